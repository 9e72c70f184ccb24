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

import re
from collections.abc import Callable, Iterator
from typing import Any

from .addresses import check_server_address, parse_bind, parse_nameserver
from .durations import format_duration, parse_duration
from .model import (
    AmqpCheck,
    Backend,
    BackendTimeouts,
    Balance,
    BindAddress,
    CheckKind,
    Config,
    Frontend,
    FrontendTimeouts,
    Global,
    Health,
    HttpCheck,
    InitState,
    LogFormat,
    OnError,
    OnMarkedDown,
    OnMarkedUp,
    Resolvers,
    SendProxy,
    Server,
    Stats,
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


def realm(text: str) -> str:
    # Sent as a quoted-string in WWW-Authenticate (RFC 7235 section 2.2): keep it plain ASCII.
    if not text.isascii() or not text.isprintable() or '"' in text or "\\" in text:
        raise Invalid(f"expected printable ASCII without quotes or backslashes, got {describe(text)}")
    return text


BINDS = one_or_many(string(parse_bind))


# --- the sections ---------------------------------------------------------------------

GLOBAL = {
    "log_format": Field(choice(LogFormat)),
    "log_level": Field(choice(LOG_LEVELS)),
    "grace": Field(duration(positive=False)),
    "control_socket": Field(string()),
}

RESOLVERS = {
    "nameservers": Field(array(string(parse_nameserver), unique=True)),
    "interval": Field(duration()),
    "timeout": Field(duration()),
}

FRONTEND_TIMEOUTS = {
    "client": Field(duration(optional=True)),
    "client_fin": Field(duration(optional=True)),
}

FRONTEND = {
    "bind": Field(BINDS, required=True, attr="binds"),
    "backend": Field(string(), required=True),
    "maxconn": Field(integer(1)),
    "backlog": Field(integer(1, 65535)),
    "timeout": Field(table(FRONTEND_TIMEOUTS, FrontendTimeouts)),
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

BACKEND = {
    "servers": Field(array_of_tables(SERVER, Server, unique="name", what="server"), required=True),
    "balance": Field(choice(Balance)),
    "retries": Field(integer(0, 100)),
    "redispatch": Field(boolean()),
    "timeout": Field(table(BACKEND_TIMEOUTS, BackendTimeouts)),
    "health": Field(table(HEALTH, Health)),
}

STATS = {
    "bind": Field(BINDS, required=True, attr="binds"),
    "users": Field(mapping(string(), check_key=basic_auth_user), required=True),
    "uri": Field(string(uri_path)),
    "realm": Field(string(realm)),
    "refresh": Field(duration(optional=True)),
    "admin": Field(boolean()),
    "hide_version": Field(boolean()),
    "metrics_auth": Field(boolean()),
}

DOCUMENT = {
    "global": Field(table(GLOBAL, Global), attr="global_"),
    "resolvers": Field(table(RESOLVERS, Resolvers)),
    "frontends": Field(named_tables(FRONTEND, Frontend, check_name=check_name)),
    "backends": Field(named_tables(BACKEND, Backend, check_name=check_name)),
    "stats": Field(table(STATS, Stats)),
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


CROSS_CHECKS: tuple[Callable[[dict[str, Any], Report], None], ...] = (
    check_backend_references,
    check_bind_conflicts,
)


def build_config(document: dict[str, Any], path: str, report: Report) -> Config | Any:
    """Validate a parsed TOML document into a Config, or return INVALID with ``report`` filled."""
    values = read_table(document, DOCUMENT, (), report)
    for check in CROSS_CHECKS:
        check(document, report)
    if values is INVALID or report.issues:
        return INVALID
    return Config(path=path, **values)
