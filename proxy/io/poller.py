"""The relays' shared poller: one epoll and one timer heap per trio run.

See :mod:`proxy.io.relay` for why relays do not use trio's own I/O
waits. A link is anything with the attributes and methods the relay's
``Link`` has: ``fds``, ``events``, ``queued``, ``notify``,
``scheduled``, ``deadline``, ``serve()``, ``expire()``, ``fail(error)``:
a relay, a connect wait (``Writable``), a listening socket (the
listener's acceptor). ``notify`` is None once the link is finished: the
poller no longer serves it.

What a link does when served is that link's business: an exception from
its ``serve()`` or ``expire()`` goes to its ``fail()``, and one from there
drops the link with a ``poller.link_failed`` error log. Nothing a link does
ends the poller, whose failure would strand every relay of the run.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import math
import select
import time
from typing import Any, Callable, Final

import outcome
import structlog
import trio

from . import trio_nesting

log = structlog.get_logger("warren.poller")
_perf_counter: Final = time.perf_counter

Link = Any  # proxy.io.relay.Link, Writable (typed loosely to avoid an import cycle)

# How relay sockets are registered: once, edge-triggered, for reading and
# writing (see ``Poller``). A connect waits on the same registration, so the
# relay that follows takes the socket over without a system call.
EDGE_MASK: Final = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
# What ends a connect wait: the socket is writable (connected) or failed.
_CONNECT_ENDED: Final = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


_SWEEP_MIN: Final = 4096  # no sweep of the timer heap below this many entries


class _Retired:
    """What a timer entry points to once its link let go of it (``retire``):
    never due (no time equals None), never served."""

    __slots__ = ()
    scheduled = None
    notify = None


_RETIRED: Final = _Retired()


def retire(entry: list | None) -> None:
    """The timer `entry` (from :meth:`Poller.wake_at`) is stale: it lets go
    of its link at once instead of holding it until due or swept.

    A relay retires its entry when it stops or pushes an earlier one: an
    entry stays in the heap until its deadline (or a sweep, once the heap
    doubled) and held the link, that is a session and everything it refers
    to, for that long. Under a stream of short connections a few thousand
    ended sessions were alive at any time, walked again by every collection
    of the cyclic collector's older generations (bench/OPTIMISATIONS.md)."""
    if entry is not None:
        entry[2] = _RETIRED


