"""Warren's configuration file, section by section: the declarative schema.

Each top-level section is one entry of :data:`DOCUMENT`: a field whose kind
reads the section and builds its model object. Adding a section (the coming
``[vip]``) is adding its field table, a builder (often the model dataclass
itself), one ``DOCUMENT`` entry and the matching ``Config`` attribute; nothing
else changes. Checks that look across sections (a frontend naming a backend,
two listeners on one port) are functions in :data:`CROSS_CHECKS`; they read the
parsed TOML, not the built objects, so they still run when a section has other
problems and every problem is reported in one go.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import shlex
from collections.abc import Callable, Iterator
from typing import Any

from ..passwords import is_hashed, parse_hash
from .addresses import check_server_address, parse_bind, parse_nameserver
from .durations import format_duration, parse_duration
from .model import (
    AUTO,
    HEARTBEAT,
    AmqpCheck,
    Backend,
    BackendTimeouts,
    Balance,
    TLS_VERSIONS,
    BindAddress,
    BindTls,
    CheckKind,
    Config,
    ConnectionLimits,
    Frontend,
    FrontendMode,
    FrontendTimeouts,
    Global,
    Health,
    HttpCheck,
    InitState,
    LimitAction,
    LogFormat,
    OnError,
    OnMarkedDown,
    OnMarkedUp,
    RateAction,
    RateLimit,
    Rebalance,
    RelayPath,
    Resolvers,
    SendProxy,
    Server,
    ServerTls,
    Stats,
    TlsVerify,
    Vip,
    VipAuth,
    VipGarp,
    VipNotify,
    VipPeerLink,
)
from .schema import (
    INVALID,
    Field,
    Invalid,
    Kind,
    Path,
    Report,
    array,
    array_of_tables,
    boolean,
    choice,
    describe,
    format_path,
    integer,
    leaf,
    mapping,
    named_tables,
    number,
    one_or_many,
    read_table,
    string,
    suggestion,
    table,
)

LOG_LEVELS = ("debug", "info", "warning", "error")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


# --- Warren's own kinds -------------------------------------------------------------


def check_name(name: str) -> str:
    """Frontend, backend and server names: they appear in logs, stats and `warren ctl backend/server`."""
    if not _NAME.fullmatch(name):
        raise Invalid(f'invalid name "{name}": expected 1-64 characters from A-Z a-z 0-9 _ . -')
    return name


def to_seconds(value: Any, *, optional: bool = False, positive: bool = True) -> float | None:
    """A duration in seconds; ``optional``: 0 means off (None); ``positive``: 0 is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Invalid(f'expected duration (a string such as "2s" or integer milliseconds), got {describe(value)}')
    try:
        seconds = parse_duration(value)
    except ValueError as error:
        raise Invalid(str(error)) from None
    if optional:
        return seconds or None
    if positive and seconds == 0:
        raise Invalid("expected a duration above 0")
    return seconds


def duration(*, optional: bool = False, positive: bool = True) -> Kind:
    return leaf(lambda value: to_seconds(value, optional=optional, positive=positive))


def amqp_heartbeat(value: Any) -> float:
    """AMQP negotiates the heartbeat in whole seconds (Connection.Tune carries a short)."""
    seconds = to_seconds(value) or 0.0  # never None: not optional
    if seconds != int(seconds) or seconds > 65535:
        raise Invalid(f"expected whole seconds from 1s to 65535s, got {format_duration(seconds)}")
    return seconds


def port() -> Kind:
    return integer(1, 65535)


def uri_path(text: str) -> str:
    if not text.startswith("/") or any(ch.isspace() or ch in "?#" for ch in text):
        raise Invalid(f'expected a path starting with "/" without spaces, "?" or "#", got "{text}"')
    return text


def basic_auth_user(user: str) -> None:
    # RFC 7617 section 2: the user-id cannot contain a colon.
    if not user or ":" in user or not user.isprintable():
        raise Invalid(f'invalid user name "{user}": expected printable characters without ":"')


