"""The rebalancing planner, the clean-close reader and the heartbeat rule."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.amqp.closing import CLOSE_OK_FRAME, TAIL, clean_close
from proxy.amqp.heartbeat import IdleLimits, dead_after, idle_limits
from proxy.amqp.rebalance import ServerLoad, is_balanced, plan, shares
from proxy.health.amqp_methods import ConnectionClose, ConnectionOpenOk
from proxy.health.amqp_wire import HEARTBEAT_FRAME


def load(name, count, *, weight=1, usable=True, first_id=0, age=600.0):
    return ServerLoad(name, weight, usable, tuple((first_id + i, age + i) for i in range(count)))


def test_a_returned_broker_gets_its_share_from_the_others_oldest_first():
    servers = [load("a", 150, first_id=0), load("b", 150, first_id=1000), load("c", 0)]
    result = plan(servers, tolerance=0.1, min_age=60, budget=1000)
    assert not result.balanced
    assert result.shares == {"a": 100, "b": 100, "c": 100}
    assert result.excess == 100
    assert len(result.moves) == 100
    by_server = {"a": [m for m in result.moves if m.server == "a"], "b": [m for m in result.moves if m.server == "b"]}
    assert len(by_server["a"]) == len(by_server["b"]) == 50
    ages = [m.age for m in by_server["a"]]
    assert ages == sorted(ages, reverse=True)  # oldest first
    assert min(ages) >= max(600 + i for i in range(100))  # the 50 oldest of a's 150


def test_the_budget_bounds_the_moves_and_servers_shed_in_turn():
    servers = [load("a", 150), load("b", 150, first_id=1000), load("c", 0)]
    moves = plan(servers, tolerance=0.1, min_age=0, budget=7).moves
    assert len(moves) == 7
    assert [m.server for m in moves] == ["a", "b", "a", "b", "a", "b", "a"]


def test_young_connections_are_never_moved():
    servers = [load("a", 20, age=5.0), load("b", 0)]
    result = plan(servers, tolerance=0.1, min_age=60, budget=100)
    assert not result.balanced and result.moves == ()


def test_weights_set_the_shares():
    servers = [load("a", 90, weight=2), load("b", 45, weight=1, first_id=500)]
    assert plan(servers, tolerance=0.1, min_age=0, budget=100).balanced
    result = plan([load("a", 45, weight=2), load("b", 90, weight=1, first_id=500)], tolerance=0.1,
                  min_age=0, budget=100)
    assert result.shares == {"a": 90, "b": 45}
    assert {m.server for m in result.moves} == {"b"} and len(result.moves) == 45


def test_unusable_servers_and_lone_servers_are_left_alone():
    servers = [load("a", 100), load("b", 0, usable=False)]
    assert plan(servers, tolerance=0.1, min_age=0, budget=100).balanced
    assert plan([load("a", 5)], tolerance=0, min_age=0, budget=100).balanced
    assert shares([load("a", 5, weight=0)]) == {}


def test_within_the_tolerance_nothing_moves():
    servers = [load("a", 105), load("b", 95, first_id=500)]
    assert plan(servers, tolerance=0.1, min_age=0, budget=100).balanced
    assert is_balanced({"a": 2, "b": 1}, {"a": 1.5, "b": 1.5}, 0.0)  # one connection of slack


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=2, max_size=5), st.integers(1, 4), st.integers(0, 2**32))
def test_closing_and_placing_by_leastconn_converges(counts, weight_seed, seed):
    """Rounds of plan + reconnect through leastconn end balanced, moving each connection at most once per round."""
    rng = random.Random(seed)
    weights = [rng.randint(1, weight_seed) for _ in counts]
    conns = {f"s{i}": [(i * 1000 + j, 1000.0) for j in range(n)] for i, n in enumerate(counts)}
    for _round in range(60):
        servers = [ServerLoad(name, w, True, tuple(c)) for (name, c), w in zip(conns.items(), weights)]
        result = plan(servers, tolerance=0.1, min_age=0, budget=25)
        if result.balanced:
            break
        assert len(result.moves) <= 25
        for move in result.moves:
            conns[move.server] = [c for c in conns[move.server] if c[0] != move.conn_id]
        for move in result.moves:  # the client reconnects: leastconn by weight
            target = min(conns, key=lambda name: (len(conns[name]) + 1) / weights[int(name[1:])])
            conns[target].append((move.conn_id, 1000.0))
    else:
        pytest.fail(f"not balanced after 60 rounds: {[len(c) for c in conns.values()]} weights {weights}")


# -- the clean close ---------------------------------------------------------------------


def test_a_client_close_is_seen_in_the_brokers_last_frame():
    tail = (ConnectionOpenOk().frame() + CLOSE_OK_FRAME)[-TAIL:]
    close = clean_close(ConnectionClose(200, "bye").frame(), tail)
    assert close is not None and not close.by_broker and close.reason is None


def test_a_broker_close_is_seen_with_its_reply_code():
    forced = ConnectionClose(320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'")
    close = clean_close(HEARTBEAT_FRAME + CLOSE_OK_FRAME, HEARTBEAT_FRAME + forced.frame())
    assert close.by_broker and close.reply_code == 320
    assert close.reason == "closed by broker: CONNECTION_FORCED"
    assert "shutdown" in close.reply_text


def test_an_abort_is_not_a_clean_close():
    assert clean_close(b"", b"") is None
    assert clean_close(None, None) is None
    assert clean_close(HEARTBEAT_FRAME, HEARTBEAT_FRAME) is None
    assert clean_close(CLOSE_OK_FRAME + HEARTBEAT_FRAME, b"") is None  # more came after it


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=TAIL), st.binary(max_size=TAIL))
def test_any_tails_are_read_without_error(client, server):
    clean_close(client, server + CLOSE_OK_FRAME[: len(server) % 13])
    clean_close(client + CLOSE_OK_FRAME, server)


# -- heartbeats ------------------------------------------------------------------------------


def test_a_side_is_dead_after_twice_the_heartbeat():
    assert dead_after(60) == 121.0
    assert dead_after(0) is None and dead_after(None) is None


def test_idle_limits_follow_the_heartbeat_or_fall_back():
    assert idle_limits(30, fallback=None, server=None) == IdleLimits(61.0, 61.0)
    assert idle_limits(30, fallback=3600.0, server=300.0) == IdleLimits(61.0, 300.0)
    assert idle_limits(0, fallback=3600.0, server=None) == IdleLimits(3600.0, None)
    assert idle_limits(None, fallback=None, server=None) == IdleLimits(None, None)
