"""The relay: bytes between a client socket and a broker socket, both ways.

One connection's data path after the broker connection is established. Two
directions run concurrently (client -> server in a child task, server ->
client in the caller's task, to spare one task per connection), each waiting
for readiness with ``trio.lowlevel.wait_readable/wait_writable`` on the raw
file descriptors and then moving as much as the kernel allows with
non-blocking system calls, so one wake-up moves up to a round's budget:

* the splice path (a ``PipePool`` given): ``splice(socket -> pipe)`` then
  ``splice(pipe -> socket)``; the bytes never enter user space;
* the copy path (``pipes=None``): ``readv`` into a buffer, ``write`` out.

Idle connections hold neither a pipe nor a buffer: both are borrowed when the
source turns readable and handed back once everything read has been written.

Half-close (RFC 9293 section 3.6): EOF from one side is forwarded as
``shutdown(SHUT_WR)`` on the other, and the opposite direction keeps flowing
until it ends too. The relay never closes the sockets; the caller owns them.

Timeouts are idle timeouts folded into the deadline of the nursery's cancel
scope, pushed forward once per wake-up rather than once per chunk (no cancel
scope is created per read or write).
"""

from __future__ import annotations

import enum
import errno
import math
import os
import socket
from dataclasses import dataclass

import structlog
import trio

from .pipes import Pipe, PipePool

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
    ended, waiting for the other direction's sender to finish is bounded by
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
        """True if at least one timeout is set."""
        return any(getattr(self, name) is not None for name in self.__slots__)


async def relay(
    client: trio.socket.SocketType,
    server: trio.socket.SocketType,
    traffic: Traffic,
    timeouts: Timeouts = Timeouts(),
    *,
    pipes: PipePool | None = None,
) -> Ending:
    """Pump bytes both ways until both directions end, one side fails or idles out.

    Returns NORMAL when both sides sent EOF, CLIENT_/SERVER_ABORT when a
    socket reports a connection error (reset, broken pipe, ...), and
    CLIENT_/SERVER_TIMEOUT when an idle timeout expires; then the other
    direction is cancelled. Uses splice through ``pipes`` when given (the
    caller checks ``splice_supported()`` first), else copies. Does not close
    the sockets. On cancellation from outside, raises Cancelled after returning
    every borrowed pipe (closing those that still hold data). Unexpected OS
    errors propagate.
    """
    state = _Relay(client, server, traffic)
    async with trio.open_nursery() as nursery:
        state.scope = nursery.cancel_scope
        if timeouts.enabled:
            state.watch = _Watchdog(timeouts, nursery.cancel_scope)
        nursery.start_soon(state.drive, state.direction(_CLIENT_TO_SERVER, pipes))
        await state.drive(state.direction(_SERVER_TO_CLIENT, pipes))
    if state.ending is not None:
        return state.ending
    if nursery.cancel_scope.cancelled_caught and state.watch is not None:
        return state.watch.blame()
    return Ending.NORMAL


# Sides and directions share indexes: direction 0 reads the client (side 0)
# and writes the server (side 1); direction 1 the reverse.
_CLIENT, _SERVER = 0, 1
_CLIENT_TO_SERVER, _SERVER_TO_CLIENT = 0, 1
_ABORT = (Ending.CLIENT_ABORT, Ending.SERVER_ABORT)
_TIMEOUT = (Ending.CLIENT_TIMEOUT, Ending.SERVER_TIMEOUT)

# What a direction waits for after a round of moving bytes.
_READ, _WRITE, _YIELD, _DONE, _NO_PIPE = range(5)

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
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0
_COPY_BUFFER_SIZE = 64 * 1024
_SPARE_BUFFERS_MAX = 64
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


