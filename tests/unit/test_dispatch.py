"""The connect rules (proxy.backends.dispatch): every retry, redispatch, queue
and timeout rule, on the machine alone with time passed in (a mock clock),
against the real live model of a backend (servers, slots, balancer)."""

from __future__ import annotations

import pytest

from proxy.backends.dispatch import Connect, Dispatch, Fail, Queue
from proxy.config.model import Backend, BackendTimeouts, Server
from proxy.io.relay import Traffic
from proxy.runtime import AdminState, BackendRuntime, Connection

CONNECT, QUEUE = 2.0, 5.0  # the backend's timeouts in these tests


def backend(*servers: Server, retries: int = 3, redispatch: bool = True, **kw) -> BackendRuntime:
    config = Backend(
        name="be", servers=servers, retries=retries, redispatch=redispatch,
        timeout=BackendTimeouts(connect=CONNECT, queue=QUEUE), **kw,
    )
    return BackendRuntime(config, 0.0)


def servers(*names: str, **kw) -> tuple[Server, ...]:
    return tuple(Server(name, "127.0.0.1", 5000 + i, **kw) for i, name in enumerate(names))


_ids = iter(range(1, 1 << 30))


def client(be: BackendRuntime) -> Connection:
    conn = Connection(next(_ids), ("10.0.0.1", 40000), "fe", Traffic())
    conn.backend = be
    return conn


def dispatch(be: BackendRuntime) -> tuple[Dispatch, Connection]:
    conn = client(be)
    return Dispatch(be, conn), conn


def names(be: BackendRuntime, attr: str) -> dict[str, int]:
    return {s.name: getattr(s, attr) for s in be.servers.values() if getattr(s, attr)}


def occupy(be: BackendRuntime, name: str) -> Connection:
    """A connection holding one slot of server `name`."""
    conn = client(be)
    be.servers[name].attach(conn)
    return conn


class Observer:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def connect_failed(self, server) -> None:
        self.seen.append(("failed", server.name))

    def connect_ok(self, server) -> None:
        self.seen.append(("ok", server.name))


# --- choosing and connecting ------------------------------------------------------------


def test_the_first_attempt_connects_to_the_balancers_choice_with_the_connect_timeout():
    be = backend(*servers("a", "b"))
    first, conn = dispatch(be)
    action = first.start(now=10.0)
    assert action == Connect(be.servers["a"], 10.0 + CONNECT)
    assert conn.server is be.servers["a"] and conn in be.servers["a"].connections
    second, _ = dispatch(be)
    assert second.start(now=10.0).server is be.servers["b"]  # roundrobin


def test_a_connect_that_succeeds_is_timed_and_reported_to_passive_health():
    be = backend(*servers("a"))
    observer = be.servers["a"].observer = Observer()
    machine, conn = dispatch(be)
    machine.start(now=1.0)
    assert machine.connected(now=1.25) is None
    assert machine.timing.connect == pytest.approx(0.25)
    assert (machine.timing.retries, machine.timing.redispatched) == (0, False)
    assert observer.seen == [("ok", "a")]
    assert conn in be.servers["a"].connections


@pytest.mark.parametrize(
    "make_unavailable",
    [
        lambda s: s.set_admin(AdminState.MAINT, 0.0),
        lambda s: s.set_admin(AdminState.DRAIN, 0.0),
        lambda s: s.set_health(False, "DOWN", 0.0),
        lambda s: setattr(s, "weight", 0),
        lambda s: setattr(s, "addresses", ()),  # a DNS name not resolved (yet)
    ],
    ids=["maint", "drain", "down", "weight-0", "unresolved"],
)
def test_no_available_server_fails_at_once_with_sc_and_counts_it(make_unavailable):
    be = backend(*servers("a"))
    make_unavailable(be.servers["a"])
    machine, conn = dispatch(be)
    assert machine.start(now=0.0) == Fail("SC", "no server available", None)
    assert be.no_server == 1 and conn.server is None


def test_backups_are_chosen_only_when_no_active_server_is_available():
    be = backend(*servers("act"), *servers("bak", backup=True))
    assert dispatch(be)[0].start(0.0).server.name == "act"
    be.servers["act"].set_admin(AdminState.MAINT, 0.0)
    assert dispatch(be)[0].start(0.0).server.name == "bak"


# --- failures and retries -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fail, code, reason",
    [
        (lambda m, now: m.connect_refused(now, "ECONNREFUSED"), "SC", "connect failed: ECONNREFUSED"),
        (lambda m, now: m.connect_timed_out(now), "sC", "connect timeout"),
    ],
    ids=["refused", "timeout"],
)
def test_without_retries_a_failed_connect_ends_the_connection(fail, code, reason):
    be = backend(*servers("a", "b"), retries=0)
    observer = be.servers["a"].observer = Observer()
    machine, conn = dispatch(be)
    machine.start(now=0.0)
    assert fail(machine, 2.0) == Fail(code, reason, be.servers["a"])
    assert be.servers["a"].connect_errors == 1 and observer.seen == [("failed", "a")]
    assert not be.servers["a"].connections  # the slot is free again
    assert conn.server is be.servers["a"]  # the log line names the server tried
    assert machine.timing.connect == pytest.approx(2.0)


