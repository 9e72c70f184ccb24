"""The relay, specified over both data paths (copy and splice) with real sockets."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import math
import os
import random
import select
import socket
import struct
import threading
import weakref
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import structlog
import structlog.testing
import trio
import trio.testing
from trio._core._run import SystemClock  # the real clock: the poller's nested way

from lab import wait_until
from proxy.io import pipes as pipes_module
from proxy.io.pipes import Pipe, PipePool, splice_supported
from proxy.io import poller as poller_module
from proxy.io.poller import current_poller
from proxy.io.relay import Ending, Timeouts, Traffic, relay, start_relay
from proxy.io.relay import Link as RelayLink
from tests.proxyutil import socket_pair

IO_BOUND = 30  # seconds; every real-time test fails rather than hangs
VIRTUAL_BOUND = 30 * 24 * 3600  # the same for autojump-clock tests, in virtual time


@pytest.fixture(params=["copy", "splice"])
def pipes(request):
    """None for the copy path, a PipePool for the splice path."""
    if request.param == "copy":
        yield None
        return
    if not splice_supported():
        pytest.skip("splice(2) unavailable")
    pool = PipePool()
    yield pool
    pool.close()


@pytest.fixture
def splice_pool():
    if not splice_supported():
        pytest.skip("splice(2) unavailable")
    pool = PipePool()
    yield pool
    pool.close()


@dataclass
class Link:
    """A relayed connection: the client's and the broker's ends, and the relay's fate."""

    client: trio.socket.SocketType
    server: trio.socket.SocketType
    traffic: Traffic
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    ending: Ending | None = None  # None if the relay was cancelled
    ended_at: float | None = None

    async def wait_ending(self) -> Ending | None:
        await self.done.wait()
        return self.ending

    def cancel(self) -> None:
        self.scope.cancel()


@asynccontextmanager
async def relayed(pipes, *, kind="tcp", timeouts=Timeouts()):
    client, proxy_client = await socket_pair(kind)
    proxy_server, server = await socket_pair(kind)
    link = Link(client, server, Traffic())

    async def run_relay():
        try:
            with link.scope:
                link.ending = await relay(
                    proxy_client, proxy_server, link.traffic, timeouts, pipes=pipes
                )
                link.ended_at = trio.current_time()
        finally:
            link.done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            yield link
            nursery.cancel_scope.cancel()
    finally:
        for sock in (client, proxy_client, proxy_server, server):
            sock.close()


async def send_all(sock, data) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view[: 1 << 20]) :]


async def send_forever(sock) -> None:
    """Keep sending until cancelled (the relay stops reading: backpressure)."""
    chunk = b"f" * (1 << 20)
    while True:
        await send_all(sock, chunk)


