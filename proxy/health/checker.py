"""The health-check service: runs every server's checks and applies verdicts.

One task per checked server runs its periodic checks (every configured kind
must pass) on the schedule of :mod:`proxy.health.schedule`; a second task per
server holds the `watch` connection, whose loss marks the server DOWN at once.
Verdicts go into the runtime model; their consequences (killing sessions,
moving clients off backups, slowstart) are applied here.
"""

from __future__ import annotations

import random
import socket
import ssl
import time
from functools import partial
from typing import TYPE_CHECKING

import structlog
import trio

from ..backends.proxy_protocol import encode as encode_proxy_header
from ..config.model import (
    CheckKind, Config, Health, OnError, OnMarkedDown, OnMarkedUp, SendProxy,
)
from ..runtime import AdminState, KillReason, ServerRuntime
from .amqp import check_amqp
from .counter import HealthCounter, Transition
from .http import check_http
from .results import CheckCode, CheckResult
from .schedule import ErrorObserver, next_delay
from .tcp import CheckTls, check_tcp
from .watch import WatchOpenFailed, watch_amqp

if TYPE_CHECKING:
    from ..runtime import Runtime

log = structlog.get_logger("warren.health")

_PERIODIC = (CheckKind.TCP, CheckKind.AMQP, CheckKind.HTTP)


