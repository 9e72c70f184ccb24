"""Admission control: token buckets, per-source buckets, the start line, rate meters, connection limits."""

import math

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.amqp.admission import (
    ConnectionCounts,
    LimitHit,
    RateGate,
    RateMeter,
    SourceBuckets,
    StartLine,
    TokenBucket,
    top_labels,
)
from proxy.config.model import ConnectionLimits as Limits
from proxy.config.model import LimitAction, RateAction, RateLimit


def test_a_bucket_starts_full_then_grants_at_its_rate():
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.reserve(0.0, max_wait=0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve(0.0, max_wait=0) is None  # reject: nothing taken
    assert bucket.reserve(0.1, max_wait=0) == 0.0  # one token refilled in 100 ms
    assert bucket.reserve(0.1, max_wait=0) is None


def test_queued_clients_are_promised_successive_slots_first_come_first_served():
    bucket = TokenBucket(rate=10, burst=1, now=0.0)
    assert bucket.reserve(0.0, max_wait=1) == 0.0
    waits = [bucket.reserve(0.0, max_wait=1) for _ in range(5)]
    assert waits == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    # Beyond the queue bound: refused, and the promises already made stand.
    assert bucket.reserve(0.0, max_wait=0.55) is None
    assert bucket.reserve(0.0, max_wait=1) == pytest.approx(0.6)


def test_a_bucket_never_saves_more_than_its_burst():
    bucket = TokenBucket(rate=100, burst=5, now=0.0)
    assert bucket.full(3600.0)
    granted = sum(bucket.reserve(3600.0, max_wait=0) is not None for _ in range(50))
    assert granted == 5


def test_a_bucket_needs_a_rate_and_a_burst():
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0, now=0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.5, 1000), burst=st.integers(1, 50),
    arrivals=st.lists(st.floats(0, 10), min_size=1, max_size=300),
)
def test_granted_connections_never_exceed_burst_plus_rate_times_time(rate, burst, arrivals):
    """The property a survivor broker relies on: admitted starts over any span
    [0, t] are at most burst + rate x t (queued ones counted at their slot)."""
    bucket = TokenBucket(rate, burst, now=0.0)
    starts = []
    for now in sorted(arrivals):
        wait = bucket.reserve(now, max_wait=2.0)
        if wait is not None:
            assert wait <= 2.0
            starts.append(now + wait)
    starts.sort()
    for index, start in enumerate(starts):
        assert index + 1 <= burst + rate * start + 1e-6


def test_sources_have_buckets_of_their_own():
    sources = SourceBuckets(rate=1, burst=2)
    assert sources.reserve("10.0.0.1", 0.0, 0) == 0.0
    assert sources.reserve("10.0.0.1", 0.0, 0) == 0.0
    assert sources.reserve("10.0.0.1", 0.0, 0) is None
    assert sources.reserve("10.0.0.2", 0.0, 0) == 0.0


def test_source_buckets_stay_bounded_and_forget_refilled_ones_first():
    sources = SourceBuckets(rate=1, burst=1, capacity=100)
    for index in range(1000):
        sources.reserve(f"10.0.{index // 256}.{index % 256}", float(index) / 1000, 10)
    assert len(sources) <= 100
    # At t = 50 every bucket has refilled: making room frees them all at once.
    sources.reserve("192.0.2.1", 50.0, 0)
    assert len(sources) == 1


def test_a_rate_meter_averages_over_its_window():
    meter = RateMeter(window=10)
    for second in range(10):
        meter.add(second + 0.5, 20)
    assert meter.rate(9.9) == 20
    assert meter.rate(14.5) == 10  # five seconds without events
    assert meter.rate(100.0) == 0


def test_connection_limits_per_vhost_and_per_user_with_overrides():
    limits = Limits(per_vhost=2, vhosts=(("/big", 3),), users=(("batch", 1),))
    counts = ConnectionCounts()
    for _ in range(2):
        assert counts.check(limits, "/", "app") is None
        counts.add("/", "app")
    assert counts.check(limits, "/", "other") == LimitHit("vhost", "/", 2)
    assert counts.check(limits, "/big", "batch") is None
    counts.add("/big", "batch")
    assert counts.check(limits, "/big", "batch") == LimitHit("user", "batch", 1)
    assert counts.check(limits, "/big", None) is None  # no user known: only the vhost counts
    assert counts.hits == {"vhost": 1, "user": 1}
    counts.remove("/", "app")
    assert counts.check(limits, "/", "app") is None
    counts.remove("/", "app")
    counts.remove("/big", "batch")
    assert not counts.vhosts and not counts.users
    assert LimitHit("vhost", "/", 2).text() == "warren: connection limit for vhost / reached (2)"


def test_limits_know_when_they_are_off():
    assert not Limits().enabled
    assert Limits(per_user=5).enabled
    assert Limits(per_user=5, action=LimitAction.ALARM).action is LimitAction.ALARM