class _Relay:
    """One connection's relay: its sockets, counters and how it ended."""

    __slots__ = ("socks", "fds", "traffic", "scope", "watch", "ending")

    def __init__(self, client, server, traffic: Traffic) -> None:
        self.socks = (client, server)
        self.fds = (client.fileno(), server.fileno())
        self.traffic = traffic
        self.scope: trio.CancelScope | None = None
        self.watch: _Watchdog | None = None
        self.ending: Ending | None = None

    def direction(self, index: int, pipes: PipePool | None) -> _Direction:
        if pipes is None:
            return _CopyDirection(self, index)
        return _SpliceDirection(self, index, pipes)

    async def drive(self, way: _Direction) -> None:
        """Run one direction to its end; on a lost side, end the whole relay."""
        watch = self.watch
        index = way.index
        want = _READ
        try:
            while True:
                if want == _READ:
                    if watch is not None:
                        watch.arm(index, way.src_side)
                    await trio.lowlevel.wait_readable(way.src)
                elif want == _WRITE:
                    if watch is not None:
                        watch.arm(index, way.dst_side)
                    await trio.lowlevel.wait_writable(way.dst)
                elif want == _YIELD:
                    if watch is not None:
                        watch.arm(index, way.src_side)
                    await trio.lowlevel.checkpoint()
                elif want == _NO_PIPE:
                    way = way.as_copy()
                else:
                    if watch is not None:
                        watch.finish(index)
                    return
                want = way.move()
        except _SideLost as lost:
            if self.ending is None:
                self.ending = _ABORT[lost.side]
            self.scope.cancel()
        finally:
            way.give_back()


class _Direction:
    """Moves bytes from one socket to the other; ``move`` never blocks."""

    __slots__ = ("relay", "index", "src", "dst", "src_side", "dst_side", "eof")

    def __init__(self, relay: _Relay, index: int) -> None:
        self.relay = relay
        self.index = index
        self.src_side = index
        self.dst_side = 1 - index
        self.src = relay.fds[index]
        self.dst = relay.fds[1 - index]
        self.eof = False

    def move(self) -> int:
        """Move bytes until blocked; return _READ, _WRITE, _YIELD, _DONE or _NO_PIPE."""
        raise NotImplementedError

    def give_back(self) -> None:
        """Return any borrowed buffer or pipe (called once the direction stops)."""

    def as_copy(self) -> _Direction:
        raise NotImplementedError

    def count(self, n: int) -> None:
        if self.index == _CLIENT_TO_SERVER:
            self.relay.traffic.bytes_in += n
        else:
            self.relay.traffic.bytes_out += n

    def forward_eof(self) -> int:
        """Everything read is written: pass the EOF on as a half-close."""
        try:
            self.relay.socks[self.dst_side].shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _lost_or_raise(exc, self.dst_side) from exc
        return _DONE


class _CopyDirection(_Direction):
    """The portable path: read into a shared-pool buffer, write it out."""

    __slots__ = ("view", "start", "pending")

    def __init__(self, relay: _Relay, index: int) -> None:
        super().__init__(relay, index)
        self.view: memoryview | None = None
        self.start = 0
        self.pending = 0

    def move(self) -> int:
        view = self.view
        if view is None:
            view = self.view = _spare_buffers.pop() if _spare_buffers else _new_buffer()
        src, dst, readv, write = self.src, self.dst, os.readv, os.write
        start, pending, moved = self.start, self.pending, 0
        short_read = False
        try:
            while True:
                if not pending:
                    try:
                        pending = readv(src, (view,))
                    except BlockingIOError:
                        self._return_buffer()
                        return _READ
                    except OSError as exc:
                        raise _lost_or_raise(exc, self.src_side) from exc
                    if not pending:
                        self.eof = True
                        self._return_buffer()
                        return self.forward_eof()
                    self.count(pending)
                    start = 0
                    short_read = pending < len(view)
                try:
                    written = write(dst, view[start : start + pending])
                except BlockingIOError:
                    return _WRITE
                except OSError as exc:
                    raise _lost_or_raise(exc, self.dst_side) from exc
                start += written
                pending -= written
                moved += written
                if pending:
                    continue
                if short_read:
                    # A stream socket's recv stops short only when its queue is
                    # empty (tcp_recvmsg drains every queued skb up to the
                    # length): skip the EAGAIN probe and let epoll tell us.
                    self._return_buffer()
                    return _READ
                if moved >= _ROUND_BUDGET:
                    return _YIELD
        finally:
            self.start, self.pending = start, pending

    def _return_buffer(self) -> None:
        if len(_spare_buffers) < _SPARE_BUFFERS_MAX:
            _spare_buffers.append(self.view)
        self.view = None

    def give_back(self) -> None:
        # A buffer with unsent bytes is simply dropped: memory, unlike a
        # pipe, is reclaimed by the garbage collector and never reused stale.
        if self.view is not None and not self.pending:
            self._return_buffer()
        self.view = None


