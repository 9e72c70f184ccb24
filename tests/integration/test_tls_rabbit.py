"""TLS with real RabbitMQ nodes and real clients (pika, aio-pika).

AMQPS clients through Warren to the plaintext session cluster, and to a node
the harness starts with TLS-only listeners (AMQPS and management over HTTPS,
the test PKI's certificates from tests/tlsca.py). Warren checks TLS brokers
the way clients reach them; a certificate problem shows as its own check
result, never as a timeout, and keeps clients away from that broker.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from dataclasses import replace

import pika
import pytest
import trio

from proxy.config.model import BindTls, CheckKind, Health, HttpCheck, InitState, ServerTls
from proxy.devcluster import NodeTls
from proxy.health.results import CheckCode
from tests.amqputil import round_trip
from lab import wait_until
from tests.proxyutil import front, make_config, server, start_warren

pytestmark = pytest.mark.rabbit


@pytest.fixture(scope="module")
def tls_node(pki, request):
    """One TLS-only broker (AMQPS + HTTPS management) shared by this module's tests."""
    from tests.rabbit import NodeFactory, skip_without_rabbitmq

    skip_without_rabbitmq()
    factory = NodeFactory()
    try:
        yield factory(mgmt=True, tls=NodeTls(pki.ca.cert_path, pki.server.cert, pki.server.key))
    finally:
        factory.close()


def checked(node, tls: ServerTls, kinds=(CheckKind.AMQP, CheckKind.HTTP, CheckKind.WATCH), name="tls-a"):
    health = Health(kinds=kinds, inter=0.3, rise=1, fall=1, timeout=3.0, init_state=InitState.DOWN,
                    http=HttpCheck(port=node.spec.mgmt_port))
    return make_config([server(name, node.spec.amqp_port, tls=tls)], health=health)


async def test_a_tls_only_broker_is_checked_over_amqps_and_https(tls_node, pki):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, checked(tls_node, ServerTls(ca_file=pki.ca.cert_path)))
            broker = app.runtime.server("be", "tls-a")
            await wait_until(lambda: broker.up and broker.watching, timeout=30, what="the TLS broker UP and watched")
            assert broker.last_check.code is CheckCode.L7OK
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "tls, description",
    [
        (dict(sni="wrong.example"), "certificate verify failed: hostname mismatch"),
        (dict(), "certificate verify failed: self-signed certificate in certificate chain"),  # system CAs only
    ],
)
async def test_a_broker_whose_certificate_fails_verification_is_down_with_the_reason(tls_node, pki, tls, description):
    settings = ServerTls(ca_file=pki.ca.cert_path, **tls) if tls else ServerTls()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, checked(tls_node, settings, kinds=(CheckKind.AMQP,)))
            broker = app.runtime.server("be", "tls-a")
            await wait_until(lambda: broker.last_check is not None, timeout=30, what="a first check")
            assert not broker.up
            assert broker.last_check.code is CheckCode.L6RSP
            assert broker.last_check.description == description
            assert "L6RSP in" in broker.last_check.short()
            nursery.cancel_scope.cancel()


async def test_a_plaintext_check_against_a_tls_port_is_not_a_timeout(tls_node):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            config = make_config([server("tls-a", tls_node.spec.amqp_port)],
                                 health=Health(kinds=(CheckKind.AMQP,), inter=0.3, rise=1, fall=1, timeout=3.0))
            app = await start_warren(nursery, config)
            broker = app.runtime.server("be", "tls-a")
            await wait_until(lambda: broker.last_check is not None, timeout=30, what="a first check")
            assert broker.last_check.code is not CheckCode.L6TOUT, broker.last_check
            nursery.cancel_scope.cancel()


def trusting(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki.ca.cert_path)


async def aio_pika_round_trip(address, pki, body: bytes) -> bytes:
    import aio_pika

    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    context.check_hostname = False  # aio-pika sends the IP as the name; the CA is still checked
    connection = await aio_pika.connect(host=address[0], port=address[1], ssl=True, ssl_context=context,
                                        timeout=20)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"warren-tls-{uuid.uuid4().hex}", auto_delete=True)
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
        message = await queue.get(timeout=20, fail=True)
        await message.ack()
        return message.body


def amqps_frontend(config, pki):
    return replace(config, frontends=(replace(config.frontends[0], tls=BindTls(crt=(pki.server.pem,))),))


async def test_pika_and_aio_pika_over_tls_through_warren_to_plaintext_brokers(healthy_cluster, pki):
    nodes = healthy_cluster.nodes
    config = amqps_frontend(make_config([server(f"n{i}", n.spec.amqp_port) for i, n in enumerate(nodes)]), pki)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, config)
            body = b"over AMQPS " * 1000
            assert await trio.to_thread.run_sync(round_trip, front(app), body, None, trusting(pki)) == body
            got = await trio.to_thread.run_sync(lambda: asyncio.run(aio_pika_round_trip(front(app), pki, body)))
            assert got == body
            assert app.runtime.statistics().frontends[0].tls.handshakes == 2
            nursery.cancel_scope.cancel()


async def test_amqps_clients_through_warren_to_a_tls_only_broker(tls_node, pki):
    config = amqps_frontend(checked(tls_node, ServerTls(ca_file=pki.ca.cert_path, sni="localhost")), pki)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, config)
            broker = app.runtime.server("be", "tls-a")
            await wait_until(lambda: broker.up, timeout=30, what="the TLS broker UP")
            body = b"encrypted twice " * 500
            assert await trio.to_thread.run_sync(round_trip, front(app), body, None, trusting(pki)) == body
            got = await trio.to_thread.run_sync(lambda: asyncio.run(aio_pika_round_trip(front(app), pki, body)))
            assert got == body
            nursery.cancel_scope.cancel()


async def test_no_client_traffic_reaches_a_broker_that_fails_verification(tls_node, pki):
    config = checked(tls_node, ServerTls(ca_file=pki.ca.cert_path, sni="wrong.example"), kinds=(CheckKind.AMQP,))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, config)
            broker = app.runtime.server("be", "tls-a")
            await wait_until(lambda: broker.last_check is not None, timeout=30, what="a first check")
            assert not broker.up and broker.last_check.description.endswith("hostname mismatch")
            with pytest.raises(pika.exceptions.AMQPConnectionError):
                await trio.to_thread.run_sync(
                    lambda: pika.BlockingConnection(pika.ConnectionParameters(*front(app), connection_attempts=1,
                                                                              socket_timeout=5)))
            assert broker.total_sessions == 0
            assert app.runtime.backends["be"].no_server >= 1
            connections = await trio.to_thread.run_sync(tls_node.connections)
            assert connections == []
            nursery.cancel_scope.cancel()