class Poller:
    """One epoll instance and one timer heap for every relay of a trio run.

    Relays register their sockets here rather than in trio's own epoll, so
    that one wake-up serves both sockets of a connection, and so that idle
    connections cost no task stack of their own; listeners and connect
    waits too, so that a new client is accepted, connected and relayed
    without a trio task switch. Serving moves bytes right
    away (moving never blocks), so no task switch per wake-up is needed.
    Relay sockets are registered once, edge-triggered, for both reading and
    writing: no system call per event to re-arm them (a relay only waits for
    an edge after draining a socket or filling it). Links that stopped at
    their round budget are served again after others had a turn.

    Where it waits, two ways (``run``, ``mode``): normally from trio's
    ``before_io_wait`` hook, blocking in this epoll with trio's own epoll
    nested in it while trio has nothing to do (``"nested"``, see
    :mod:`proxy.io.trio_nesting`); with a test's mock clock, an untested
    trio, or trio internals not as expected, a system task sleeps in trio on
    this epoll's file descriptor under a cancel scope set to the earliest
    timer (``"portable"``, ``_run_in_trio``).
    """

    __slots__ = (
        "_epoll", "_links", "_busy", "_timers", "_sweep_at", "_sleep", "_order", "_nested", "mode", "_offset",
    )  # fmt: skip

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._links: dict[int, Link] = {}
        self._busy: list[Link] = []  # links with more to move at once
        self._timers: list[list] = []  # [when, tie-breaker, link] (lists: ``retire`` clears the link)
        self._sweep_at = _SWEEP_MIN  # heap size at which stale entries are swept
        self._sleep: trio.CancelScope | None = None
        self._order = itertools.count()  # heap tie-breaker: links don't compare
        # Decided once, in the run that creates it (see run).
        self._nested = trio_nesting.probe()
        self.mode = "portable" if isinstance(self._nested, str) else "nested"
        # The nested way reads trio's system clock itself (``now``).
        self._offset = math.nan

    def watch(self, fd: int, link: Link, mask: int) -> None:
        """Serve `link` when `fd` reports events of the epoll `mask`.

        An fd whose connect wait just ended (``when_writable``) is already
        registered with ``EDGE_MASK``: taken over with that mask, it costs no
        system call, unless events came for it since the connect completed
        (a server speaking first), which a modify reports again. Any other
        fd already registered is taken over with one modify; like a
        registration, the modify reports the fd at once if already ready.
        Whoever closes a watched fd calls ``drop`` or ``forget`` first, so
        an entry here always describes the fd's current registration.
        """
        old = self._links.get(fd)
        if (
            mask == EDGE_MASK and type(old) is Writable and old.connected
            and old.notify is None and not old.events[0]
        ):
            self._links[fd] = link
        else:
            self._register(fd, link, mask)

    def _register(self, fd: int, link: Link, mask: int) -> None:
        if fd in self._links:
            try:
                self._epoll.modify(fd, mask)
            except FileNotFoundError:  # a stale entry: that fd was closed since
                self._epoll.register(fd, mask)
        else:
            self._epoll.register(fd, mask)
        self._links[fd] = link

    def forget(self, fd: int) -> None:
        if self._links.pop(fd, None) is None:
            return
        try:
            self._epoll.unregister(fd)
        except OSError as exc:
            # EBADF/ENOENT: the caller closed the socket under a running relay;
            # closing already removed it from the epoll set.
            if exc.errno not in (errno.EBADF, errno.ENOENT):
                raise

    def drop(self, fd: int) -> None:
        """Forget `fd` without a system call: the caller closes it right away,
        which removes it from the epoll set anyway."""
        self._links.pop(fd, None)

    async def wait_writable(self, fd: int, deadline: float) -> int:
        """Sleeps until `fd` is writable or has failed; returns its epoll
        events, or 0 once `deadline` passes (a connect in progress).

        The registration is left in place for the relay to take over
        (``watch``); whoever closes the fd first calls ``drop`` or ``forget``.
        """
        task = trio.lowlevel.current_task()
        waiter = self.when_writable(
            fd, deadline,
            lambda events: trio.lowlevel.reschedule(task, outcome.Value(events)),
            lambda error: trio.lowlevel.reschedule(task, outcome.Error(error)),
        )  # fmt: skip
        return await trio.lowlevel.wait_task_rescheduled(waiter.abort)

    def when_writable(
        self, fd: int, deadline: float, notify: Callable[[int], Any], fail: Callable[[Exception], Any]
    ) -> Writable:
        """Like :meth:`wait_writable`, for callbacks: `notify` gets the
        events (0 on timeout), `fail` an unexpected error, unless the
        returned waiter is cancelled first."""
        waiter = Writable(fd, deadline, notify, fail)
        self._register(fd, waiter, EDGE_MASK)
        self.wake_at(waiter, deadline)
        return waiter

    def poke(self, link: Link) -> None:
        """Serve `link` in the next round, as if it had reported an event
        (a socket map's notification: proxy.io.kernel_relay.RingWatch)."""
        if not link.queued:
            link.queued = True
            self._busy.append(link)

    def wake_at(self, link: Link, when: float) -> list | None:
        """Call `link`'s ``expire`` at `when` if its ``deadline`` has passed
        then (else look again at its deadline then). Returns the timer
        entry, which the link may ``retire`` once it no longer needs it."""
        if when == math.inf:
            # Never due: an entry would only keep the link (and everything
            # it holds) alive after it ended, as entries leave the heap
            # only when due. The link's ``scheduled`` stays inf, so a finite
            # deadline later is pushed again.
            return None
        timers = self._timers
        entry = [when, next(self._order), link]
        heapq.heappush(timers, entry)
        if len(timers) >= self._sweep_at:
            self._sweep_timers()
        if self._sleep is not None and when < self._sleep.deadline:
            self._sleep.deadline = when
        return entry

    def _sweep_timers(self) -> None:
        """Drops the heap's stale entries: those of ended links and those
        superseded by an earlier deadline. Entries otherwise leave only when
        due, and each holds its link (a session and all it refers to) unless
        the link retired it (``retire``: relays do): with an idle timeout of
        hours, every connection closed meanwhile would stay in memory until
        then, and the heap itself grows. Swept in place (``_fire_timers`` holds the
        list) when the heap doubles since the last sweep: amortised O(1)
        per entry."""
        timers = self._timers
        timers[:] = [entry for entry in timers if entry[0] == entry[2].scheduled and entry[2].notify is not None]
        heapq.heapify(timers)
        self._sweep_at = max(_SWEEP_MIN, 2 * len(timers))

    async def run(self) -> None:
        """Serve the links until cancelled, the fast way when trio allows it
        (:mod:`proxy.io.trio_nesting`), else the portable way; ``mode`` says which."""
        nested = self._nested
        try:
            if isinstance(nested, str):
                # Only a test's clock is expected; anything else costs CPU.
                level = log.debug if nested == trio_nesting.TEST_CLOCK else log.warning
                level("poller.portable", reason=nested)
                await self._run_in_trio()
            else:
                await trio_nesting.serve_from_io_wait(self, *nested)
        finally:
            self._epoll.close()

    async def _run_in_trio(self) -> None:
        """Sleep in trio's epoll, on this epoll's fd (the portable way)."""
        epoll_fd = self._epoll.fileno()
        timers = self._timers
        while True:
            # One cancel scope per timer expiry, not per batch of events:
            # its deadline follows the earliest timer.
            with trio.CancelScope(deadline=timers[0][0] if timers else math.inf) as sleep:
                self._sleep = sleep
                while True:
                    if self._busy:
                        await trio.lowlevel.checkpoint()
                    else:
                        await trio.lowlevel.wait_readable(epoll_fd)
                    self._serve_ready_links(self._epoll.poll(0))
                    if timers:
                        self._fire_timers(trio.current_time())
                        earliest = timers[0][0] if timers else math.inf
                        if earliest != sleep.deadline:
                            sleep.deadline = earliest
            self._sleep = None
            self._fire_timers(trio.current_time())

    # -- for the nested way (proxy.io.trio_nesting) -----------------------------------

    def nest(self, fd: int, offset: float) -> None:
        """Watch `fd` (trio's own epoll) without a link: its readiness is
        what :meth:`serve_once` returns. `offset`: that of the run's clock,
        trio's system clock (``now``)."""
        self._epoll.register(fd, select.EPOLLIN)
        self._offset = offset

    def now(self) -> float:
        """The run's clock (``trio.current_time()``). Nested, it is trio's
        system clock, read here as that clock reads itself (its offset plus
        ``time.perf_counter()``): a compiled call, where trio's takes three
        Python calls (some ten per connection)."""
        offset = self._offset
        if offset == offset:  # not NaN: nested
            return offset + _perf_counter()
        return trio.current_time()

    def serve_until(self, end: float, now: float, nested_fd: int, runq: Any) -> bool:
        """Serve (:meth:`serve_once`) until `nested_fd` is ready (True), or
        `runq` (trio's run queue) has a task or `end` has passed (False).
        Here rather than in its caller (:mod:`proxy.io.trio_nesting`) so
        that the loop runs compiled."""
        while True:
            nested_ready, now = self.serve_once(end, now, nested_fd)
            if nested_ready:
                return True
            if runq or now >= end:
                return False

    def serve_once(self, until: float, now: float, nested_fd: int) -> tuple[bool, float]:
        """Wait for events until `until` at the latest (not at all while
        links wait for another round, never past the earliest timer; `now`
        is the time now), serve the ready links and the timers due. Returns
        (whether `nested_fd` (see :meth:`nest`) is ready, the time after)."""
        timers = self._timers
        if self._busy or until <= now:
            wait = 0.0
        else:
            wait = (min(until, timers[0][0]) if timers else until) - now
            if wait < 0.0:
                wait = 0.0
        nested_ready = self._serve_ready_links(self._epoll.poll(wait), nested_fd)
        now = self.now()
        if timers and timers[0][0] <= now:
            self._fire_timers(now)
        return nested_ready, now

    # -- serving -------------------------------------------------------------------

    def _serve_ready_links(self, events: list[tuple[int, int]], trio_fd: int = -1) -> bool:
        """Serve the links with `events` (and those that stopped at their
        budget); True if `trio_fd` is among the events."""
        ready, self._busy = self._busy, []
        for link in ready:
            link.queued = True
        links, trio_ready = self._links, False
        for fd, fd_events in events:
            link = links.get(fd)
            if link is None:
                trio_ready = trio_ready or fd == trio_fd
                continue
            side = 0 if fd == link.fds[0] else 1
            link.events[side] |= fd_events
            if not link.queued:
                link.queued = True
                ready.append(link)
        busy = self._busy
        for link in ready:
            link.queued = False
            if link.notify is None:
                continue  # finished or cancelled since
            try:
                if link.serve():
                    busy.append(link)
            except Exception as exc:
                self._contain(link, exc)
        return trio_ready

    def _fire_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            entry = heapq.heappop(timers)
            when, _, link = entry
            if when != link.scheduled or link.notify is None:
                continue  # superseded by an earlier timer, or the relay ended
            if link.deadline <= now:
                link.scheduled = math.inf
                try:
                    link.expire()
                except Exception as exc:
                    self._contain(link, exc)
            else:
                # Pushed back by traffic since (or no longer bounded: its
                # timeouts were retimed away): look again then.
                link.scheduled = link.deadline
                if link.deadline != math.inf:
                    # The same entry again: a link that keeps it can still retire it.
                    entry[0], entry[1] = link.deadline, next(self._order)
                    heapq.heappush(timers, entry)


    def _contain(self, link: Link, error: Exception) -> None:
        """Serving `link` (or its deadline) raised: a bug or an unexpected OS
        error, which belongs to that link alone, never to the poller that
        serves everyone. The link hears it (``fail``: a relay's owner gets
        the error, a session ends with PD); if even that raises, the link
        is dropped here, logged, and never served again."""
        try:
            link.fail(error)
        except Exception as second:
            log.error("poller.link_failed", fds=link.fds, error=repr(error), exc_info=second)
            link.notify = None
            for fd in link.fds:
                if self._links.get(fd) is link:
                    del self._links[fd]


