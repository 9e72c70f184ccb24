"""Real RabbitMQ nodes and real AMQP clients through Warren.

pika's blocking client runs in worker threads (trio.to_thread) so the
in-process Warren keeps serving; aio-pika runs in its own asyncio loop in a
thread for the 1,000-connection test.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import uuid
from collections import Counter

import pika
import pytest
import trio

from proxy.config.model import SendProxy
from tests.amqputil import pika_connect, round_trip
from tests.proxyutil import front, make_config, server, start_warren
from tests.warrenproc import WarrenProcess, json_global, write

pytestmark = pytest.mark.rabbit


def in_thread(fn, *args):
    return trio.to_thread.run_sync(fn, *args)


def per_node(nodes) -> list[int]:
    """Client connections each node holds (list_connections is cluster-wide)."""
    ports = Counter(c["port"] for c in nodes[0].connections())
    return [ports[n.spec.amqp_port] for n in nodes]


def cluster_config(nodes, **kw):
    return make_config([server(f"n{i}", n.spec.amqp_port) for i, n in enumerate(nodes)], **kw)


async def test_publish_and_consume_through_warren(healthy_cluster):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, cluster_config(healthy_cluster))
            assert await in_thread(round_trip, front(app), b"hello broker") == b"hello broker"
            nursery.cancel_scope.cancel()


async def test_connections_spread_by_weight_as_brokers_see_them(healthy_cluster):
    nodes = list(healthy_cluster)
    servers = [server(f"n{i}", n.spec.amqp_port, weight=w) for i, (n, w) in enumerate(zip(nodes, (1, 2, 3)))]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, make_config(servers))
            before = await in_thread(per_node, nodes)
            held = [await in_thread(pika_connect, front(app)) for _ in range(12)]
            try:
                after = await in_thread(per_node, nodes)
                assert [a - b for a, b in zip(after, before)] == [2, 4, 6]
            finally:
                for connection in held:
                    await in_thread(connection.close)
            nursery.cancel_scope.cancel()


async def test_stopped_broker_costs_new_clients_nothing(healthy_cluster):
    nodes = list(healthy_cluster)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, cluster_config(nodes, retries=2))
            await in_thread(nodes[2].stop)
            for _ in range(9):  # no health checks here: retries + redispatch do it
                assert await in_thread(round_trip, front(app), b"x") == b"x"
            dead = app.runtime.server("be", "n2")
            assert dead.connect_errors >= 3 and dead.redispatches >= 1
            nursery.cancel_scope.cancel()


async def test_64_mb_message_passes_intact(healthy_cluster):
    body = hashlib.sha256(b"seed").digest() * (2 * 1024 * 1024)  # 64 MiB
    assert len(body) == 64 * 1024 * 1024
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, cluster_config(healthy_cluster))
            received = await in_thread(round_trip, front(app), body)
            assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()
            stats = app.runtime.statistics().backends[0]
            assert stats.bytes_in > len(body) and stats.bytes_out > len(body)
            nursery.cancel_scope.cancel()


async def _thousand_clients(address, count: int) -> int:
    import aio_pika

    queue_name = f"warren-many-{uuid.uuid4().hex}"
    limit = asyncio.Semaphore(100)

    async def open_one():
        async with limit:
            return await aio_pika.connect(host=address[0], port=address[1], timeout=30)

    connections = await asyncio.gather(*(open_one() for _ in range(count)))
    try:
        first = await connections[0].channel()
        queue = await first.declare_queue(queue_name, auto_delete=False)

        async def publish(connection, i):
            async with limit:
                channel = await connection.channel()
                await channel.default_exchange.publish(aio_pika.Message(str(i).encode()), queue_name)
                await channel.close()

        await asyncio.gather(*(publish(c, i) for i, c in enumerate(connections)))
        seen = set()
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                seen.add(int(message.body))
                if len(seen) == count:
                    break
        await queue.delete(if_unused=False, if_empty=False)
        return len(seen)
    finally:
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)


async def test_a_thousand_concurrent_amqp_connections(healthy_cluster):
    count = 1000
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, cluster_config(healthy_cluster))
            peak = 0

            async def watch_peak():
                nonlocal peak
                while True:
                    peak = max(peak, app.runtime.statistics().frontends[0].current_sessions)
                    await trio.sleep(0.05)

            nursery.start_soon(watch_peak)
            delivered = await in_thread(lambda: asyncio.run(_thousand_clients(front(app), count)))
            assert delivered == count
            assert peak >= count
            per_server = [s.total_sessions for s in app.runtime.statistics().backends[0].servers]
            assert all(abs(n - count / 3) < count * 0.05 for n in per_server), per_server
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("version", [SendProxy.V1, SendProxy.V2])
async def test_proxy_protocol_broker_sees_real_client_addresses(rabbit_node_factory, version):
    node = await in_thread(lambda: rabbit_node_factory(proxy_protocol=True))
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            config = make_config([server("pp", node.spec.amqp_port, send_proxy=version)])
            app = await start_warren(nursery, config)
            clients = [await in_thread(pika_connect, front(app)) for _ in range(3)]
            try:
                local = {c._impl._transport._sock.getsockname()[:2] for c in clients}
                seen = {(c["peer_host"], c["peer_port"]) for c in await in_thread(node.connections)}
                assert seen == local
            finally:
                for c in clients:
                    await in_thread(c.close)
            nursery.cancel_scope.cancel()


def _proc_config(nodes, grace="30s"):
    servers = "".join(
        f'\n[[backends.be.servers]]\nname = "n{i}"\naddress = "127.0.0.1"\nport = {n.spec.amqp_port}\n'
        for i, n in nodes
    )
    return json_global(f'grace = "{grace}"') + (
        '[frontends.fe]\nbind = "127.0.0.1:0"\nbackend = "be"\n[backends.be]\n' + servers
    )


async def test_sighup_adds_and_removes_a_broker_while_clients_stay(healthy_cluster, tmp_path):
    nodes = list(healthy_cluster)
    path = write(tmp_path / "w.toml", _proc_config([(0, nodes[0]), (1, nodes[1])]))
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery, WarrenProcess(path) as warren:
            await warren.start(nursery)
            address = warren.front("fe")
            held = [await in_thread(pika_connect, address) for _ in range(4)]
            write(path, _proc_config([(1, nodes[1]), (2, nodes[2])]))
            baseline = await in_thread(per_node, nodes)
            warren.signal(signal.SIGHUP)
            event = await warren.wait_for("config.reloaded")
            assert event["servers_added"] == ["be/n2"] and event["servers_removed"] == ["be/n0"]
            fresh = [await in_thread(pika_connect, address) for _ in range(4)]
            now = await in_thread(per_node, nodes)
            assert now[0] == baseline[0] and now[2] - baseline[2] == 2 and now[1] - baseline[1] == 2
            for connection in held:  # established connections survived, also those on n0
                channel = await in_thread(connection.channel)
                await in_thread(channel.queue_declare, "", False, False, True, True)
            for connection in held + fresh:
                await in_thread(connection.close)
            assert await warren.stop() == 0
            nursery.cancel_scope.cancel()


async def test_sigterm_drains_amqp_clients(healthy_cluster, tmp_path):
    nodes = list(healthy_cluster)
    path = write(tmp_path / "w.toml", _proc_config(list(enumerate(nodes))))
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, WarrenProcess(path) as warren:
            await warren.start(nursery)
            address = warren.front("fe")
            connection = await in_thread(pika_connect, address)
            channel = await in_thread(connection.channel)
            warren.signal(signal.SIGTERM)
            await warren.wait_for("warren.stopping", live_connections=1)
            with pytest.raises(pika.exceptions.AMQPConnectionError):
                await in_thread(pika_connect, address)
            await in_thread(channel.queue_declare, "", False, False, True, True)  # still served
            await in_thread(connection.close)
            assert await warren.process.wait() == 0
            closed = [e for e in warren.events if e["event"] == "connection.closed"]
            # Served to its end, not killed: RabbitMQ closes sockets with a reset
            # (linger 0), so a normal AMQP close can log SD (docs/operations.md).
            assert len(closed) == 1 and closed[0]["termination"] in {"--", "SD"}
            nursery.cancel_scope.cancel()
