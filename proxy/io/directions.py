"""How a relay moves bytes one way: the copy path and the splice path.

A direction reads from one socket of a link and writes to the other; ``move``
never blocks and says what the direction waits for next. The link
(:mod:`proxy.io.relay`) decides when to call it, from the poller's events.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from typing import Any, Callable, Final

import structlog
from mypy_extensions import mypyc_attr

from .pipes import Pipe, PipePool

Link = Any  # proxy.io.relay.Link: its fds, socks, traffic, want and owned

log = structlog.get_logger("warren.relay")

# What a direction waits for after a round of moving bytes. (Final: the
# compiled modules read a Final module constant as a C constant, or a C
# static for a computed one, instead of a lookup in the module's dict.)
READ: Final = 0
WRITE: Final = 1
YIELD: Final = 2
DONE: Final = 3
NO_PIPE: Final = 4
BULK: Final = 5

# errnos meaning "this connection is gone", charged to the socket that
# reported them; anything else is a bug or a resource problem and propagates.
_CONNECTION_LOST: Final = frozenset(
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
_OUT_OF_PIPES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})

# A direction yields to other tasks after moving this much in one wake-up, so
# a sender that never lets its socket run dry cannot starve the other
# connections (trio has no preemption).
_ROUND_BUDGET: Final = 1024 * 1024
# A splice into an empty pipe that returns less than this is a trickle: the
# direction goes back to copying. It does NOT prove the socket drained:
# tcp_splice_read also stops when the pipe's slots are full, one per
# segment (or page fragment) taken, and a pipe whose resize was refused
# (beyond pipe-user-pages-soft) has only 16: many small segments fill it
# with far less than this while the socket holds more. With edge-triggered
# epoll no further event would come for what is left, so a copy read
# follows, whose short read is the proof (see CopyDirection.move).
_SMALL_SPLICE: Final = 16 * 1024
# Announced ends (proxy.io.relay: a direction's ``ending`` holds the epoll
# bits) after which the copy path reads once more: an error to pick up, or a
# hang-up, which need not follow a FIN. EPOLLRDHUP alone is the peer's FIN.
_FAILURE_ANNOUNCED: Final = select.EPOLLERR | select.EPOLLHUP
# Internal: the splice path handing over to the copy path (a trickle).
_TRICKLE: Final = -1
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0
_COPY_BUFFER_SIZE: Final = 128 * 1024
_SPARE_BUFFERS_MAX: Final = 16
# Copy buffers shared by all connections: a direction holds one only while
# its bytes are in flight, like a pipe. Plain list: trio runs on one thread.
_spare_buffers: Final[list[memoryview]] = []


# How many of the last bytes a direction keeps once told to (``tail``): enough
# for an AMQP Connection.Close frame (proxy.amqp.closing).
TAIL: Final = 512


class Hold(Exception):
    """A tap withheld the bytes it was shown: the relay stops, both sockets stay open."""


class SideLost(Exception):
    """A socket reported a connection error; ``side`` is the one to blame."""

    def __init__(self, side: int) -> None:
        self.side = side


def lost_or_raise(exc: OSError, side: int) -> SideLost:
    if exc.errno in _CONNECTION_LOST:
        return SideLost(side)
    raise exc


@mypyc_attr(allow_interpreted_subclasses=True)  # proxy.tls.pump.TlsDirection
class Direction:
    """Moves bytes from one socket to the other; ``move`` never blocks."""

    __slots__ = ("link", "index", "src", "dst", "eof", "ending", "tap", "tail")
    # Subclasses set these in their __init__ (one call per direction, on
    # every connection): link, index, src = link.fds[index], dst = the other
    # fd, eof (the source's end of stream has been read) and ending (... is
    # announced: the epoll bits that said so, 0 if none), tap (None, or shown every read before
    # it is written: tap(buffer, length), which may raise Hold; set during an
    # AMQP handshake only, proxy.amqp.tap) and tail (None, or the last TAIL
    # bytes read through user space, b"" once a splice moved bytes past
    # them: how the connection ended, read once).
    link: Link
    index: int
    src: int
    dst: int
    eof: bool
    ending: int
    tap: Callable[[memoryview, int], None] | None
    tail: bytes | None

    def move(self) -> int:
        """Move bytes until blocked or the round's budget is spent; say what next.

        Returns READ / WRITE (wait for the source / destination), YIELD
        (budget spent, more to move), DONE (EOF forwarded), or internally
        NO_PIPE / BULK. Raises SideLost when a connection is gone.
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
        if link.owned and link.want[1 - self.index] == DONE:
            return DONE
        try:
            self.link.socks[1 - self.index].shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise lost_or_raise(exc, 1 - self.index) from exc
        return DONE


