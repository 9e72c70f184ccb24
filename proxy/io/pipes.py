"""Kernel pipes for the zero-copy relay, lent out per active direction.

``splice(2)`` moves data between two file descriptors without copying it
through user space, but one end must be a pipe: socket -> pipe -> socket.
A pipe costs two file descriptors, so a relay borrows one only while a
direction has a bulk transfer in flight (small messages are copied) and gives
it back as soon as the pipe is empty again. 8,000 idle connections therefore
hold no pipe at all; only the connections moving bulk data at this instant do.

A returned pipe is kept for reuse (creating one costs ``pipe2`` plus
``fcntl``), up to ``max_idle`` of them; beyond that it is closed. A pipe that
still holds data (its writer blocked, then the relay was cancelled) can never
be reused, because the next borrower would forward stale bytes: it is
discarded (closed) instead.

The pool is plain synchronous code: trio runs all tasks on one thread, and no
method here blocks.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import socket
from dataclasses import dataclass

import structlog

log = structlog.get_logger("warren.pipes")

# Why 1 MiB: the capacity bounds how much one socket -> pipe splice takes,
# and each splice out of a socket may send a window update (tcp_read_sock
# ends in tcp_cleanup_rbuf), so a bigger pipe means fewer system calls and
# fewer ACKs per byte. Measured through the relay on loopback, in CPU seconds
# of the relay's thread per GB: 64 KiB (the kernel default) 0.44, 256 KiB
# 0.35-0.41, 512 KiB 0.36-0.41, 1 MiB 0.26-0.35. Pages are pinned only while
# data sits in a pipe (a direction whose receiver is slow holds up to 1 MiB
# of kernel memory), but Linux charges the *capacity* to the user's
# pipe-user-pages-soft budget: 64 MiB without CAP_SYS_RESOURCE, i.e. 64 such
# pipes. Beyond it F_SETPIPE_SZ fails with EPERM and the pipe keeps a default
# size: slower, still correct. Hence few idle pipes are kept: creating one
# (pipe2 + fcntl, microseconds) is cheap next to the bulk transfer (at least
# one full 128 KiB copy buffer) that asks for it.
DEFAULT_PIPE_SIZE = 1024 * 1024
DEFAULT_MAX_IDLE = 16

# F_SETPIPE_SZ / F_GETPIPE_SZ exist in fcntl since Python 3.10 on Linux; the
# numbers are the kernel's (F_LINUX_SPECIFIC_BASE + 7 / + 8).
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class Pipe:
    """One kernel pipe: ``read_fd`` / ``write_fd``, ``size`` its capacity in bytes."""

    __slots__ = ("read_fd", "write_fd", "size")

    def __init__(self, read_fd: int, write_fd: int, size: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.size = size

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@dataclass(frozen=True, slots=True)
class PipePoolStatistics:
    """A snapshot: pipes lent out, pipes kept for reuse, pipes ever created, capacity."""

    in_use: int
    idle: int
    created: int
    pipe_size: int


class PipePool:
    """Lends pipes to relay directions; keeps up to ``max_idle`` returned ones.

    ``pipe_size`` is requested with F_SETPIPE_SZ on each new pipe; if the
    kernel refuses (EPERM over the user's pipe budget, EINVAL on very old
    kernels) the pipe keeps its default size and the pool carries on.
    ``acquire`` raises OSError (EMFILE, ENFILE, ENOMEM) when no pipe can be
    created; callers fall back to copying for that round.
    """

    def __init__(
        self,
        *,
        pipe_size: int = DEFAULT_PIPE_SIZE,
        max_idle: int = DEFAULT_MAX_IDLE,
    ) -> None:
        if pipe_size <= 0 or max_idle < 0:
            raise ValueError("pipe_size must be > 0 and max_idle >= 0")
        self._pipe_size = pipe_size
        self._max_idle = max_idle
        self._idle: list[Pipe] = []
        self._in_use = 0
        self._created = 0
        self._closed = False

    def acquire(self) -> Pipe:
        """Lend an empty pipe (reused if one is idle, else new). Raises OSError."""
        if self._idle:
            pipe = self._idle.pop()
        else:
            pipe = self._create_pipe()
        self._in_use += 1
        return pipe

    def release(self, pipe: Pipe) -> None:
        """Take back a pipe the caller has EMPTIED; keep it idle or close it."""
        self._in_use -= 1
        if self._closed or len(self._idle) >= self._max_idle:
            pipe.close()
        else:
            self._idle.append(pipe)

    def discard(self, pipe: Pipe) -> None:
        """Take back a pipe that may still hold data: it is closed, never reused."""
        self._in_use -= 1
        pipe.close()

    def statistics(self) -> PipePoolStatistics:
        return PipePoolStatistics(
            in_use=self._in_use,
            idle=len(self._idle),
            created=self._created,
            pipe_size=self._pipe_size,
        )

    def close(self) -> None:
        """Close the idle pipes; pipes still lent out are closed when returned."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    def _create_pipe(self) -> Pipe:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._created += 1
        return Pipe(read_fd, write_fd, _resize_pipe(write_fd, self._pipe_size))


def _resize_pipe(fd: int, wanted: int) -> int:
    """Ask for ``wanted`` bytes of capacity; return the capacity actually granted."""
    try:
        return fcntl.fcntl(fd, _F_SETPIPE_SZ, wanted)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL, errno.EBUSY):
            raise
        log.debug("pipe.resize_refused", wanted=wanted, errno=exc.errno)
        return fcntl.fcntl(fd, _F_GETPIPE_SZ)


@functools.cache
def splice_supported() -> bool:
    """True if ``os.splice`` exists and moves bytes socket -> pipe -> socket here.

    Probed once per process with a throw-away socket pair and pipe, because
    splice can be missing (non-Linux, old Python) or refused (seccomp
    filters, exotic socket families) even where the function exists.
    """
    if not hasattr(os, "splice"):
        return False
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    left, right = socket.socketpair()
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        left.sendall(b"probe")
        into_pipe = os.splice(right.fileno(), write_fd, 5, flags=flags)
        out_of_pipe = os.splice(read_fd, left.fileno(), into_pipe, flags=flags)
        return into_pipe == 5 and out_of_pipe == 5 and right.recv(5) == b"probe"
    except OSError as exc:
        log.info("splice.unsupported", errno=exc.errno)
        return False
    finally:
        left.close()
        right.close()
        os.close(read_fd)
        os.close(write_fd)
