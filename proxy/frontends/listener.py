"""Accepting client connections on one bind address of a frontend."""

from __future__ import annotations

import errno
import socket
from typing import Awaitable, Callable

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

Handler = Callable[[trio.socket.SocketType, tuple, FrontendRuntime, object], Awaitable[None]]


class BindError(Exception):
    """A bind address could not be listened on; the message says which and why."""


async def open_listener(bind: BindAddress, backlog: int) -> trio.socket.SocketType:
    """Binds and listens; raises BindError (e.g. address already in use)."""
    family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
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
        await sock.bind((bind.host, bind.port))
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise BindError(f"cannot listen on {bind}: {error.strerror or error}") from None
    return sock


async def serve_listener(
    sock: trio.socket.SocketType,
    frontend: FrontendRuntime,
    handler: Handler,
    handler_nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accepts forever on `sock` (closed when this returns or is cancelled).

    A frontend slot is taken *before* accepting, so beyond `maxconn` clients
    wait in the kernel's backlog until a slot frees instead of being reset.
    Each accepted client runs `handler(sock, peer, frontend, slot)` in
    `handler_nursery`; the handler releases the slot.
    """
    bound = sock.getsockname()
    log.info("listener.started", frontend=frontend.name, address=_format(bound))
    task_status.started()
    with sock:
        while True:
            slot = object()
            await frontend.limiter.acquire_on_behalf_of(slot)
            try:
                client, peer = await sock.accept()
            except OSError as error:
                frontend.limiter.release_on_behalf_of(slot)
                if error.errno not in _TRANSIENT_ACCEPT_ERRORS:
                    raise
                log.error(
                    "listener.accept_failed", frontend=frontend.name,
                    error=errno.errorcode.get(error.errno, str(error.errno)),
                )
                await trio.sleep(_ACCEPT_BACKOFF)
                continue
            except BaseException:
                frontend.limiter.release_on_behalf_of(slot)
                raise
            handler_nursery.start_soon(handler, client, peer, frontend, slot)


def _format(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