def test_retries_go_to_the_same_server_and_are_counted_there():
    be = backend(*servers("a", "b"), retries=2, redispatch=False)
    machine, _ = dispatch(be)
    a = be.servers["a"]
    assert machine.start(0.0).server is a
    assert machine.connect_refused(0.1, "ECONNREFUSED") == Connect(a, 0.1 + CONNECT)
    assert machine.connect_timed_out(2.1) == Connect(a, 2.1 + CONNECT)
    assert machine.timing.retries == 2 and a.retries == 2
    assert machine.connect_refused(2.2, "ECONNRESET") == Fail("SC", "connect failed: ECONNRESET", a)
    assert a.connect_errors == 3 and be.servers["b"].connect_errors == 0
    assert names(be, "redispatches") == {} and not machine.timing.redispatched
    assert machine.timing.connect == pytest.approx(2.2)


def test_with_redispatch_the_last_retry_goes_to_another_server():
    be = backend(*servers("a", "b"), retries=3, redispatch=True)
    machine, conn = dispatch(be)
    a, b = be.servers["a"], be.servers["b"]
    targets = [machine.start(0.0).server]
    for now in (1.0, 2.0, 3.0):
        targets.append(machine.connect_refused(now, "ECONNREFUSED").server)
    assert targets == [a, a, a, b]
    assert machine.timing.retries == 3 and machine.timing.redispatched
    assert (a.retries, b.retries) == (2, 1)  # counted on the server each retry went to
    assert names(be, "redispatches") == {"a": 1}  # counted on the server it moved away from
    machine.connected(3.5)
    assert conn.server is b and conn in b.connections and conn not in a.connections


def test_a_single_retry_with_redispatch_is_the_redispatch():
    be = backend(*servers("a", "b"), retries=1)
    machine, _ = dispatch(be)
    assert machine.start(0.0).server.name == "a"
    assert machine.connect_timed_out(2.0).server.name == "b"
    assert machine.timing.redispatched and names(be, "redispatches") == {"a": 1}


def test_redispatch_with_no_other_server_retries_the_same_one_uncounted():
    be = backend(*servers("a"), retries=1)
    machine, _ = dispatch(be)
    a = be.servers["a"]
    machine.start(0.0)
    assert machine.connect_refused(0.1, "ECONNREFUSED") == Connect(a, 0.1 + CONNECT)
    assert not machine.timing.redispatched and a.redispatches == 0 and a.retries == 1


def test_redispatch_avoids_every_server_that_failed_not_only_the_last():
    be = backend(*servers("a", "b", "c"), retries=2)
    machine, _ = dispatch(be)
    assert machine.start(0.0).server.name == "a"
    be.servers["a"].set_admin(AdminState.MAINT, 0.0)  # the retry cannot stay on a
    assert machine.connect_refused(0.1, "ECONNREFUSED").server.name == "b"
    be.servers["a"].set_admin(AdminState.READY, 0.0)
    assert machine.connect_refused(0.2, "ECONNREFUSED").server.name == "c"
    assert names(be, "redispatches") == {"b": 1}


def test_a_retry_whose_server_left_the_candidates_goes_elsewhere_without_redispatch():
    be = backend(*servers("a", "b"), retries=3)
    machine, _ = dispatch(be)
    machine.start(0.0)
    be.servers["a"].set_health(False, "DOWN", 0.0)
    assert machine.connect_refused(0.1, "ECONNREFUSED").server.name == "b"
    assert not machine.timing.redispatched and names(be, "redispatches") == {}


def test_a_retry_finding_no_server_at_all_ends_with_sc_no_server():
    be = backend(*servers("a"), retries=3)
    machine, conn = dispatch(be)
    machine.start(0.0)
    be.servers["a"].set_health(False, "DOWN", 0.0)
    assert machine.connect_refused(0.1, "ECONNREFUSED") == Fail("SC", "no server available", None)
    assert be.no_server == 1
    assert conn.server is be.servers["a"] and not be.servers["a"].connections


@pytest.mark.parametrize(
    "last, code",
    [("refused", "SC"), ("timeout", "sC")],
)
def test_the_last_attempts_failure_is_the_one_reported(last, code):
    be = backend(*servers("a", "b"), retries=1)
    machine, _ = dispatch(be)
    machine.start(0.0)
    first = machine.connect_timed_out(2.0) if last == "refused" else machine.connect_refused(0.5, "EHOSTUNREACH")
    assert type(first) is Connect
    end = machine.connect_refused(2.5, "ECONNREFUSED") if last == "refused" else machine.connect_timed_out(2.5)
    assert type(end) is Fail and end.code == code and end.server.name == "b"


