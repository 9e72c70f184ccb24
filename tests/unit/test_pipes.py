"""PipePool: lends pipes for splice, keeps a bounded number for reuse."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import socket

import pytest

from proxy.io import pipes as pipes_module
from proxy.io.pipes import PipePool, PipePoolStatistics, splice_supported


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_lent_pipe_is_counted_in_use_and_kept_idle_once_returned():
    pool = PipePool()
    pipe = pool.acquire()
    assert pool.statistics() == PipePoolStatistics(
        in_use=1, idle=0, created=1, pipe_size=pipes_module.DEFAULT_PIPE_SIZE
    )
    pool.release(pipe)
    assert pool.acquire() is pipe  # reused, not recreated
    assert pool.statistics().created == 1
    pool.release(pipe)
    pool.close()


def test_the_pipe_gets_the_requested_capacity_and_is_non_blocking():
    pool = PipePool(pipe_size=256 * 1024)
    pipe = pool.acquire()
    assert pipe.size == 256 * 1024 == fcntl.fcntl(pipe.write_fd, fcntl.F_GETPIPE_SZ)
    for fd in (pipe.read_fd, pipe.write_fd):
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    pool.release(pipe)
    pool.close()


def test_a_refused_resize_keeps_the_kernel_default_silently(monkeypatch):
    real_fcntl = fcntl.fcntl

    def refusing_fcntl(fd, cmd, arg=0):
        if cmd == fcntl.F_SETPIPE_SZ:
            raise OSError(errno.EPERM, "over pipe-user-pages-soft")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(pipes_module.fcntl, "fcntl", refusing_fcntl)
    pool = PipePool(pipe_size=1 << 20)
    pipe = pool.acquire()
    assert pipe.size == real_fcntl(pipe.write_fd, fcntl.F_GETPIPE_SZ) < 1 << 20
    pool.release(pipe)
    pool.close()


def test_idle_pipes_are_bounded_and_the_surplus_closed():
    fds_before = open_fds()
    pool = PipePool(max_idle=2)
    lent = [pool.acquire() for _ in range(5)]
    assert open_fds() == fds_before + 10
    for pipe in lent:
        pool.release(pipe)
    assert pool.statistics() == PipePoolStatistics(
        in_use=0, idle=2, created=5, pipe_size=pool.statistics().pipe_size
    )
    assert open_fds() == fds_before + 4
    pool.close()
    assert open_fds() == fds_before


def test_a_discarded_pipe_is_closed_never_lent_again():
    pool = PipePool()
    pipe = pool.acquire()
    os.write(pipe.write_fd, b"stale bytes")
    pool.discard(pipe)
    with pytest.raises(OSError):
        os.fstat(pipe.read_fd)
    assert pool.statistics().in_use == 0 and pool.statistics().idle == 0
    assert pool.acquire() is not pipe
    pool.close()


def test_a_closed_pool_closes_pipes_returned_later():
    fds_before = open_fds()
    pool = PipePool()
    pipe = pool.acquire()
    pool.close()
    pool.release(pipe)
    assert pool.statistics().idle == 0
    assert open_fds() == fds_before


def test_statistics_are_an_immutable_snapshot():
    pool = PipePool()
    snapshot = pool.statistics()
    pipe = pool.acquire()
    assert snapshot.in_use == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.in_use = 5
    pool.release(pipe)
    pool.close()


def test_splice_is_supported_on_this_linux_and_probed_once():
    assert splice_supported() is True
    fds_before = open_fds()
    assert splice_supported() is True  # cached: no new probe, no fd churn
    assert open_fds() == fds_before


def test_a_pipe_carries_bytes_between_sockets_by_splice():
    """What the relay relies on: socket -> pipe -> socket, non-blocking."""
    pool = PipePool()
    pipe = pool.acquire()
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    left_a, left_b = socket.socketpair()
    right_a, right_b = socket.socketpair()
    with left_a, left_b, right_a, right_b:
        left_a.sendall(b"x" * 100_000)
        moved_in = os.splice(left_b.fileno(), pipe.write_fd, pipe.size, flags=flags)
        moved_out = os.splice(pipe.read_fd, right_a.fileno(), moved_in, flags=flags)
        assert moved_in == moved_out > 0
        with pytest.raises(BlockingIOError):
            os.splice(pipe.read_fd, right_a.fileno(), 1, flags=flags)  # pipe empty
    pool.release(pipe)
    pool.close()


def test_nonsense_sizes_are_refused():
    with pytest.raises(ValueError):
        PipePool(pipe_size=0)
    with pytest.raises(ValueError):
        PipePool(max_idle=-1)
