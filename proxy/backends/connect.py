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

from ..io.poller import current_poller
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
    backend: BackendRuntime,
    conn: Connection,
    timing: Timing,
    *,
    first_failure: ConnectFailed | None = None,
) -> tuple[socket.socket, ServerRuntime]:
    """Connects `conn` to a server of `backend` and attaches it there.

    Returns the connected socket (the caller closes it) and the server. On
    failure raises ConnectFailed with the termination code ("SC" no server or
    connect refused, "sC" connect timeout, "sQ" queue timeout, "RC" Warren is
    out of descriptors or memory); `conn` is then attached to no server.
    `first_failure`: the first attempt was made elsewhere (the session's
    fast path, through :func:`note_failure`) and failed so; go on from there.
    """
    config = backend.config
    failed: list[ServerRuntime] = []
    last_error: ConnectFailed | None = None
    first = 0
    if first_failure is not None:
        assert first_failure.server is not None
        failed.append(first_failure.server)
        last_error, first = first_failure, 1
    for attempt in range(first, config.retries + 1):
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
            note_failure(server, conn, error)
            failed.append(server)
            last_error = error
            continue
        timing.connect += time.monotonic() - started
        server.connect_ok()
        return sock, server
    assert last_error is not None
    raise last_error


def note_failure(server: ServerRuntime, conn: Connection, error: ConnectFailed) -> None:
    """A connect to `server` failed: `conn` lets go of it; RC is raised on,
    as retrying cannot help when Warren itself is out of resources."""
    server.detach(conn)
    if error.code == "RC":  # our shortage, not the server's fault
        raise error
    server.connect_failed()


def try_acquire(
    backend: BackendRuntime,
    conn: Connection,
    prefer: ServerRuntime | None = None,
    exclude: tuple[ServerRuntime, ...] | list[ServerRuntime] = (),
) -> ServerRuntime | None:
    """Chooses a server with a free slot and attaches `conn`; None when every
    available server is at its maxconn (the caller queues); ConnectFailed
    ("SC") when no server is available at all."""
    candidates = backend.candidates()
    if not candidates:
        backend.no_server += 1
        raise ConnectFailed("SC", "no server available")
    free = [s for s in candidates if s.has_free_slot]
    if prefer is not None and prefer in free:
        chosen = prefer
    else:
        pool = [s for s in free if s not in exclude] or free
        if not pool:
            return None
        chosen = backend.balancer.pick(pool, conn.client[0])
    chosen.attach(conn)
    conn.server = chosen
    return chosen


async def _acquire_server(
    backend: BackendRuntime,
    conn: Connection,
    timing: Timing,
    prefer: ServerRuntime | None,
    exclude: tuple[ServerRuntime, ...] | list[ServerRuntime],
) -> ServerRuntime:
    """Like :func:`try_acquire`, queueing while all servers are full."""
    queued_at = None
    deadline = trio.current_time() + backend.config.timeout.queue
    while True:
        chosen = try_acquire(backend, conn, prefer, exclude)
        if chosen is not None:
            if queued_at is not None:
                timing.queue += time.monotonic() - queued_at
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


def start_connect(server: ServerRuntime) -> tuple[socket.socket, int]:
    """A new non-blocking socket and the errno of its ``connect()`` to
    `server`: 0, EINPROGRESS (see :func:`connect_outcome`) or a failure.
    ConnectFailed ("RC") when no socket can be had."""
    address = server.addresses[0]
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as error:  # EMFILE, ENFILE, ENOBUFS, ENOMEM
        reason = errno.errorcode.get(error.errno or 0, str(error))
        raise ConnectFailed("RC", f"cannot open a socket: {reason}", server) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, sock.connect_ex((address, server.config.port))
    except BaseException:
        sock.close()
        raise


def connect_outcome(sock: socket.socket, server: ServerRuntime, failure: int, events: int | None) -> None:
    """Raises ConnectFailed unless the connect succeeded: `failure` is the
    errno ``connect()`` gave, `events` what the poller reported since (None:
    no wait; 0: the connect timeout passed)."""
    if events is not None:
        if not events:
            raise ConnectFailed("sC", "connect timeout", server)
        failure = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events & _FAILED else 0
    if failure:
        reason = errno.errorcode.get(failure, str(failure))
        raise ConnectFailed("SC", f"connect failed: {reason}", server)


async def _open(server: ServerRuntime, timeout: float) -> socket.socket:
    """A non-blocking socket connected to `server` (the caller owns it).

    The connect waits in the relays' poller rather than in trio's epoll: the
    socket stays registered there for the relay to take over, which saves
    the registrations and wrappers a trio socket would cost per connection.
    """
    sock, failure = start_connect(server)
    poller = current_poller()
    try:
        events = None
        if failure == errno.EINPROGRESS:
            events = await poller.wait_writable(sock.fileno(), trio.current_time() + timeout)
        connect_outcome(sock, server, failure, events)
    except BaseException:
        poller.drop(sock.fileno())
        sock.close()
        raise
    return sock


# A failed connect reports EPOLLERR (and EPOLLHUP) besides EPOLLOUT.
_FAILED = select.EPOLLERR | select.EPOLLHUP