def test_no_socket_is_warrens_shortage_rc_at_once_without_retry_or_blame():
    be = backend(*servers("a", "b"), retries=3)
    observer = be.servers["a"].observer = Observer()
    machine, conn = dispatch(be)
    machine.start(0.0)
    assert machine.no_socket(0.0, "EMFILE") == Fail("RC", "cannot open a socket: EMFILE", be.servers["a"])
    assert be.servers["a"].connect_errors == 0 and observer.seen == []
    assert not be.servers["a"].connections and machine.timing.retries == 0


def test_the_rules_of_the_config_at_start_hold_across_a_reload():
    be = backend(*servers("a", "b"), retries=3)
    machine, _ = dispatch(be)
    machine.start(0.0)
    from dataclasses import replace

    be.reconfigure(replace(be.config, retries=0), 0.0)
    assert type(machine.connect_refused(0.1, "ECONNREFUSED")) is Connect


# --- the queue ----------------------------------------------------------------------------


def test_with_every_server_at_maxconn_the_client_queues_until_the_queue_timeout():
    be = backend(*servers("a", maxconn=1))
    occupant = occupy(be, "a")
    machine, conn = dispatch(be)
    assert machine.start(now=10.0) == Queue(10.0 + QUEUE)
    assert conn.server is None
    be.servers["a"].detach(occupant)
    assert machine.slot_freed(now=11.5) == Connect(be.servers["a"], 11.5 + CONNECT)
    assert machine.timing.queue == pytest.approx(1.5)


def test_a_wake_up_that_finds_every_server_still_full_keeps_the_first_deadline():
    be = backend(*servers("a", maxconn=1))
    occupy(be, "a")
    machine, _ = dispatch(be)
    assert machine.start(now=0.0) == Queue(QUEUE)
    assert machine.slot_freed(now=3.0) == Queue(QUEUE)
    assert machine.slot_freed(now=QUEUE + 0.5) == Fail("sQ", "queue timeout: every server at maxconn", None)
    assert be.queue_timeouts == 1 and machine.timing.queue == pytest.approx(QUEUE + 0.5)


def test_the_queue_timeout_ends_the_connection_with_sq():
    be = backend(*servers("a", "b", maxconn=1))
    occupy(be, "a"), occupy(be, "b")
    machine, conn = dispatch(be)
    assert machine.start(now=1.0) == Queue(1.0 + QUEUE)
    assert machine.queue_expired(now=1.0 + QUEUE) == Fail("sQ", "queue timeout: every server at maxconn", None)
    assert be.queue_timeouts == 1 and machine.timing.queue == pytest.approx(QUEUE)
    assert conn.server is None


def test_a_slot_freed_just_past_the_deadline_is_still_taken():
    """Woken by a freed slot (not by its deadline), a client tries again
    first: it may be served even if the deadline passed meanwhile."""
    be = backend(*servers("a", maxconn=1))
    occupant = occupy(be, "a")
    machine, _ = dispatch(be)
    machine.start(now=0.0)
    be.servers["a"].detach(occupant)
    assert type(machine.slot_freed(now=QUEUE + 0.1)) is Connect
    assert be.queue_timeouts == 0


def test_each_attempt_that_must_queue_gets_a_queue_timeout_of_its_own():
    be = backend(*servers("a", "b", maxconn=1), retries=1)
    a, b = be.servers["a"], be.servers["b"]
    occupants = [occupy(be, "a"), occupy(be, "b")]
    machine, _ = dispatch(be)
    assert machine.start(now=0.0) == Queue(QUEUE)
    a.detach(occupants[0])
    assert machine.slot_freed(now=1.0).server is a
    a.set_health(False, "DOWN", 1.5)  # the redispatch can only go to b, which is full
    assert machine.connect_refused(now=2.0, reason="ECONNREFUSED") == Queue(2.0 + QUEUE)
    assert machine.queue_expired(now=2.0 + QUEUE).code == "sQ"
    assert machine.timing.queue == pytest.approx(1.0 + QUEUE)
    assert b.connections == {occupants[1]}


def test_a_failed_connect_frees_its_slot_for_the_queue():
    be = backend(*servers("a", maxconn=1), retries=0)
    first, _ = dispatch(be)
    first.start(0.0)
    waiting, _ = dispatch(be)
    assert type(waiting.start(0.0)) is Queue
    first.connect_refused(0.5, "ECONNREFUSED")
    assert waiting.slot_freed(0.5) == Connect(be.servers["a"], 0.5 + CONNECT)
