"""AMQP awareness with real RabbitMQ nodes and real clients (pika, aio-pika):
identities (over plain AMQP and AMQPS), refusals, connection limits answered with 530."""

from __future__ import annotations

import asyncio
import time
import dataclasses
import json
import ssl
import uuid

import aio_pika
import pika
import pytest
import structlog
import trio

from lab import wait_until
from proxy.app import App
from proxy.config.model import BindAddress, BindTls, ConnectionLimits, FrontendMode, LimitAction, Stats, TlsVerify
from proxy.stats_ui.control import ControlService
from proxy.stats_ui.service import StatsService
from tests.integration.test_stats_ctl import ctl
from tests.integration.test_stats_http import CREDENTIALS, http
from tests.proxyutil import (
    front,
    kernel_availability,
    make_config,
    on_the_kernel_path,
    server,
    start_warren,
    use_service,
)

pytestmark = pytest.mark.rabbit
PASSWORD = "Pw-" + uuid.uuid4().hex  # appears nowhere but in the broker and the clients


@pytest.fixture
def accounts(healthy_cluster):
    """Two users and two vhosts made for this test (removed afterwards)."""
    node = healthy_cluster.nodes[0]
    tag = uuid.uuid4().hex[:8]
    users, vhosts = [f"alice-{tag}", f"bob-{tag}"], [f"/orders-{tag}", f"/billing-{tag}"]
    for user in users:
        node.ctl("add_user", user, PASSWORD)
    for vhost in vhosts:
        node.ctl("add_vhost", vhost)
        for user in users:
            node.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    try:
        yield users, vhosts
    finally:
        for user in users:
            node.ctl("delete_user", user)
        for vhost in vhosts:
            node.ctl("delete_vhost", vhost)


def cluster_config(nodes, limits: ConnectionLimits | None = None):
    config = make_config([server(f"n{i}", n.spec.amqp_port) for i, n in enumerate(nodes)])
    amqp = dataclasses.replace(config.frontends[0], mode=FrontendMode.AMQP)
    config = dataclasses.replace(config, frontends=(amqp,))
    if limits is not None:
        backend = dataclasses.replace(config.backends[0], limits=limits)
        config = dataclasses.replace(config, backends=(backend,))
    return config


def pika_params(address, user, vhost, name, password=PASSWORD, heartbeat=20, tls=None):
    return pika.ConnectionParameters(
        host=address[0], port=address[1], virtual_host=vhost, heartbeat=heartbeat,
        credentials=pika.PlainCredentials(user, password), client_properties={"connection_name": name},
        connection_attempts=1, socket_timeout=10,
        ssl_options=None if tls is None else pika.SSLOptions(tls, server_hostname="localhost"),
    )


def closed_lines(logs):
    return [line for line in logs if line["event"] == "connection.closed"]


async def wait_closed(logs, count, timeout=30):
    with trio.fail_after(timeout):
        while len(closed_lines(logs)) < count:
            await trio.sleep(0.02)
    return closed_lines(logs)


def run_aio_pika(address, user, vhost, name, tls=None):
    async def main():
        scheme = "amqp" if tls is None else "amqps"
        url = f"{scheme}://{user}:{PASSWORD}@{address[0]}:{address[1]}/{vhost.replace('/', '%2F')}?heartbeat=15"
        connection = await aio_pika.connect(url, client_properties={"connection_name": name}, ssl_context=tls)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(exclusive=True)

    asyncio.run(main())


async def test_pika_and_aio_pika_connections_are_known_by_name_user_vhost_and_heartbeat(healthy_cluster, accounts):
    (alice, bob), (orders, billing) = accounts
    with structlog.testing.capture_logs() as logs, trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, cluster_config(healthy_cluster.nodes))
            address = front(app)

            def pika_session():
                connection = pika.BlockingConnection(pika_params(address, alice, orders, "orders-consumer"))
                connection.channel().queue_declare("", exclusive=True)
                connection.close()

            await trio.to_thread.run_sync(pika_session)
            await trio.to_thread.run_sync(run_aio_pika, address, bob, billing, "billing-publisher")
            lines = await wait_closed(logs, 2)
            nursery.cancel_scope.cancel()
    by_name = {line["amqp_name"]: line for line in lines}
    assert (by_name["orders-consumer"]["amqp_user"], by_name["orders-consumer"]["amqp_vhost"]) == (alice, orders)
    assert by_name["orders-consumer"]["amqp_heartbeat"] == 20
    assert (by_name["billing-publisher"]["amqp_user"], by_name["billing-publisher"]["amqp_vhost"]) == (bob, billing)
    assert by_name["billing-publisher"]["amqp_heartbeat"] == 15
    # A clean AMQP close is "--" even though RabbitMQ resets its sockets.
    assert [line["termination"] for line in lines] == ["--", "--"]
    assert PASSWORD not in json.dumps(logs, default=str)


