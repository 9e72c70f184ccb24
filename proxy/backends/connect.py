"""Getting a client a broker: choose a server, queue, connect, retry, redispatch.

HAProxy semantics: a connect failure is retried up to `retries` times on the
same server; with `redispatch` the last retry goes to another server, so a
client never sees an error because one broker is dead while another is
available. When every available server is at its `maxconn`, the client waits
in the backend's queue for at most `timeout.queue`.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from dataclasses import dataclass

import trio

from ..frontends.poller import current_poller
from ..runtime import BackendRuntime, Connection, ServerRuntime


class ConnectFailed(Exception):
    """No connection to any server; `code` is the termination state."""

    def __init__(self, code: str, reason: str, server: ServerRuntime | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.server = server


@dataclass(slots=True)
class Timing:
    """Phase durations in seconds, for the connection log line."""

    queue: float = 0.0
    connect: float = 0.0
    retries: int = 0
    redispatched: bool = False


async def connect_to_backend(
    backend: BackendRuntime, conn: Connection, timing: Timing
) -> tuple[socket.socket, ServerRuntime]:
    """Connects `conn` to a server of `backend` and attaches it there.

    Returns the connected socket (the caller closes it) and the server. On
    failure raises ConnectFailed with the termination code ("SC" no server or
    connect refused, "sC" connect timeout, "sQ" queue timeout, "RC" Warren is
    out of descriptors or memory); `conn` is then attached to no server.
    """
    config = backend.config
    failed: list[ServerRuntime] = []
    last_error: ConnectFailed | None = None
    for attempt in range(config.retries + 1):
        redispatch = bool(failed) and config.redispatch and attempt == config.retries
        prefer = None if (redispatch or not failed) else failed[-1]
        server = await _acquire_server(backend, conn, timing, prefer, failed if redispatch else ())
        if redispatch and server is not failed[-1]:
            failed[-1].redispatches += 1
            timing.redispatched = True
        if attempt:
            timing.retries += 1
            server.retries += 1
        started = time.monotonic()
        try:
            sock = await _open(server, config.timeout.connect)
        except ConnectFailed as error:
            timing.connect += time.monotonic() - started
            server.detach(conn)
            if error.code == "RC":  # our shortage, not the server's fault; retrying won't help
                raise
            server.connect_failed()
            failed.append(server)
            last_error = error
            continue
        timing.connect += time.monotonic() - started
        server.connect_ok()
        return sock, server
    assert last_error is not None
    raise last_error


async def _acquire_server(
    backend: BackendRuntime,
    conn: Connection,
    timing: Timing,
    prefer: ServerRuntime | None,
    exclude: tuple[ServerRuntime, ...] | list[ServerRuntime],
) -> ServerRuntime:
    """Chooses a server with a free slot and attaches `conn`, queueing while all are full."""
    queued_at = None
    deadline = trio.current_time() + backend.config.timeout.queue
    while True:
        candidates = backend.candidates()
        if not candidates:
            backend.no_server += 1
            raise ConnectFailed("SC", "no server available")
        free = [s for s in candidates if s.has_free_slot]
        if prefer is not None and prefer in free:
            chosen = prefer
        else:
            pool = [s for s in free if s not in exclude] or free
            chosen = backend.balancer.pick(pool, conn.client[0]) if pool else None
        if chosen is not None:
            if queued_at is not None:
                timing.queue += time.monotonic() - queued_at
            chosen.attach(conn)
            conn.server = chosen
            return chosen
        if queued_at is None:
            queued_at = time.monotonic()
        backend.queue_max = max(backend.queue_max, backend.queue.statistics().tasks_waiting + 1)
        with trio.move_on_at(deadline):
            await backend.queue.park()
            continue
        timing.queue += time.monotonic() - queued_at
        backend.queue_timeouts += 1
        raise ConnectFailed("sQ", "queue timeout: every server at maxconn")


async def _open(server: ServerRuntime, timeout: float) -> socket.socket:
    """A non-blocking socket connected to `server` (the caller owns it).

    The connect waits in the relays' poller rather than in trio's epoll: the
    socket stays registered there for the relay to take over, which saves
    the registrations and wrappers a trio socket would cost per connection.
    """
    address = server.addresses[0]
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as error:  # EMFILE, ENFILE, ENOBUFS, ENOMEM
        reason = errno.errorcode.get(error.errno or 0, str(error))
        raise ConnectFailed("RC", f"cannot open a socket: {reason}", server) from None
    poller = current_poller()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        failure = sock.connect_ex((address, server.config.port))
        if failure == errno.EINPROGRESS:
            events = await poller.wait_writable(sock.fileno(), trio.current_time() + timeout)
            if not events:
                raise ConnectFailed("sC", "connect timeout", server)
            failure = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events & _FAILED else 0
        if failure:
            reason = errno.errorcode.get(failure, str(failure))
            raise ConnectFailed("SC", f"connect failed: {reason}", server)
    except BaseException:
        poller.drop(sock.fileno())
        sock.close()
        raise
    return sock


# A failed connect reports EPOLLERR (and EPOLLHUP) besides EPOLLOUT.
_FAILED = select.EPOLLERR | select.EPOLLHUP
