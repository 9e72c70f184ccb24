"""The relay: bytes between a client socket and a broker socket, both ways.

One connection's data path once the broker connection is established.
8,000 mostly idle AMQP connections are the normal case, so a connection must
cost little while idle: no task, nursery or wait stack of its own. The
caller's task just sleeps in ``relay()`` until the outcome is known; both
sockets of every relay are registered in one epoll instance shared by the
trio run (``proxy.frontends.poller``), whose single system task also keeps the relays' idle
deadlines. When a socket is ready, that task moves what the kernel allows
right away, with non-blocking system calls (moving never blocks, so there is
no task switch per wake-up):

* the splice path (a ``PipePool`` given): ``splice(socket -> pipe)`` then
  ``splice(pipe -> socket)``, the bytes never entering user space; small
  reads are copied instead, where two splices would cost more;
* the copy path (``pipes=None``): ``readv`` into a buffer, ``write`` out.

Idle connections hold neither a pipe nor a buffer: both are borrowed when the
source turns readable and handed back once everything read has been written.

Half-close (RFC 9293 section 3.6): EOF from one side is forwarded as
``shutdown(SHUT_WR)`` on the other, and the opposite direction keeps flowing
until it ends too. The relay never closes the sockets; the caller owns them
(and must cancel a running relay before closing them).
"""

from __future__ import annotations

import enum
import errno
import functools
import math
import os
import select
import socket
from dataclasses import dataclass
from typing import Any, Callable

import outcome
import structlog
import trio

from .pipes import Pipe, PipePool
from .poller import EDGE_MASK, current_poller

log = structlog.get_logger("warren.relay")


class Ending(enum.Enum):
    """How a relay ended; the session maps it to a HAProxy termination code."""

    NORMAL = "normal"  # both directions ended with EOF
    CLIENT_ABORT = "client_abort"  # error/reset on the client socket -> "CD"
    SERVER_ABORT = "server_abort"  # error/reset on the server socket -> "SD"
    CLIENT_TIMEOUT = "client_timeout"  # client idle / client-fin expired -> "cD"
    SERVER_TIMEOUT = "server_timeout"  # server idle / server-fin expired -> "sD"


