"""One nursery that owns everything Warren runs: listeners, sessions, services.

Lifecycle:
- start: every listener is bound before anything is reported ready; all bind
  errors are reported together. Then the services start, in order, each
  under a supervisor (proxy/supervisor.py): a service that crashes later is
  logged, counted and restarted, and the proxy goes on.
- SIGHUP: the config file is read again; a valid one is applied without
  dropping established connections, an invalid one is logged and ignored.
- SIGTERM/SIGINT: listeners close at once, live connections get
  `global.grace` to finish, then the rest are closed; exit status 0.
- systemd (proxy/sdnotify.py): READY=1 once started, RELOADING=1/READY=1
  around a SIGHUP reload, STOPPING=1 when a stop begins, watchdog pings.
"""

from __future__ import annotations

import signal
from functools import partial
from typing import Any

import structlog
import trio

from . import _native as native, logs, privileges
from .amqp.rebalancer import RebalanceService
from .backends.names import NamesService
from .config import ConfigError, load_config
from .config.model import BindAddress, Config
from .errors import StartupError
from .memory import collapse_startup_memory, collect_startup_garbage, freeze_startup_objects, trim_after_waves
from .frontends.listener import BindError, open_listener, serve_listener
from .frontends.relay_path import choose_relay
from .frontends.session import Sessions
from .health.checker import HealthService
from .runtime import FrontendRuntime, KillReason, Runtime
from .sdnotify import Notifier, status_line
from .stats_ui import ControlService, StatsService
from .supervisor import Service, Supervisor
from .vip.service import VipService
from .tls import TlsConfigError, TlsMaterial, build_material

log = structlog.get_logger("warren.app")

_STOPPING_BUDGET = 5.0  # seconds services may take to hand over before listeners close