def stats_password(text: str) -> str:
    """Clear text, or a ``scrypt$...`` hash that must parse (a malformed one would never match)."""
    if is_hashed(text):
        try:
            parse_hash(text)
        except ValueError as error:
            raise Invalid(f"malformed password hash: {error} (make one with `warren hash-password`)") from None
    return text


def build_stats(**values: Any) -> Stats:
    """`admins` listed without `admin`: admin actions are on (for those users)."""
    values.setdefault("admin", "admins" in values)
    return Stats(**values)


def realm(text: str) -> str:
    # Sent as a quoted-string in WWW-Authenticate (RFC 7235 section 2.2): keep it plain ASCII.
    if not text.isascii() or not text.isprintable() or '"' in text or "\\" in text:
        raise Invalid(f"expected printable ASCII without quotes or backslashes, got {describe(text)}")
    return text


# --- the floating IP: [vip.<name>] -----------------------------------------------------

MIN_LEASE = 2.0  # the kernel counts address lifetimes in whole seconds
MIN_AUTH_SECRET = 16  # bytes, as proxy.vip.auth requires


def interface_name(text: str) -> str:
    # The kernel's dev_valid_name(): at most IFNAMSIZ - 1 = 15 bytes, no "/", ":" or spaces.
    if len(text.encode()) > 15 or text in (".", "..") or any(ch.isspace() or ch in "/:" for ch in text):
        raise Invalid(f'invalid interface name "{text}": expected at most 15 characters without spaces, "/" or ":"')
    return text


def vip_address(text: str) -> str:
    """``"10.0.0.100/24"`` (a bare address means /32 or /128), normalised."""
    try:
        interface = ipaddress.ip_interface(text)
    except ValueError:
        raise Invalid(f'"{text}" is not an IP address with an optional prefix length, e.g. "10.0.0.100/24"') from None
    ip = interface.ip
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback:
        raise Invalid(f'"{text}" cannot be a floating address (multicast, unspecified or loopback)')
    return str(interface)


