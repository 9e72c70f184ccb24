"""Admission control: token buckets, per-source buckets, rate meters, connection limits."""

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


# -- the gate's starts: what the brokers see, whatever the event loop did -----------------


def _gate(rate=20.0, burst=2.0, action=RateAction.QUEUE):
    from types import SimpleNamespace

    frontend = SimpleNamespace(name="fe", rate_limit=RateLimit(rate, burst, action), source_rate_limit=None)
    return RateGate(frontend, now=0.0)


def _most_within(times, window):
    times = sorted(times)
    return max(sum(1 for t in times if start <= t < start + window) for start in times)


def test_without_stalls_the_starts_are_the_promised_moments():
    gate = _gate()
    promised = [gate.admit("10.0.0.1", 100.0, max_wait=10).wait for _ in range(10)]
    assert promised == pytest.approx([0, 0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4])
    assert gate.release(100.0) == 0 and gate.release(100.0) == 0  # the two let in at once
    for wait in promised[2:]:
        assert gate.release(100.0 + wait) == pytest.approx(0, abs=1e-9)


async def test_clients_overdue_after_a_stall_are_spread_again(mock_clock):
    """40 clients at once, 20/s with a burst of 2, queued; the event loop then
    stalls for a second (the mock clock jumps): every promised moment up to
    then passes at once. The clients go on as the session does (promised
    moment, then release), and their starts stay within burst + rate x window
    for any window, as without the stall."""
    gate, rate, burst = _gate(), 20.0, 2
    starts = []

    async def client():
        now = trio.current_time()
        answer = gate.admit("10.0.0.1", now, max_wait=10)
        if answer.wait == 0:
            late = gate.release(now)
        else:
            await trio.sleep(answer.wait)
            late = gate.release(trio.current_time())
        if late:
            await trio.sleep(late)
        starts.append(trio.current_time())

    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(1.0)  # the stall
        while len(starts) < 40:
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(0.01)
    assert len(starts) == 40
    for window in (0.05, 0.25, 1.0):
        assert _most_within(starts, window) <= burst + rate * window + 1, window
    assert max(starts) - began >= (40 - burst) / rate  # none was lost or skipped: the storm still takes its time


def test_only_a_queued_frontend_limit_meters_starts():
    assert _gate(action=RateAction.REJECT).release(0.0) == 0.0
    assert _gate(action=RateAction.ALARM).release(0.0) == 0.0
