"""The validated configuration: frozen objects built once by :mod:`proxy.config.load`.

Nothing here parses or validates; every value is already checked and has its
final type. Durations are floats in seconds; ``None`` means "off".
Defaults live here and in ``docs/configuration.md``; keep both in step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Balance(enum.StrEnum):
    ROUNDROBIN = "roundrobin"
    LEASTCONN = "leastconn"
    FIRST = "first"
    SOURCE = "source"


class SendProxy(enum.StrEnum):
    NONE = "none"
    V1 = "v1"
    V2 = "v2"


class CheckKind(enum.StrEnum):
    TCP = "tcp"
    AMQP = "amqp"
    HTTP = "http"
    WATCH = "watch"


class InitState(enum.StrEnum):
    UP = "up"
    DOWN = "down"


class OnMarkedDown(enum.StrEnum):
    NONE = "none"
    SHUTDOWN_SESSIONS = "shutdown-sessions"


class OnMarkedUp(enum.StrEnum):
    NONE = "none"
    SHUTDOWN_BACKUP_SESSIONS = "shutdown-backup-sessions"


class OnError(enum.StrEnum):
    NONE = "none"
    FASTINTER = "fastinter"
    MARK_DOWN = "mark-down"


class FrontendMode(enum.StrEnum):
    AMQP = "amqp"  # AMQP 0-9-1 clients: handshakes are read (identity, heartbeat, limits)
    TCP = "tcp"  # any TCP protocol, relayed blind


class RateAction(enum.StrEnum):
    QUEUE = "queue"  # hold the client until its turn (at most timeout.queue)
    REJECT = "reject"  # close it at once
    ALARM = "alarm"  # only count and log


class LimitAction(enum.StrEnum):
    REFUSE = "refuse"  # AMQP Connection.Close 530 NOT_ALLOWED
    ALARM = "alarm"  # only count and log


HEARTBEAT = "heartbeat"  # timeout.client: idle limit from the negotiated AMQP heartbeat
AUTO = "auto"  # a default the frontend's mode settles (see build_frontend)
class TlsVerify(enum.StrEnum):
    NONE = "none"
    OPTIONAL = "optional"  # bind side only: a certificate is asked for, not required
    REQUIRED = "required"


TLS_VERSIONS = ("TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")  # HAProxy's ssl-min-ver names


@dataclass(frozen=True, slots=True)
class BindTls:
    """TLS on a listening side (a frontend, the stats page): HAProxy's `bind ... ssl`.

    ``crt`` entries are PEM files holding a certificate chain and its key, or
    directories of such files; the first certificate is the default, the
    others are chosen by SNI. ``ciphers``/``ciphersuites`` None: Warren's
    defaults (see proxy.tls.contexts).
    """

    crt: tuple[str, ...]
    key_password: str | None = field(default=None, repr=False)  # never in a log line
    ca_file: str | None = None  # client certificates are verified against it
    crl_file: str | None = None
    verify: TlsVerify = TlsVerify.NONE
    ssl_min_ver: str = "TLSv1.2"
    ssl_max_ver: str = "TLSv1.3"
    ciphers: str | None = None
    ciphersuites: str | None = None
    tickets: bool = True  # session resumption with tickets
    handshake_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class ServerTls:
    """TLS towards a broker: HAProxy's `server ... ssl verify required ca-file F sni N crt C`.

    ``ca_file`` None: the system's trust store. ``sni`` None: the server's
    address when it is a host name (IP addresses are checked against the
    certificate's IP SANs and sent without SNI).
    """

    verify: TlsVerify = TlsVerify.REQUIRED  # "none" is explicit and logged as a warning
    ca_file: str | None = None
    crl_file: str | None = None
    sni: str | None = None
    crt: str | None = None  # client certificate (chain + key) for brokers that require one
    key_password: str | None = field(default=None, repr=False)
    ssl_min_ver: str = "TLSv1.2"
    ssl_max_ver: str = "TLSv1.3"
    ciphers: str | None = None
    ciphersuites: str | None = None


class LogFormat(enum.StrEnum):
    CONSOLE = "console"
    JSON = "json"


class RelayPath(enum.StrEnum):
    """How relayed bytes move: in the kernel (a BPF socket map), spliced
    through pipes, or copied; ``auto`` takes the kernel where its start-up
    self-test passes, else splice."""

    AUTO = "auto"
    KERNEL = "kernel"
    SPLICE = "splice"
    COPY = "copy"


@dataclass(frozen=True, slots=True)
class BindAddress:
    host: str  # literal IPv4/IPv6 address, "0.0.0.0" / "::" for any
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class FrontendTimeouts:
    # Idle client side once established: seconds, None (off) or HEARTBEAT
    # (AMQP frontends' default: twice the negotiated heartbeat, see proxy.amqp.heartbeat).
    client: float | str | None = AUTO
    client_fin: float | None = None  # half-closed client side
    client_fallback: float | None = None  # HEARTBEAT, but no heartbeat negotiated (or not AMQP)
    handshake: float | None | str = AUTO  # AMQP: the client's protocol header within this (cR)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket of new connections: `rate` a second, `burst` saved up."""

    rate: float
    burst: float | None = None  # None: one second's worth (rate, at least 1)
    action: RateAction = RateAction.QUEUE

    @property
    def bucket_size(self) -> float:
        return self.burst if self.burst is not None else max(1.0, self.rate)


@dataclass(frozen=True, slots=True)
class Frontend:
    name: str
    binds: tuple[BindAddress, ...]
    backend: str
    # A configuration file's frontends are AMQP unless they say otherwise
    # (build_frontend); built in code, a frontend is plain TCP unless told.
    mode: FrontendMode = FrontendMode.TCP
    maxconn: int = 2000
    backlog: int = 1024
    timeout: FrontendTimeouts = FrontendTimeouts(client=None, handshake=None)
    # Bulk streams: relayed with splice even where the kernel path is in
    # use (the kernel path moves small messages for less, bulk more slowly).
    bulk: bool = False
    rate_limit: RateLimit | None = None  # new connections on this frontend
    source_rate_limit: RateLimit | None = None  # new connections per client address
    tls: BindTls | None = None  # None: plaintext


@dataclass(frozen=True, slots=True)
class AmqpCheck:
    user: str = "guest"
    password: str = "guest"
    vhost: str = "/"
    heartbeat: float = 5.0  # watch connections: heartbeat interval


@dataclass(frozen=True, slots=True)
class HttpCheck:
    port: int = 15672
    path: str = "/api/health/checks/alarms"
    user: str = "guest"
    password: str = "guest"
    expect: tuple[int, ...] = (200,)
    tls: bool | None = None  # HTTPS; None: when the server is reached over TLS


@dataclass(frozen=True, slots=True)
class Health:
    """A backend's health-check settings (HAProxy's `check inter rise fall ...`)."""

    kinds: tuple[CheckKind, ...] = ()  # empty: no checks, servers count as UP
    inter: float = 2.0
    fastinter: float | None = None  # None: same as inter
    downinter: float | None = None  # None: same as inter
    rise: int = 2
    fall: int = 3
    timeout: float = 2.0
    spread: float = 0.0  # 0..0.5: random +/- fraction of each interval
    init_state: InitState = InitState.DOWN
    on_marked_down: OnMarkedDown = OnMarkedDown.NONE
    on_marked_up: OnMarkedUp = OnMarkedUp.NONE
    slowstart: float | None = None
    error_limit: int = 10
    on_error: OnError = OnError.FASTINTER
    amqp: AmqpCheck = AmqpCheck()
    http: HttpCheck = HttpCheck()


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    address: str  # literal IP or DNS name
    port: int
    weight: int = 1
    maxconn: int = 0  # 0: no limit
    backup: bool = False
    send_proxy: SendProxy = SendProxy.NONE
    check: bool = True  # False: never checked, always counts as UP
    check_port: int | None = None  # None: the server's port (amqp/tcp/watch)
    http_port: int | None = None  # None: the backend's health.http.port
    tls: ServerTls | None = None  # None: plaintext (the backend's [tls] merged with the server's)


@dataclass(frozen=True, slots=True)
class BackendTimeouts:
    connect: float = 5.0
    queue: float = 5.0
    server: float | None = None  # idle server side once established
    tunnel: float | None = None  # idle in both directions; overrides client/server
    server_fin: float | None = None  # half-closed server side


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Live AMQP connections per vhost and per user, checked at Connection.Open."""

    per_vhost: int | None = None  # every vhost (None: no default limit)
    per_user: int | None = None
    vhosts: tuple[tuple[str, int], ...] = ()  # overrides by name
    users: tuple[tuple[str, int], ...] = ()
    action: LimitAction = LimitAction.REFUSE

    @property
    def enabled(self) -> bool:
        return bool(self.per_vhost or self.per_user or self.vhosts or self.users)

    def for_vhost(self, vhost: str) -> int | None:
        return dict(self.vhosts).get(vhost, self.per_vhost)

    def for_user(self, user: str) -> int | None:
        return dict(self.users).get(user, self.per_user)


@dataclass(frozen=True, slots=True)
class Rebalance:
    """Closing connections of over-loaded servers so a returned broker gets its share."""

    tolerance: float = 0.1  # fraction of a server's share it may exceed
    rate: float = 5.0  # closes per second, at most
    min_age: float = 60.0  # never a connection younger than this
    interval: float = 1.0  # how often the spread is looked at


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    servers: tuple[Server, ...]
    balance: Balance = Balance.ROUNDROBIN
    retries: int = 3
    redispatch: bool = True
    timeout: BackendTimeouts = BackendTimeouts()
    health: Health = Health()
    limits: ConnectionLimits = ConnectionLimits()
    rebalance: Rebalance | None = None  # None: never rebalanced automatically

    def server(self, name: str) -> Server:
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class Resolvers:
    nameservers: tuple[BindAddress, ...] = ()  # empty: the system's resolv.conf
    interval: float = 30.0  # re-resolve DNS server addresses this often
    timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class Stats:
    """The HTTP stats page (`[stats]`); absent from the file means no page."""

    binds: tuple[BindAddress, ...]
    users: tuple[tuple[str, str], ...]  # (user, password or "scrypt$..." hash)
    uri: str = "/"
    realm: str = "Warren statistics"
    refresh: float | None = 10.0  # None: no auto-refresh
    admin: bool = False  # admin actions on the page at all (true by default when `admins` is set)
    admins: tuple[str, ...] | None = None  # who may act; None: every user (when admin); others read only
    hide_version: bool = False
    metrics_auth: bool = True  # False: /metrics without credentials
    label_limit: int = 20  # vhosts / users named in /metrics; the rest are "other"
    tls: BindTls | None = None  # HTTPS


@dataclass(frozen=True, slots=True)
class VipGarp:
    """When a new master announces its addresses (gratuitous ARP / unsolicited NA).

    A round sends ``burst`` frames per address ``burst_delay`` apart: one round
    at once, one more ``repeat_after`` later (None: no repeat), then one of
    ``refresh_burst`` frames every ``refresh`` while master (None: no refresh).
    """

    burst: int = 5
    burst_delay: float = 0.01
    repeat_after: float | None = 5.0
    refresh: float | None = None
    refresh_burst: int = 1


@dataclass(frozen=True, slots=True)
class VipNotify:
    """Commands run on a state change, as argv prefixes (instance, state, priority are appended)."""

    master: tuple[str, ...] | None = None
    backup: tuple[str, ...] | None = None
    fault: tuple[str, ...] | None = None
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class VipAuth:
    """HMAC-SHA256 authentication of adverts (Warren-only; see docs/vip.md)."""

    secret: str = field(repr=False)  # never in a log line or traceback
    max_age: float | None = None  # None: replayed adverts are refused by sequence only


@dataclass(frozen=True, slots=True)
class VipPeerLink:
    """The TCP link a backup keeps to its Warren master, whose end (FIN/RST) means the
    master's process is gone: takeover after the skew instead of 3 advert intervals."""

    enabled: bool = True
    port: int = 5798


@dataclass(frozen=True, slots=True)
class Vip:
    """One VRRPv3 instance (`[vip.<name>]`): a floating address shared with peers.

    ``addresses`` are ``"ip/prefix"`` texts of one IP family. ``lease`` is the
    final valid lifetime in seconds of the configured addresses (None: they are
    permanent); the loader derives it from the interval and priority when the
    file does not set it.
    """

    name: str
    interface: str
    vrid: int
    addresses: tuple[str, ...]
    priority: int = 100
    advert_interval: float = 1.0
    peers: tuple[str, ...] = ()  # empty: multicast
    source: str | None = None  # None: the interface's own address
    preempt: bool = True
    preempt_delay: float | None = None
    track: str | None = None  # a backend name
    weight: int = 50
    resign_on_track_failure: bool = True
    lease: float | None = 4.0
    garp: VipGarp = VipGarp()
    notify: VipNotify = VipNotify()
    auth: VipAuth | None = None
    peer_link: VipPeerLink = VipPeerLink()


@dataclass(frozen=True, slots=True)
class Global:
    log_format: LogFormat = LogFormat.CONSOLE
    log_level: str = "info"
    grace: float = 30.0  # SIGTERM: how long live connections may finish
    control_socket: str | None = None  # `warren ctl` UNIX socket path
    relay: RelayPath = RelayPath.AUTO
    # On the kernel path, a TCP connection is relayed by splice/copy for this
    # many quiet rounds (about two per request and response) before it enters
    # the socket map; 0: at once.
    kernel_after: int = 8


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    global_: Global = Global()
    resolvers: Resolvers = Resolvers()
    frontends: tuple[Frontend, ...] = ()
    backends: tuple[Backend, ...] = field(default=())
    stats: Stats | None = None
    vip: tuple[Vip, ...] = ()
    # Valid but worth saying at start-up and in `warren check` (a clear-text password...):
    # "<file>:<line>: warning: <key>: <message>" lines.
    warnings: tuple[str, ...] = ()

    def backend(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)