async def test_amqps_connections_are_known_by_name_user_vhost_heartbeat_and_client_certificate(
        healthy_cluster, accounts, pki):
    """Over AMQPS the tap reads the decrypted handshake: the same identity as in
    plain AMQP, with the TLS version and the client certificate's CN beside it."""
    (alice, bob), (orders, billing) = accounts
    config = cluster_config(healthy_cluster.nodes)
    tls = BindTls(crt=(pki.server.pem,), ca_file=pki.ca.cert_path, verify=TlsVerify.OPTIONAL)
    config = dataclasses.replace(config, frontends=(dataclasses.replace(config.frontends[0], tls=tls),))
    anonymous = ssl.create_default_context(cafile=pki.ca.cert_path)
    with_certificate = ssl.create_default_context(cafile=pki.ca.cert_path)
    with_certificate.load_cert_chain(pki.client.pem)
    with structlog.testing.capture_logs() as logs, trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, config)
            address = front(app)

            def pika_session():
                params = pika_params(address, alice, orders, "orders-consumer", tls=with_certificate)
                connection = pika.BlockingConnection(params)
                connection.channel().queue_declare("", exclusive=True)
                connection.close()

            await trio.to_thread.run_sync(pika_session)
            await trio.to_thread.run_sync(run_aio_pika, address, bob, billing, "billing-publisher", anonymous)
            lines = await wait_closed(logs, 2)
            nursery.cancel_scope.cancel()
    by_name = {line["amqp_name"]: line for line in lines}
    consumer, publisher = by_name["orders-consumer"], by_name["billing-publisher"]
    assert (consumer["amqp_user"], consumer["amqp_vhost"], consumer["amqp_heartbeat"]) == (alice, orders, 20)
    assert (publisher["amqp_user"], publisher["amqp_vhost"], publisher["amqp_heartbeat"]) == (bob, billing, 15)
    assert consumer["client_cn"] == "app-publisher" and "client_cn" not in publisher
    assert {line["tls_version"] for line in lines} <= {"TLSv1.2", "TLSv1.3"}
    assert [line["termination"] for line in lines] == ["--", "--"]
    assert PASSWORD not in json.dumps(logs, default=str)


async def test_a_wrong_password_is_refused_by_broker_access_refused(healthy_cluster, accounts):
    (alice, _), (orders, _) = accounts
    wrong = "wrong-" + PASSWORD
    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, cluster_config(healthy_cluster.nodes))

            def attempt():
                with pytest.raises(pika.exceptions.ProbableAuthenticationError):
                    pika.BlockingConnection(pika_params(front(app), alice, orders, "bad-login", password=wrong))

            await trio.to_thread.run_sync(attempt)
            (line,) = await wait_closed(logs, 1)
            nursery.cancel_scope.cancel()
    assert line["termination"] == "SR"
    assert line["reason"] == "refused by broker: ACCESS_REFUSED"
    assert line["amqp_user"] == alice
    assert wrong not in json.dumps(logs, default=str)


async def test_a_vhost_limit_answers_530_that_the_client_library_reports(healthy_cluster, accounts):
    (alice, bob), (orders, billing) = accounts
    limits = ConnectionLimits(vhosts=((orders, 1),))
    node = healthy_cluster.nodes[0]
    log_mark = [n.log_size() for n in healthy_cluster.nodes]
    with structlog.testing.capture_logs() as logs, trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, cluster_config(healthy_cluster.nodes, limits))
            address = front(app)
            first = await trio.to_thread.run_sync(
                pika.BlockingConnection, pika_params(address, alice, orders, "first"))

            def second():
                # pika reports a Close at Connection.Open as a probable access denial.
                with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as refused:
                    pika.BlockingConnection(pika_params(address, bob, orders, "second"))
                return str(refused.value)

            text = f"warren: connection limit for vhost {orders} reached (1)"
            assert f"ConnectionClosedByBroker: (530) '{text}'" in await trio.to_thread.run_sync(second)
            # Another vhost is not limited.
            other = await trio.to_thread.run_sync(
                pika.BlockingConnection, pika_params(address, bob, billing, "other"))
            await trio.to_thread.run_sync(other.close)
            (line, _) = await wait_closed(logs, 2)
            assert (line["termination"], line["amqp_vhost"]) == ("PR", orders)
            assert line["reason"] == text
            assert app.runtime.backends["be"].amqp_counts.hits["vhost"] == 1
            assert dict(app.runtime.backends["be"].amqp_counts.vhosts) == {orders: 1}
            await trio.to_thread.run_sync(first.close)
            nursery.cancel_scope.cancel()
    # The broker saw a clean open and close for the refused one: no warning, no error.
    for mark, each in zip(log_mark, healthy_cluster.nodes):
        assert each.log_warnings(since=mark) == []
    assert node.is_serving()