async def recv_exactly(sock, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


async def recv_to_eof(sock) -> bytes:
    data = bytearray()
    while chunk := await sock.recv(1 << 20):
        data += chunk
    return bytes(data)


async def digest_to_eof(sock) -> tuple[int, str]:
    digest, total = hashlib.sha256(), 0
    while chunk := await sock.recv(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    return total, digest.hexdigest()


def reset(sock) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def fds_after_a_first_relay() -> int:
    """Open fds once the run's shared relay poller (one epoll fd) exists."""
    async with relayed(None, kind="unix") as link:
        link.client.shutdown(socket.SHUT_WR)
        link.server.shutdown(socket.SHUT_WR)
        assert await link.wait_ending() is Ending.NORMAL
    return open_fds()


# --- data -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_request_and_reply_flow_and_clean_close_is_normal(pipes, kind):
    with trio.fail_after(IO_BOUND):
        async with relayed(pipes, kind=kind) as link:
            await send_all(link.client, b"AMQP\x00\x00\x09\x01")
            assert await recv_exactly(link.server, 8) == b"AMQP\x00\x00\x09\x01"
            await send_all(link.server, b"start" * 100)
            assert await recv_exactly(link.client, 500) == b"start" * 100
            link.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(link.server) == b""
            link.server.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(link.client) == b""
            assert await link.wait_ending() is Ending.NORMAL
            assert (link.traffic.bytes_in, link.traffic.bytes_out) == (8, 500)


async def test_64_mib_each_way_at_once_arrive_intact_and_counted(pipes):
    size = 64 << 20
    blob = random.Random(5672).randbytes(size)
    expected = hashlib.sha256(blob).hexdigest()
    received = {}

    async def send_then_close(sock):
        await send_all(sock, blob)
        sock.shutdown(socket.SHUT_WR)

    async def receive(name, sock):
        received[name] = await digest_to_eof(sock)

    with trio.fail_after(IO_BOUND * 2):
        async with relayed(pipes) as link:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_then_close, link.client)
                nursery.start_soon(send_then_close, link.server)
                nursery.start_soon(receive, "at_server", link.server)
                nursery.start_soon(receive, "at_client", link.client)
            assert await link.wait_ending() is Ending.NORMAL
    assert received == {"at_server": (size, expected), "at_client": (size, expected)}
    assert (link.traffic.bytes_in, link.traffic.bytes_out) == (size, size)


async def test_counters_are_live_while_the_connection_is_open(pipes):
    with trio.fail_after(IO_BOUND):
        async with relayed(pipes) as link:
            await send_all(link.client, b"p" * (1 << 20))
            await recv_exactly(link.server, 1 << 20)
            assert link.traffic.bytes_in == 1 << 20
            await send_all(link.server, b"c" * 1000)
            await recv_exactly(link.client, 1000)
            assert (link.traffic.bytes_in, link.traffic.bytes_out) == (1 << 20, 1000)
            assert not link.done.is_set()


# --- half-close -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("first", ["client", "server"])
async def test_half_close_is_forwarded_and_the_other_way_keeps_flowing(pipes, kind, first):
    with trio.fail_after(IO_BOUND):
        async with relayed(pipes, kind=kind) as link:
            closer, talker = (
                (link.client, link.server) if first == "client" else (link.server, link.client)
            )
            await send_all(closer, b"last words")
            closer.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(talker) == b"last words"
            for _ in range(3):  # the open direction still carries bulk data
                await send_all(talker, b"x" * 300_000)
                assert await recv_exactly(closer, 300_000) == b"x" * 300_000
            assert not link.done.is_set()
            talker.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(closer) == b""
            assert await link.wait_ending() is Ending.NORMAL


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("first", ["client", "server"])
async def test_data_and_its_end_arriving_together_are_both_forwarded(pipes, kind, first):
    """Bytes and the FIN right behind them reach the relay in one readiness
    report; the end must still be read and passed on, not waited for."""
    with trio.fail_after(IO_BOUND):
        async with relayed(pipes, kind=kind) as link:
            closer, talker = (
                (link.client, link.server) if first == "client" else (link.server, link.client)
            )
            await send_all(closer, b"ping")
            assert await recv_exactly(talker, 4) == b"ping"  # the relay is idle again
            # No checkpoint between the two: both are queued before the relay looks.
            os.write(closer.fileno(), b"tail")
            closer.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(talker) == b"tail"
            os.write(talker.fileno(), b"bye")
            talker.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(closer) == b"bye"
            assert await link.wait_ending() is Ending.NORMAL


# --- aborts -----------------------------------------------------------------


@pytest.mark.parametrize(
    "side, expected", [("client", Ending.CLIENT_ABORT), ("server", Ending.SERVER_ABORT)]
)
async def test_reset_of_an_idle_side_is_that_sides_abort(pipes, side, expected):
    with trio.fail_after(IO_BOUND):
        async with relayed(pipes) as link:
            await send_all(link.client, b"hello")
            await recv_exactly(link.server, 5)
            reset(getattr(link, side))
            assert await link.wait_ending() is expected


@pytest.mark.parametrize(
    "side, expected", [("client", Ending.CLIENT_ABORT), ("server", Ending.SERVER_ABORT)]
)
async def test_reset_of_the_receiving_side_during_a_stream_is_that_sides_abort(
    pipes, side, expected
):
    """The relay is blocked writing to the side that resets (it reads nothing)."""
    with trio.fail_after(IO_BOUND):
        async with relayed(pipes) as link:
            receiver = getattr(link, side)
            sender = link.server if side == "client" else link.client
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_forever, sender)
                counter = "bytes_out" if side == "client" else "bytes_in"
                await wait_until(lambda: getattr(link.traffic, counter) > 1 << 20, timeout=IO_BOUND, interval=0)
                reset(receiver)
                assert await link.wait_ending() is expected
                nursery.cancel_scope.cancel()


# --- timeouts ---------------------------------------------------------------
# Run on both clocks: trio's MockClock (virtual time, exact; the poller then
# waits through trio, the portable way) and trio's real clock (the poller
# nested in trio's I/O wait, the way Warren runs), with every duration
# scaled down and an expiry checked to come never early and not much late.


@dataclass(frozen=True)
class Timebase:
    """Test durations in units: seconds on the mock clock, `unit` s on the real one."""

    unit: float
    exact: bool
    slack: float = 2.0  # real clock: how late an expiry may come on a busy machine

    def __call__(self, units: float) -> float:
        return units * self.unit

    def assert_elapsed(self, elapsed: float, units: float) -> None:
        if self.exact:
            assert elapsed == pytest.approx(units)
        else:
            assert self(units) <= elapsed <= self(units) + self.slack