class App:
    def __init__(self, config: Config, *, handle_signals: bool = True, splice: bool | None = None,
                 freeze_start_up: bool = False):  # fmt: skip
        """Raises StartupError if the TLS files of `config` cannot all be used.

        `freeze_start_up`: once started, keep every object alive then out of
        the cyclic collector (:func:`proxy.memory.freeze_startup_objects`) and,
        with a VIP's peer link, move the start-up memory onto huge pages
        (:func:`proxy.memory.collapse_startup_memory`): process-wide choices for
        the process that is Warren (`warren run`), not for one that merely
        hosts an App (a test, a benchmark)."""
        self.config = config
        self.runtime = Runtime(config)
        self.runtime.tls = _load_tls(config)
        self.relay = choose_relay(config, splice=splice)
        self.pipes = self.relay.pipes
        self.runtime.relay = self.relay.describe()
        self.sessions = Sessions(self.runtime, self.pipes, _logs_connections(config), self.relay.sockmap)
        self.handle_signals = handle_signals
        self.freeze_start_up = freeze_start_up
        self.services: list[Service] = default_services(config)
        self._supervised: list[tuple[Service, Supervisor]] = []
        self._bound: dict[tuple[str, BindAddress], tuple[str, int]] = {}
        self._listeners: dict[tuple[str, BindAddress], trio.CancelScope] = {}
        self._stop = trio.Event()
        self._services_nursery: trio.Nursery | None = None
        self._session_nursery: trio.Nursery | None = None
        self.systemd = Notifier.from_environment()

    @property
    def addresses(self) -> dict[str, list[tuple[str, int]]]:
        """Frontend name -> the addresses it listens on now (real ports for port 0)."""
        result: dict[str, list[tuple[str, int]]] = {}
        for (name, _), address in self._bound.items():
            result.setdefault(name, []).append(address)
        return result

    def stop(self) -> None:
        """Begins a graceful stop (what SIGTERM does)."""
        self._stop.set()

    async def serve(self, *, task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs until stopped; raises StartupError if a listener cannot be
        bound or the relay path the configuration insists on is unavailable."""
        self.relay.check()
        opened = await self._open_listeners(self.config)  # before any nursery: a plain error
        async with trio.open_nursery() as session_nursery:
            self._session_nursery = session_nursery
            self.sessions.nursery = session_nursery
            if self.handle_signals:  # here, so a second SIGTERM works while draining
                session_nursery.start_soon(self._handle_signals, session_nursery.cancel_scope)
            async with trio.open_nursery() as services:
                self._services_nursery = services
                await self._serve_listeners(opened, services)
                services.start_soon(trim_after_waves, self.sessions.closed_total)
                if self.freeze_start_up:
                    # Both before the services start: each stalls the event loop, for hundreds of
                    # ms under load, and a VIP instance already in its election reads no advert
                    # meanwhile (a backup that joined took over from a live master; another missed
                    # its master's priority-0 advert, which took the VIP back, resigned as it was).
                    collect_startup_garbage()
                    if any(vip.peer_link.enabled for vip in self.config.vip):
                        await trio.to_thread.run_sync(collapse_startup_memory)  # (its docstring)
                for service in self.services:
                    await services.start(self._supervise(service).run)
                log.info(
                    "warren.started",
                    listeners={f: [_fmt(a) for a in addrs] for f, addrs in self.addresses.items()},
                    relay=self.relay.path,
                    compiled=f"{len(native.compiled())}/{len(native.MODULES)}",  # proxy/_native.py
                )
                if self.freeze_start_up:
                    freeze_startup_objects(collected=True)
                self.systemd.ready(self.status_line())
                session_nursery.start_soon(self.systemd.keep_alive, self.status_line)
                task_status.started(self)
                await self._stop.wait()
                self.systemd.stopping()
                await self._announce_stop()
                services.cancel_scope.cancel()
            grace = self.config.global_.grace
            log.info("warren.stopping", live_connections=len(self.sessions.live), grace=grace)
            if not self.sessions.live:
                session_nursery.cancel_scope.cancel()  # only the signal handler is left
            else:
                session_nursery.start_soon(self._end_sessions, session_nursery.cancel_scope, grace)
        log.info("warren.stopped")
        self.relay.close_if_idle()

    def _supervise(self, service: Service) -> Supervisor:
        supervisor = Supervisor(service.name, partial(service.run, self.runtime), registry=self.runtime.supervisors)
        self._supervised.append((service, supervisor))
        return supervisor

    async def _open_listeners(self, config: Config) -> list[tuple[str, BindAddress, Any]]:
        """Binds every address of `config` not yet listened on; all or nothing."""
        wanted = [(f, b) for f in config.frontends for b in f.binds if (f.name, b) not in self._listeners]
        opened, problems = [], []
        for frontend, bind in wanted:
            try:
                opened.append((frontend.name, bind, open_listener(bind, frontend.backlog)))
            except BindError as error:
                problems.append(f"frontend {frontend.name}: {error}")
        if problems:
            for _, _, sock in opened:
                sock.close()
            raise StartupError(problems)
        return opened

    async def _serve_listeners(self, opened, nursery: trio.Nursery) -> None:
        for name, bind, sock in opened:
            runtime = self.runtime.frontends[name]
            scope = await nursery.start(self._run_listener, sock, runtime)
            self._listeners[(name, bind)] = scope
            self._bound[(name, bind)] = sock.getsockname()[:2]

    async def _run_listener(self, sock, frontend: FrontendRuntime, *, task_status) -> None:
        with trio.CancelScope() as scope:
            await serve_listener(sock, frontend, self.sessions.start, task_status=_Started(task_status, scope))

    async def _announce_stop(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(_STOPPING_BUDGET):
            for service, supervisor in self._supervised:
                stopping = getattr(service, "stopping", None)
                if stopping is not None:
                    await supervisor.call_async(stopping)

    async def _end_sessions(self, scope: trio.CancelScope, grace: float) -> None:
        """Lets connections finish for `grace` seconds, then kills the rest
        (most sessions have no task a cancelled nursery would reach)."""
        with trio.move_on_after(grace):
            while self.sessions.live:
                await self.sessions.drained.wait()
        self.sessions.kill_all(KillReason.KILLED)
        scope.cancel()

    async def _handle_signals(self, everything: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if not self._stop.is_set():
                        self.systemd.reloading()
                        await self.reload()
                        self.systemd.ready(self.status_line())
                    continue
                log.info("warren.signal", signal=signal.Signals(signum).name)
                if self._stop.is_set():  # a second one while draining: stop now
                    self.sessions.kill_all(KillReason.KILLED)
                    everything.cancel()
                self.stop()

    async def reload(self) -> bool:
        """Re-reads the config file; returns whether the new config is in force."""
        path = self.config.path
        try:
            config = load_config(path)
        except ConfigError as error:
            log.error("config.reload_failed", path=path, errors=[str(p) for p in error.problems])
            return False
        # A reload must not strand live clients nor need what this process lacks
        # (a [vip] added without CAP_NET_ADMIN would only fail later, in the service).
        refused = self.runtime.refuse_reload(config) + privileges.capability_problems(config)
        if refused:
            log.error("config.reload_failed", path=path, errors=refused)
            return False
        try:
            # Certificates, keys, CA bundles and CRLs are read again even when
            # the file did not change: a SIGHUP is how they are rotated.
            tls = _load_tls(config)
        except StartupError as error:
            log.error("config.reload_failed", path=path, errors=error.problems, kept="the running TLS set")
            return False
        try:
            opened = await self._open_listeners(config)
        except StartupError as error:
            log.error("config.reload_failed", path=path, errors=error.problems)
            return False
        removed = [key for key in self._listeners if key not in _bind_keys(config)]
        for key in removed:
            self._listeners.pop(key).cancel()
            self._bound.pop(key, None)
        changes = self.runtime.apply(config)
        self.runtime.tls = tls  # new connections only: live ones keep their contexts
        await self._serve_listeners(opened, self._services_nursery)
        self.config = config
        logs.configure(config.global_.log_format, config.global_.log_level)
        logs.config_warnings(config)
        self.sessions.log_connections = _logs_connections(config)
        for service, supervisor in self._supervised:
            supervisor.call(service.reconfigure, config)
        # Closing a port or dropping a server is worth an operator's attention.
        level = log.warning if removed or changes["servers_removed"] else log.info
        level("config.reloaded", path=path, listeners_closed=[f"{f}/{b}" for f, b in removed], **changes)
        return True

    def status_line(self) -> str:
        return status_line(self.runtime.statistics())

    def kill_all(self) -> None:
        self.sessions.kill_all(KillReason.KILLED)


def default_services(config: Config) -> list[Service]:
    """The capabilities that run beside the proxy, in start order."""
    # The floating IP last: a host competes for it only once it can serve it.
    return [
        NamesService(config), HealthService(config), RebalanceService(config), StatsService(config),
        ControlService(config), VipService(config),
    ]


class _Started:
    """Reports a listener's cancel scope as its start value once it is accepting."""

    def __init__(self, task_status: trio.TaskStatus[Any], scope: trio.CancelScope):
        self._task_status, self._scope = task_status, scope

    def started(self, value: Any = None) -> None:
        self._task_status.started(self._scope)


def _load_tls(config: Config) -> TlsMaterial:
    """The TLS material of `config`, its warnings logged; StartupError listing every problem."""
    try:
        material = build_material(config)
    except TlsConfigError as error:
        from .config.load import locate_problems

        raise StartupError([str(problem) for problem in locate_problems(config.path, error.issues)]) from None
    for server in material.unverified:
        log.warning("tls.verify_disabled", server=server, reason='verify = "none": broker certificates are not checked')
    for use in material.expiring():
        log.warning("tls.certificate_expiring", where=use.where, file=use.info.path, subject=use.info.subject,
                    not_after=use.info.not_after.isoformat(), days_left=round(use.info.seconds_left() / 86400, 1))
    return material


def _logs_connections(config: Config) -> bool:
    """`connection.closed` is an info event: skip building it when filtered out."""
    return config.global_.log_level in ("debug", "info")


def _bind_keys(config: Config) -> set[tuple[str, BindAddress]]:
    return {(f.name, b) for f in config.frontends for b in f.binds}


def _fmt(address: tuple[str, int]) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
