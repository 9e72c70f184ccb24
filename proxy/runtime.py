"""The live model: one place owns servers, states and counters.

Everything that changes while Warren runs (sessions per server, bytes, health
and admin state, weights) lives in the objects of this module. Writers are the
proxy itself (sessions), the health checkers and the control surfaces (stats
page, `warren ctl`); readers get immutable snapshots from
:meth:`Runtime.statistics` and never reach into live state.

Everything here runs on the trio thread; nothing is locked.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Final, Iterator, Sequence, cast

import trio

from . import __version__
from .backends.dispatch import FULL, NO_SERVER
from .amqp.admission import ConnectionCounts, RateGate
from .amqp.inspect import Identity
from .backends.lb import make_balancer
from .config.model import Backend, Config, Frontend, InitState, Server
from .supervisor import ServiceStats, Supervisors

if TYPE_CHECKING:
    from .io.kernel_relay import KernelTraffic
    from .io.relay import Traffic


# The status of a retired server (removed by a reload, connections still open).
REMOVED = "REMOVED"


class AdminState(enum.StrEnum):
    READY = "READY"
    DRAIN = "DRAIN"  # no new connections, existing ones stay
    MAINT = "MAINT"  # no new connections, not checked


class KillReason(enum.StrEnum):
    """First letter of the termination state of a connection ended from outside."""

    KILLED = "K"  # by an operator, or at stop when the grace period is over
    SERVER_DOWN = "D"  # its server was marked down (shutdown-sessions)


class Connection:
    """One proxied client connection, as long as it lives."""

    __slots__ = (
        "id", "client", "frontend", "backend", "server", "traffic",
        "started", "interrupt", "kill_reason", "kill_note", "amqp",
    )

    def __init__(self, conn_id: int, client: tuple[str, int], frontend: str, traffic: Traffic | KernelTraffic):
        self.id = conn_id
        self.client = client
        self.frontend = frontend
        self.backend: BackendRuntime | None = None
        self.server: ServerRuntime | None = None
        self.traffic = traffic
        self.started = time.monotonic()
        # Ends whatever the session is waiting for (a cancel scope's cancel,
        # the relay's interrupt, ...); set by the session as it goes.
        self.interrupt: Callable[[], None] | None = None
        self.kill_reason: KillReason | None = None
        self.kill_note: str | None = None  # the log line's reason (e.g. "rebalanced")
        self.amqp: Any = None  # proxy.amqp.tap.AmqpConnection on an AMQP frontend

    def kill(self, reason: KillReason, note: str | None = None) -> None:
        """Ends the connection from outside; the session logs `reason` (and `note`)."""
        if self.kill_reason is None:
            self.kill_reason = reason
            self.kill_note = note
        if self.interrupt is not None:
            self.interrupt()


class ServerRuntime:
    """A server's live state. Its config is replaced on reload; state stays.

    A server a reload removed while it still had connections is *retired*:
    it takes no new connections and is not checked, but it stays reachable
    (statistics, kills) until its last connection ends; a reload that brings
    its name back revives it with its connections.
    """

    def __init__(self, backend: BackendRuntime, config: Server, now: float):
        self.backend = backend
        self.config = config
        self.retired = False
        self._addresses: tuple[str, ...] = (config.address,) if _is_ip(config.address) else ()
        self._admin_weight = config.weight
        self.slowstart: tuple[float, float] | None = None  # (since, duration) while ramping up
        self._admin = AdminState.READY
        checked = config.check and bool(backend.config.health.kinds)
        self.checked = checked
        self._up = (not checked) or backend.config.health.init_state is InitState.UP
        self.status = ("UP" if self._up else "DOWN") if checked else "no check"
        self.last_check: Any = None  # health.results.CheckResult once checked
        self.last_change = now
        self.downtime = 0.0
        self.check_failures = 0
        self.total_checks = 0
        self.watching = False  # the health watch connection is open
        self.down_transitions = 0
        self.connections: set[Connection] = set()
        self.max_sessions = 0
        self.total_sessions = 0
        self.closed_bytes_in = 0
        self.closed_bytes_out = 0
        self.connect_errors = 0
        self.retries = 0
        self.redispatches = 0
        self.observer: Any = None  # health's passive observer: connect_failed()/connect_ok()
        self.counter_state: Any = None  # health counter kept across a reload

    @property
    def name(self) -> str:
        return self.config.name

    # Whether the server may take new connections depends on these four:
    # setting one drops the backend's cached candidate list.

    @property
    def up(self) -> bool:
        return self._up

    @up.setter
    def up(self, value: bool) -> None:
        self._up = value
        self.backend.forget_candidates()

    @property
    def admin(self) -> AdminState:
        return self._admin

    @admin.setter
    def admin(self, value: AdminState) -> None:
        self._admin = value
        self.backend.forget_candidates()

    @property
    def admin_weight(self) -> int:
        return self._admin_weight

    @admin_weight.setter
    def admin_weight(self, value: int) -> None:
        self._admin_weight = value
        self.backend.forget_candidates()

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._addresses

    @addresses.setter
    def addresses(self, value: tuple[str, ...]) -> None:
        self._addresses = value
        self.backend.forget_candidates()

    @property
    def weight(self) -> int:
        """The weight balancing uses: the admin weight, ramped during slowstart."""
        weight = self._admin_weight
        if self.slowstart is None or weight == 0:
            return weight
        since, duration = self.slowstart
        fraction = (time.monotonic() - since) / duration
        if fraction >= 1:
            self.slowstart = None
            return weight
        return max(1, int(weight * fraction))

    @weight.setter
    def weight(self, value: int) -> None:
        self.admin_weight = value
        self.backend.queue.unpark_all()  # queued clients may fit now

    @property
    def current_sessions(self) -> int:
        return len(self.connections)

    @property
    def available(self) -> bool:
        """May take new connections (ignoring its maxconn)."""
        return (self.up and self.admin is AdminState.READY and self.weight > 0 and bool(self.addresses)
                and not self.retired)

    @property
    def has_free_slot(self) -> bool:
        return self.config.maxconn == 0 or len(self.connections) < self.config.maxconn

    def set_health(self, up: bool, status: str, now: float) -> bool:
        """Records a health verdict; returns True when up/down changed."""
        self.status = status
        if up == self.up:
            return False
        if up:
            self.downtime += now - self.last_change
        else:
            self.down_transitions += 1
        self.up = up
        self.last_change = now
        return True

    def recheck_settings(self, backend: Backend) -> None:
        """After a reload: a server no longer checked counts as UP."""
        self.checked = self.config.check and bool(backend.health.kinds)
        if not self.checked:
            self.up, self.status, self.last_check = True, "no check", None

    def connect_failed(self) -> None:
        self.connect_errors += 1
        if self.observer is not None:
            self.observer.connect_failed(self)

    def connect_ok(self) -> None:
        if self.observer is not None:
            self.observer.connect_ok(self)

    def set_admin(self, state: AdminState, now: float) -> None:
        if state is not self.admin:
            self.admin = state
            self.last_change = now
            self.backend.queue.unpark_all()

    def attach(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.total_sessions += 1
        self.max_sessions = max(self.max_sessions, len(self.connections))

    def detach(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.closed_bytes_in += conn.traffic.bytes_in
            self.closed_bytes_out += conn.traffic.bytes_out
            self.backend.slot_freed()
            if self.retired and not self.connections:
                self.backend.retired.pop(self.name, None)

    def kill_sessions(self, reason: KillReason) -> int:
        victims = list(self.connections)
        for conn in victims:
            conn.kill(reason)
        return len(victims)

    def bytes_totals(self) -> tuple[int, int]:
        live_in = sum(c.traffic.bytes_in for c in self.connections)
        live_out = sum(c.traffic.bytes_out for c in self.connections)
        return self.closed_bytes_in + live_in, self.closed_bytes_out + live_out


class BackendRuntime:
    def __init__(self, config: Backend, now: float):
        self._candidates: list[ServerRuntime] | None = None  # see candidates()
        self._limited = False  # some candidate has a maxconn
        self.config = config
        self.servers: dict[str, ServerRuntime] = {
            s.name: ServerRuntime(self, s, now) for s in config.servers
        }
        self.retired: dict[str, ServerRuntime] = {}  # removed by a reload, connections still open
        self.balancer = make_balancer(config.balance)
        self.queue = trio.lowlevel.ParkingLot()
        self.queued = 0  # sessions waiting in the queue now
        self.queue_max = 0
        self.total_sessions = 0
        self.no_server = 0
        self.queue_timeouts = 0
        self.amqp_counts = ConnectionCounts()  # live AMQP connections per vhost / user
        self.rebalance: Any = None  # proxy.amqp.rebalancer.RebalanceState, once rebalanced

    @property
    def name(self) -> str:
        return self.config.name

    def slot_freed(self) -> None:
        if self.queued:  # nobody waits, the common case: no ParkingLot calls
            self.queue.unpark()

    def reconfigure(self, config: Backend, now: float) -> tuple[list[str], list[str]]:
        """Applies a reloaded backend; servers keep their live state by name.

        Returns (added, removed) server names. Removed servers' connections
        stay open until they end on their own (like HAProxy's old process);
        until then the server is retired, still counted and reachable.
        """
        old, old_balance = self.servers, self.config.balance
        self.config = config  # new servers read their health settings from it
        self.servers = {}
        for server_config in config.servers:
            server = old.get(server_config.name) or self._revive(server_config.name)
            if server is None:
                server = ServerRuntime(self, server_config, now)
            else:
                if server.config.weight != server_config.weight:
                    server.admin_weight = server_config.weight
                if server.config.address != server_config.address:
                    server.addresses = (server_config.address,) if _is_ip(server_config.address) else ()
                server.config = server_config
                server.recheck_settings(config)
            self.servers[server_config.name] = server
        if config.balance != old_balance:
            self.balancer = make_balancer(config.balance)
        added = [n for n in self.servers if n not in old]
        removed = [n for n in old if n not in self.servers]
        for name in removed:
            if old[name].connections:
                old[name].retired = True
                self.retired[name] = old[name]
        self.forget_candidates()  # other servers, backup flags, maxconns
        self.queue.unpark_all()  # a new server may have free slots
        return added, removed

    def _revive(self, name: str) -> ServerRuntime | None:
        server = self.retired.pop(name, None)
        if server is not None:
            server.retired = False
        return server

    @property
    def connections(self) -> int:
        """Live connections on its servers, retired ones included."""
        return sum(len(s.connections) for s in self.servers.values()) + sum(
            len(s.connections) for s in self.retired.values()
        )

    def candidates(self) -> list[ServerRuntime]:
        """Servers that may take a new connection now: active ones, else
        backups. Cached until a server's health, admin state, weight or
        addresses change, or a reload (``forget_candidates``); do not modify."""
        candidates = self._candidates
        if candidates is None:
            active = [s for s in self.servers.values() if s.available and not s.config.backup]
            candidates = active or [s for s in self.servers.values() if s.available and s.config.backup]
            self._candidates = candidates
            self._limited = any(s.config.maxconn for s in candidates)
        return candidates

    def forget_candidates(self) -> None:
        self._candidates = None

    def acquire(
        self, conn: Connection, prefer: ServerRuntime | None, exclude: Sequence[ServerRuntime]
    ) -> ServerRuntime | str:
        """Attaches `conn` to a candidate with a free slot and returns it:
        `prefer` if it is one, else one not in `exclude` if possible, chosen
        by the balancer. FULL when every candidate is at its maxconn,
        NO_SERVER when there is no candidate (see proxy.backends.dispatch)."""
        candidates = self._candidates
        if candidates is None:
            candidates = self.candidates()
        if not candidates:
            return NO_SERVER
        free = [s for s in candidates if s.has_free_slot] if self._limited else candidates
        if prefer is not None and prefer in free:
            chosen = prefer
        else:
            pool = ([s for s in free if s not in exclude] or free) if exclude else free
            if not pool:
                return FULL
            chosen = cast(ServerRuntime, self.balancer.pick(pool, conn.client[0]))
        chosen.attach(conn)
        conn.server = chosen
        return chosen

    async def wait_in_queue(self, until: float) -> bool:
        """Waits in the backend's queue until a slot may have freed (True)
        or the trio clock reaches `until` (False)."""
        self.queue_max = max(self.queue_max, self.queue.statistics().tasks_waiting + 1)
        self.queued += 1
        try:
            with trio.move_on_at(until):
                await self.queue.park()
                return True
            return False
        finally:
            self.queued -= 1


class FrontendRuntime:
    """A frontend's live state. ``current`` counts its clients, each holding
    one of its ``maxconn`` slots from accept to close: the listener takes a
    slot as it accepts (``take_slot``) and accepts only while one is free
    (``wait_for_slot``); the session gives it back (``release_slot``)."""

    def __init__(self, config: Frontend):
        from .tls.counters import TlsCounters

        self.config = config
        self.current = 0
        self.max_sessions = 0
        self.total_sessions = 0
        self._slot_freed: trio.Event | None = None  # while a listener waits for a slot
        self.gate = _rate_gate(config)
        self.tls = TlsCounters()  # kept across reloads, shown while the frontend has TLS

    @property
    def name(self) -> str:
        return self.config.name

    def reconfigure(self, config: Frontend) -> None:
        self.config = config
        self._wake_listeners()  # maxconn may have grown
        if self.gate is None or not self.gate.same_limits(config):
            self.gate = _rate_gate(config)

    def take_slot(self) -> None:
        """A client was just accepted (no checkpoint since a slot was free)."""
        current = self.current = self.current + 1
        self.total_sessions += 1
        if current > self.max_sessions:
            self.max_sessions = current

    def release_slot(self) -> None:
        self.current -= 1
        if self._slot_freed is not None:
            self._wake_listeners()

    async def wait_for_slot(self) -> None:
        """Returns once fewer than ``maxconn`` clients hold a slot."""
        while self.current >= self.config.maxconn:
            if self._slot_freed is None:
                self._slot_freed = trio.Event()
            await self._slot_freed.wait()

    def _wake_listeners(self) -> None:
        event, self._slot_freed = self._slot_freed, None
        if event is not None:
            event.set()


def _rate_gate(config: Frontend) -> RateGate | None:
    if config.rate_limit is None and config.source_rate_limit is None:
        return None
    return RateGate(config, now=0.0)  # buckets start full: the start time does not matter


@dataclass(frozen=True, slots=True)
class ServerStats:
    backend: str
    name: str
    address: str
    port: int
    status: str
    up: bool
    admin: str
    weight: int  # effective (slowstart ramps it)
    admin_weight: int
    backup: bool
    checked: bool
    last_check: Any
    last_change: float  # seconds in the current state
    downtime: float
    check_failures: int
    down_transitions: int
    current_sessions: int
    max_sessions: int
    limit: int
    total_sessions: int
    bytes_in: int
    bytes_out: int
    connect_errors: int
    retries: int
    redispatches: int


@dataclass(frozen=True, slots=True)
class AmqpCountStats:
    """Live AMQP connections of a backend per vhost and per user, and limit hits."""

    vhosts: tuple[tuple[str, int], ...] = ()
    users: tuple[tuple[str, int], ...] = ()
    hits: tuple[tuple[str, int], ...] = ()  # ("vhost" | "user", times a limit was reached)


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    """A frontend's rate limits and what they did."""

    rate: float  # new connections per second, last 10 s
    rate_limit: float | None
    source_rate_limit: float | None
    queued: int
    rejected: int
    alarms: int


@dataclass(frozen=True, slots=True)
class ConnectionStats:
    """One established connection, as the connections view shows it."""

    id: int
    client: str
    frontend: str
    backend: str
    server: str
    age: float
    idle: float  # since Warren last saw its byte counts change (to the sampling interval)
    bytes_in: int
    bytes_out: int
    name: str | None = None  # AMQP connection_name, else product
    product: str | None = None
    version: str | None = None
    user: str | None = None
    vhost: str | None = None
    heartbeat: int | None = None
    phase: str | None = None  # None: not an AMQP frontend


@dataclass(frozen=True, slots=True)
class BackendStats:
    name: str
    balance: str
    servers: tuple[ServerStats, ...]
    active_servers: int
    backup_servers: int
    current_sessions: int
    total_sessions: int
    queue_current: int
    queue_max: int
    no_server: int
    bytes_in: int
    bytes_out: int
    amqp: AmqpCountStats = AmqpCountStats()


@dataclass(frozen=True, slots=True)
class FrontendStats:
    name: str
    binds: tuple[str, ...]
    backend: str
    current_sessions: int
    max_sessions: int
    limit: int
    total_sessions: int
    mode: str = "tcp"
    admission: AdmissionStats | None = None
    tls: Any = None  # proxy.tls.counters.TlsStatistics when the frontend terminates TLS


@dataclass(frozen=True, slots=True)
class CertificateStats:
    """A certificate Warren presents: where, which file, whose, until when (Unix time)."""

    where: str
    path: str
    subject: str
    not_after: float
    seconds_left: float


@dataclass(frozen=True, slots=True)
class Statistics:
    version: str
    pid: int
    uptime: float
    frontends: tuple[FrontendStats, ...]
    backends: tuple[BackendStats, ...]
    extra: dict[str, Any] = field(default_factory=dict)  # vip, ... by later capabilities
    services: tuple[ServiceStats, ...] = ()  # every supervised service, in start order
    relay: str = ""  # the relay path in use (and why, if not the one asked for)
    certificates: tuple[CertificateStats, ...] = ()


class Runtime:
    """Owns the live state built from a :class:`Config`; see the module docstring."""

    def __init__(self, config: Config):
        now = time.monotonic()
        self.config = config
        self.started = now
        self.relay = ""  # set by the App: the relay path in use
        self.frontends = {f.name: FrontendRuntime(f) for f in config.frontends}
        self.backends = {b.name: BackendRuntime(b, now) for b in config.backends}
        # Removed by a reload while clients were connected: their slots stay
        # taken until those connections end; the name coming back revives it.
        self.retired_frontends: dict[str, FrontendRuntime] = {}
        self._next_id = 0
        self.tls: Any = None  # proxy.tls.TlsMaterial of the config in force (set by the App)
        self.extra_statistics: dict[str, Any] = {}  # name -> callable returning a snapshot
        self.supervisors = Supervisors()  # the services' health: running, crashes, restarts
        self._activity: dict[int, tuple[int, float]] = {}  # conn id -> (bytes seen, since when)

    def new_connection_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def servers(self) -> Iterator[ServerRuntime]:
        for backend in self.backends.values():
            yield from backend.servers.values()

    def backend_available(self, name: str) -> bool:
        """Whether backend `name` has a server that may take a connection now."""
        backend = self.backends.get(name)
        return backend is not None and bool(backend.candidates())

    def server(self, backend: str, server: str) -> ServerRuntime:
        """Raises KeyError naming what is unknown. Retired servers are found too."""
        owner = self.backends.get(backend)
        found = None if owner is None else owner.servers.get(server) or owner.retired.get(server)
        if found is None:
            raise KeyError(f"no server {backend}/{server}")
        return found

    def refuse_reload(self, config: Config) -> list[str]:
        """Why applying `config` now would strand live connections (empty: it may be applied).

        A backend with live connections must keep at least one of the servers
        it has now: a reload that removes the backend or every server of it
        (a half-written file, a wrong copy) would leave those clients on
        servers no longer configured. The safe ways are to keep a server, or
        to end those sessions first (`shutdown sessions server`).
        """
        problems = []
        kept = {b.name: {s.name for s in b.servers} for b in config.backends}
        for name, backend in self.backends.items():
            live = backend.connections
            if not live:
                continue
            names = kept.get(name)
            if names is None:
                problems.append(f"backend {name}: the new configuration removes it while {live} connection(s) "
                                "use it; shut its sessions down first (warren ctl shutdown sessions server ...)")
            elif not names & set(backend.servers):
                problems.append(f"backend {name}: the new configuration removes every one of its servers "
                                f"({', '.join(backend.servers)}) while {live} connection(s) use them; keep "
                                "one, or shut their sessions down first")
        return problems

    def apply(self, config: Config) -> dict[str, Any]:
        """Applies a reloaded config; health and admin state survive.

        Nothing live leaves the accounting: removed servers and frontends
        with connections stay retired until those end.
        """
        now = time.monotonic()
        changes: dict[str, Any] = {"servers_added": [], "servers_removed": []}
        backends = {}
        for backend_config in config.backends:
            backend = self.backends.get(backend_config.name)
            if backend is None:
                backend = BackendRuntime(backend_config, now)
                changes["servers_added"] += [f"{backend.name}/{n}" for n in backend.servers]
            else:
                added, removed = backend.reconfigure(backend_config, now)
                changes["servers_added"] += [f"{backend.name}/{n}" for n in added]
                changes["servers_removed"] += [f"{backend.name}/{n}" for n in removed]
            backends[backend_config.name] = backend
        frontends = {}
        for frontend_config in config.frontends:
            name = frontend_config.name
            frontend = self.frontends.get(name) or self.retired_frontends.pop(name, None)
            frontend = frontend or FrontendRuntime(frontend_config)
            frontend.reconfigure(frontend_config)
            frontends[name] = frontend
        for name, frontend in self.frontends.items():
            if name not in frontends and frontend.current:
                self.retired_frontends[name] = frontend
        self.retired_frontends = {n: f for n, f in self.retired_frontends.items() if f.current}
        self.backends, self.frontends, self.config = backends, frontends, config
        return changes

    def _frontends_with_retired(self) -> Iterator[FrontendRuntime]:
        yield from self.frontends.values()
        yield from (f for f in self.retired_frontends.values() if f.current)

    def connection_stats(self, backend: str | None = None, server: str | None = None,
                         frontend: str | None = None) -> list[ConnectionStats]:
        """Snapshots of the established connections, filtered. Idle times are
        observed (bytes unchanged since an earlier look: this one, or the stats
        sampler's :meth:`observe_activity`), so they are exact to that interval."""
        if len(self._activity) > 2 * sum(len(s.connections) for s in self._all_servers()) + 1024:
            self.observe_activity()  # nothing samples (no stats page): forget ended connections here
        now = time.monotonic()
        found = []
        for server_runtime in self._all_servers():
            if backend is not None and server_runtime.backend.name != backend:
                continue
            if server is not None and server_runtime.name != server:
                continue
            for conn in server_runtime.connections:
                if frontend is None or conn.frontend == frontend:
                    since = self._note_activity(conn, now, self._activity)
                    found.append(_connection_stats(conn, server_runtime.backend.name, server_runtime.name, now, since))
        return found

    def observe_activity(self) -> None:
        """Notes which connections moved bytes since the last look (the stats
        sampler calls this every few seconds); forgets the ones that ended."""
        now = time.monotonic()
        seen: dict[int, tuple[int, float]] = {}
        for server in self._all_servers():
            for conn in server.connections:
                last = self._activity.get(conn.id)
                if last is not None:
                    seen[conn.id] = last
                self._note_activity(conn, now, seen)
        self._activity = seen

    @staticmethod
    def _note_activity(conn: Connection, now: float, into: dict[int, tuple[int, float]]) -> float:
        """Since when `conn` has moved no byte, as far as the looks saw; recorded in `into`."""
        moved = conn.traffic.bytes_in + conn.traffic.bytes_out
        last = into.get(conn.id)
        since = last[1] if last is not None and last[0] == moved else now
        into[conn.id] = (moved, since)
        return since

    def _all_servers(self) -> Iterator[ServerRuntime]:
        for backend in self.backends.values():
            yield from backend.servers.values()
            yield from backend.retired.values()

    def statistics(self) -> Statistics:
        now = time.monotonic()
        return Statistics(
            version=__version__,
            pid=os.getpid(),
            uptime=now - self.started,
            frontends=tuple(_frontend_stats(f) for f in self._frontends_with_retired()),
            backends=tuple(_backend_stats(b, now) for b in self.backends.values()),
            extra={name: snap() for name, snap in self.extra_statistics.items()},
            services=self.supervisors.statistics(),
            relay=self.relay,
            certificates=_certificate_stats(self.tls),
        )


def _server_stats(server: ServerRuntime, now: float) -> ServerStats:
    bytes_in, bytes_out = server.bytes_totals()
    downtime = server.downtime + (0.0 if server.up else now - server.last_change)
    return ServerStats(
        backend=server.backend.name,
        name=server.name,
        address=server.addresses[0] if server.addresses else server.config.address,
        port=server.config.port,
        status=REMOVED if server.retired else server.status,
        up=server.up,
        admin=server.admin.value,
        weight=server.weight,
        admin_weight=server.admin_weight,
        backup=server.config.backup,
        checked=server.checked,
        last_check=server.last_check,
        last_change=now - server.last_change,
        downtime=downtime if server.checked else 0.0,
        check_failures=server.check_failures,
        down_transitions=server.down_transitions,
        current_sessions=server.current_sessions,
        max_sessions=server.max_sessions,
        limit=server.config.maxconn,
        total_sessions=server.total_sessions,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        connect_errors=server.connect_errors,
        retries=server.retries,
        redispatches=server.redispatches,
    )


def _backend_stats(backend: BackendRuntime, now: float) -> BackendStats:
    servers = tuple(_server_stats(s, now) for s in (*backend.servers.values(), *backend.retired.values()))
    return BackendStats(
        name=backend.name,
        balance=backend.config.balance.value,
        servers=servers,
        active_servers=sum(1 for s in backend.servers.values() if s.available and not s.config.backup),
        backup_servers=sum(1 for s in backend.servers.values() if s.available and s.config.backup),
        current_sessions=sum(s.current_sessions for s in servers),
        total_sessions=backend.total_sessions,
        queue_current=backend.queue.statistics().tasks_waiting,
        queue_max=backend.queue_max,
        no_server=backend.no_server,
        bytes_in=sum(s.bytes_in for s in servers),
        bytes_out=sum(s.bytes_out for s in servers),
        amqp=_amqp_count_stats(backend),
    )


def _frontend_stats(frontend: FrontendRuntime) -> FrontendStats:
    gate, config = frontend.gate, frontend.config
    admission = None
    if gate is not None:
        admission = AdmissionStats(
            rate=gate.accepted.rate(trio.current_time() if _in_trio() else 0.0),
            rate_limit=config.rate_limit.rate if config.rate_limit else None,
            source_rate_limit=config.source_rate_limit.rate if config.source_rate_limit else None,
            queued=gate.queued, rejected=gate.rejected, alarms=gate.alarms,
        )
    return FrontendStats(
        name=frontend.name,
        binds=tuple(str(b) for b in config.binds),
        backend=config.backend,
        current_sessions=frontend.current,
        max_sessions=frontend.max_sessions,
        limit=config.maxconn,
        total_sessions=frontend.total_sessions,
        mode=config.mode.value,
        admission=admission,
        tls=frontend.tls.statistics() if frontend.config.tls is not None else None,
    )


def _certificate_stats(material: Any) -> tuple[CertificateStats, ...]:
    if material is None:
        return ()
    return tuple(
        CertificateStats(use.where, use.info.path, use.info.subject, use.info.not_after.timestamp(),
                         use.info.seconds_left())
        for use in material.certificates
    )


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _amqp_count_stats(backend: BackendRuntime) -> AmqpCountStats:
    counts = backend.amqp_counts
    return AmqpCountStats(
        vhosts=tuple(sorted(counts.vhosts.items())),
        users=tuple(sorted(counts.users.items())),
        hits=tuple(sorted(counts.hits.items())),
    )


_NO_IDENTITY: Final = Identity()  # a connection on a TCP frontend: no AMQP fields


def _connection_stats(conn: Connection, backend: str, server: str, now: float, since: float) -> ConnectionStats:
    host, port = conn.client[0], conn.client[1]
    amqp = conn.amqp
    identity = _NO_IDENTITY if amqp is None else amqp.identity
    return ConnectionStats(
        id=conn.id, client=f"[{host}]:{port}" if ":" in host else f"{host}:{port}", frontend=conn.frontend,
        backend=backend, server=server, age=now - conn.started, idle=now - since,
        bytes_in=conn.traffic.bytes_in, bytes_out=conn.traffic.bytes_out,
        name=identity.name, product=identity.product, version=identity.version, user=identity.user,
        vhost=identity.vhost, heartbeat=identity.heartbeat,
        phase=None if amqp is None else amqp.inspector.phase.value,
    )


def _is_ip(address: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