async def test_a_user_limit_in_alarm_mode_counts_and_lets_in(healthy_cluster, accounts):
    (alice, _), (orders, billing) = accounts
    limits = ConnectionLimits(per_user=1, action=LimitAction.ALARM)
    with structlog.testing.capture_logs() as logs, trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, cluster_config(healthy_cluster.nodes, limits))
            address = front(app)
            connections = [
                await trio.to_thread.run_sync(pika.BlockingConnection, pika_params(address, alice, vhost, vhost))
                for vhost in (orders, billing)
            ]
            counts = app.runtime.backends["be"].amqp_counts
            assert counts.users[alice] == 2 and counts.hits["user"] == 1
            alarms = [line for line in logs if line["event"] == "amqp.limit_reached"]
            assert [(a["kind"], a["name"], a["action"]) for a in alarms] == [("user", alice, "alarm")]
            for connection in connections:
                await trio.to_thread.run_sync(connection.close)
            await wait_closed(logs, 2)
            assert not counts.users
            nursery.cancel_scope.cancel()


async def test_the_page_json_ctl_and_metrics_show_who_is_connected_and_never_the_password(
        healthy_cluster, accounts, tmp_path):
    (alice, bob), (orders, billing) = accounts
    config = cluster_config(healthy_cluster.nodes)
    stats = Stats(binds=(BindAddress("127.0.0.1", 0),), users=(CREDENTIALS,), admin=True)
    config = dataclasses.replace(config, stats=stats, global_=dataclasses.replace(
        config.global_, control_socket=str(tmp_path / "ctl.sock")))
    with structlog.testing.capture_logs() as logs, trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            app = App(config, handle_signals=False)
            service = StatsService(config, sample_interval=0.2)
            use_service(app, service)
            use_service(app, ControlService(config))
            await nursery.start(app.serve)
            address = front(app)
            held = [
                await trio.to_thread.run_sync(pika.BlockingConnection, pika_params(address, user, vhost, name, heartbeat=hb))
                for user, vhost, name, hb in ((alice, orders, "orders-consumer", 30), (bob, billing, "billing-api", 45))
            ]
            page = service.addresses[0]
            outputs = {
                "page": (await http(page, "/")).text,
                "connections": (await http(page, "/;connections?sort=name&order=asc")).text,
                "json": (await http(page, "/;connections.json?backend=be")).text,
                "stats-json": (await http(page, "/;json")).text,
                "csv": (await http(page, "/;csv")).text,
                "metrics": (await http(page, "/metrics")).text,
                "ctl": (await ctl(tmp_path / "ctl.sock", "show", "sessions", "be"))[1],
            }
            rows = {row["amqp"]["name"]: row for row in json.loads(outputs["json"])["connections"]}
            assert rows["orders-consumer"]["amqp"] | {"version": None} == {
                "phase": "open", "name": "orders-consumer", "product": "Pika Python Client Library",
                "version": None, "user": alice, "vhost": orders, "heartbeat": 30}
            assert (rows["billing-api"]["amqp"]["user"], rows["billing-api"]["amqp"]["heartbeat"]) == (bob, 45)
            assert "orders-consumer" in outputs["connections"] and billing in outputs["connections"]
            assert f'warren_amqp_vhost_connections{{proxy="be",vhost="{orders}"}} 1' in outputs["metrics"]
            assert f'warren_amqp_user_connections{{proxy="be",user="{bob}"}} 1' in outputs["metrics"]
            ctl_lines = [line for line in outputs["ctl"].splitlines() if not line.startswith("#") and line]
            assert len(ctl_lines) == 2
            assert any(f" orders-consumer {alice} {orders} 30" in line for line in ctl_lines)
            for connection in held:
                await trio.to_thread.run_sync(connection.close)
            await wait_closed(logs, 2)
            nursery.cancel_scope.cancel()
    for name, text in outputs.items():
        assert PASSWORD not in text, name
    assert PASSWORD not in json.dumps(logs, default=str)