class CopyDirection(Direction):
    """The portable path: read into a shared-pool buffer, write it out."""

    __slots__ = ("view", "start", "pending")
    # A full buffer means a bulk transfer: subclasses that splice take over.
    hands_bulk_over = False

    def __init__(self, link: Link, index: int) -> None:
        self.link = link
        self.index = index
        self.src = link.fds[index]
        self.dst = link.fds[1 - index]
        self.eof = False
        self.ending = 0
        self.tap = None
        self.tail = None
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
                        self._return_buffer(view)
                        return READ
                    except OSError as exc:
                        raise lost_or_raise(exc, self.index) from exc
                    if not pending:
                        self.eof = True
                        self._return_buffer(view)
                        return self.forward_eof()
                    if self.index:
                        self.link.traffic.bytes_out += pending
                    else:
                        self.link.traffic.bytes_in += pending
                    if self.tap is not None:
                        self.tap(view, pending)
                    if self.tail is not None:
                        self.tail = view[pending - TAIL if pending > TAIL else 0 : pending].tobytes()
                    start = 0
                    short_read = pending < len(view)
                try:
                    written = write(dst, view[start : start + pending])
                except BlockingIOError:
                    return WRITE
                except OSError as exc:
                    raise lost_or_raise(exc, 1 - self.index) from exc
                start += written
                pending -= written
                moved += written
                if pending:
                    continue
                if short_read:
                    if self.ending:
                        if self.ending & _FAILURE_ANNOUNCED:
                            continue  # read the end (or the error) now
                        # Only the peer's FIN was announced (EPOLLRDHUP
                        # without EPOLLERR or EPOLLHUP), before this read:
                        # every byte it sent was queued before the FIN was,
                        # and a short read took all that was queued. So
                        # this is the end, without a read returning 0.
                        self.eof = True
                        self._return_buffer(view)
                        return self.forward_eof()
                    # A stream socket's recv stops short only once its queue
                    # is empty (tcp_recvmsg takes every queued skb up to the
                    # length): skip the EAGAIN probe, the next arrival is a
                    # new edge.
                    if len(_spare_buffers) < _SPARE_BUFFERS_MAX:
                        _spare_buffers.append(view)
                    self.view = None
                    return READ
                if self.hands_bulk_over:
                    self._return_buffer(view)
                    return BULK
                if moved >= _ROUND_BUDGET:
                    return YIELD
        finally:
            self.start, self.pending = start, pending

    def _return_buffer(self, view: memoryview) -> None:
        """Hands `view` (this direction's buffer) back to the shared pool."""
        if len(_spare_buffers) < _SPARE_BUFFERS_MAX:
            _spare_buffers.append(view)
        self.view = None

    def give_back(self) -> None:
        # A buffer with unsent bytes is simply dropped: unlike a pipe it is
        # reclaimed by the garbage collector, never reused with stale bytes.
        view = self.view
        if view is not None and not self.pending:
            self._return_buffer(view)
        self.view = None


def _new_buffer() -> memoryview:
    return memoryview(bytearray(_COPY_BUFFER_SIZE))


class SpliceDirection(CopyDirection):
    """The zero-copy path, for bulk: socket -> borrowed pipe -> socket.

    Each wake-up starts by copying, as HAProxy's splice-auto does: for a small
    message one read and one write into a pooled buffer cost less than two
    splices and a pipe. A read that fills the buffer marks a bulk transfer;
    from then on bytes are spliced until the source trickles again.
    """

    __slots__ = ("pool", "pipe", "in_pipe", "bulk")
    hands_bulk_over = True

    def __init__(self, link: Link, index: int, pool: PipePool) -> None:
        CopyDirection.__init__(self, link, index)
        self.pool = pool
        self.pipe: Pipe | None = None
        self.in_pipe = 0  # bytes sitting in the pipe
        self.bulk = False

    def move(self) -> int:
        if not self.bulk:
            wanted = super().move()
            if wanted != BULK:
                return wanted
            self.bulk = True
        wanted = self._splice()
        if wanted != _TRICKLE:
            return wanted
        # A short splice, now forwarded: copy, which tells a drained socket
        # (a short read) from more queued. A full buffer again is bulk
        # again: spliced in the next round, after the others had a turn.
        wanted = super().move()
        if wanted == BULK:
            self.bulk = True
            return YIELD
        return wanted

    def _splice(self) -> int:
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = self.pool.acquire()
            except OSError as exc:
                if exc.errno not in _OUT_OF_PIPES:
                    raise
                log.warning("relay.splice_fallback", errno=exc.errno)
                return NO_PIPE
        src, dst, splice, flags = self.src, self.dst, os.splice, _SPLICE_FLAGS
        pipe_in, pipe_out, size = pipe.write_fd, pipe.read_fd, pipe.size
        pending, moved = self.in_pipe, 0
        try:
            while True:
                # EAGAIN into an empty pipe means the socket is empty; into a
                # non-empty pipe it may just mean the pipe is full.
                drained = trickle = False
                if not self.eof:
                    try:
                        received = splice(src, pipe_in, size, flags=flags)
                    except BlockingIOError:
                        drained = not pending
                    except OSError as exc:
                        raise lost_or_raise(exc, self.index) from exc
                    else:
                        if received:
                            if not pending and received < _SMALL_SPLICE and not self.ending:
                                trickle = True  # back to copying, see _SMALL_SPLICE
                            pending += received
                            if self.tail is not None:
                                self.tail = b""  # these bytes bypass user space
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
                        return WRITE  # keep the pipe: it holds our bytes
                    except OSError as exc:
                        raise lost_or_raise(exc, 1 - self.index) from exc
                    pending -= written
                    moved += written
                    if pending:
                        continue
                if self.eof:
                    self._return_pipe(pipe)
                    return self.forward_eof()
                if drained:
                    self._return_pipe(pipe)
                    return READ
                if trickle:
                    self._return_pipe(pipe)
                    self.bulk = False
                    return _TRICKLE
                if moved >= _ROUND_BUDGET:
                    return YIELD
        finally:
            self.in_pipe = pending

    def _return_pipe(self, pipe: Pipe) -> None:
        """Hands `pipe` (this direction's, empty) back to the pool."""
        self.pool.release(pipe)
        self.pipe = None

    def give_back(self) -> None:
        if self.view is not None:
            CopyDirection.give_back(self)
        if self.pipe is not None:
            if self.in_pipe:
                self.pool.discard(self.pipe)  # holds bytes: never reuse it
            else:
                self.pool.release(self.pipe)
            self.pipe = None

    def as_copy(self) -> Direction:
        way = CopyDirection(self.link, self.index)
        way.eof, way.ending, way.tap, way.tail = self.eof, self.ending, self.tap, self.tail
        return way