@pytest.fixture(params=["mock-clock", "real-clock"])
def clock(request):
    """The run's clock (pytest-trio uses a Clock fixture as the test run's)."""
    if request.param == "mock-clock":
        return trio.testing.MockClock(autojump_threshold=0)
    return SystemClock()


@pytest.fixture
def time_(clock) -> Timebase:
    if isinstance(clock, trio.testing.MockClock):
        return Timebase(unit=1.0, exact=True)
    return Timebase(unit=0.03, exact=False)


async def test_the_timeout_tests_run_both_ways_of_the_poller(clock):
    poller = current_poller()
    assert poller.mode == ("portable" if isinstance(clock, trio.testing.MockClock) else "nested")


async def test_without_timeouts_an_idle_connection_lives_on(pipes, autojump_clock):
    with trio.fail_after(VIRTUAL_BOUND):
        async with relayed(pipes) as link:
            with trio.move_on_after(7 * 24 * 3600):
                await link.done.wait()
            assert not link.done.is_set()


@asynccontextmanager
async def started_relay(timeouts: Timeouts, notify):
    """A relay started without a task (as a session does): yields its link."""
    client, proxy_client = await socket_pair("unix")
    proxy_server, server = await socket_pair("unix")
    try:
        yield start_relay(proxy_client, proxy_server, Traffic(), timeouts, pipes=None, owned=False, notify=notify)
    finally:
        for sock in (client, proxy_client, proxy_server, server):
            sock.close()


async def test_a_relay_retimed_to_no_timeout_is_not_kept_by_the_poller_once_stopped(autojump_clock):
    # An AMQP connection starts with the handshake timeout and is retimed to
    # none when it negotiates no heartbeat: the timer entry of its first
    # deadline must not come back as a never-due one that keeps the ended
    # link (and its whole session) in the poller's heap for ever.
    poller = current_poller()
    with trio.fail_after(VIRTUAL_BOUND):
        async with started_relay(Timeouts(client=10), notify=lambda result: None) as link:
            link.retime(Timeouts())
            await trio.sleep(20)  # the first deadline's entry comes due
            link.stop()
        assert not [entry for entry in poller._timers if entry[2] is link]


async def test_relays_ended_long_before_their_idle_deadline_do_not_pile_up_in_the_poller(autojump_clock):
    # Timer entries leave the heap when due; with an idle timeout of an hour,
    # every connection closed meanwhile (its link, its whole session) would
    # stay in memory until then: the heap sweeps such entries once it doubles.
    poller = current_poller()
    ended = 2 * poller_module._SWEEP_MIN + 100
    with trio.fail_after(VIRTUAL_BOUND):
        for _ in range(ended):
            async with started_relay(Timeouts(client=3600), notify=lambda result: None) as link:
                link.stop()
        assert len(poller._timers) < poller_module._SWEEP_MIN
        async with started_relay(Timeouts(client=5), notify=lambda result: None) as live:
            poller._sweep_timers()
            assert [entry[2] for entry in poller._timers] == [live]  # a live link keeps its entry
            live.stop()


class _WatchedLink(RelayLink):
    __slots__ = ("__weakref__",)


async def test_a_stopped_relay_is_not_kept_alive_by_its_timer_entries(autojump_clock):
    # Entries leave the heap when due (or in a sweep, once the heap doubled):
    # an ended relay (a session: its connection, dispatch, AMQP identity)
    # lived on in its entry until then, and in any entry an earlier deadline
    # superseded; under a stream of short connections thousands of ended
    # sessions were alive, walked by every older-generation collection.
    poller = current_poller()
    client, proxy_client = await socket_pair("unix")
    proxy_server, server = await socket_pair("unix")
    try:
        link = _WatchedLink(proxy_client, proxy_server, Traffic(), Timeouts(client=3600), None, poller, False,
                            lambda result: None)  # fmt: skip
        link.retime(Timeouts(client=60))  # an earlier deadline: the first entry is superseded
        entries = len(poller._timers)
        link.stop()
        alive = weakref.ref(link)
        del link
        assert len(poller._timers) == entries >= 2  # both entries still in the heap...
        assert alive() is None  # ...without the relay
        await trio.sleep(3601)  # and they come due harmlessly
        assert len(poller._timers) == 0
    finally:
        for sock in (client, proxy_client, proxy_server, server):
            sock.close()