def ip_literal(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise Invalid(f'"{text}" is not an IP address') from None


def advert_interval(value: Any) -> float:
    """RFC 5798 5.2.7: the interval travels as 12 bits of centiseconds (10ms to 40.95s)."""
    seconds = to_seconds(value) or 0.0
    centiseconds = seconds * 100
    if not 1 <= round(centiseconds, 6) <= 4095:
        raise Invalid(f"expected 10ms-40.95s, got {format_duration(seconds)}")
    if abs(centiseconds - round(centiseconds)) > 1e-6:
        raise Invalid(f"expected whole centiseconds (VRRP counts in 10ms steps), got {format_duration(seconds)}")
    return round(centiseconds) / 100


def lease_lifetime(value: Any) -> float | None:
    """``0``: permanent addresses; otherwise at least 2s, rounded up to whole seconds."""
    seconds = to_seconds(value, optional=True)
    if seconds is None:
        return None
    if seconds < MIN_LEASE:
        raise Invalid(f"expected 0 (off) or at least 2s (lifetimes are whole seconds), got {format_duration(seconds)}")
    return float(math.ceil(seconds))


def derived_lease(interval: float, priority: int) -> float:
    """The default lease: RFC 5798 Master_Down_Interval rounded up to whole seconds, at least 2s.

    A killed master's address then expires about when a backup takes over.
    """
    master_down = 3 * interval + (256 - priority) * interval / 256
    return max(MIN_LEASE, float(math.ceil(master_down - 1e-9)))


def command_line(text: str) -> tuple[str, ...]:
    """A notify command, split like a shell would (but never run through one)."""
    try:
        argv = shlex.split(text)
    except ValueError as error:
        raise Invalid(f"cannot split the command line: {error}") from None
    if not argv:
        raise Invalid("expected a command")
    return tuple(argv)


def auth_secret(text: str) -> str:
    length = len(text.encode())
    if length < MIN_AUTH_SECRET:
        # Never echo the secret itself.
        raise Invalid(f"expected a secret of at least {MIN_AUTH_SECRET} bytes, got {length}")
    return text


def build_garp(**values: Any) -> VipGarp:
    garp = VipGarp(**values)
    first_round = (garp.burst - 1) * garp.burst_delay
    if garp.repeat_after is not None and garp.repeat_after <= first_round:
        raise Invalid(
            f"repeat_after ({format_duration(garp.repeat_after)}) must be longer than the first burst "
            f"({garp.burst} x {format_duration(garp.burst_delay)})"
        )
    return garp


_DERIVED: Any = object()


def build_vip(*, lease: float | None = _DERIVED, **values: Any) -> Vip:
    vip = Vip(**values)
    if lease is _DERIVED:
        lease = derived_lease(vip.advert_interval, vip.priority)
    return dataclasses.replace(vip, lease=lease)


BINDS = one_or_many(string(parse_bind))


# --- AMQP awareness: modes, heartbeat timeouts, admission, rebalancing ---------------

DEFAULT_HANDSHAKE = 5.0  # AMQP frontends: seconds for the client's protocol header


def client_timeout(value: Any) -> float | str | None:
    """``"heartbeat"`` (from the negotiated AMQP heartbeat) or a duration (0: off)."""
    if value == HEARTBEAT:
        return HEARTBEAT
    try:
        return to_seconds(value, optional=True)
    except Invalid as error:
        raise Invalid(f'expected "heartbeat" or a duration: {error}') from None


def build_frontend(*, timeout: FrontendTimeouts | None = None, mode: FrontendMode = FrontendMode.AMQP,
                   **values: Any) -> Frontend:
    """A frontend of the file: ``mode = "amqp"`` unless it says otherwise, with
    timeout defaults settled by its mode (AMQP frontends get ``client =
    "heartbeat"`` and a 5 s handshake timeout, TCP ones neither)."""
    frontend = Frontend(mode=mode, **values)
    timeout = timeout or FrontendTimeouts()
    if frontend.mode is FrontendMode.AMQP:
        client = HEARTBEAT if timeout.client == AUTO else timeout.client
        handshake = DEFAULT_HANDSHAKE if timeout.handshake == AUTO else timeout.handshake
    else:
        if timeout.client == HEARTBEAT:
            raise Invalid('timeout.client = "heartbeat" needs mode = "amqp" (a TCP frontend sees no heartbeat)')
        if timeout.handshake not in (AUTO, None):
            raise Invalid('timeout.handshake needs mode = "amqp"')
        client = None if timeout.client == AUTO else timeout.client
        handshake = None
    if timeout.client_fallback is not None and client != HEARTBEAT:
        raise Invalid('timeout.client_fallback applies only with timeout.client = "heartbeat"')
    return dataclasses.replace(frontend, timeout=dataclasses.replace(timeout, client=client, handshake=handshake))


# --- TLS: HAProxy's bind/server ssl options ----------------------------------------------

# TLS 1.3 suites OpenSSL knows (RFC 8446 appendix B.4); `ciphersuites` picks among them.
TLS13_SUITES = (
    "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256",
)


def cipher_list(text: str) -> str:
    """An OpenSSL cipher string for TLS 1.2 and below (``ciphers``), checked by OpenSSL itself."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(text)
    except ssl.SSLError:
        raise Invalid(f'no cipher can be selected with "{text}"') from None
    return text


def tls13_suites(text: str) -> str:
    """A colon-separated list of TLS 1.3 suite names (``ciphersuites``)."""
    for name in text.split(":"):
        if name not in TLS13_SUITES:
            raise Invalid(f'unknown TLS 1.3 suite "{name}"; expected names among {", ".join(TLS13_SUITES)}'
                          + suggestion(name, TLS13_SUITES))
    return text


def build_bind_tls(**values: Any) -> BindTls:
    tls = BindTls(**values)
    _check_versions(tls.ssl_min_ver, tls.ssl_max_ver)
    if tls.verify is not TlsVerify.NONE and tls.ca_file is None:
        raise Invalid(f'verify = "{tls.verify}" needs ca_file (the CAs client certificates are checked against)')
    if tls.crl_file is not None and tls.ca_file is None:
        raise Invalid("crl_file needs ca_file (a CRL only matters when client certificates are verified)")
    return tls


def _check_versions(low: str, high: str) -> None:
    if TLS_VERSIONS.index(low) > TLS_VERSIONS.index(high):
        raise Invalid(f'ssl_min_ver "{low}" is above ssl_max_ver "{high}"')


def merged_server_tls(backend_part: dict[str, Any] | None, server_part: Any) -> ServerTls | None:
    """The TLS a server is reached with: the backend's ``[tls]`` with the server's keys over it.

    A server's ``tls = false`` turns TLS off for it; ``enabled = false`` does the same in a table.
    """
    if server_part is False:
        return None
    parts = {**(backend_part or {}), **(server_part if isinstance(server_part, dict) else {})}
    if backend_part is None and not isinstance(server_part, dict):
        return None
    if not parts.pop("enabled", True):
        return None
    tls = ServerTls(**parts)
    _check_versions(tls.ssl_min_ver, tls.ssl_max_ver)
    if tls.crl_file is not None and tls.verify is TlsVerify.NONE:
        raise Invalid('crl_file is useless with verify = "none"')
    return tls


def build_backend(*, name: str, servers: tuple[Server, ...], tls: dict[str, Any] | None = None, **values: Any) -> Backend:
    """The backend with each server's TLS settled (its own ``tls`` over the backend's)."""
    built = []
    for index, server in enumerate(servers):
        try:
            built.append(dataclasses.replace(server, tls=merged_server_tls(tls, server.tls)))
        except Invalid as error:
            where = ("servers", index, "tls") if isinstance(server.tls, dict) else ("tls",)
            raise Invalid(f"{error} (server {server.name})", where) from None
    return Backend(name=name, servers=tuple(built), **values)


# --- the sections ---------------------------------------------------------------------

GLOBAL = {
    "log_format": Field(choice(LogFormat)),
    "log_level": Field(choice(LOG_LEVELS)),
    "grace": Field(duration(positive=False)),
    "control_socket": Field(string()),
    "relay": Field(choice(RelayPath)),
    "kernel_after": Field(integer(0, 1_000_000)),
}

RESOLVERS = {
    "nameservers": Field(array(string(parse_nameserver), unique=True)),
    "interval": Field(duration()),
    "timeout": Field(duration()),
}

FRONTEND_TIMEOUTS = {
    "client": Field(leaf(client_timeout)),
    "client_fin": Field(duration(optional=True)),
    "client_fallback": Field(duration(optional=True)),
    "handshake": Field(duration(optional=True)),
}

RATE_LIMIT = {
    "rate": Field(number(0.001, 1e6), required=True),
    "burst": Field(number(1, 1e7)),
    "action": Field(choice(RateAction)),
}

TLS_VERSION = choice(TLS_VERSIONS)

BIND_TLS = {
    "crt": Field(one_or_many(string()), required=True),
    "key_password": Field(string(empty=True)),
    "ca_file": Field(string()),
    "crl_file": Field(string()),
    "verify": Field(choice(TlsVerify)),
    "ssl_min_ver": Field(TLS_VERSION),
    "ssl_max_ver": Field(TLS_VERSION),
    "ciphers": Field(string(cipher_list)),
    "ciphersuites": Field(string(tls13_suites)),
    "tickets": Field(boolean()),
    "handshake_timeout": Field(duration()),
}

SERVER_TLS = {
    "enabled": Field(boolean()),
    "verify": Field(choice((TlsVerify.NONE.value, TlsVerify.REQUIRED.value))),
    "ca_file": Field(string()),
    "crl_file": Field(string()),
    "sni": Field(string(check_server_address)),
    "crt": Field(string()),
    "key_password": Field(string(empty=True)),
    "ssl_min_ver": Field(TLS_VERSION),
    "ssl_max_ver": Field(TLS_VERSION),
    "ciphers": Field(string(cipher_list)),
    "ciphersuites": Field(string(tls13_suites)),
}


def server_tls_field(value: Any, at: Path, report: Report) -> Any:
    """A server's ``tls``: ``false`` (plaintext for this one) or a table over the backend's."""
    if value is False:
        return False
    if isinstance(value, bool):
        report.add(at, "expected false or a table (true is the default where the backend has [tls])")
        return INVALID
    values = read_table(value, SERVER_TLS, at, report)
    return INVALID if values is INVALID else _verify_enum(values)


def backend_tls_field(value: Any, at: Path, report: Report) -> Any:
    values = read_table(value, SERVER_TLS, at, report)
    return INVALID if values is INVALID else _verify_enum(values)


def _verify_enum(values: dict[str, Any]) -> dict[str, Any]:
    if "verify" in values:
        values["verify"] = TlsVerify(values["verify"])
    return values


FRONTEND = {
    "bind": Field(BINDS, required=True, attr="binds"),
    "backend": Field(string(), required=True),
    "mode": Field(choice(FrontendMode)),
    "maxconn": Field(integer(1)),
    "backlog": Field(integer(1, 65535)),
    "timeout": Field(table(FRONTEND_TIMEOUTS, FrontendTimeouts)),
    "bulk": Field(boolean()),
    "rate_limit": Field(table(RATE_LIMIT, RateLimit)),
    "source_rate_limit": Field(table(RATE_LIMIT, RateLimit)),
    "tls": Field(table(BIND_TLS, build_bind_tls)),
}

SERVER = {
    "name": Field(string(check_name), required=True),
    "address": Field(string(check_server_address), required=True),
    "port": Field(port(), required=True),
    "weight": Field(integer(0, 256)),
    "maxconn": Field(integer(0)),
    "backup": Field(boolean()),
    "send_proxy": Field(choice(SendProxy)),
    "check": Field(boolean()),
    "check_port": Field(port()),
    "http_port": Field(port()),
    "tls": Field(server_tls_field),
}

AMQP_CHECK = {
    "user": Field(string()),
    "password": Field(string(empty=True)),
    "vhost": Field(string()),
    "heartbeat": Field(leaf(amqp_heartbeat)),
}

HTTP_CHECK = {
    "port": Field(port()),
    "path": Field(string(uri_path)),
    "user": Field(string()),
    "password": Field(string(empty=True)),
    "expect": Field(array(integer(100, 599), unique=True, nonempty=True)),
    "tls": Field(boolean()),
}

HEALTH = {
    "kinds": Field(array(choice(CheckKind), unique=True)),
    "inter": Field(duration()),
    "fastinter": Field(duration(optional=True)),
    "downinter": Field(duration(optional=True)),
    "rise": Field(integer(1)),
    "fall": Field(integer(1)),
    "timeout": Field(duration()),
    "spread": Field(number(0, 0.5)),
    "init_state": Field(choice(InitState)),
    "on_marked_down": Field(choice(OnMarkedDown)),
    "on_marked_up": Field(choice(OnMarkedUp)),
    "slowstart": Field(duration(optional=True)),
    "error_limit": Field(integer(1)),
    "on_error": Field(choice(OnError)),
    "amqp": Field(table(AMQP_CHECK, AmqpCheck)),
    "http": Field(table(HTTP_CHECK, HttpCheck)),
}

BACKEND_TIMEOUTS = {
    "connect": Field(duration()),
    "queue": Field(duration()),
    "server": Field(duration(optional=True)),
    "tunnel": Field(duration(optional=True)),
    "server_fin": Field(duration(optional=True)),
}

LIMITS = {
    "per_vhost": Field(integer(1)),
    "per_user": Field(integer(1)),
    "vhosts": Field(mapping(integer(1))),
    "users": Field(mapping(integer(1))),
    "action": Field(choice(LimitAction)),
}

REBALANCE = {
    "tolerance": Field(number(0, 10)),
    "rate": Field(number(0.01, 1000)),
    "min_age": Field(duration(positive=False)),
    "interval": Field(duration()),
}

BACKEND = {
    "servers": Field(array_of_tables(SERVER, Server, unique="name", what="server"), required=True),
    "limits": Field(table(LIMITS, ConnectionLimits)),
    "rebalance": Field(table(REBALANCE, Rebalance)),

    "balance": Field(choice(Balance)),
    "retries": Field(integer(0, 100)),
    "redispatch": Field(boolean()),
    "timeout": Field(table(BACKEND_TIMEOUTS, BackendTimeouts)),
    "health": Field(table(HEALTH, Health)),
    "tls": Field(backend_tls_field),
}

STATS = {
    "bind": Field(BINDS, required=True, attr="binds"),
    "users": Field(mapping(string(stats_password), check_key=basic_auth_user), required=True),
    "uri": Field(string(uri_path)),
    "realm": Field(string(realm)),
    "refresh": Field(duration(optional=True)),
    "admin": Field(boolean()),
    "admins": Field(array(string(), unique=True)),
    "hide_version": Field(boolean()),
    "metrics_auth": Field(boolean()),
    "label_limit": Field(integer(1, 1000)),
    "tls": Field(table(BIND_TLS, build_bind_tls)),
}

VIP_GARP = {
    "burst": Field(integer(1, 100)),
    "burst_delay": Field(duration(positive=False)),
    "repeat_after": Field(duration(optional=True)),
    "refresh": Field(duration(optional=True)),
    "refresh_burst": Field(integer(1, 100)),
}

VIP_NOTIFY = {
    "master": Field(string(command_line)),
    "backup": Field(string(command_line)),
    "fault": Field(string(command_line)),
    "timeout": Field(duration()),
}

VIP_AUTH = {
    "secret": Field(string(auth_secret), required=True),
    "max_age": Field(duration(optional=True)),
}

VIP_PEER_LINK = {
    "enabled": Field(boolean()),
    "port": Field(integer(1, 65535)),
}

VIP = {
    "interface": Field(string(interface_name), required=True),
    "vrid": Field(integer(1, 255), required=True),
    "addresses": Field(array(string(vip_address), unique=True, nonempty=True), required=True),
    "priority": Field(integer(1, 255)),
    "advert_interval": Field(leaf(advert_interval)),
    "peers": Field(array(string(ip_literal), unique=True)),
    "source": Field(string(ip_literal)),
    "preempt": Field(boolean()),
    "preempt_delay": Field(duration(optional=True)),
    "track": Field(string()),
    "weight": Field(integer(1, 254)),
    "resign_on_track_failure": Field(boolean()),
    "lease": Field(leaf(lease_lifetime)),
    "garp": Field(table(VIP_GARP, build_garp)),
    "notify": Field(table(VIP_NOTIFY, VipNotify)),
    "auth": Field(table(VIP_AUTH, VipAuth)),
    "peer_link": Field(table(VIP_PEER_LINK, VipPeerLink)),
}

DOCUMENT = {
    "global": Field(table(GLOBAL, Global), attr="global_"),
    "resolvers": Field(table(RESOLVERS, Resolvers)),
    "frontends": Field(named_tables(FRONTEND, build_frontend, check_name=check_name)),
    "backends": Field(named_tables(BACKEND, build_backend, check_name=check_name)),
    "stats": Field(table(STATS, build_stats)),
    "vip": Field(named_tables(VIP, build_vip, check_name=check_name)),
}


# --- checks across sections -----------------------------------------------------------


def check_backend_references(document: dict[str, Any], report: Report) -> None:
    """Every frontend's ``backend`` names a backend defined in the file."""
    frontends, backends = document.get("frontends"), document.get("backends")
    if not isinstance(frontends, dict):
        return
    names = list(backends) if isinstance(backends, dict) else []
    for name, frontend in frontends.items():
        target = frontend.get("backend") if isinstance(frontend, dict) else None
        if isinstance(target, str) and target not in names:
            message = f'dangling backend reference: no backend named "{target}"' + suggestion(target, names)
            report.add(("frontends", name, "backend"), message)


