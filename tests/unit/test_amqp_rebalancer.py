"""The rebalancing service and admin actions on a runtime with made-up connections (time passed in)."""

import dataclasses

from proxy.amqp import rebalancer
from proxy.config.model import Rebalance
from proxy.io.relay import Traffic
from proxy.runtime import Connection, KillReason, Runtime
from proxy.stats_ui import admin, commands
from tests.proxyutil import make_config, server


def runtime_with(counts, rebalance=Rebalance(rate=4, min_age=0, tolerance=0.1), now=1000.0) -> Runtime:
    config = make_config([server(f"s{i}", i + 1) for i in range(len(counts))])
    config = dataclasses.replace(config, backends=(dataclasses.replace(config.backends[0], rebalance=rebalance),))
    runtime = Runtime(config)
    backend = runtime.backends["be"]
    for index, count in enumerate(counts):
        target = backend.servers[f"s{index}"]
        for n in range(count):
            conn = Connection(runtime.new_connection_id(), ("10.0.0.1", 1), "fe", Traffic())
            conn.started = now - 100 - n
            conn.interrupt = lambda c=conn, t=target: t.detach(c)  # the session ends it at once
            conn.server = target
            target.attach(conn)
    return runtime


def reconnect(runtime, count, now):
    """Closed clients come back through leastconn: each to the emptiest server."""
    backend = runtime.backends["be"]
    for _ in range(count):
        emptiest = min(backend.servers.values(), key=lambda s: len(s.connections))
        conn = Connection(runtime.new_connection_id(), ("10.0.0.1", 1), "fe", Traffic())
        conn.started = now
        conn.interrupt = lambda c=conn, t=emptiest: t.detach(c)
        conn.server = emptiest
        emptiest.attach(conn)


def sizes(runtime):
    return [len(s.connections) for s in runtime.backends["be"].servers.values()]


def test_the_service_closes_at_most_rate_per_second_oldest_first_until_balanced():
    runtime = runtime_with([30, 30, 0])
    service = rebalancer.RebalanceService(runtime.config)
    closed_at = []
    now = 1000.0
    for step in range(400):  # 100 s in ticks of 0.25 s
        before = sum(sizes(runtime))
        service.tick(runtime, now)
        gone = before - sum(sizes(runtime))
        closed_at += [now] * gone
        reconnect(runtime, gone, now)
        now += 0.25
    assert sizes(runtime) == [22, 22, 16]  # within 10 % of the share of 20: balanced
    assert len(closed_at) == 16
    for start in closed_at:  # any one-second window: at most burst (4) + rate (4) x 1 s
        assert sum(1 for t in closed_at if start <= t < start + 1.0) <= 8
    assert closed_at[-1] - closed_at[0] >= (16 - 4) / 4 - 0.25  # the rate, not a burst
    assert runtime.backends["be"].rebalance.closed == 16


def test_a_balanced_backend_and_young_connections_are_left_alone():
    runtime = runtime_with([10, 9, 10])
    service = rebalancer.RebalanceService(runtime.config)
    service.tick(runtime, 1000.0)
    assert sizes(runtime) == [10, 9, 10]
    young = runtime_with([10, 0], rebalance=Rebalance(rate=100, min_age=3600))
    rebalancer.RebalanceService(young.config).tick(young, 1000.0)
    assert sizes(young) == [10, 0]


def test_a_backend_without_the_table_is_rebalanced_only_when_asked():
    runtime = runtime_with([12, 0], rebalance=None)
    service = rebalancer.RebalanceService(runtime.config)
    service.tick(runtime, 1000.0)
    assert sizes(runtime) == [12, 0]
    notice = admin.apply_request(runtime, admin.AdminRequest("be", "", admin.Action.REBALANCE_DRY_RUN), 1000.0,
                                 user="ops", source="http")
    assert notice == "be: 6 connection(s) over their share (s0 12/6, s1 0/6); would close 6 now (s0 6)"
    assert sizes(runtime) == [12, 0]  # a dry run closes nothing
    notice = admin.apply_request(runtime, admin.AdminRequest("be", "", admin.Action.REBALANCE), 1000.0,
                                 user="ops", source="http")
    assert notice.endswith("closing 5 now (s0 5)")  # the default rate's burst (5/s)
    assert sizes(runtime) == [7, 0]
    reconnect(runtime, 5, 1000.0)
    assert sizes(runtime) == [7, 5]
    for step in range(1, 20):
        before = sum(sizes(runtime))
        service.tick(runtime, 1000.0 + step)
        reconnect(runtime, before - sum(sizes(runtime)), 1000.0 + step)
    assert sizes(runtime) == [7, 5]  # balanced (one connection of slack): the request has ended
    assert not runtime.backends["be"].rebalance.requested


def test_killed_connections_carry_the_note():
    runtime = runtime_with([3, 0], rebalance=Rebalance(rate=10, min_age=0))
    victims = list(runtime.backends["be"].servers["s0"].connections)
    rebalancer.rebalance(runtime.backends["be"], 1000.0)
    killed = [c for c in victims if c.kill_reason is not None]
    assert len(killed) == 1
    assert (killed[0].kill_reason, killed[0].kill_note) == (KillReason.KILLED, "rebalanced")
    assert killed[0].started == min(c.started for c in victims)  # the oldest


def test_ctl_rebalance_backend():
    runtime = runtime_with([4, 0], rebalance=None)
    answer, ok = commands.execute("rebalance backend be dry-run", runtime, 1000.0)
    assert ok and "would close 2 now (s0 2)" in answer
    answer, ok = commands.execute("rebalance backend nope", runtime, 1000.0)
    assert not ok and "no backend nope" in answer
    answer, ok = commands.execute("rebalance backend be now", runtime, 1000.0)
    assert not ok and "usage" in answer
    answer, ok = commands.execute("rebalance backend be", runtime, 1000.0)
    assert ok and "closing 2 now" in answer
    assert sizes(runtime) == [2, 0]


def test_the_page_form_parses_a_backend_action():
    request = admin.request_from_form({"backend": "be", "action": "rebalance"})
    assert (request.backend, request.server, request.action) == ("be", "", admin.Action.REBALANCE)