def _new_buffer() -> memoryview:
    return memoryview(bytearray(_COPY_BUFFER_SIZE))


class _SpliceDirection(_Direction):
    """The zero-copy path: socket -> borrowed pipe -> socket with splice(2)."""

    __slots__ = ("pool", "pipe", "pending")

    def __init__(self, relay: _Relay, index: int, pool: PipePool) -> None:
        super().__init__(relay, index)
        self.pool = pool
        self.pipe: Pipe | None = None
        self.pending = 0  # bytes sitting in the pipe

    def move(self) -> int:
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
        pending, moved = self.pending, 0
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
                        raise _lost_or_raise(exc, self.src_side) from exc
                    else:
                        if received:
                            pending += received
                            self.count(received)
                        else:
                            self.eof = True
                if pending:
                    try:
                        written = splice(pipe_out, dst, pending, flags=flags)
                    except BlockingIOError:
                        return _WRITE  # keep the pipe: it holds our bytes
                    except OSError as exc:
                        raise _lost_or_raise(exc, self.dst_side) from exc
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
            self.pending = pending

    def _return_pipe(self) -> None:
        self.pool.release(self.pipe)
        self.pipe = None

    def give_back(self) -> None:
        if self.pipe is not None:
            if self.pending:
                self.pool.discard(self.pipe)
            else:
                self.pool.release(self.pipe)
            self.pipe = None

    def as_copy(self) -> _Direction:
        way = _CopyDirection(self.relay, self.index)
        way.eof = self.eof
        return way


class _Watchdog:
    """Both directions' idle deadlines, folded into one cancel scope's deadline.

    ``arm`` is called before each wait (once per wake-up, not per chunk) with
    the side being waited on; ``finish`` when a direction has ended. When the
    scope fires, ``blame`` names the side whose deadline expired.
    """

    __slots__ = ("timeouts", "scope", "deadlines", "sides", "done")

    def __init__(self, timeouts: Timeouts, scope: trio.CancelScope) -> None:
        self.timeouts = timeouts
        self.scope = scope
        self.deadlines = [math.inf, math.inf]
        self.sides = [_CLIENT, _SERVER]
        self.done = [False, False]

    def arm(self, direction: int, side: int) -> None:
        now = trio.current_time()
        deadlines = self.deadlines
        self.sides[direction] = side
        deadlines[direction] = now + self._limit(direction, side)
        other = 1 - direction
        if self.timeouts.tunnel is not None and not self.done[other]:
            # Tunnel: traffic either way keeps the whole connection alive.
            deadlines[other] = now + self._limit(other, self.sides[other])
        self.scope.deadline = min(deadlines)

    def finish(self, direction: int) -> None:
        self.done[direction] = True
        self.deadlines[direction] = math.inf
        other = 1 - direction
        if not self.done[other]:
            # The fin timeouts start now, replacing whatever the other
            # direction was waiting under.
            limit = self._limit(other, self.sides[other])
            self.deadlines[other] = trio.current_time() + limit
        self.scope.deadline = min(self.deadlines)

    def blame(self) -> Ending:
        d0, d1 = self.deadlines
        direction = _SERVER_TO_CLIENT if d1 < d0 else _CLIENT_TO_SERVER
        return _TIMEOUT[self.sides[direction]]

    def _limit(self, direction: int, side: int) -> float:
        timeouts = self.timeouts
        if self.done[1 - direction] and side == direction:
            # Waiting on this direction's sender while the other has ended.
            fin = timeouts.client_fin if side == _CLIENT else timeouts.server_fin
            if fin is not None:
                return fin
        if timeouts.tunnel is not None:
            return timeouts.tunnel
        limit = timeouts.client if side == _CLIENT else timeouts.server
        return math.inf if limit is None else limit
