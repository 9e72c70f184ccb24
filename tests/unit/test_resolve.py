"""Resolver and keep_resolved against the tiny test DNS server on 127.0.0.1."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

import pytest
import structlog
import trio

from lab import wait_until
from proxy.backends.resolve import ResolveError, Resolver, changed_entries, keep_resolved, literal_ip
from tests.dnsserver import serve_dns

IO_BUDGET = 10  # seconds; generous on a loaded 2-core machine, never reached when passing


@dataclass
class Zone:
    records: dict[str, list[str]] = field(default_factory=dict)
    servfail: set[str] = field(default_factory=set)
    drop: set[str] = field(default_factory=set)
    seen: list[tuple[str, str]] = field(default_factory=list)
    address: tuple[str, int] = ("127.0.0.1", 0)

    def a_queries(self, name: str) -> int:
        return self.seen.count((name, "A"))


@pytest.fixture
async def zone(nursery):
    zone = Zone(
        records={
            "rabbit1.warren.test": ["10.0.0.1"],
            "rabbit2.warren.test": ["10.0.0.2"],
            "dual.warren.test": ["fd00::20", "10.0.0.20", "10.0.0.3", "fd00::3", "10.0.0.3"],
            "v6only.warren.test": ["fd00::6"],
            "empty.warren.test": [],
        }
    )
    serve = partial(serve_dns, zone.records, servfail=zone.servfail, drop=zone.drop, seen=zone.seen)
    zone.address = await nursery.start(serve)
    return zone


# --------------------------------------------------------------------------
# Resolver.resolve


async def test_resolves_a_record(zone):
    with trio.fail_after(IO_BUDGET):
        assert await Resolver([zone.address]).resolve("rabbit1.warren.test") == ("10.0.0.1",)


async def test_resolves_a_and_aaaa_sorted_and_deduplicated(zone):
    with trio.fail_after(IO_BUDGET):
        addresses = await Resolver([zone.address]).resolve("dual.warren.test")
    # IPv4 first, numeric order (string order would put 10.0.0.20 before 10.0.0.3).
    assert addresses == ("10.0.0.3", "10.0.0.20", "fd00::3", "fd00::20")


async def test_resolves_aaaa_only_name(zone):
    with trio.fail_after(IO_BUDGET):
        assert await Resolver([zone.address]).resolve("v6only.warren.test") == ("fd00::6",)


async def test_names_are_case_insensitive_and_may_be_fully_qualified(zone):
    with trio.fail_after(IO_BUDGET):
        assert await Resolver([zone.address]).resolve("Rabbit1.Warren.Test.") == ("10.0.0.1",)


async def test_nxdomain_raises_resolve_error(zone):
    with trio.fail_after(IO_BUDGET), pytest.raises(ResolveError) as error:
        await Resolver([zone.address]).resolve("nope.warren.test")
    assert (error.value.name, error.value.reason) == ("nope.warren.test", "nxdomain")


async def test_name_without_addresses_raises_resolve_error(zone):
    with trio.fail_after(IO_BUDGET), pytest.raises(ResolveError) as error:
        await Resolver([zone.address]).resolve("empty.warren.test")
    assert error.value.reason == "nodata"


async def test_servfail_raises_resolve_error(zone):
    zone.servfail.add("rabbit1.warren.test")
    with trio.fail_after(IO_BUDGET), pytest.raises(ResolveError) as error:
        await Resolver([zone.address]).resolve("rabbit1.warren.test")
    assert error.value.reason == "servfail"


async def test_unanswered_query_times_out_within_the_timeout(zone):
    zone.drop.add("rabbit1.warren.test")
    timeout = 2.0  # long enough that losing the deadline shows beyond a loaded machine's noise
    ended: dict[str, float] = {}

    async def reference() -> None:
        # Sleeps exactly the resolver's timeout in the same event loop: how late the
        # loop wakes up on a loaded machine delays both alike, so the difference is
        # the resolver's own overrun (a retry or a blocking call past its deadline).
        await trio.sleep(timeout)
        ended["reference"] = trio.current_time()

    async def resolve() -> None:
        with pytest.raises(ResolveError) as error:
            await Resolver([zone.address], timeout=timeout).resolve("rabbit1.warren.test")
        ended["resolver"] = trio.current_time()
        assert error.value.reason == "timeout"

    start = trio.current_time()
    with trio.fail_after(IO_BUDGET):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reference)
            nursery.start_soon(resolve)
    assert ended["resolver"] - start >= timeout * 0.9  # it did not give up early
    # The overrun is microseconds (cancel and close the channel); 0.4 s leaves room for
    # the process being preempted there or between the two tasks' starts, and still
    # catches c-ares' own retry schedule ending the lookup instead of the deadline
    # (0.75 s late with this timeout, measured).
    assert ended["resolver"] - ended["reference"] < 0.4
    # A lost datagram is retransmitted before the budget runs out (the test's DNS
    # server, a task of this loop, may read the retry after the resolver gave up).
    await wait_until(lambda: zone.a_queries("rabbit1.warren.test") >= 2, timeout=IO_BUDGET, what="a retry")


@pytest.mark.parametrize(
    "literal,expected",
    [("10.1.2.3", "10.1.2.3"), ("::1", "::1"), ("[fd00:0::1]", "fd00::1"), ("FD00::2", "fd00::2")],
)
async def test_literal_ips_never_touch_dns(zone, literal, expected):
    with trio.fail_after(IO_BUDGET):
        assert await Resolver([zone.address]).resolve(literal) == (expected,)
    assert zone.seen == []


def test_literal_ip_recognises_only_addresses():
    assert literal_ip("rabbit1.warren.test") is None
    assert literal_ip("10.0.0.256") is None
    assert literal_ip("::ffff:10.0.0.1") == "::ffff:a00:1"


async def test_concurrent_lookups_do_not_interfere(zone):
    names = ["rabbit1.warren.test", "rabbit2.warren.test", "dual.warren.test"] * 5
    resolver = Resolver([zone.address])
    results: dict[int, tuple[str, ...]] = {}

    async def resolve(index: int, name: str) -> None:
        results[index] = await resolver.resolve(name)

    with trio.fail_after(IO_BUDGET):
        async with trio.open_nursery() as nursery:
            for index, name in enumerate(names):
                nursery.start_soon(resolve, index, name)
    expected = [await resolver.resolve(name) for name in names[:3]]
    assert [results[i] for i in range(len(names))] == expected * 5


async def test_cancelled_lookup_releases_its_sockets(zone):
    zone.drop.add("rabbit1.warren.test")
    resolver = Resolver([zone.address], timeout=5)
    await resolver.resolve("rabbit2.warren.test")  # warm up imports and lazy threads
    open_fds = len(os.listdir("/proc/self/fd"))
    with trio.fail_after(IO_BUDGET):
        with trio.move_on_after(0.1):
            await resolver.resolve("rabbit1.warren.test")
        await wait_until(lambda: len(os.listdir("/proc/self/fd")) <= open_fds, timeout=IO_BUDGET)


# --------------------------------------------------------------------------
# keep_resolved


def test_changed_entries_ignores_failed_and_unchanged_names():
    known = {"a": ("1.1.1.1",), "b": ("2.2.2.2",)}
    fresh = {"a": ("1.1.1.1",), "c": ("3.3.3.3",)}
    assert changed_entries(known, fresh) == [("c", ("3.3.3.3",))]
    assert changed_entries(known, {"b": ("2.2.2.3",)}) == [("b", ("2.2.2.3",))]


async def start_keeper(nursery, zone, names, calls, interval=0.05):
    keeper = partial(keep_resolved, Resolver([zone.address], timeout=1.0), names, interval, lambda *call: calls.append(call))
    return await nursery.start(keeper)


async def test_initial_resolution_is_reported_and_failures_left_out(nursery, zone):
    calls: list = []
    with structlog.testing.capture_logs() as logs, trio.fail_after(IO_BUDGET):
        initial = await start_keeper(
            nursery, zone, ["rabbit1.warren.test", "10.9.9.9", "missing.warren.test"], calls
        )
    assert initial == {"rabbit1.warren.test": ("10.0.0.1",), "10.9.9.9": ("10.9.9.9",)}
    assert {"event": "dns.failed", "name": "missing.warren.test", "reason": "nxdomain", "log_level": "warning"} in logs
    assert calls == []


async def test_changed_record_triggers_on_change_exactly_once(nursery, zone):
    name = "rabbit1.warren.test"
    calls: list = []
    with structlog.testing.capture_logs() as logs, trio.fail_after(IO_BUDGET):
        await start_keeper(nursery, zone, [name, "rabbit2.warren.test"], calls)
        zone.records[name] = ["10.0.0.11", "10.0.0.1"]
        await wait_until(lambda: calls, timeout=IO_BUDGET)
        rounds_seen = zone.a_queries(name)
        await wait_until(lambda: zone.a_queries(name) >= rounds_seen + 3, timeout=IO_BUDGET)
    assert calls == [(name, ("10.0.0.1", "10.0.0.11"))]
    changed = [entry for entry in logs if entry["event"] == "dns.changed"]
    assert changed == [
        {"event": "dns.changed", "name": name, "old": ("10.0.0.1",), "new": ("10.0.0.1", "10.0.0.11"), "log_level": "info"}
    ]


async def test_no_on_change_while_nothing_changes(nursery, zone):
    name = "dual.warren.test"
    calls: list = []
    with trio.fail_after(IO_BUDGET):
        await start_keeper(nursery, zone, [name], calls)
        await wait_until(lambda: zone.a_queries(name) >= 5, timeout=IO_BUDGET)
    assert calls == []


async def test_servfail_keeps_last_good_addresses_and_logs(nursery, zone):
    name = "rabbit1.warren.test"
    calls: list = []
    with structlog.testing.capture_logs() as logs, trio.fail_after(IO_BUDGET):
        initial = await start_keeper(nursery, zone, [name], calls)
        zone.servfail.add(name)
        await wait_until(lambda: sum(entry["event"] == "dns.failed" for entry in logs) >= 2, timeout=IO_BUDGET)
        zone.servfail.discard(name)
        # Recovery with the same addresses is not a change: the last good set was kept.
        recovered_from = zone.a_queries(name)
        await wait_until(lambda: zone.a_queries(name) >= recovered_from + 3, timeout=IO_BUDGET)
    assert initial == {name: ("10.0.0.1",)}
    assert {"event": "dns.failed", "name": name, "reason": "servfail", "log_level": "warning"} in logs
    assert calls == []


async def test_name_that_starts_resolving_later_is_reported(nursery, zone):
    name = "late.warren.test"
    calls: list = []
    with trio.fail_after(IO_BUDGET):
        initial = await start_keeper(nursery, zone, [name], calls)
        zone.records[name] = ["10.0.0.9"]
        await wait_until(lambda: calls, timeout=IO_BUDGET)
    assert initial == {}
    assert calls == [(name, ("10.0.0.9",))]