@pytest.mark.parametrize("end", ["connected", "cancelled"])
async def test_a_finished_connect_wait_keeps_nothing_of_its_caller_in_the_poller(end):
    # Its timer entry stays in the heap until the connect deadline (or a
    # sweep); its callbacks are bound to a session (connection, dispatch,
    # counters), which must not live on with it: under a stream of short
    # connections those objects reached the collector's oldest generation,
    # and its full collections cost ~6 % of the proxy's CPU.
    class Caller:
        def connected(self, events):
            self.events = events

        def failed(self, error):
            raise AssertionError(error)

    poller = current_poller()
    caller = Caller()
    alive = weakref.ref(caller)
    with trio.fail_after(IO_BOUND), trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            assert sock.connect_ex(listener.getsockname()) == errno.EINPROGRESS
            waiter = poller.when_writable(sock.fileno(), trio.current_time() + 3600, caller.connected, caller.failed)
            if end == "connected":
                await wait_until(lambda: getattr(caller, "events", 0), timeout=IO_BOUND, interval=0)
            else:
                waiter.cancel()
            assert [entry for entry in poller._timers if entry[2] is waiter]  # still in the heap
            del caller
            assert alive() is None
        finally:
            poller.forget(sock.fileno())
            sock.close()


async def test_a_relay_retimed_to_no_timeout_and_back_times_out_again(autojump_clock):
    results = []
    with trio.fail_after(VIRTUAL_BOUND):
        async with started_relay(Timeouts(client=10), notify=results.append) as link:
            link.retime(Timeouts())
            await trio.sleep(20)
            assert results == []
            link.retime(Timeouts(client=5))
            start = trio.current_time()
            await wait_until(lambda: results, timeout=VIRTUAL_BOUND)
            assert trio.current_time() - start == pytest.approx(5, abs=1)
            assert results[0].unwrap() is Ending.CLIENT_TIMEOUT
            link.stop()


def _scaled(timeouts: Timeouts, time_: Timebase) -> Timeouts:
    return Timeouts(**{k: None if v is None else time_(v) for k, v in _fields(timeouts).items()})


@pytest.mark.parametrize(
    "timeouts, expected",
    [
        (Timeouts(client=10), Ending.CLIENT_TIMEOUT),
        (Timeouts(server=10), Ending.SERVER_TIMEOUT),
        (Timeouts(tunnel=10), Ending.CLIENT_TIMEOUT),
    ],
)
async def test_silence_ends_the_relay_after_the_idle_timeout(pipes, clock, time_, timeouts, expected):
    with trio.fail_after(VIRTUAL_BOUND):
        async with relayed(pipes, timeouts=_scaled(timeouts, time_)) as link:
            start = trio.current_time()
            assert await link.wait_ending() is expected
            time_.assert_elapsed(link.ended_at - start, 10)


@pytest.mark.parametrize(
    "timeouts, talker, expected",
    [
        # The server talking does not make the client any less silent.
        (Timeouts(client=10), "server", Ending.CLIENT_TIMEOUT),
        (Timeouts(server=10), "client", Ending.SERVER_TIMEOUT),
    ],
)
async def test_a_side_timeout_counts_only_that_sides_silence(
    pipes, clock, time_, timeouts, talker, expected
):
    with trio.fail_after(VIRTUAL_BOUND):
        async with relayed(pipes, timeouts=_scaled(timeouts, time_)) as link:
            start = trio.current_time()
            sender = getattr(link, talker)
            receiver = link.client if talker == "server" else link.server
            while not link.done.is_set():
                await send_all(sender, b"tick")
                await recv_exactly(receiver, 4)
                await trio.sleep(time_(3))
            assert link.ending is expected
            time_.assert_elapsed(link.ended_at - start, 10)


@pytest.mark.parametrize("talker", ["client", "server"])
async def test_tunnel_timeout_is_pushed_back_by_traffic_either_way(pipes, clock, talker):
    # Traffic every 6 units against a 10-unit tunnel: on the real clock a
    # unit of 0.1 s leaves 0.4 s for a busy machine's scheduling delays.
    time_ = Timebase(unit=1.0, exact=True) if isinstance(clock, trio.testing.MockClock) else Timebase(0.1, False)
    with trio.fail_after(VIRTUAL_BOUND):
        timeouts = _scaled(Timeouts(tunnel=10, client=1, server=1), time_)
        async with relayed(pipes, timeouts=timeouts) as link:
            start = trio.current_time()
            sender = getattr(link, talker)
            receiver = link.client if talker == "server" else link.server
            for _ in range(3):  # 18 units: the tunnel would have expired at 10
                await trio.sleep(time_(6))
                await send_all(sender, b"tick")
                assert await recv_exactly(receiver, 4) == b"tick"
            assert not link.done.is_set()
            pushed = trio.current_time()
            # Both directions idle: the client is the one the relay was waiting on.
            assert await link.wait_ending() is Ending.CLIENT_TIMEOUT
            time_.assert_elapsed(link.ended_at - pushed, 10)
            if time_.exact:
                assert link.ended_at - start == pytest.approx(28)