_POLLER: Final[trio.lowlevel.RunVar[Poller]] = trio.lowlevel.RunVar("warren_relay_poller")


def current_poller() -> Poller:
    """The run's poller, started on first use (its system task installs
    the I/O-wait hook, or waits through trio the portable way)."""
    try:
        return _POLLER.get()
    except LookupError:
        poller = Poller()
        trio.lowlevel.spawn_system_task(poller.run, name="warren.relay.poller")
        _POLLER.set(poller)
        return poller


class Writable:
    """A link that waits for one fd to turn writable (a connect completing).

    The fd is registered with ``EDGE_MASK``, so whoever takes it over next
    (the relay) finds it registered. Events that come after the connect
    completed are kept in ``events`` until then.
    """

    __slots__ = ("fds", "events", "queued", "notify", "on_error", "scheduled", "deadline", "connected")

    def __init__(
        self, fd: int, deadline: float, notify: Callable[[int], Any], fail: Callable[[Exception], Any]
    ) -> None:
        self.fds = (fd,)
        self.events = [0]
        self.queued = False
        self.notify: Callable[[int], Any] | None = notify
        self.on_error: Callable[[Exception], Any] | None = fail
        self.scheduled = self.deadline = deadline
        self.connected = False  # the wait ended with the fd's readiness

    def serve(self) -> bool:
        events = self.events[0]
        if not events & _CONNECT_ENDED:
            return False
        self.events[0] = events & ~_CONNECT_ENDED  # anything else is news for the next owner
        self.scheduled = math.inf  # the timer entry is stale from now on
        self.connected = True
        self._finish(events)
        return False

    def expire(self) -> None:
        self._finish(0)

    def fail(self, error: Exception) -> None:
        on_error = self.on_error
        if on_error is not None:  # None together with notify
            self.notify = self.on_error = None
            on_error(error)

    def _finish(self, events: int) -> None:
        # Both callbacks let go: the stale timer entry keeps this waiter until
        # its deadline (or a sweep), and callbacks are bound to the session
        # (its connection, dispatch, counters): ~17 objects per connection
        # that survived into the collector's oldest generation, whose full
        # collections then took ~6 % of the CPU of a stream of connections.
        notify = self.notify
        if notify is not None:
            self.notify = self.on_error = None
            notify(events)

    def cancel(self) -> None:
        """No outcome will be delivered (the caller gave up waiting)."""
        self.notify = self.on_error = None
        self.scheduled = math.inf

    def abort(self, raise_cancel) -> trio.lowlevel.Abort:
        self.cancel()
        return trio.lowlevel.Abort.SUCCEEDED