def test_label_cardinality_is_capped_with_the_rest_as_other():
    counts = {f"user{index}": index for index in range(1, 101)}
    labels = top_labels(counts, cap=3)
    assert labels == {"user100": 100, "user99": 99, "user98": 98, "other": sum(range(1, 98))}
    assert sum(labels.values()) == sum(counts.values())
    assert top_labels({"a": 1}, cap=3) == {"a": 1}


# -- the start line: what the brokers see, whatever the event loop did -------------------


def _gate(rate=20.0, burst=2.0, action=RateAction.QUEUE, source=None):
    from types import SimpleNamespace

    frontend = SimpleNamespace(name="fe", rate_limit=RateLimit(rate, burst, action), source_rate_limit=source)
    return RateGate(frontend, now=0.0)


def _most_within(times, window):
    times = sorted(times)
    return max(sum(1 for t in times if start <= t < start + window) for start in times)


def test_the_line_lets_clients_go_in_order_at_its_rate():
    line = StartLine(rate=10, burst=2, now=0.0)
    assert line.enter("a", 0.0) and line.enter("b", 0.0)  # the burst goes at once
    assert not line.enter("c", 0.0) and not line.enter("d", 0.0)
    assert len(line) == 2 and line.next_at() == pytest.approx(0.1)
    assert line.due(0.05) == []  # too early: nobody goes
    assert line.due(0.1) == ["c"]
    assert line.next_at() == pytest.approx(0.2)
    assert line.due(0.2) == ["d"] and line.next_at() is None


def test_nobody_overtakes_the_line_even_with_a_token_free():
    line = StartLine(rate=10, burst=5, now=0.0)
    for client in "abcde":
        line.enter(client, 0.0)
    assert not line.enter("f", 0.0)
    assert not line.enter("g", 10.0)  # the bucket has refilled, but f waits first
    assert line.due(10.0) == ["f", "g"]


def test_a_withdrawn_client_is_skipped_and_takes_no_token():
    line = StartLine(rate=10, burst=1, now=0.0)
    line.enter("a", 0.0)
    for client in "bcd":
        line.enter(client, 0.0)
    line.withdraw("b")
    line.withdraw("c")
    assert len(line) == 1
    assert line.next_at() == pytest.approx(0.1)
    assert line.due(0.1) == ["d"]
    line.enter("e", 0.1)
    line.withdraw("e")
    assert line.next_at() is None and line.drain() == []


def test_a_client_that_gave_up_is_asked_at_its_turn_and_takes_no_token():
    line = StartLine(rate=10, burst=1, now=0.0)
    line.enter("a", 0.0)
    for client in "bcd":
        line.enter(client, 0.0)
    asked = []

    def gave_up(client):
        asked.append(client)
        return client == "b"

    assert line.due(0.05, gave_up) == [] and asked == []  # nobody's turn yet: nobody asked
    assert line.due(0.1, gave_up) == ["c"]  # b's turn, b gone: c takes the token
    assert asked == ["b", "c"]
    assert line.due(0.2, gave_up) == ["d"] and line.next_at() is None


def test_draining_the_line_returns_those_still_waiting_in_order():
    line = StartLine(rate=1, burst=1, now=0.0)
    for client in "abcd":
        line.enter(client, 0.0)
    line.withdraw("c")
    assert line.drain() == ["b", "d"]
    assert len(line) == 0 and line.next_at() is None


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(1, 1000), burst=st.integers(1, 50),
    arrivals=st.lists(st.floats(0, 5), min_size=1, max_size=300),
    stalls=st.lists(st.tuples(st.floats(0, 6), st.floats(0, 8)), max_size=4),
    lag=st.floats(0, 0.05),
)
def test_no_window_ever_lets_more_than_burst_plus_rate_times_its_length(rate, burst, arrivals, stalls, lag):
    """The releaser as the trio shell drives it, on a clock of our own: it
    wakes at next_at() (late by `lag`), or not at all during a stall (from,
    seconds) of the event loop, and every client that arrived meanwhile is
    in line. The moments clients go on, counted over any window of T seconds
    (T = 1 s and others), never exceed burst + rate x T; everyone goes, in
    order of arrival."""
    line = StartLine(rate, burst, now=0.0)
    arrivals = sorted(arrivals)
    went: dict[int, float] = {}

    def stalled_until(t):
        return max([start + length for start, length in stalls if start <= t < start + length], default=t)

    now, pending = 0.0, list(enumerate(arrivals))
    while pending or len(line):
        wake = line.next_at()
        wake = math.inf if wake is None else max(now, wake + lag)
        if pending and pending[0][1] <= wake:  # a client arrives first (a callback runs then)
            now = stalled_until(max(now, pending[0][1]))
            while pending and pending[0][1] <= now:
                client, _ = pending.pop(0)
                if line.enter(client, now):
                    went[client] = now
            continue
        now = stalled_until(wake)
        for client in line.due(now):
            went[client] = now
    assert sorted(went) == list(range(len(arrivals)))
    order = sorted(went, key=lambda client: (went[client], client))
    assert order == sorted(order)  # first come, first served
    moments = list(went.values())
    for window in (0.01, 0.1, 1.0, 2.5):
        assert _most_within(moments, window) <= burst + rate * window + 1e-6, window