async def test_a_side_not_reading_is_blamed_for_the_timeout(pipes, clock, time_):
    """The client keeps sending; the server reads nothing, so the relay waits on it."""
    with trio.fail_after(VIRTUAL_BOUND):
        async with relayed(pipes, timeouts=_scaled(Timeouts(client=10, server=30), time_)) as link:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_forever, link.client)
                assert await link.wait_ending() is Ending.SERVER_TIMEOUT
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("base", [Timeouts(client=100, server=100), Timeouts(tunnel=100)])
async def test_client_fin_bounds_the_wait_for_the_client_after_the_server_ended(pipes, clock, time_, base):
    timeouts = _scaled(Timeouts(**{**_fields(base), "client_fin": 5}), time_)
    with trio.fail_after(VIRTUAL_BOUND):
        async with relayed(pipes, timeouts=timeouts) as link:
            await trio.sleep(time_(12))  # below the base timeouts
            link.server.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(link.client) == b""
            shut = trio.current_time()
            assert await link.wait_ending() is Ending.CLIENT_TIMEOUT
            time_.assert_elapsed(link.ended_at - shut, 5)


@pytest.mark.parametrize("base", [Timeouts(client=100, server=100), Timeouts(tunnel=100)])
async def test_server_fin_bounds_the_wait_for_the_server_after_the_client_ended(pipes, clock, time_, base):
    timeouts = _scaled(Timeouts(**{**_fields(base), "server_fin": 5}), time_)
    with trio.fail_after(VIRTUAL_BOUND):
        async with relayed(pipes, timeouts=timeouts) as link:
            await trio.sleep(time_(12))  # below the base timeouts
            link.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(link.server) == b""
            shut = trio.current_time()
            assert await link.wait_ending() is Ending.SERVER_TIMEOUT
            time_.assert_elapsed(link.ended_at - shut, 5)


def _fields(timeouts: Timeouts) -> dict:
    return {field.name: getattr(timeouts, field.name) for field in dataclasses.fields(Timeouts) if field.init}


def test_timeouts_say_once_whether_any_is_set_and_what_each_side_may_wait():
    assert not Timeouts().enabled
    assert Timeouts().waits == (math.inf,) * 4
    assert Timeouts(server_fin=3).enabled
    timeouts = Timeouts(client=1, server=2, client_fin=3)
    assert timeouts.waits == (1, 2, 3, 2)
    assert timeouts.waits == tuple(timeouts.limit(side, fin=fin) for fin in (False, True) for side in (0, 1))
    assert Timeouts(client=1, tunnel=7, server_fin=4).waits == (7, 7, 7, 4)
    assert Timeouts(client=1) == Timeouts(client=1) and hash(Timeouts(client=1)) == hash(Timeouts(client=1))


def test_timeouts_must_be_positive():
    with pytest.raises(ValueError, match="client_fin"):
        Timeouts(client_fin=0)


# --- cancellation, pipes and file descriptors -------------------------------


async def test_cancellation_leaves_no_pipe_behind(pipes):
    """Cancelled while a pipe holds bytes the server will not read."""
    with trio.fail_after(IO_BOUND):
        fds_before = await fds_after_a_first_relay()
        async with relayed(pipes) as link:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_forever, link.client)
                await wait_until(lambda: link.traffic.bytes_in > 1 << 20, timeout=IO_BOUND, interval=0)
                if pipes is not None:
                    await wait_until(lambda: pipes.statistics().in_use == 1, timeout=IO_BOUND, interval=0)
                link.cancel()
                assert await link.wait_ending() is None
                nursery.cancel_scope.cancel()
    if pipes is not None:
        stats = pipes.statistics()
        assert stats.in_use == 0
        pipes.close()
    assert open_fds() == fds_before


async def test_idle_connections_hold_no_pipe(splice_pool):
    with trio.fail_after(IO_BOUND):
        async with relayed(splice_pool) as first, relayed(splice_pool) as second:
            for link in (first, second):
                async with trio.open_nursery() as nursery:  # bulk both ways: spliced
                    nursery.start_soon(send_all, link.client, b"b" * (8 << 20))
                    nursery.start_soon(send_all, link.server, b"B" * (8 << 20))
                    await recv_exactly(link.server, 8 << 20)
                    await recv_exactly(link.client, 8 << 20)
            assert splice_pool.statistics().created >= 1
            await wait_until(lambda: splice_pool.statistics().in_use == 0, timeout=IO_BOUND, interval=0)
            assert not first.done.is_set() and not second.done.is_set()


