"""The stats page as an App service: binds `[stats]`, serves HTTP(S), samples history.

It shares nothing with the proxy path but the runtime's snapshots: each HTTP
connection is its own task with bounded reads and writes (see
:mod:`.server`), and password hashing runs in a worker thread, so a slow or
hostile HTTP client cannot stall proxying. Connections hold slots (see
:mod:`.admission`): at most `max_connections`, `max_connections_per_client`
from one client; beyond them the connection that has waited longest for
its request is evicted, so silent connections cannot lock a real client
out. Events a client triggers at will (refusals, failed logins) go through
one rate-limited log (:mod:`proxy.lograte`), summed up every 10 s.

On reload (:meth:`StatsService.reconfigure`) users, URI, realm, refresh and
admin take effect for the next request; changed bind addresses are opened
before the old ones close, and if they cannot be, the old ones stay (logged
as `stats.rebind_failed`). With `[stats.tls]` every connection starts with a
TLS handshake (the certificate set in force when it was accepted), inside
the connection's slot. Login failure counts, CSRF secret and history
survive reloads.
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any

import structlog
import trio

from ..config.model import BindAddress, Config
from ..errors import StartupError
from ..lograte import Rate, RateLimitedLog
from .admin import CsrfTokens, Notices
from .admission import Refused, Slots
from .auth import Authenticator, FailureLimiter
from .history import History
from .server import Limits, Request, Response, serve_connection, text_response
from .site import StatsSite

log = structlog.get_logger("warren.stats")

SAMPLE_INTERVAL = 2.0
HISTORY_SAMPLES = 150  # five minutes at SAMPLE_INTERVAL
# A reconnecting flood overflows a short accept queue, and a real client whose
# SYN is dropped waits a second for the kernel's retransmit (the kernel caps
# this at net.core.somaxconn, 4096 by default).
STATS_BACKLOG = 1024
LOG_SUMMARY_CHECK = 1.0  # how often finished log intervals are summed up
# What a client can make us log at will: the first `burst` per interval in full, then a summary.
LOG_RATES = {
    "stats.connection_limit": Rate(burst=1, interval=10.0),
    "stats.request_refused": Rate(burst=30, interval=10.0),
    "stats.login_failed": Rate(burst=30, interval=10.0),
    "stats.login_throttled": Rate(burst=1, interval=10.0),
    "stats.csrf_refused": Rate(burst=10, interval=10.0),
    "stats.admin_refused": Rate(burst=10, interval=10.0),
    "stats.send_timeout": Rate(burst=10, interval=10.0),
    "stats.tls_handshake_failed": Rate(burst=10, interval=10.0),
}
_FREEBIND = {socket.AF_INET: (socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15)),
             socket.AF_INET6: (socket.IPPROTO_IPV6, getattr(socket, "IPV6_FREEBIND", 78))}


class StatsBindError(StartupError):
    """A `[stats] bind` address could not be listened on."""


class StatsService:
    """A :class:`proxy.supervisor.Service`: the `[stats]` page (nothing when it is unset)."""

    name = "stats"

    def __init__(self, config: Config, *, limits: Limits = Limits(), sample_interval: float = SAMPLE_INTERVAL,
                 login_failures: FailureLimiter | None = None):
        self._settings = config.stats
        self.limits = limits
        self.sample_interval = sample_interval
        self.history = History(HISTORY_SAMPLES)
        self._limiter = login_failures or FailureLimiter()
        self._csrf = CsrfTokens()
        self._notices = Notices()
        self._verify_limiter = trio.CapacityLimiter(1)
        self._runtime: Any = None
        self.site: StatsSite | None = None
        self._listeners: list[trio.SocketListener] = []
        self._pending: list[trio.SocketListener] | None = None
        self._accepting: trio.CancelScope | None = None
        self._slots = Slots(limits.max_connections, limits.max_connections_per_client)
        self.log = RateLimitedLog(log, LOG_RATES)

    @property
    def open_connections(self) -> int:
        return len(self._slots)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the page listens now (real ports when bound to port 0)."""
        return [listener.socket.getsockname()[:2] for listener in self._listeners]

    async def run(self, runtime: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until cancelled; raises StatsBindError if a bind address is unusable.

        Login failure counts, CSRF secret and history outlive a restart after a crash.
        """
        self._runtime = runtime
        self.site = self._make_site(self._settings)
        self._listeners, self._pending = open_listeners(self._settings.binds if self._settings else ()), None
        for address in self.addresses:
            log.info("stats.listening", address=_format(address))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sample_history)
                nursery.start_soon(self._sum_up_logs)
                await nursery.start(self._accept_forever, nursery)
                task_status.started()
        finally:
            self._accepting = None  # not running: a reload only records its settings
            for listener in self._listeners + (self._pending or []):
                listener.socket.close()
            self._listeners, self._pending = [], None

    def reconfigure(self, config: Config) -> None:
        """Applies a reloaded `[stats]` (absent: the page closes)."""
        old, new = self._settings, config.stats
        if new is not None and self._runtime is not None:
            self.site = self._make_site(new)
        old_binds = old.binds if old else ()
        new_binds = new.binds if new else ()
        self._settings = new
        if new_binds != old_binds and self._accepting is not None:
            superseded = self._pending or []
            try:
                self._pending = open_listeners(new_binds, reuse_from=self._listeners + superseded)
            except StatsBindError as error:
                log.error("stats.rebind_failed", error=str(error))
                return
            for listener in superseded:  # a second reload before the first swap: drop its leftovers
                if listener not in self._pending and listener not in self._listeners:
                    listener.socket.close()
            self._accepting.cancel()

    def _make_site(self, settings: Any) -> StatsSite | None:
        if settings is None:
            return None
        return StatsSite(
            settings, self._runtime,
            authenticator=Authenticator(settings.users, limiter=self._limiter, logger=self.log),
            csrf=self._csrf, notices=self._notices, history=self.history,
            sample_interval=self.sample_interval, verify_limiter=self._verify_limiter, logger=self.log,
        )

    async def _accept_forever(self, connections: trio.Nursery, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accepts on the current listeners; swaps them when reconfigure() opened new ones."""
        while True:
            with trio.CancelScope() as scope:
                self._accepting = scope
                async with trio.open_nursery() as acceptors:
                    for listener in self._listeners:
                        acceptors.start_soon(self._accept, listener, connections)
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    await trio.sleep_forever()
            if self._pending is None:
                return
            keep = {id(listener) for listener in self._pending}
            for listener in self._listeners:
                if id(listener) not in keep:
                    await listener.aclose()
            self._listeners, self._pending = self._pending, None
            log.info("stats.rebound", addresses=[_format(a) for a in self.addresses])

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                log.error("stats.accept_failed", error=error.strerror)
                await trio.sleep(0.1)
                continue
            connections.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        host, client = _peer(stream)
        with trio.CancelScope() as scope:
            slot, evicted = self._slots.admit(host, scope.cancel)
            for victim in evicted:
                self._log_limit("evicted", victim.client)
            if isinstance(slot, Refused):
                self._log_limit(slot.reason, client)
                await stream.aclose()
                return
            try:
                # The handshake happens in the slot, waiting: a client that never
                # finishes it is evicted like one that never sends its request.
                tls = getattr(self._runtime.tls, "stats", None)  # read per connection: a reload swaps it
                secure = await self._handshake(stream, tls, client) if tls is not None else stream
                if secure is not None:
                    await serve_connection(secure, self._dispatch, self.limits, client, slot=slot, logger=self.log)
            finally:
                slot.release()
                await trio.aclose_forcefully(stream)  # closed already, unless evicted or refused in the handshake

    def _log_limit(self, reason: str, client: str) -> None:
        self.log.warning("stats.connection_limit", reason=reason, client=client,
                         limit=self.limits.max_connections, per_client=self.limits.max_connections_per_client)

    async def _handshake(self, stream: trio.SocketStream, tls: Any, client: str) -> trio.SSLStream | None:
        """The TLS handshake of an HTTPS connection within `[stats.tls] handshake_timeout`; None if it failed.

        The caller closes `stream` then. https_compatible: browsers end
        connections without close_notify.
        """
        secure = trio.SSLStream(stream, tls.context, server_side=True, https_compatible=True)
        reason = None
        with trio.move_on_after(tls.settings.handshake_timeout) as scope:
            try:
                await secure.do_handshake()
                return secure
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                cause = error.__cause__
                reason = getattr(cause, "reason", None) or str(cause or error) or "connection closed"
        if scope.cancelled_caught:
            reason = "handshake timeout"
        self.log.info("stats.tls_handshake_failed", client=client, reason=reason)
        return None

    async def _dispatch(self, request: Request) -> Response:
        site = self.site
        if site is None:  # [stats] removed by a reload; this connection outlived it
            return text_response(404, close=True)
        return await site.handle(request)

    async def _sample_history(self) -> None:
        while True:
            self.history.record(self._runtime.statistics(), time.monotonic())
            self._runtime.observe_activity()  # idle times of the connections view
            await trio.sleep(self.sample_interval)

    async def _sum_up_logs(self) -> None:
        while True:
            await trio.sleep(LOG_SUMMARY_CHECK)
            self.log.flush()


def open_listeners(binds: tuple[BindAddress, ...], *, reuse_from: list[trio.SocketListener] = ()) -> list[trio.SocketListener]:
    """Binds every address (all or nothing); raises StatsBindError naming the first failure.

    Listeners in `reuse_from` already bound to a wanted address are kept, so a
    reload that adds an address does not close the others.
    """
    existing = {_bind_key(listener): listener for listener in reuse_from}
    opened: list[trio.SocketListener] = []
    fresh: list[socket.socket] = []
    try:
        for bind in binds:
            listener = existing.get((bind.host, bind.port)) if bind.port else None
            if listener is None:
                sock = _bound_socket(bind)
                fresh.append(sock)
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            opened.append(listener)
    except OSError as error:
        for sock in fresh:
            sock.close()
        raise StatsBindError(f"stats: cannot listen on {bind}: {error.strerror or error}") from None
    return opened


def _bound_socket(bind: BindAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # The page may live on a floating address this host does not own yet.
        sock.setsockopt(*_FREEBIND[family], 1)
        sock.bind((bind.host, bind.port))
        sock.listen(STATS_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_key(listener: trio.SocketListener) -> tuple[str, int]:
    host, port = listener.socket.getsockname()[:2]
    return host, port


def _peer(stream: trio.SocketStream) -> tuple[str, str]:
    """The client's (address, "address:port") as logs show it."""
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?", "?"
    return host, _format((host, port))


def _format(address: tuple[str, int]) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
