"""Balancing algorithms: who gets the next connection."""

from collections import Counter
from dataclasses import dataclass

import pytest

from proxy.backends.lb import First, LeastConn, SmoothRoundRobin, SourceHash, make_balancer
from proxy.config.model import Balance


@dataclass(eq=False)  # compared by identity, like the servers of the live model
class S:
    name: str
    weight: int = 1
    current_sessions: int = 0


def picks(balancer, servers, n, client="10.0.0.1"):
    return [balancer.pick(servers, client).name for _ in range(n)]


def test_roundrobin_equal_weights_rotates_in_order():
    servers = [S("a"), S("b"), S("c")]
    assert picks(SmoothRoundRobin(), servers, 6) == ["a", "b", "c", "a", "b", "c"]


def test_roundrobin_honours_weights_exactly_over_a_cycle():
    servers = [S("a", 5), S("b", 1), S("c", 1)]
    chosen = picks(SmoothRoundRobin(), servers, 70)
    assert Counter(chosen) == {"a": 50, "b": 10, "c": 10}


def test_roundrobin_interleaves_instead_of_bursting():
    servers = [S("a", 5), S("b", 1), S("c", 1)]
    assert picks(SmoothRoundRobin(), servers, 7) == ["a", "a", "b", "a", "c", "a", "a"]


def test_roundrobin_weight_change_takes_effect_on_next_cycle():
    servers = [S("a", 1), S("b", 1)]
    rr = SmoothRoundRobin()
    picks(rr, servers, 4)
    servers[0].weight = 3
    assert Counter(picks(rr, servers, 40)) == {"a": 30, "b": 10}


def test_roundrobin_server_leaving_and_returning():
    a, b, c = S("a"), S("b"), S("c")
    rr = SmoothRoundRobin()
    assert set(picks(rr, [a, b], 4)) == {"a", "b"}
    assert Counter(picks(rr, [a, b, c], 30)) == {"a": 10, "b": 10, "c": 10}


def test_roundrobin_no_candidates():
    assert SmoothRoundRobin().pick([], "1.2.3.4") is None


def test_leastconn_prefers_fewest_sessions():
    servers = [S("a", current_sessions=5), S("b", current_sessions=1), S("c", current_sessions=3)]
    assert LeastConn().pick(servers, "x").name == "b"


def test_leastconn_relative_to_weight():
    servers = [S("a", weight=4, current_sessions=6), S("b", weight=1, current_sessions=2)]
    # a: 7/4 = 1.75, b: 3/1 = 3
    assert LeastConn().pick(servers, "x").name == "a"


def test_leastconn_rotates_among_ties():
    servers = [S("a"), S("b"), S("c")]
    assert set(picks(LeastConn(), servers, 3)) == {"a", "b", "c"}


def test_leastconn_spreads_as_sessions_grow():
    servers = [S("a"), S("b")]
    lc = LeastConn()
    for _ in range(10):
        lc.pick(servers, "x").current_sessions += 1
    assert [s.current_sessions for s in servers] == [5, 5]


def test_first_takes_the_first_candidate():
    assert First().pick([S("b"), S("a")], "x").name == "b"
    assert First().pick([], "x") is None


def test_source_is_sticky_per_client():
    servers = [S("a"), S("b"), S("c")]
    sh = SourceHash()
    for client in ("10.0.0.1", "10.0.0.2", "2001:db8::7"):
        assert len(set(picks(sh, servers, 5, client))) == 1


def test_source_spreads_clients_by_weight():
    servers = [S("a", 2), S("b", 1), S("c", 1)]
    sh = SourceHash()
    counts = Counter(sh.pick(servers, f"10.1.{i // 250}.{i % 250}").name for i in range(4000))
    assert counts["a"] == pytest.approx(2000, rel=0.1)
    assert counts["b"] == pytest.approx(1000, rel=0.15)


def test_source_moves_only_clients_of_a_removed_server():
    servers = [S("a"), S("b"), S("c")]
    sh = SourceHash()
    clients = [f"10.2.0.{i}" for i in range(200)]
    before = {c: sh.pick(servers, c).name for c in clients}
    after = {c: sh.pick(servers[:2], c).name for c in clients}
    moved = [c for c in clients if before[c] != after[c]]
    assert moved and all(before[c] == "c" for c in moved)


@pytest.mark.parametrize("balance", list(Balance))
def test_every_configured_algorithm_has_a_balancer(balance):
    assert make_balancer(balance).pick([S("a")], "1.1.1.1").name == "a"