class HealthService:
    """A :class:`proxy.supervisor.Service`: health checks for every checked server.

    Verdicts live in the runtime model and each checker's counter is handed
    back to its server when it stops, so a restart after a crash carries on
    from the same health states.
    """

    name = "health"

    def __init__(self, config: Config):
        self.config = config
        self._runtime: Runtime | None = None
        self._nursery: trio.Nursery | None = None
        self._checkers: dict[tuple[str, str], ServerChecker] = {}
        self._rng = random.Random()

    async def run(self, runtime: Runtime, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._runtime = runtime
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._sync()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for checker in self._checkers.values():
                checker.stop()  # keeps each verdict on its server for the next run
            self._checkers.clear()

    def reconfigure(self, config: Config) -> None:
        self.config = config
        if self._nursery is not None:  # not running: the next run starts from the runtime
            self._sync()

    def _sync(self) -> None:
        """Starts checkers for new or changed servers, stops those of removed ones."""
        wanted: dict[tuple[str, str], ServerRuntime] = {}
        for backend in self._runtime.backends.values():
            for server in backend.servers.values():
                if server.checked:
                    wanted[(backend.name, server.name)] = server
        for key, checker in list(self._checkers.items()):
            server = wanted.get(key)
            if server is None or checker.settings_changed(server):
                checker.stop()
                del self._checkers[key]
        for key, server in wanted.items():
            if key not in self._checkers:
                checker = ServerChecker(server, self._rng, lambda: self._runtime.tls)
                self._checkers[key] = checker
                self._nursery.start_soon(checker.run)


class ServerChecker:
    """Checks one server until stopped; owns its health counter."""

    def __init__(self, server: ServerRuntime, rng: random.Random, tls_material=lambda: None):
        self.server = server
        self.tls_material = tls_material  # () -> the TlsMaterial in force
        self.health: Health = server.backend.config.health
        self.settings = (self.health, _check_target(server))
        self.counter = HealthCounter(self.health.rise, self.health.fall, self.health.init_state)
        if server.counter_state is not None:  # a reload: carry the verdict over
            self.counter.restore(server.counter_state)
        self.observer = ErrorObserver(self.health.error_limit, self.health.on_error)
        self.fast = False
        self.rng = rng
        self.scope = trio.CancelScope()
        self.wake = trio.Event()  # set: check now (watch lost, passive errors)
        self.changed = trio.Event()  # set (and replaced) on every up/down transition
        server.observer = self

    def settings_changed(self, server: ServerRuntime) -> bool:
        return server is not self.server or (server.backend.config.health, _check_target(server)) != self.settings

    def stop(self) -> None:
        self.server.counter_state = self.counter.snapshot()
        if self.server.observer is self:
            self.server.observer = None
        self.scope.cancel()

    async def run(self) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                if CheckKind.WATCH in self.health.kinds:
                    nursery.start_soon(self._watch_forever)
                await self._check_forever()

    async def _check_forever(self) -> None:
        # Watch alone: periodic AMQP checks bring a server (back) up.
        kinds = [k for k in self.health.kinds if k in _PERIODIC] or [CheckKind.AMQP]
        while True:
            with trio.move_on_after(next_delay(self.counter, self.health, self.rng, fast=self.fast)):
                await self.wake.wait()
            self.wake = trio.Event()
            if self.server.admin is AdminState.MAINT:
                continue  # MAINT: not checked
            result = await self._run_checks(kinds)
            self._record(result)
            if self.counter.is_fully_up or self.counter.is_fully_down:
                self.fast = False

    async def _run_checks(self, kinds) -> CheckResult:
        """Runs each kind in order; the first failure is the verdict."""
        host, port, http_port = _check_target(self.server)
        tls = self._tls()
        result = None
        for kind in kinds:
            try:
                header = self._proxy_header(host, port) if kind is not CheckKind.HTTP else None
            except ValueError:  # a host name not resolved yet: a PROXY header needs an address
                result = CheckResult(CheckCode.L4CON, 0.0, f"{host} is not resolved yet", kind)
                break
            timeout = self.health.timeout
            if kind is CheckKind.TCP:
                result = await check_tcp(host, port, None, timeout, proxy_header=header, tls=tls)
            elif kind is CheckKind.AMQP:
                result = await check_amqp(host, port, self.health.amqp, timeout, proxy_header=header, tls=tls)
            else:
                result = await check_http(host, http_port, self.health.http, timeout, tls=self._http_tls(tls))
            if not result.passed:
                break
        return result

    def _tls(self) -> CheckTls | None:
        """The TLS clients reach this server with (read per check: a SIGHUP may rotate it)."""
        material = self.tls_material()
        server = self.server
        context = material.server(server.backend.name, server.name) if material is not None else None
        return None if context is None else CheckTls(context, _hostname(server))

    def _http_tls(self, server_tls: CheckTls | None) -> CheckTls | None:
        wanted = self.health.http.tls
        if wanted is None or (wanted and server_tls is not None):
            return server_tls
        if not wanted:
            return None
        return CheckTls(_default_https_context(), _hostname(self.server))  # HTTPS to a plaintext-AMQP broker

    def _proxy_header(self, host: str, port: int) -> bytes | None:
        version = self.server.config.send_proxy
        if version is SendProxy.NONE:
            return None
        return encode_proxy_header(version.value, (_source_address(host), 0), (host, port))

    def _record(self, result: CheckResult) -> None:
        server = self.server
        server.last_check = result
        server.total_checks += 1
        if not result.passed and self.counter.is_up:
            server.check_failures += 1
        transition = self.counter.record(result.passed)
        self._apply(transition, result, "check")

    def _apply(self, transition: Transition | None, result: CheckResult | None, reason: str) -> None:
        server = self.server
        now = time.monotonic()
        server.set_health(self.counter.is_up, self.counter.status, now)
        if transition is None:
            return
        self.changed.set()
        self.changed = trio.Event()
        backend = server.backend
        remaining = sum(1 for s in backend.servers.values() if s.available)
        fields = dict(
            backend=backend.name, server=server.name, status=transition.new_status,
            reason=reason, check=result.short() if result else None,
            description=result.description if result else None, remaining=remaining,
        )
        if transition.went_up:
            log.info("server.up", **fields)
            self._after_up(now)
        else:
            log.warning("server.down", **fields)
            if self.health.on_marked_down is OnMarkedDown.SHUTDOWN_SESSIONS:
                server.kill_sessions(KillReason.SERVER_DOWN)
            if not backend.candidates():
                log.error("backend.no_server", backend=backend.name, reason=f"{server.name} went down")

    def _after_up(self, now: float) -> None:
        server = self.server
        if self.health.slowstart:
            server.slowstart = (now, self.health.slowstart)
        if self.health.on_marked_up is OnMarkedUp.SHUTDOWN_BACKUP_SESSIONS and not server.config.backup:
            for other in server.backend.servers.values():
                if other.config.backup:
                    other.kill_sessions(KillReason.SERVER_DOWN)
        server.backend.queue.unpark_all()

    async def _watch_forever(self) -> None:
        """Holds one AMQP connection while the server is UP; its loss marks it DOWN."""
        host, port, _ = _check_target(self.server)
        while True:
            while not self.counter.is_up:
                await self.changed.wait()
            lost = trio.Event()
            verdicts: list[CheckResult] = []

            def on_lost(result: CheckResult) -> None:
                verdicts.append(result)
                lost.set()

            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(
                        partial(
                            watch_amqp, proxy_header=self._proxy_header(host, port),
                            tls=self._tls(), open_timeout=self.health.timeout,
                        ),
                        host, port, self.health.amqp, on_lost,
                    )
                except WatchOpenFailed:
                    pass  # the periodic checks judge; try again after an interval
                else:
                    self.server.watching = True
                    try:
                        await lost.wait()
                    finally:
                        self.server.watching = False
                nursery.cancel_scope.cancel()
            if not verdicts:  # could not open: try again after an interval
                await trio.sleep(self.health.inter)
            else:
                self.server.last_check = verdicts[0]
                self._apply(self.counter.force_down(), verdicts[0], "watch connection lost")
                self.wake.set()  # start checking at once, to bring it back through rise

    # Passive observation (ServerRuntime.observer): real client connects.
    def connect_failed(self, server: ServerRuntime) -> None:
        action = self.observer.record_connect_error()
        if action is OnError.FASTINTER:
            self.fast = True
            self.wake.set()
        elif action is OnError.MARK_DOWN:
            self._apply(self.counter.force_down(), None, "too many connection errors")

    def connect_ok(self, server: ServerRuntime) -> None:
        self.observer.record_connect_ok()


def _check_target(server: ServerRuntime) -> tuple[str, int, int]:
    host = server.addresses[0] if server.addresses else server.config.address
    port = server.config.check_port or server.config.port
    http_port = server.config.http_port or server.backend.config.health.http.port
    return host, port, http_port


def _hostname(server: ServerRuntime) -> str:
    """The name a broker's certificate must carry: ``sni``, else the configured address
    (an IP address is checked against the certificate's IP SANs, and sent without SNI)."""
    tls = server.config.tls
    return (tls.sni if tls is not None and tls.sni else None) or server.config.address


_https_default: list[ssl.SSLContext] = []


def _default_https_context() -> ssl.SSLContext:
    """For ``health.http.tls = true`` on a server reached in clear: the system's trust store."""
    if not _https_default:
        _https_default.append(ssl.create_default_context())
    return _https_default[0]


def _source_address(destination: str) -> str:
    """The local address the kernel would use to reach `destination` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in destination else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((destination, 9))
            return probe.getsockname()[0]
        except OSError:
            return "::" if family == socket.AF_INET6 else "0.0.0.0"
