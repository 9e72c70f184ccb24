"""TLS against real RabbitMQ nodes that listen on TLS only (AMQPS and management over HTTPS).

The nodes are started by the harness with the test PKI's certificates
(tests/tlsca.py); Warren checks them the way clients reach them, and a
certificate problem shows as its own check result, never as a timeout.
"""

from __future__ import annotations

import ssl

import pytest
import trio

from proxy.config.model import CheckKind, Health, HttpCheck, InitState, ServerTls
from proxy.devcluster import NodeTls
from proxy.health.results import CheckCode
from tests.polling import wait_until
from tests.proxyutil import make_config, server, start_warren

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
            await wait_until(lambda: broker.up and broker.watching, 30, "the TLS broker UP and watched")
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
            await wait_until(lambda: broker.last_check is not None, 30, "a first check")
            assert not broker.up
            assert broker.last_check.code is CheckCode.L6RSP
            assert broker.last_check.description == description
            assert f"L6RSP in" in broker.last_check.short()
            nursery.cancel_scope.cancel()


async def test_a_plaintext_check_against_a_tls_port_is_not_a_timeout(tls_node):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            config = make_config([server("tls-a", tls_node.spec.amqp_port)],
                                 health=Health(kinds=(CheckKind.AMQP,), inter=0.3, rise=1, fall=1, timeout=3.0))
            app = await start_warren(nursery, config)
            broker = app.runtime.server("be", "tls-a")
            await wait_until(lambda: broker.last_check is not None, 30, "a first check")
            assert broker.last_check.code is not CheckCode.L6TOUT, broker.last_check
            nursery.cancel_scope.cancel()
