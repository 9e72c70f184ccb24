"""Accepting client connections on one bind address of a frontend."""

from __future__ import annotations

import errno
import socket
from typing import Callable

import structlog
import trio

from ..config.model import BindAddress
from ..runtime import FrontendRuntime

log = structlog.get_logger("warren.listener")

# Linux: lets a standby host bind a floating address it does not own yet
# (the alternative is the system-wide net.ipv4.ip_nonlocal_bind sysctl).
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)

# Out of descriptors or kernel memory: transient, back off and accept again
# (trio's own serve_listeners does the same).
_TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_BACKOFF = 0.1

# Clients accepted in a row before other tasks get a turn.
_ACCEPT_BATCH = 16

# Starts serving one accepted client without blocking (and never raises).
Handler = Callable[[socket.socket, tuple, FrontendRuntime, object], None]


class BindError(Exception):
    """A bind address could not be listened on; the message says which and why."""


def open_listener(bind: BindAddress, backlog: int) -> socket.socket:
    """Binds and listens (non-blocking); raises BindError (e.g. address already in use)."""
    family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it (Linux): no per-connection syscall.
        # AMQP frames are small and latency matters: no Nagle.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_FREEBIND", 78), 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((bind.host, bind.port))
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise BindError(f"cannot listen on {bind}: {error.strerror or error}") from None
    return sock


async def serve_listener(
    sock: socket.socket,
    frontend: FrontendRuntime,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accepts forever on `sock` (closed when this returns or is cancelled).

    A frontend slot is taken *before* accepting, so beyond `maxconn` clients
    wait in the kernel's backlog until a slot frees instead of being reset.
    Each accepted client (a non-blocking socket) goes to
    `handler(sock, peer, frontend, slot)`, which releases the slot when the
    client is done. Clients are accepted in batches while the backlog has
    them, and the task waits for the listener only when it is empty.
    """
    bound = sock.getsockname()
    log.info("listener.started", frontend=frontend.name, address=_format(bound))
    task_status.started()
    limiter = frontend.limiter
    # socket.accept() converts the listener's family and type to enums and
    # wraps the new fd for every client; accept on the raw fd and wrap it
    # with the listener's values taken once.
    accept, family, kind, proto = sock._accept, sock.family, sock.type, sock.proto
    slot = None  # taken, not yet handed to a client
    try:
        in_a_row = 0
        while True:
            if slot is None:
                slot = object()
                try:
                    limiter.acquire_on_behalf_of_nowait(slot)
                except trio.WouldBlock:
                    try:
                        await limiter.acquire_on_behalf_of(slot)
                    except BaseException:
                        slot = None
                        raise
            try:
                fd, peer = accept()
            except BlockingIOError:
                in_a_row = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as error:
                if error.errno not in _TRANSIENT_ACCEPT_ERRORS:
                    raise
                log.error(
                    "listener.accept_failed", frontend=frontend.name,
                    error=errno.errorcode.get(error.errno, str(error.errno)),
                )
                await trio.sleep(_ACCEPT_BACKOFF)
                continue
            client = socket.socket(family, kind, proto, fd)
            client.setblocking(False)
            handler(client, peer, frontend, slot)
            slot = None
            in_a_row += 1
            if in_a_row == _ACCEPT_BATCH:
                in_a_row = 0
                await trio.lowlevel.checkpoint()
    finally:
        if slot is not None:
            limiter.release_on_behalf_of(slot)
        trio.lowlevel.notify_closing(sock)
        sock.close()


def _format(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