async def test_small_messages_are_copied_and_bulk_is_spliced(splice_pool):
    """Like HAProxy's splice-auto: two splices cost more than a copy for a few bytes."""
    with trio.fail_after(IO_BOUND):
        async with relayed(splice_pool) as link:
            for _ in range(20):
                await send_all(link.client, b"publish" * 100)
                await recv_exactly(link.server, 700)
                await send_all(link.server, b"ack")
                await recv_exactly(link.client, 3)
            assert splice_pool.statistics().created == 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all, link.client, b"m" * (16 << 20))
                assert await recv_exactly(link.server, 16 << 20) == b"m" * (16 << 20)
            assert splice_pool.statistics().created == 1


async def test_pipes_are_reused_across_connections(splice_pool):
    with trio.fail_after(IO_BOUND):
        for _ in range(10):
            async with relayed(splice_pool) as link:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_all, link.client, b"m" * (4 << 20))
                    await recv_exactly(link.server, 4 << 20)
                link.client.shutdown(socket.SHUT_WR)
                link.server.shutdown(socket.SHUT_WR)
                assert await link.wait_ending() is Ending.NORMAL
    stats = splice_pool.statistics()
    assert 1 <= stats.created <= 2 and stats.in_use == 0


async def test_a_batch_of_relays_leaks_no_file_descriptor(pipes):
    with trio.fail_after(IO_BOUND):
        fds_before = await fds_after_a_first_relay()
        for round_ in range(12):
            async with relayed(pipes, kind="tcp" if round_ % 2 else "unix") as link:
                await send_all(link.client, b"d" * 200_000)
                await send_all(link.server, b"u" * 100_000)
                await recv_exactly(link.server, 200_000)
                await recv_exactly(link.client, 100_000)
                if round_ % 3 == 0:
                    link.client.shutdown(socket.SHUT_WR)
                    link.server.shutdown(socket.SHUT_WR)
                    assert await link.wait_ending() is Ending.NORMAL
                elif round_ % 3 == 1 and round_ % 2:
                    reset(link.server)
                    assert await link.wait_ending() is Ending.SERVER_ABORT
                # else: cancelled when the block exits
    if pipes is not None:
        pipes.close()
    assert open_fds() == fds_before


class _NoPipesLeft(PipePool):
    def acquire(self):
        raise OSError(errno.EMFILE, "Too many open files")


async def test_splice_falls_back_to_copying_when_no_pipe_can_be_made():
    with trio.fail_after(IO_BOUND), structlog.testing.capture_logs() as logs:
        async with relayed(_NoPipesLeft()) as link:
            await send_all(link.client, b"a" * 500_000)
            assert await recv_exactly(link.server, 500_000) == b"a" * 500_000
            await send_all(link.server, b"b" * 500_000)
            assert await recv_exactly(link.client, 500_000) == b"b" * 500_000
            link.client.shutdown(socket.SHUT_WR)
            link.server.shutdown(socket.SHUT_WR)
            assert await link.wait_ending() is Ending.NORMAL
            assert (link.traffic.bytes_in, link.traffic.bytes_out) == (500_000, 500_000)
    assert {"event": "relay.splice_fallback", "errno": errno.EMFILE, "log_level": "warning"} in logs


class _PipesWithBadFds(PipePool):
    """Lends a 'pipe' whose fds are not open: splice fails with EBADF, a bug."""

    def acquire(self):
        return Pipe(read_fd=2**20, write_fd=2**20 + 1, size=1 << 20)

    def release(self, pipe):
        pass

    def discard(self, pipe):
        pass


async def test_unexpected_errors_propagate_instead_of_ending_the_relay():
    with trio.fail_after(IO_BOUND):
        with pytest.raises(BaseExceptionGroup) as caught:
            async with relayed(_PipesWithBadFds()) as link:
                await send_all(link.client, b"e" * (1 << 20))  # bulk: spliced
                await link.wait_ending()
    assert caught.group_contains(OSError, match="Bad file descriptor")


# --- taking over a connect --------------------------------------------------


class _CountingEpoll:
    """The poller's epoll, counting the registrations asked of the kernel."""

    def __init__(self, epoll) -> None:
        self._epoll = epoll
        self.calls: list[str] = []

    def register(self, fd, mask):
        self.calls.append("register")
        self._epoll.register(fd, mask)

    def modify(self, fd, mask):
        self.calls.append("modify")
        self._epoll.modify(fd, mask)

    def __getattr__(self, name):
        return getattr(self._epoll, name)