@pytest.mark.skipif(not kernel_availability().available, reason="the kernel relay path is unavailable here")
async def test_a_publisher_with_confirms_moves_to_the_kernel_path_after_its_handshake_and_loses_nothing(
        healthy_cluster, accounts):
    """On the kernel path with its defaults: once the handshake is over and the
    connection proved long-lived (kernel_after quiet rounds), the kernel relays it; it is still
    known by name, counted whole, and its clean close is still "--"."""
    (alice, _), (orders, _) = accounts
    queue, batch = f"kernel-{uuid.uuid4().hex[:8]}", 200
    with structlog.testing.capture_logs() as logs, trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, on_the_kernel_path(cluster_config(healthy_cluster.nodes[:1])))
            assert app.relay.path == "kernel"
            address = front(app)

            def open_publisher():
                connection = pika.BlockingConnection(pika_params(address, alice, orders, "kernel-publisher"))
                channel = connection.channel()
                channel.confirm_delivery()
                channel.queue_declare(queue, durable=True)
                return connection, channel

            def publish(channel, first):
                for number in range(first, first + batch):  # each waits for its confirm: raises if nacked
                    channel.basic_publish("", queue, b"%d:" % number + b"x" * 1000,
                                          pika.BasicProperties(delivery_mode=2), mandatory=True)

            connection, channel = await trio.to_thread.run_sync(open_publisher)
            await trio.to_thread.run_sync(publish, channel, 0)
            assert app.relay.sockmap.pairs == 1  # in the map, its handshake seen in user space
            (row,) = app.runtime.connection_stats()
            assert (row.name, row.user, row.vhost, row.phase) == ("kernel-publisher", alice, orders, "open")
            before = row.bytes_in
            await trio.to_thread.run_sync(publish, channel, batch)  # on the kernel path
            (row,) = app.runtime.connection_stats()
            assert row.bytes_in >= before + batch * 1000  # counted by the kernel
            await trio.to_thread.run_sync(connection.close)
            (line,) = await wait_closed(logs, 1)
            assert app.relay.sockmap.pairs == 0

            def drain():
                received = []
                with pika.BlockingConnection(pika_params(address, alice, orders, "kernel-consumer")) as consumer:
                    consuming = consumer.channel()
                    while (message := consuming.basic_get(queue, auto_ack=True))[0] is not None:
                        received.append(int(message[2].split(b":")[0]))
                    consuming.queue_delete(queue)
                return received

            received = await trio.to_thread.run_sync(drain)
            nursery.cancel_scope.cancel()
    assert sorted(received) == list(range(2 * batch))  # every confirmed message, once
    assert (line["amqp_name"], line["termination"]) == ("kernel-publisher", "--")
    assert line["bytes_in"] >= 2 * batch * 1000 and "reason" not in line


# -- rebalancing after a broker returns ---------------------------------------------------

CLIENTS = 300
PUBLISHERS = 3


async def _storm_and_publish(address, queue, stop: asyncio.Event, ready: asyncio.Event, confirmed: set, counts):
    """CLIENTS idle robust connections and PUBLISHERS publishers with confirms, all reconnecting by themselves."""
    url = f"amqp://guest:guest@{address[0]}:{address[1]}/?heartbeat=10"
    limit = asyncio.Semaphore(50)

    async def connect():
        while not stop.is_set():  # a first connect that fails on a busy machine is tried again
            try:
                async with limit:
                    return await aio_pika.connect_robust(url, reconnect_interval=0.3, timeout=30)
            except Exception:
                counts["connect_retries"] = counts.get("connect_retries", 0) + 1
                await asyncio.sleep(0.5)

    async def publisher(index):
        connection = await connect()
        if connection is None:
            return
        serial = 0
        async with connection:
            while not stop.is_set():
                body = f"{index}-{serial}"
                try:
                    channel = await connection.channel(publisher_confirms=True)
                    while not stop.is_set():
                        body = f"{index}-{serial}"
                        await channel.default_exchange.publish(
                            aio_pika.Message(body.encode(), delivery_mode=2), queue, timeout=10)
                        confirmed.add(body)  # the broker confirmed it: it must be in the queue
                        serial += 1
                        await asyncio.sleep(0.01)
                except Exception:  # connection lost mid-publish: not confirmed, publish it again
                    counts["publish_retries"] += 1
                    await asyncio.sleep(0.3)

    clients = await asyncio.gather(*(connect() for _ in range(CLIENTS)))
    publishers = [asyncio.create_task(publisher(i)) for i in range(PUBLISHERS)]
    ready.set()
    await stop.wait()
    await asyncio.gather(*publishers, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in clients if c is not None), return_exceptions=True)


def _drain_queue(address, queue) -> set:
    connection = pika.BlockingConnection(pika.ConnectionParameters(host=address[0], port=address[1]))
    try:
        channel = connection.channel()
        received = set()
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return received
            received.add(body.decode())
    finally:
        connection.close()


