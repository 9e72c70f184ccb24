"""Accepting client connections on one bind address of a frontend."""

from __future__ import annotations

import _socket
import errno
import math
import select
import socket
import struct
from typing import Any, Callable, Final

import structlog
import trio

from ..config.model import BindAddress
from ..io.poller import current_poller
from ..runtime import FrontendRuntime

log = structlog.get_logger("warren.listener")

# Linux: lets a standby host bind a floating address it does not own yet
# (the alternative is the system-wide net.ipv4.ip_nonlocal_bind sysctl).
IP_FREEBIND: Final = getattr(socket, "IP_FREEBIND", 15)

# Out of descriptors or kernel memory: transient, back off and accept again
# (trio's own serve_listeners does the same).
_TRANSIENT_ACCEPT_ERRORS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_BACKOFF: Final = 0.1

# Clients accepted in a row before other tasks get a turn.
_ACCEPT_BATCH: Final = 16
# How many clients wait in a listening socket's accept queue: TCP_INFO's
# tcpi_unacked, which tcp_get_info() fills with the accept queue's length for
# a socket in LISTEN, a u32 at offset 24 (after eight one-byte fields and
# rto, ato, snd_mss, rcv_mss): the first 28 bytes are asked for.
_QUEUED: Final = struct.Struct("=24xI")
# The listening socket in the relays' epoll: a new client is an edge.
_ACCEPT_MASK: Final = select.EPOLLIN | select.EPOLLET

# Starts serving one accepted client without blocking (and never raises);
# the client holds one of the frontend's slots until the handler releases it.
Handler = Callable[[_socket.socket, tuple, FrontendRuntime], None]


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

    A client is accepted only while the frontend has a free slot (fewer
    than `maxconn` clients), so beyond `maxconn` clients wait in the
    kernel's backlog until a slot frees instead of being reset. Each
    accepted client (a non-blocking socket) holds a slot
    (``FrontendRuntime.take_slot``) and goes to `handler(sock, peer,
    frontend)`, which releases the slot when the client is done.

    Accepting happens in the relays' poller (:class:`_Acceptor`), like
    relaying: a connection arriving is accepted, connected and relayed in
    one wake-up, without a trio task switch or trio's one-shot re-arm of the
    listening socket. This task only holds the registration and waits
    while the acceptor is paused: for a free slot, or 100 ms after a
    transient accept error (out of descriptors or memory); any other accept
    error is raised here.
    """
    bound = sock.getsockname()
    poller = current_poller()
    acceptor = _Acceptor(sock, frontend, handler)
    poller.watch(acceptor.fds[0], acceptor, _ACCEPT_MASK)
    log.info("listener.started", frontend=frontend.name, address=_format(bound))
    task_status.started()
    try:
        # The backlog may hold clients that arrived before the registration
        # (their edge is gone): accept them now.
        while acceptor.serve():
            await trio.lowlevel.checkpoint()
        while True:
            await acceptor.paused.wait()
            acceptor.paused = trio.Event()
            error = acceptor.error
            if error is None:
                await frontend.wait_for_slot()
            elif isinstance(error, OSError) and error.errno in _TRANSIENT_ACCEPT_ERRORS:
                log.error(
                    "listener.accept_failed", frontend=frontend.name,
                    error=errno.errorcode.get(error.errno, str(error.errno)),
                )
                await trio.sleep(_ACCEPT_BACKOFF)
            else:
                raise error
            acceptor.error = None
            while acceptor.serve():  # resumed: the backlog may hold clients (no new edge)
                await trio.lowlevel.checkpoint()
    finally:
        acceptor.notify = None
        poller.forget(acceptor.fds[0])
        sock.close()


class _Acceptor:
    """A listening socket as a link of the relays' poller: it accepts while
    the frontend has slots, and pauses (``paused`` is set) when it has none
    or accept() failed (``error``); the listener's task resumes it."""

    __slots__ = (
        "fds", "events", "queued", "notify", "scheduled", "deadline",
        "accept", "info", "family", "kind", "proto", "frontend", "handler", "paused", "error",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, frontend: FrontendRuntime, handler: Handler) -> None:
        self.fds = (sock.fileno(),)
        self.events = [0]
        self.queued = False
        self.notify: object = True  # never None: the poller serves it until the listener ends
        self.scheduled = self.deadline = math.inf  # no timer
        # socket.accept() converts the listener's family and type to enums
        # and wraps the new fd in a Python-level socket.socket for every
        # client; accept on the raw fd and wrap it in the C-level
        # _socket.socket (all its methods are C) with values taken once.
        # (_accept, CPython's, returns (fd, address); typeshed lacks it.)
        self.accept: Callable[[], tuple[int, Any]] = sock._accept  # type: ignore[attr-defined]
        self.family, self.kind, self.proto = int(sock.family), int(sock.type), sock.proto
        self.info = sock.getsockopt
        self.frontend = frontend
        self.handler = handler
        self.paused = trio.Event()
        self.error: Exception | None = None  # an OSError from accept(), else a bug (fail)

    def serve(self) -> bool:
        """Accepts clients until the backlog is empty, up to a batch; True
        if the batch ran out first (serve again after others had a turn).

        Whether the backlog is empty is asked (the accept queue's length,
        one ``getsockopt``) whenever the clients it last reported have been
        accepted, rather than learnt from an ``accept`` that fails with
        EAGAIN, which costs a listening socket's lock and a Python exception
        (~4.5 µs here, against 0.6 for the question) on every wake-up. A
        client queued after the last question is a new edge.
        """
        self.events[0] = 0
        if self.paused.is_set():
            return False  # the listener's task resumes us
        frontend, accept, handler, info = self.frontend, self.accept, self.handler, self.info
        waiting = 0
        for _ in range(_ACCEPT_BATCH):
            if not waiting:
                waiting = _QUEUED.unpack(info(socket.IPPROTO_TCP, socket.TCP_INFO, _QUEUED.size))[0]
                if not waiting:
                    return False  # drained: the next client is a new edge
            if frontend.current >= frontend.config.maxconn:
                self.paused.set()
                return False
            try:
                fd, peer = accept()
            except BlockingIOError:
                return False  # drained after all (a queued client went away)
            except OSError as error:
                self.error = error
                self.paused.set()
                return False
            waiting -= 1
            frontend.take_slot()
            client = _socket.socket(self.family, self.kind, self.proto, fd)
            client.setblocking(False)
            handler(client, peer, frontend)
        return True

    def expire(self) -> None:
        pass  # it has no timer

    def fail(self, error: Exception) -> None:
        # A bug (handlers never raise): the listener's task raises it.
        self.error = error
        self.paused.set()


def _format(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