class _Waiting:
    """A session in line as the releaser sees it: go_on records the moment."""

    __slots__ = ("starts", "line")

    def __init__(self, starts):
        self.starts, self.line = starts, None

    def go_on(self, now):
        self.starts.append(now)

    def gave_up_waiting(self):
        return False


async def test_the_releaser_spreads_clients_again_after_the_event_loop_stalls(mock_clock):
    """200 clients in a 20/s line with a burst of 2; twice the event loop
    stalls (the clock jumps while the releaser sleeps: 5 s, then 3 s). The
    releaser still lets at most burst + rate x T go in any T seconds, all of
    them in the end, never two at once except the burst."""
    from proxy.frontends.session import _release_line
    from proxy.io.poller import current_poller

    rate, burst, count = 20.0, 2, 200
    line = StartLine(rate, burst, now=trio.current_time())
    starts = []
    waiting = [_Waiting(starts) for _ in range(count)]
    for session in waiting:
        if line.enter(session, trio.current_time()):
            session.go_on(trio.current_time())
    poller = current_poller()  # a Poller: compiled, _release_line takes nothing else
    mock_clock.autojump_threshold = 0  # time passes whenever every task sleeps
    line.driven = True  # as the session does when it starts the releaser
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_release_line, line, poller)
        for stall in (5.0, 3.0):
            await trio.sleep(1.0)
            mock_clock.jump(stall)  # the releaser sleeps through it: overdue when it wakes
    assert line.driven is False
    assert len(starts) == count
    for window in (0.05, 0.5, 1.0, 3.0):
        assert _most_within(starts, window) <= burst + rate * window + 1e-6, window
    assert starts[-1] - starts[0] >= 8.0 + (count - burst) / rate - 1.0  # the stalls delayed, never skipped


def test_a_gate_with_a_queued_frontend_limit_lines_everyone_up():
    gate = _gate(rate=20, burst=2)
    answers = [gate.admit("10.0.0.1", 100.0, max_wait=10) for _ in range(4)]
    assert [a.wait for a in answers] == pytest.approx([0, 0, 0.05, 0.1])
    assert all(a.hold == 0 for a in answers)  # the line, not a sleep, makes them wait
    assert gate.line is not None and gate.queued == 2


def test_a_source_limit_holds_a_client_before_it_lines_up():
    gate = _gate(rate=1000, burst=100, source=RateLimit(5, 1, RateAction.QUEUE))
    assert gate.admit("10.0.0.1", 0.0, max_wait=10).hold == 0
    second = gate.admit("10.0.0.1", 0.0, max_wait=10)
    assert second.hold == pytest.approx(0.2) and second.wait == pytest.approx(0.2)
    assert gate.admit("10.0.0.2", 0.0, max_wait=10).hold == 0  # another source


def test_only_a_queued_frontend_limit_has_a_line():
    assert _gate(action=RateAction.REJECT).line is None
    assert _gate(action=RateAction.ALARM).line is None
    held = _gate(action=RateAction.REJECT, source=RateLimit(1, 1, RateAction.QUEUE))
    held.admit("10.0.0.1", 0.0, max_wait=10)
    assert held.admit("10.0.0.1", 0.0, max_wait=10).hold == pytest.approx(1.0)  # no line: it sleeps it all


def _tcp_pair():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=5)
        accepted, _ = server.accept()
    return client, accepted


@pytest.mark.parametrize(
    ("client_does", "gone_on_amqp", "gone_on_tcp"),
    [
        ("waits", False, False),
        ("sends its header and waits", False, False),
        ("closes (FIN)", True, False),  # a TCP client may only have half-closed: it goes on
        ("sends its header and closes", True, False),
        ("resets", True, True),
    ],
)
def test_which_waiting_clients_gave_up(client_does, gone_on_amqp, gone_on_tcp):
    """The releaser's check at a client's turn (one poll, nothing read)."""
    import socket
    import struct

    from lab import wait_until_blocking
    from proxy.frontends.session import _client_gone

    client, accepted = _tcp_pair()
    try:
        if "header" in client_does:
            client.sendall(b"AMQP\x00\x00\x09\x01")
        if client_does == "resets":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if "close" in client_does or client_does == "resets":
            client.close()
            wait_until_blocking(lambda: _client_gone(accepted, amqp=True), timeout=5, what="the close seen")
        assert _client_gone(accepted, amqp=True) is gone_on_amqp
        assert _client_gone(accepted, amqp=False) is gone_on_tcp
        if "header" in client_does:
            assert accepted.recv(64, socket.MSG_PEEK) == b"AMQP\x00\x00\x09\x01"  # nothing consumed
    finally:
        client.close()
        accepted.close()