async def test_rebalancing_after_a_broker_returns_spreads_at_a_bounded_rate_and_loses_no_confirmed_message(
        healthy_cluster):
    from proxy.amqp.rebalance import is_balanced, shares
    from proxy.amqp.rebalancer import loads
    from proxy.config.model import Balance, CheckKind, Health, InitState, Rebalance

    nodes = healthy_cluster.nodes
    rate, tolerance = 20.0, 0.15
    config = cluster_config(nodes)
    # TCP checks mark the stopped broker down quickly, so reconnections stop trying it.
    health = Health(kinds=(CheckKind.TCP,), inter=0.5, rise=1, fall=1, timeout=0.5, init_state=InitState.UP)
    backend = dataclasses.replace(config.backends[0], balance=Balance.LEASTCONN, health=health,
                                  rebalance=Rebalance(tolerance=tolerance, rate=rate, min_age=0, interval=0.25))
    config = dataclasses.replace(config, backends=(backend,))
    queue = f"warren-rebalance-{uuid.uuid4().hex[:8]}"
    admin = pika.BlockingConnection(pika.ConnectionParameters(port=nodes[0].spec.amqp_port))
    admin.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    admin.close()
    confirmed: set[str] = set()
    counts = {"publish_retries": 0}
    samples: list[tuple[float, int]] = []
    loop_box: dict = {}

    def stop_clients() -> None:
        loop_box["stopping"] = True  # read by a client loop that is only starting
        if "loop" in loop_box and not loop_box["loop"].is_closed():
            try:
                loop_box["loop"].call_soon_threadsafe(loop_box["stop"].set)
            except RuntimeError:  # it closed meanwhile: nothing left to stop
                pass

    def in_thread(fn):  # a worker thread a failing test does not wait for
        return trio.to_thread.run_sync(fn, abandon_on_cancel=True)

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, config)
            address = front(app)
            runtime_backend = app.runtime.backends["be"]

            def run_clients():
                async def main():
                    loop_box["stop"], loop_box["ready"] = asyncio.Event(), asyncio.Event()
                    loop_box["loop"] = asyncio.get_running_loop()
                    if loop_box.get("stopping"):
                        return
                    await _storm_and_publish(address, queue, loop_box["stop"], loop_box["ready"], confirmed, counts)
                asyncio.run(main())

            nursery.start_soon(in_thread, run_clients)

            def spread():
                return [len(s.connections) for s in runtime_backend.servers.values()]

            try:
                await wait_until(lambda: sum(spread()) >= CLIENTS + PUBLISHERS, timeout=90, interval=0.1)
                await in_thread(nodes[2].stop)  # its clients reconnect to the others
                await wait_until(lambda: spread()[2] == 0 and sum(spread()) >= CLIENTS + PUBLISHERS, timeout=60,
                                 interval=0.1)

                async def sample_closes():
                    while True:
                        state = runtime_backend.rebalance
                        samples.append((trio.current_time(), state.closed if state else 0))
                        await trio.sleep(0.05)

                nursery.start_soon(sample_closes)
                await in_thread(nodes[2].start)
                await in_thread(nodes[2].wait_ready)
                returned = trio.current_time()

                def balanced():
                    now = time.monotonic()
                    current = loads(runtime_backend, now)
                    targets = shares(current)
                    counted = {s.name: len(s.connections) for s in current}
                    return sum(counted.values()) >= CLIENTS + PUBLISHERS and is_balanced(counted, targets, tolerance)

                await wait_until(lambda: balanced() and spread()[2] > 0, timeout=90, interval=0.1)
                took = trio.current_time() - returned
                final = spread()
                stop_clients()
                await wait_until(lambda: sum(spread()) == 0, timeout=60, interval=0.1)
            finally:
                stop_clients()  # whatever happened: the client thread must end
            nursery.cancel_scope.cancel()
    received = await trio.to_thread.run_sync(_drain_queue, (address[0], nodes[0].spec.amqp_port), queue)
    assert confirmed, "the publishers confirmed nothing"
    assert confirmed <= received, f"{len(confirmed - received)} confirmed message(s) lost"
    share = (CLIENTS + PUBLISHERS) / 3
    assert all(count <= share + max(1, tolerance * share) for count in final), final
    # The close rate never exceeded the limit: burst (rate) + rate per second, over any span.
    for i, (t1, c1) in enumerate(samples):
        for t2, c2 in samples[i + 1 :]:
            assert c2 - c1 <= rate + rate * (t2 - t1) + 1, (t1, t2, c1, c2)
    assert samples[-1][1] > 0 and took < 120