@dataclass(slots=True)
class Traffic:
    """Per-connection byte counters, bumped in place as bytes are received."""

    bytes_in: int = 0  # received from the client (forwarded to the server)
    bytes_out: int = 0  # received from the server (forwarded to the client)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Idle timeouts in seconds; None disables one, all None means none at all.

    ``tunnel`` (both directions, any traffic resets it) replaces ``client``
    and ``server`` when set. ``client`` bounds waiting on the client (to send,
    or to accept what we write), ``server`` likewise. Once one direction has
    ended, waiting for the other direction's sender is bounded by
    ``client_fin`` / ``server_fin`` when set, overriding the others (as
    HAProxy's timeout client-fin / server-fin override timeout tunnel).
    """

    client: float | None = None
    server: float | None = None
    tunnel: float | None = None
    client_fin: float | None = None
    server_fin: float | None = None

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"timeout {name} must be > 0 or None, got {value!r}")

    @property
    def enabled(self) -> bool:
        """True if at least one timeout is set (asked once per connection)."""
        return not (
            self.client is None and self.server is None and self.tunnel is None
            and self.client_fin is None and self.server_fin is None
        )


async def relay(
    client: trio.socket.SocketType,
    server: trio.socket.SocketType,
    traffic: Traffic,
    timeouts: Timeouts = Timeouts(),
    *,
    pipes: PipePool | None = None,
    owned: bool = False,
) -> Ending:
    """Pump bytes both ways until both directions end, a side fails or idles out.

    Returns NORMAL when both sides sent EOF, CLIENT_/SERVER_ABORT when a
    socket reports a connection error (reset, broken pipe, ...), and
    CLIENT_/SERVER_TIMEOUT when an idle timeout expires; the other direction
    simply stops. Uses splice through ``pipes`` when given (the caller checks
    ``splice_supported()`` first), else copies. With ``owned`` the relay
    closes both sockets when it ends, however it ends (which spares the
    system calls that unregister them and the last half-close); otherwise the
    caller keeps them. On cancellation, raises Cancelled after returning every
    borrowed pipe (closing those that still hold data). Unexpected OS errors
    propagate (raised here, although the bytes are moved by the shared poller
    task).
    """
    task = trio.lowlevel.current_task()
    notify = functools.partial(trio.lowlevel.reschedule, task)
    link = start_relay(client, server, traffic, timeouts, pipes=pipes, owned=owned, notify=notify)
    try:
        # The poller moves the bytes; this task only waits for the outcome.
        return await trio.lowlevel.wait_task_rescheduled(link.abort)
    finally:
        link.stop()


def start_relay(
    client: socket.socket,
    server: socket.socket,
    traffic: Traffic,
    timeouts: Timeouts,
    *,
    pipes: PipePool | None,
    owned: bool,
    notify: Callable[[outcome.Outcome], Any],
) -> _Link:
    """:func:`relay` without a task: `notify` gets the outcome (an Ending,
    None after ``interrupt()``, or an unexpected error) from the poller task
    and must then call the link's ``stop()``. Nothing is delivered once the
    link is stopped first. Raises (closing owned sockets) if the sockets
    cannot be registered."""
    poller = current_poller()
    try:
        return _Link(client, server, traffic, timeouts, pipes, poller, owned, notify)
    except BaseException:
        if owned:
            for sock in (client, server):
                poller.drop(sock.fileno())
                sock.close()
        raise


_CLIENT = 0  # side index; the server is side 1
# Directions share the index of the side they read from: direction 0 reads
# the client and writes the server, direction 1 the reverse.
_ABORT = (Ending.CLIENT_ABORT, Ending.SERVER_ABORT)
_TIMEOUT = (Ending.CLIENT_TIMEOUT, Ending.SERVER_TIMEOUT)

# What a direction waits for after a round of moving bytes.
_READ, _WRITE, _YIELD, _DONE, _NO_PIPE, _BULK = range(6)

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
# Both sockets stay registered for both events, edge-triggered (EDGE_MASK):
# an event says "something changed", and a direction that waits has always
# drained its source (EAGAIN, or a short read with no end of stream
# announced) or filled its destination (EAGAIN) first, so the next change is
# an edge that reaches us. Nothing to re-arm per event.
# The peer has sent its FIN, or the connection failed: after the data still
# queued, a read returns the end (or the error) without a further edge.
_ENDING = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# As in trio and selectors: EPOLLHUP/EPOLLERR wake readers and writers alike.
_WAKES_READER = ~_OUT
_WAKES_WRITER = ~_IN

# errnos meaning "this connection is gone", charged to the socket that
# reported them; anything else is a bug or a resource problem and propagates.
_CONNECTION_LOST = frozenset(
    {
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.ENOTCONN,
        errno.ESHUTDOWN,
    }
)
# No pipe could be created: this connection continues by copying.
_OUT_OF_PIPES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})

# A direction yields to other tasks after moving this much in one wake-up, so
# a sender that never lets its socket run dry cannot starve the other
# connections (trio has no preemption).
_ROUND_BUDGET = 1024 * 1024
# A splice into an empty pipe that returns less than this drained the socket
# (tcp_splice_read stops early only on an empty queue or a full pipe), so the
# EAGAIN probe is skipped; if wrong, level-triggered epoll wakes us again.
_SMALL_SPLICE = 16 * 1024
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0
_COPY_BUFFER_SIZE = 128 * 1024
_SPARE_BUFFERS_MAX = 16
# Copy buffers shared by all connections: a direction holds one only while
# its bytes are in flight, like a pipe. Plain list: trio runs on one thread.
_spare_buffers: list[memoryview] = []


class _SideLost(Exception):
    """A socket reported a connection error; ``side`` is the one to blame."""

    def __init__(self, side: int) -> None:
        self.side = side


def _lost_or_raise(exc: OSError, side: int) -> _SideLost:
    if exc.errno in _CONNECTION_LOST:
        return _SideLost(side)
    raise exc


class _Link:
    """One connection being relayed: both directions, readiness and deadlines.

    Served by the poller task (``serve`` runs the directions that can move),
    while the relay's own task sleeps until ``finish`` hands it the outcome.
    """

    __slots__ = (
        "socks", "fds", "traffic", "poller", "ways", "want", "events",
        "notify", "queued", "timeouts", "deadlines", "deadline", "scheduled", "owned",
    )  # fmt: skip

    def __init__(self, client, server, traffic, timeouts, pipes, poller, owned, notify) -> None:
        self.socks = (client, server)
        self.fds = (client.fileno(), server.fileno())
        self.traffic = traffic
        self.poller = poller
        if pipes is None:
            self.ways = [_CopyDirection(self, 0), _CopyDirection(self, 1)]
        else:
            self.ways = [_SpliceDirection(self, 0, pipes), _SpliceDirection(self, 1, pipes)]
        self.want = [_READ, _READ]
        self.events = [0, 0]  # epoll events per side, delivered by the poller
        self.notify = notify  # gets the outcome; None once finished or cancelled
        self.queued = False  # in the poller's list of links to serve
        self.timeouts = timeouts if timeouts.enabled else None
        self.deadlines = [math.inf, math.inf]  # per direction
        self.deadline = math.inf  # the earlier of the two
        self.scheduled = math.inf  # when the poller will next look at us
        self.owned = owned  # close the sockets at the end
        poller.watch(self.fds[0], self, EDGE_MASK)
        try:
            poller.watch(self.fds[1], self, EDGE_MASK)
        except BaseException:
            poller.forget(self.fds[0])
            raise
        if self.timeouts is not None:
            self._push_deadlines(True, True)

    def serve(self) -> bool:
        """Move what the delivered events allow; True if a direction has more.

        The per-wake-up path, run by the poller: kept flat on purpose.
        """
        want, events = self.want, self.events
        client_events, server_events = events
        events[0] = events[1] = 0
        if (client_events | server_events) & _ENDING:
            if client_events & _ENDING:
                self.ways[0].ending = True
            if server_events & _ENDING:
                self.ways[1].ending = True
        moved0 = moved1 = False
        try:
            wanted = want[0]
            if (
                (wanted == _READ and client_events & _WAKES_READER)
                or (wanted == _WRITE and server_events & _WAKES_WRITER)
                or wanted == _YIELD
            ):
                moved0 = True
                want[0] = self._move(0)
            wanted = want[1]
            if (
                (wanted == _READ and server_events & _WAKES_READER)
                or (wanted == _WRITE and client_events & _WAKES_WRITER)
                or wanted == _YIELD
            ):
                moved1 = True
                want[1] = self._move(1)
        except _SideLost as lost:
            self.finish(outcome.Value(_ABORT[lost.side]))
            return False
        want0, want1 = want
        if want0 == _DONE and want1 == _DONE:
            self.finish(outcome.Value(Ending.NORMAL))
            return False
        if self.timeouts is not None:
            # A direction that just ended starts the other's fin timeout.
            self._push_deadlines(
                moved0 or (moved1 and want1 == _DONE), moved1 or (moved0 and want0 == _DONE)
            )
        return want0 == _YIELD or want1 == _YIELD

    def _move(self, index: int) -> int:
        wanted = self.ways[index].move()
        if wanted == _NO_PIPE:
            # No pipe to be had: this direction copies from now on.
            self.ways[index] = self.ways[index].as_copy()
            wanted = self.ways[index].move()
        return wanted

    def finish(self, result: outcome.Outcome) -> None:
        """Hand the result over; the poller serves us no more."""
        notify = self.notify
        if notify is not None:
            self.notify = None
            notify(result)

    def interrupt(self) -> None:
        """End the relay from outside (a kill): the outcome is None."""
        self.finish(outcome.Value(None))

    def expire(self) -> None:
        """Called by the poller once ``deadline`` has passed."""
        self.finish(outcome.Value(self._blame()))

    def abort(self, raise_cancel) -> trio.lowlevel.Abort:
        self.notify = None  # cancelled: the poller must not touch us any more
        return trio.lowlevel.Abort.SUCCEEDED

    def stop(self) -> None:
        if self.ways is None:
            return  # stopped already
        self.notify = None
        self.scheduled = math.inf  # makes any pending timer entry stale
        for way in self.ways:
            way.give_back()
        self.ways = None
        if self.owned:
            # Closing removes them from the epoll set: no unregistering.
            for fd, sock in zip(self.fds, self.socks):
                self.poller.drop(fd)
                sock.close()
        else:
            self.poller.forget(self.fds[0])
            self.poller.forget(self.fds[1])

    # --- idle deadlines ------------------------------------------------------
    # Each direction's deadline is "now + the limit for the side it waits on",
    # pushed forward only for directions that moved, once per wake-up. The
    # poller keeps one timer per link and re-checks it lazily, so pushing a
    # deadline forward costs two float stores, not a cancel scope update.

    def _push_deadlines(self, moved0: bool, moved1: bool) -> None:
        now = trio.current_time()
        deadlines, want = self.deadlines, self.want
        tunnel = self.timeouts.tunnel is not None and (moved0 or moved1)
        for index, moved in ((0, moved0), (1, moved1)):
            if want[index] == _DONE:
                deadlines[index] = math.inf
            elif moved or tunnel:
                deadlines[index] = now + self._limit(index)
        self.deadline = deadline = min(deadlines)
        if deadline < self.scheduled:
            self.scheduled = deadline
            self.poller.wake_at(self, deadline)

    def _waited_side(self, index: int) -> int:
        return 1 - index if self.want[index] == _WRITE else index

    def _limit(self, index: int) -> float:
        timeouts, side = self.timeouts, self._waited_side(index)
        if self.want[1 - index] == _DONE and side == index:
            # Waiting on this direction's sender while the other has ended.
            fin = timeouts.client_fin if side == _CLIENT else timeouts.server_fin
            if fin is not None:
                return fin
        if timeouts.tunnel is not None:
            return timeouts.tunnel
        limit = timeouts.client if side == _CLIENT else timeouts.server
        return math.inf if limit is None else limit

    def _blame(self) -> Ending:
        d0, d1 = self.deadlines
        return _TIMEOUT[self._waited_side(1 if d1 < d0 else 0)]


class _Direction:
    """Moves bytes from one socket to the other; ``move`` never blocks."""

    __slots__ = ("link", "index", "src", "dst", "eof", "ending")

    def __init__(self, link: _Link, index: int) -> None:
        self.link = link
        self.index = index
        self.src = link.fds[index]
        self.dst = link.fds[1 - index]
        self.eof = False  # the source's end of stream has been read
        self.ending = False  # ... is announced: read until it comes

    def move(self) -> int:
        """Move bytes until blocked or the round's budget is spent; say what next.

        Returns _READ / _WRITE (wait for the source / destination), _YIELD
        (budget spent, more to move), _DONE (EOF forwarded), or internally
        _NO_PIPE / _BULK. Raises _SideLost when a connection is gone.
        """
        raise NotImplementedError

    def give_back(self) -> None:
        """Return any borrowed buffer or pipe (the direction has stopped)."""

    def forward_eof(self) -> int:
        """Everything read has been written: pass the EOF on as a half-close.

        When the other direction has ended too and the relay closes the
        sockets, the close about to come sends that FIN instead.
        """
        link = self.link
        if link.owned and link.want[1 - self.index] == _DONE:
            return _DONE
        try:
            self.link.socks[1 - self.index].shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _lost_or_raise(exc, 1 - self.index) from exc
        return _DONE


class _CopyDirection(_Direction):
    """The portable path: read into a shared-pool buffer, write it out."""

    __slots__ = ("view", "start", "pending")
    # A full buffer means a bulk transfer: subclasses that splice take over.
    hands_bulk_over = False

    def __init__(self, link: _Link, index: int) -> None:
        super().__init__(link, index)
        self.view: memoryview | None = None
        self.start = 0
        self.pending = 0  # bytes read but not yet written, at view[start:]

    def move(self) -> int:
        view = self.view
        if view is None:
            view = self.view = _spare_buffers.pop() if _spare_buffers else _new_buffer()
        src, dst, readv, write = self.src, self.dst, os.readv, os.write
        start, pending, moved, short_read = self.start, self.pending, 0, False
        try:
            while True:
                if not pending:
                    try:
                        pending = readv(src, (view,))
                    except BlockingIOError:
                        self._return_buffer()
                        return _READ
                    except OSError as exc:
                        raise _lost_or_raise(exc, self.index) from exc
                    if not pending:
                        self.eof = True
                        self._return_buffer()
                        return self.forward_eof()
                    if self.index:
                        self.link.traffic.bytes_out += pending
                    else:
                        self.link.traffic.bytes_in += pending
                    start = 0
                    short_read = pending < len(view)
                try:
                    written = write(dst, view[start : start + pending])
                except BlockingIOError:
                    return _WRITE
                except OSError as exc:
                    raise _lost_or_raise(exc, 1 - self.index) from exc
                start += written
                pending -= written
                moved += written
                if pending:
                    continue
                if short_read:
                    if self.ending:
                        continue  # announced: read the end (or error) now
                    # A stream socket's recv stops short only once its queue
                    # is empty (tcp_recvmsg takes every queued skb up to the
                    # length): skip the EAGAIN probe, the next arrival is a
                    # new edge.
                    if len(_spare_buffers) < _SPARE_BUFFERS_MAX:
                        _spare_buffers.append(view)
                    self.view = None
                    return _READ
                if self.hands_bulk_over:
                    self._return_buffer()
                    return _BULK
                if moved >= _ROUND_BUDGET:
                    return _YIELD
        finally:
            self.start, self.pending = start, pending

    def _return_buffer(self) -> None:
        if len(_spare_buffers) < _SPARE_BUFFERS_MAX:
            _spare_buffers.append(self.view)
        self.view = None

    def give_back(self) -> None:
        # A buffer with unsent bytes is simply dropped: unlike a pipe it is
        # reclaimed by the garbage collector, never reused with stale bytes.
        if self.view is not None and not self.pending:
            self._return_buffer()
        self.view = None


def _new_buffer() -> memoryview:
    return memoryview(bytearray(_COPY_BUFFER_SIZE))


class _SpliceDirection(_CopyDirection):
    """The zero-copy path, for bulk: socket -> borrowed pipe -> socket.

    Each wake-up starts by copying, as HAProxy's splice-auto does: for a small
    message one read and one write into a pooled buffer cost less than two
    splices and a pipe. A read that fills the buffer marks a bulk transfer;
    from then on bytes are spliced until the source trickles again.
    """

    __slots__ = ("pool", "pipe", "in_pipe", "bulk")
    hands_bulk_over = True

    def __init__(self, link: _Link, index: int, pool: PipePool) -> None:
        super().__init__(link, index)
        self.pool = pool
        self.pipe: Pipe | None = None
        self.in_pipe = 0  # bytes sitting in the pipe
        self.bulk = False

    def move(self) -> int:
        if not self.bulk:
            wanted = super().move()
            if wanted != _BULK:
                return wanted
            self.bulk = True
        return self._splice()

    def _splice(self) -> int:
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = self.pool.acquire()
            except OSError as exc:
                if exc.errno not in _OUT_OF_PIPES:
                    raise
                log.warning("relay.splice_fallback", errno=exc.errno)
                return _NO_PIPE
        src, dst, splice, flags = self.src, self.dst, os.splice, _SPLICE_FLAGS
        pipe_in, pipe_out, size = pipe.write_fd, pipe.read_fd, pipe.size
        pending, moved = self.in_pipe, 0
        try:
            while True:
                # EAGAIN into an empty pipe means the socket is empty; into a
                # non-empty pipe it may just mean the pipe is full.
                drained = False
                if not self.eof:
                    try:
                        received = splice(src, pipe_in, size, flags=flags)
                    except BlockingIOError:
                        drained = not pending
                    except OSError as exc:
                        raise _lost_or_raise(exc, self.index) from exc
                    else:
                        if received:
                            if not pending and received < _SMALL_SPLICE and not self.ending:
                                drained = True  # a trickle: back to copying
                                self.bulk = False
                            pending += received
                            if self.index:
                                self.link.traffic.bytes_out += received
                            else:
                                self.link.traffic.bytes_in += received
                        else:
                            self.eof = True
                if pending:
                    try:
                        written = splice(pipe_out, dst, pending, flags=flags)
                    except BlockingIOError:
                        return _WRITE  # keep the pipe: it holds our bytes
                    except OSError as exc:
                        raise _lost_or_raise(exc, 1 - self.index) from exc
                    pending -= written
                    moved += written
                    if pending:
                        continue
                if self.eof:
                    self._return_pipe()
                    return self.forward_eof()
                if drained:
                    self._return_pipe()
                    return _READ
                if moved >= _ROUND_BUDGET:
                    return _YIELD
        finally:
            self.in_pipe = pending

    def _return_pipe(self) -> None:
        self.pool.release(self.pipe)
        self.pipe = None

    def give_back(self) -> None:
        super().give_back()
        if self.pipe is not None:
            if self.in_pipe:
                self.pool.discard(self.pipe)  # holds bytes: never reuse it
            else:
                self.pool.release(self.pipe)
            self.pipe = None

    def as_copy(self) -> _Direction:
        way = _CopyDirection(self.link, self.index)
        way.eof, way.ending = self.eof, self.ending
        return way
