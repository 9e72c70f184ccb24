"""Health checks against real RabbitMQ nodes: each way a broker fails.

Warren runs in-process so tests read the runtime model directly. Timing
bounds here are generous correctness bounds (a dead broker is noticed at all,
and by the watch rather than by `fall` periodic failures); the detection
times themselves are measured in bench/, side by side with HAProxy.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pika
import pytest
import structlog
import trio

from lab import wait_until
from proxy.config.model import AmqpCheck, CheckKind, Health, HttpCheck, OnMarkedDown
from tests.integration.test_rabbit_proxy import in_thread, pika_connect
from tests.proxyutil import front, make_config, server, start_warren

pytestmark = pytest.mark.rabbit

WATCHED = Health(
    kinds=(CheckKind.AMQP, CheckKind.WATCH), inter=1.0, rise=2, fall=3, timeout=1.0,
    amqp=AmqpCheck(heartbeat=1.0), on_marked_down=OnMarkedDown.SHUTDOWN_SESSIONS,
)


def health_config(nodes, health=WATCHED, **kw):
    servers = [server(f"n{i}", n.spec.amqp_port, **kw) for i, n in enumerate(nodes)]
    return make_config(servers, health=health, retries=1)


def all_up(app) -> bool:
    """Every server UP and, where configured, its watch connection open."""
    watch = CheckKind.WATCH in app.config.backends[0].health.kinds
    return all(s.up and (s.watching or not watch) for s in app.runtime.servers())


@pytest.mark.parametrize("failure", ["kill", "stop"])
async def test_dead_broker_is_marked_down_by_the_watch_at_once(healthy_cluster, failure):
    node = healthy_cluster[2]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, health_config(healthy_cluster))
            await wait_until(lambda: all_up(app), timeout=30, what="all UP")
            watched = app.runtime.server("be", "n2")
            down_before = watched.down_transitions
            broke_at = time.monotonic()
            with structlog.testing.capture_logs() as logs:
                await in_thread(getattr(node, failure))
                await wait_until(lambda: not watched.up, timeout=10, what="DOWN")
            assert watched.down_transitions == down_before + 1
            down = [e for e in logs if e["event"] == "server.down"][0]
            assert down["reason"] == "watch connection lost", down
            # SIGKILL: the broker's kernel resets the watch at once. Graceful
            # stop: Close 320, then a reset a fraction of a millisecond later
            # that may overtake it on the way up the stack.
            expected = {"kill": ("L4CON", "SOCKERR"), "stop": ("L7STS/320", "SOCKERR")}[failure]
            assert down["check"].startswith(expected), down
            # far sooner than fall x inter (3 s) plus the stop itself
            assert time.monotonic() - broke_at < 8
            assert all(s.up for s in app.runtime.servers() if s.name != "n2")
            nursery.cancel_scope.cancel()


async def test_hung_broker_is_marked_down(healthy_cluster):
    node = healthy_cluster[1]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, health_config(healthy_cluster))
            await wait_until(lambda: all_up(app), timeout=30, what="all UP")
            hung = app.runtime.server("be", "n1")
            await in_thread(node.pause)
            try:
                # heartbeats stop: the watch gives up after two intervals (2 s)
                paused = time.monotonic()
                await wait_until(lambda: not hung.up, timeout=15, what="DOWN")
                took = time.monotonic() - paused
                assert took < 8, took
                assert hung.last_check.code.name in {"L7TOUT", "L6TOUT", "L4TOUT"}
            finally:
                await in_thread(node.resume)
            nursery.cancel_scope.cancel()


async def test_restarted_broker_comes_back_through_rise(healthy_cluster):
    node = healthy_cluster[0]
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, health_config(healthy_cluster))
            await wait_until(lambda: all_up(app), timeout=30, what="all UP")
            restarted = app.runtime.server("be", "n0")
            await in_thread(node.kill)
            await wait_until(lambda: not restarted.up, timeout=10, what="DOWN")
            await in_thread(node.restart)
            await wait_until(lambda: restarted.up, timeout=30, what="UP again")
            assert restarted.status == "UP" and restarted.last_check.code.name == "L7OK"
            assert restarted.last_check.details.get("product") == "RabbitMQ"
            nursery.cancel_scope.cancel()


async def test_clients_of_a_dying_broker_reconnect_through_warren(healthy_cluster):
    nodes = list(healthy_cluster)
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, health_config(nodes))
            await wait_until(lambda: all_up(app), timeout=30, what="all UP")
            clients = [await in_thread(pika_connect, front(app)) for _ in range(6)]
            victim = app.runtime.server("be", "n1")
            on_victim = len(victim.connections)
            assert on_victim == 2
            await in_thread(nodes[1].kill)
            await wait_until(lambda: not victim.up and not victim.connections, timeout=10, what="sessions closed")
            # every client reconnects through Warren and lands on a live broker
            for client in clients:
                try:
                    await in_thread(client.close)
                except pika.exceptions.AMQPError:
                    pass
            again = [await in_thread(pika_connect, front(app)) for _ in range(6)]
            for client in again:
                channel = await in_thread(client.channel)
                await in_thread(channel.queue_declare, "", False, False, True, True)
                await in_thread(client.close)
            assert not victim.connections and victim.total_sessions == on_victim
            nursery.cancel_scope.cancel()


async def test_checks_leave_no_warnings_in_the_broker_log(healthy_cluster):
    marks = [n.log_size() for n in healthy_cluster]
    health = replace(WATCHED, inter=0.1, fastinter=0.1)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, health_config(healthy_cluster, health=health))
            await wait_until(lambda: all_up(app), timeout=30, what="all UP")
            await wait_until(
                lambda: all(s.total_checks >= 40 for s in app.runtime.servers()), timeout=60, what="40 checks each",
            )
            nursery.cancel_scope.cancel()  # closes the watch connections politely
    for node, mark in zip(healthy_cluster, marks):
        warnings = await in_thread(node.log_warnings, mark)
        assert warnings == [], warnings[:5]


async def test_memory_alarm_is_caught_by_the_http_check(rabbit_node_factory):
    node = await in_thread(lambda: rabbit_node_factory(mgmt=True))
    health = Health(
        kinds=(CheckKind.AMQP, CheckKind.HTTP), inter=0.5, rise=1, fall=1, timeout=2.0,
        http=HttpCheck(port=node.spec.mgmt_port),
    )
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, health_config([node], health=health))
            checked = app.runtime.server("be", "n0")
            await wait_until(lambda: checked.up, timeout=30, what="UP")
            await in_thread(node.ctl, "set_vm_memory_high_watermark", "0.0001")
            try:
                await wait_until(lambda: not checked.up, timeout=20, what="DOWN on the memory alarm")
                assert checked.last_check.short().startswith("L7STS/503")
            finally:
                await in_thread(node.ctl, "set_vm_memory_high_watermark", "0.4")
            await wait_until(lambda: checked.up, timeout=20, what="UP after the alarm clears")
            nursery.cancel_scope.cancel()


async def test_drained_node_is_taken_out(rabbit_node_factory):
    node = await in_thread(rabbit_node_factory)
    health = Health(kinds=(CheckKind.AMQP,), inter=0.5, rise=1, fall=1, timeout=2.0)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, health_config([node], health=health))
            checked = app.runtime.server("be", "n0")
            await wait_until(lambda: checked.up, timeout=30, what="UP")
            await in_thread(node.upgrade, "drain")  # maintenance mode: listeners suspended
            try:
                await wait_until(lambda: not checked.up, timeout=20, what="DOWN while drained")
            finally:
                await in_thread(node.upgrade, "revive")
            await wait_until(lambda: checked.up, timeout=20, what="UP after revive")
            nursery.cancel_scope.cancel()