@asynccontextmanager
async def connected_by_the_poller(*, banner: bytes = b""):
    """(proxy_client, client, proxy_server, server, poller): proxy_server is
    a plain non-blocking socket whose connect completed in the relays'
    poller (as a session's does); the server end sends `banner` at once."""
    poller = current_poller()
    counting = poller._epoll = _CountingEpoll(poller._epoll)
    client, proxy_client = await socket_pair("tcp")
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        proxy_server = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        assert proxy_server.connect_ex(listener.getsockname()) == errno.EINPROGRESS
        events = await poller.wait_writable(proxy_server.fileno(), trio.current_time() + IO_BOUND)
        assert events & select.EPOLLOUT
        server, _ = await listener.accept()
    if banner:
        await send_all(server, banner)
    try:
        yield proxy_client, client, proxy_server, server, counting
    finally:
        poller._epoll = counting._epoll
        for sock in (client, proxy_client, server):
            sock.close()
        if proxy_server.fileno() != -1:
            poller.drop(proxy_server.fileno())
            proxy_server.close()


async def relay_until_closed(proxy_client, proxy_server, *, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    await relay(proxy_client, proxy_server, Traffic(), owned=True)


async def test_a_relay_takes_over_a_connected_socket_without_registering_it_again():
    with trio.fail_after(IO_BOUND):
        async with connected_by_the_poller() as (proxy_client, client, proxy_server, server, epoll):
            epoll.calls.clear()
            async with trio.open_nursery() as nursery:
                await nursery.start(relay_until_closed, proxy_client, proxy_server)
                await send_all(client, b"ping")
                assert await recv_exactly(server, 4) == b"ping"
                await send_all(server, b"pong")
                assert await recv_exactly(client, 4) == b"pong"
                client.shutdown(socket.SHUT_WR)
                server.shutdown(socket.SHUT_WR)
    # The client's socket is new to the poller; the server's was registered
    # by the connect wait, edge-triggered for both ways already.
    assert epoll.calls == ["register"]


async def test_what_a_server_sends_before_the_relay_starts_still_reaches_the_client():
    with trio.fail_after(IO_BOUND):
        async with connected_by_the_poller(banner=b"AMQP-like greeting") as (
            proxy_client, client, proxy_server, server, epoll,
        ):
            # The greeting's edge reaches the poller before any relay owns the socket.
            waiter = current_poller()._links[proxy_server.fileno()]
            await wait_until(lambda: waiter.events[0] & select.EPOLLIN, timeout=IO_BOUND, interval=0)
            async with trio.open_nursery() as nursery:
                await nursery.start(relay_until_closed, proxy_client, proxy_server)
                assert await recv_exactly(client, 18) == b"AMQP-like greeting"
                client.shutdown(socket.SHUT_WR)
                server.shutdown(socket.SHUT_WR)


# --- the poller inside trio's loop --------------------------------------------


async def test_trio_tasks_keep_their_timing_while_the_poller_blocks(pipes):
    """The hook blocks in the relays' epoll in trio's place: a sleeping task
    must still wake at its deadline, not a second timeout later, and trio's
    own I/O (a thread's result, a socket) must still reach its tasks."""
    with trio.fail_after(IO_BOUND):
        async with relayed(pipes) as link:
            await send_all(link.client, b"x")
            assert await recv_exactly(link.server, 1) == b"x"  # the relay is idle now
            started = trio.current_time()
            await trio.sleep(0.5)
            assert trio.current_time() - started < 0.9  # 1.0 if the timeout were waited twice
            assert await trio.to_thread.run_sync(lambda: "from a thread") == "from a thread"
            a, b = trio.socket.socketpair()
            with a, b:
                await a.send(b"y")
                assert await b.recv(1) == b"y"
            await send_all(link.server, b"z")
            assert await recv_exactly(link.client, 1) == b"z"


# --- small segments through default-sized pipes ---------------------------------------


def _refuse_pipe_resizing(monkeypatch) -> None:
    """As beyond pipe-user-pages-soft without CAP_SYS_RESOURCE: F_SETPIPE_SZ
    fails with EPERM and every pipe keeps its default 16 slots."""
    real_fcntl = pipes_module.fcntl.fcntl

    def refusing_fcntl(fd, cmd, arg=0):
        if cmd == pipes_module._F_SETPIPE_SZ:
            raise OSError(errno.EPERM, "over pipe-user-pages-soft")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(pipes_module.fcntl, "fcntl", refusing_fcntl)


class _RecordingPool(PipePool):
    """A pool that remembers the capacity of every pipe it created."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def _create_pipe(self) -> Pipe:
        pipe = super()._create_pipe()
        self.sizes.append(pipe.size)
        return pipe


@pytest.mark.parametrize("segment", [20, 100, 600])
async def test_many_small_segments_through_a_default_sized_pipe_all_arrive(monkeypatch, segment):
    """A pipe has 16 slots when its resize is refused, and a splice out of a
    socket holding many small segments fills them with far less than 16 KiB
    while the socket still holds more. The relay must not take that short
    splice for a drained socket: edge-triggered epoll would never wake it
    again while the sender waits for an answer. (Without the fix, 20- and
    100-byte segments stalled here; 600-byte ones did not.)"""
    _refuse_pipe_resizing(monkeypatch)
    if not splice_supported():
        pytest.skip("splice(2) unavailable")
    pool = _RecordingPool()
    bulk, small = 1 << 20, 200 * 1024
    with trio.fail_after(IO_BOUND):
        async with relayed(pool) as link:
            await send_all(link.client, b"b" * bulk)  # a bulk transfer: spliced from now on
            assert await recv_exactly(link.server, bulk) == b"b" * bulk
            # A blocking plain socket on the same connection, for the thread.
            sender = socket.socket(fileno=os.dup(link.client.fileno()))
            sender.setblocking(True)
            sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            chunk = b"s" * segment

            def send_small_segments() -> None:
                for _ in range(small // segment):
                    sender.send(chunk)

            # The relay is slow: trio's thread (the relay's) is blocked while
            # the segments pile up, until all are sent or the buffers are full.
            thread = threading.Thread(target=send_small_segments, daemon=True)
            thread.start()
            thread.join(IO_BOUND / 6)
            received = await recv_exactly(link.server, small // segment * segment)
            thread.join()
            sender.close()
            assert received == chunk * (small // segment)
    assert pool.sizes and max(pool.sizes) < 1 << 20  # default-sized pipes only
    pool.close()


# --- one link's failure is that link's alone ------------------------------------------


class _ExpiryFails(RelayLink):
    """A relay whose idle timer fails when it fires (a bug in expire)."""

    __slots__ = ()

    def expire(self) -> None:
        raise RuntimeError("boom in expire")


class _ExpiryAndFailFail(_ExpiryFails):
    """... and whose owner's error handling fails too."""

    __slots__ = ()

    def fail(self, error: Exception) -> None:
        raise RuntimeError("boom in fail")


@asynccontextmanager
async def faulty_link(cls, timeouts: Timeouts):
    """A relay of class `cls` (a Link) and the outcomes its owner heard."""
    client, proxy_client = await socket_pair("tcp")
    proxy_server, server = await socket_pair("tcp")
    heard: list = []
    link = cls(proxy_client, proxy_server, Traffic(), timeouts, None, current_poller(), False, heard.append)
    try:
        yield link, heard
    finally:
        link.stop()
        for sock in (client, proxy_client, proxy_server, server):
            sock.close()


async def _still_relays(link: Link) -> None:
    await send_all(link.client, b"still")
    assert await recv_exactly(link.server, 5) == b"still"
    await send_all(link.server, b"here")
    assert await recv_exactly(link.client, 4) == b"here"


async def test_a_failing_expiry_ends_that_relay_alone_and_the_poller_serves_on(clock, time_):
    with trio.fail_after(VIRTUAL_BOUND):
        async with relayed(None) as healthy, faulty_link(_ExpiryFails, _scaled(Timeouts(tunnel=1), time_)) as (
            faulty, heard,
        ):
            await wait_until(lambda: heard, timeout=IO_BOUND, interval=time_(0.1))
            (result,) = heard
            with pytest.raises(RuntimeError, match="boom in expire"):
                result.unwrap()  # the relay's owner gets the error
            await _still_relays(healthy)
            assert not healthy.done.is_set()


async def test_a_link_whose_failure_handling_fails_too_is_dropped_and_logged(clock, time_):
    with trio.fail_after(VIRTUAL_BOUND), structlog.testing.capture_logs() as logs:
        async with relayed(None) as healthy, faulty_link(
            _ExpiryAndFailFail, _scaled(Timeouts(tunnel=1), time_)
        ) as (faulty, heard):
            poller = current_poller()
            await wait_until(lambda: any(e["event"] == "poller.link_failed" for e in logs), timeout=IO_BOUND,
                             interval=time_(0.1))
            assert faulty.fds[0] not in poller._links and faulty.fds[1] not in poller._links
            assert heard == []
            await _still_relays(healthy)
    (failed,) = [e for e in logs if e["event"] == "poller.link_failed"]
    assert failed["log_level"] == "error" and "boom in expire" in failed["error"]