def check_bind_conflicts(document: dict[str, Any], report: Report) -> None:
    """No two listeners (frontends, stats page) on overlapping addresses.

    Overlapping includes a wildcard and a specific address of the same family
    on one port: Linux refuses the second listen() with EADDRINUSE even with
    SO_REUSEADDR. IPv4 vs IPv6 wildcards are left alone (IPV6_V6ONLY decides).
    """
    seen: list[tuple[BindAddress, Path]] = []
    for at, text in _raw_binds(document):
        try:
            address = parse_bind(text)
        except Invalid:
            continue  # reported by the section itself
        if address.port == 0:
            continue  # a fresh ephemeral port each time: never a conflict
        for other, other_at in seen:
            if _overlap(address, other):
                same = "is already bound" if address == other else f"overlaps {other} bound"
                report.add(at, f"duplicate bind: {address} {same} by {format_path(other_at)}")
                break
        seen.append((address, at))


def _raw_binds(document: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    owners: list[tuple[Path, Any]] = []
    frontends = document.get("frontends")
    if isinstance(frontends, dict):
        owners += [(("frontends", name), body) for name, body in frontends.items()]
    owners.append((("stats",), document.get("stats")))
    for at, body in owners:
        bind = body.get("bind") if isinstance(body, dict) else None
        if isinstance(bind, str):
            yield at + ("bind",), bind
        elif isinstance(bind, list):
            yield from ((at + ("bind", i), item) for i, item in enumerate(bind) if isinstance(item, str))


_WILDCARDS = ("0.0.0.0", "::")


def _overlap(a: BindAddress, b: BindAddress) -> bool:
    if a.port != b.port:
        return False
    if a.host == b.host:
        return True
    same_family = (":" in a.host) == (":" in b.host)
    return same_family and (a.host in _WILDCARDS or b.host in _WILDCARDS)


def check_vip_sections(document: dict[str, Any], report: Report) -> None:
    """Across ``[vip.*]``: tracked backends exist, one IP family per instance,
    no VRID used twice on an interface, no address managed twice."""
    vips = document.get("vip")
    if not isinstance(vips, dict):
        return
    backends = document.get("backends")
    backend_names = list(backends) if isinstance(backends, dict) else []
    routers: dict[tuple[str, int, int], str] = {}
    managed: dict[Any, str] = {}
    for name, body in vips.items():
        if not isinstance(body, dict):
            continue
        at = ("vip", name)
        _check_vip_track(body, at, backend_names, report)
        family = _check_vip_families(body, at, report)
        _check_vip_router_unique(body, at, family, routers, report)
        _check_vip_addresses_unique(body, at, managed, report)


def _check_vip_track(body: dict[str, Any], at: Path, backends: list[str], report: Report) -> None:
    target = body.get("track")
    if isinstance(target, str) and target and target not in backends:
        message = f'dangling backend reference: no backend named "{target}"' + suggestion(target, backends)
        report.add(at + ("track",), message)


def _raw_ips(body: dict[str, Any], key: str, parse: Callable[[str], Any]) -> Iterator[tuple[Path, Any]]:
    """``(sub-path, parsed)`` for each parseable string under ``key`` (a string or an array of them)."""
    raw = body.get(key)
    if isinstance(raw, str):
        entries: list[tuple[Path, Any]] = [((key,), raw)]
    elif isinstance(raw, list):
        entries = [((key, index), item) for index, item in enumerate(raw)]
    else:
        entries = []
    for where, text in entries:
        if not isinstance(text, str):
            continue
        try:
            yield where, parse(text)
        except ValueError:
            continue  # reported by the field itself


_VIP_IP_KEYS = (
    ("addresses", "address", ipaddress.ip_interface),
    ("peers", "peer", ipaddress.ip_address),
    ("source", "source", ipaddress.ip_address),
)


def _check_vip_families(body: dict[str, Any], at: Path, report: Report) -> int | None:
    """The family of the instance's addresses; every address, peer and source must share it."""
    family = None
    for key, what, parse in _VIP_IP_KEYS:
        for where, value in _raw_ips(body, key, parse):
            if family is None:
                family = value.version
            elif value.version != family:
                report.add(
                    at + where,
                    f"IPv{value.version} {what} in an IPv{family} instance: one instance carries one IP family "
                    "(use a second instance for the other)",
                )
    return family


def _check_vip_router_unique(
    body: dict[str, Any], at: Path, family: int | None, routers: dict[tuple[str, int, int], str], report: Report
) -> None:
    interface, vrid = body.get("interface"), body.get("vrid")
    if not isinstance(interface, str) or isinstance(vrid, bool) or not isinstance(vrid, int) or family is None:
        return
    key = (interface, vrid, family)
    if key in routers:
        report.add(at + ("vrid",), f'vrid {vrid} is already used on interface "{interface}" by {routers[key]}')
    else:
        routers[key] = format_path(at)


def _check_vip_addresses_unique(body: dict[str, Any], at: Path, managed: dict[Any, str], report: Report) -> None:
    for where, interface in _raw_ips(body, "addresses", ipaddress.ip_interface):
        owner = managed.get(interface.ip)
        if owner is not None and owner != format_path(at):
            report.add(at + where, f"address {interface.ip} is already managed by {owner}")
        else:
            managed[interface.ip] = format_path(at)


def check_stats_admins(document: dict[str, Any], report: Report) -> None:
    """Every name in ``stats.admins`` is one of ``stats.users``."""
    stats = document.get("stats")
    if not isinstance(stats, dict) or not isinstance(stats.get("admins"), list):
        return
    users = list(stats["users"]) if isinstance(stats.get("users"), dict) else []
    for index, name in enumerate(stats["admins"]):
        if isinstance(name, str) and name not in users:
            report.add(("stats", "admins", index), f'no user "{name}" in stats.users' + suggestion(name, users))


def check_frontends_present(document: dict[str, Any], report: Report) -> None:
    """At least one frontend: a file without one (empty, half-written by a
    tool that does not write atomically) would close every front port."""
    if not document.get("frontends"):
        report.add(("frontends",), "no frontend: Warren would accept no clients "
                   "(define at least one [frontends.<name>] with bind and backend)")


CROSS_CHECKS: tuple[Callable[[dict[str, Any], Report], None], ...] = (
    check_backend_references,
    check_bind_conflicts,
    check_vip_sections,
    check_stats_admins,
)


# --- advice: valid, but worth a warning -------------------------------------------------


def advise_hashed_passwords(document: dict[str, Any], report: Report) -> None:
    """A stats password in clear text logs in whoever reads the file (or a backup of it)."""
    users = (document.get("stats") or {}).get("users")
    for user, password in users.items() if isinstance(users, dict) else ():
        if isinstance(password, str) and not is_hashed(password):
            report.add(("stats", "users", user), "password stored in clear text: whoever can read this file "
                       "can log in; store a hash made by `warren hash-password` instead")


def advise_stats_admins(document: dict[str, Any], report: Report) -> None:
    """With admin actions on and several users, say who may act."""
    stats = document.get("stats") or {}
    users = stats.get("users")
    if stats.get("admin") is True and "admins" not in stats and isinstance(users, dict) and len(users) > 1:
        report.add(("stats", "admin"), "every user of stats.users may drain, disable, kill and reweight servers; "
                   'list those who may in stats.admins (e.g. admins = ["' + next(iter(users)) + '"]) '
                   "to make the others read-only")


ADVICE: tuple[Callable[[dict[str, Any], Report], None], ...] = (advise_hashed_passwords, advise_stats_admins)


def build_config(document: dict[str, Any], path: str, report: Report, *, runnable: bool = False) -> Config | Any:
    """Validate a parsed TOML document into a Config, or return INVALID with ``report`` filled.

    ``runnable``: the document is a whole file Warren is to run, which must
    also pass :func:`check_frontends_present`.
    """
    values = read_table(document, DOCUMENT, (), report)
    for check in CROSS_CHECKS + ((check_frontends_present,) if runnable else ()):
        check(document, report)
    if values is INVALID or report.issues:
        return INVALID
    return Config(path=path, **values)
