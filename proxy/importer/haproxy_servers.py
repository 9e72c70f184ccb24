"""``server`` lines, ``default-server`` and health-check options into Warren's servers and health.

HAProxy sets check timing per server; Warren per backend. When the checked
servers of a backend agree (the usual case: one ``default-server`` line, or
the same options on every line) the value moves to ``[backends.<name>.health]``
unchanged; when they differ, the most common value is used and every other
server line is reported as approximated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .context import (
    HaproxyContext,
    duration_text,
    is_ip,
    name_note,
    seconds,
    warren_name,
)
from .draft import Item, Table
from .haproxy import Line, Section
from .haproxy_tls import SERVER_WORDS, options, server_tls
from .haproxy_tls import VALUED as TLS_VALUED
from .traps import check_interval_unit

AMQP_HEADER_HEX = "414d515000000901"

# option -> (Warren health key, kind of value)
HEALTH_OPTIONS = {
    "inter": ("inter", "time"), "fastinter": ("fastinter", "time"), "downinter": ("downinter", "time"),
    "rise": ("rise", "int"), "fall": ("fall", "int"), "slowstart": ("slowstart", "time"),
    "on-marked-down": ("on_marked_down", "word"), "on-marked-up": ("on_marked_up", "word"),
    "error-limit": ("error_limit", "int"), "on-error": ("on_error", "word"), "init-state": ("init_state", "word"),
}  # fmt: skip
_WORD_VALUES = {
    "on_marked_down": {"shutdown-sessions"},
    "on_marked_up": {"shutdown-backup-sessions"},
    "on_error": {"fastinter", "mark-down", "fail-check", "sudden-death"},
    "init_state": {"up", "down", "fully-up", "fully-down"},
}
_VALUED = frozenset({
    *HEALTH_OPTIONS, "weight", "maxconn", "port", "addr", "maxqueue", "minconn", "id", "cookie", "resolvers",
    "resolve-prefer", "resolve-net", "init-addr", "agent-port", "agent-inter", "agent-addr", "agent-send",
    "observe", "track", "source", "namespace", "proto", "pool-max-conn", "pool-low-conn", "pool-purge-delay",
    "max-reuse", "tcp-ut", "ws", "usesrc", "log-proto", "set-proxy-v2-tlv-fmt", "shard", "guid", *TLS_VALUED,
})  # fmt: skip
_IGNORED = {
    "maxqueue": "Warren's queue is bounded by timeout.queue",
    "minconn": "no dynamic maxconn in Warren",
    "id": "numeric ids are not used",
    "cookie": "no HTTP persistence in TCP mode",
    "resolvers": "host names are resolved through [resolvers]",
    "resolve-prefer": "host names are resolved through [resolvers]",
    "init-addr": "host names are resolved through [resolvers]",
    "observe": "Warren always observes real connections (error_limit, on_error)",
    "agent-check": "no agent checks",
    "agent-port": "no agent checks",
    "agent-inter": "no agent checks",
    "check-send-proxy": "Warren's checks send the PROXY header whenever send_proxy is set",
    "non-stick": "no stick tables",
    "track": "each server is checked on its own",
    "addr": "checks go to the server's address",
    "enabled": "servers are enabled by default",
    "no-check": "the server is not checked",
}


@dataclass
class _Server:
    line: Line
    name: str
    values: dict
    checked: bool = False
    health: dict = field(default_factory=dict)  # Warren health key -> (value, line)
    tls_options: list = field(default_factory=list)  # (line, word, value), settled by haproxy_tls
    tls: dict | None = None  # the server's TLS table; None: plaintext
    check_ssl: bool = False  # check-ssl on a plaintext server


def translate_servers(ctx: HaproxyContext, section: Section, table: Table) -> None:
    backend = table.path[1]
    defaults = _default_server_words(section)
    servers = [_server(ctx, line, defaults, section) for line in section.find("server")]
    servers = [server for server in servers if server is not None]
    _place_tls(table, servers)
    if not servers:
        ctx.notes.ignored(section.line, (section.kind, section.name), "no server line: the backend has no servers")
    table.values["servers"] = [Item(f"{ctx.cfg.path}:{s.line.number}: server {s.line.args[0]}", s.values)
                               for s in servers]
    health = _health(ctx, section, servers, backend)
    if health:
        table.values["health"] = health


def _default_server_words(section: Section) -> list[tuple[Line, str, str | None]]:
    """Options of the default-server lines in force (defaults section first, then the section's own)."""
    lines = (section.defaults.find("default-server") if section.defaults else []) + section.find("default-server")
    return [option for line in lines for option in _options(line, line.args)]


def _options(line: Line, words: tuple[str, ...]) -> list[tuple[Line, str, str | None]]:
    return options(line, words, _VALUED)


def _server(ctx: HaproxyContext, line: Line, defaults: list, section: Section) -> _Server | None:
    if len(line.args) < 2:
        ctx.notes.ignored(line.number, line.words, "a server needs a name and an address")
        return None
    raw_name, address = line.args[0], line.args[1]
    host, port = _split_address(address)
    name = warren_name(raw_name)
    if host is None:
        ctx.notes.ignored(line.number, line.words, f'"{address}": not a TCP server address')
        return None
    values: dict = {"name": name, "address": host}
    note = f"server {name}"
    if port is None:
        port = 5672
        ctx.notes.approximated(line.number, line.words, "no port: HAProxy uses the client's destination port; "
                               "port = 5672 (AMQP)")
    values["port"] = port
    if extra := name_note(raw_name, name):
        note += f"; {extra}"
    ctx.notes.translated(line.number, line.words[:3], note)
    server = _Server(line, name, values)
    for option_line, word, value in defaults + _options(line, line.args[2:]):
        _server_option(ctx, server, option_line, word, value, section)
    server.tls, checks = server_tls(ctx.tls, ctx.notes, name, host, server.tls_options, warren_name(section.name))
    _check_tls(ctx, server, checks, section.last("option", "httpchk") is not None)
    if not server.checked:
        values["check"] = False
    return server


def _split_address(address: str) -> tuple[str | None, int | None]:
    for prefix in ("ipv4@", "ipv6@", "tcp@", "tcp4@", "tcp6@"):
        address = address.removeprefix(prefix)
    if address.startswith(("unix@", "abns@", "/", "sockpair@")):
        return None, None
    if is_ip(address) and ":" in address:
        return address, None  # a bare IPv6 address
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, None
    host = host.strip("[]")
    return host, int(port) if port.isdigit() and 1 <= int(port) <= 65535 else None


def _server_option(ctx: HaproxyContext, server: _Server, line: Line, word: str, value: str | None,
                   section: Section) -> None:
    values, notes, shown = server.values, ctx.notes, f"{word} {value}" if value is not None else word
    if word == "check":
        server.checked = True
    elif word == "no-check":
        server.checked = False
    elif word == "backup":
        values["backup"] = True
        notes.translated(line.number, line.words, f"{server.name}: backup = true")
    elif word in ("weight", "maxconn") and value is not None and value.isdigit():
        values[word] = min(int(value), 256) if word == "weight" else int(value)
        notes.translated(line.number, line.words, f"{server.name}: {word} = {values[word]}")
    elif word in ("send-proxy", "send-proxy-v2"):
        values["send_proxy"] = "v1" if word == "send-proxy" else "v2"
        notes.translated(line.number, line.words, f'{server.name}: send_proxy = "{values["send_proxy"]}"')
    elif word in ("send-proxy-v2-ssl", "send-proxy-v2-ssl-cn"):
        values["send_proxy"] = "v2"
        notes.translated(line.number, line.words, f'{server.name}: send_proxy = "v2": Warren adds the SSL TLV '
                         "(TLS version, cipher, the client certificate's CN when verified) whenever the client came "
                         "over TLS")
    elif word == "port" and value is not None and value.isdigit():
        key = "http_port" if section.last("option", "httpchk") is not None else "check_port"
        values[key] = int(value)
        notes.translated(line.number, line.words, f"{server.name}: {key} = {value}")
    elif word == "disabled":
        values["weight"] = 0
        notes.approximated(line.number, line.words, f"{server.name}: weight = 0 (takes no new connections); "
                           f"HAProxy starts it in MAINT: `warren ctl set server <backend>/{server.name} "
                           "state maint` after start")
    elif word in HEALTH_OPTIONS and value is not None:
        _health_option(ctx, server, line, word, value)
    elif word in SERVER_WORDS:
        server.tls_options.append((line, word, value))
    elif word in _IGNORED:
        notes.ignored(line.number, line.words, f"{server.name}: {shown}: {_IGNORED[word]}")
    else:
        notes.ignored(line.number, line.words, f"{server.name}: {shown}: server option not supported by Warren")


def _check_tls(ctx: HaproxyContext, server: _Server, checks: list, http: bool) -> None:
    """``check-ssl``, ``no-check-ssl``, ``check-sni``: Warren checks a server the way its clients reach it."""
    tls = server.tls
    for line, word, value in checks:
        shown = f"{word} {value}" if value is not None else word
        if word == "check-ssl" and tls is not None:
            ctx.notes.translated(line.number, line.words, f"{server.name}: checks use the server's TLS settings")
        elif word == "check-ssl" and http:
            server.check_ssl = True
            ctx.notes.translated(line.number, line.words, f"{server.name}: the management API is checked over "
                                 "HTTPS (health.http.tls = true, against the system's trust store)")
        elif word == "check-ssl":
            ctx.notes.approximated(line.number, line.words, f"{server.name}: {shown}: Warren checks a plaintext "
                                   "server in clear, the way its clients reach it")
        elif word == "no-check-ssl" and tls is not None:
            ctx.notes.approximated(line.number, line.words, f"{server.name}: {shown}: Warren checks a TLS server "
                                   "over TLS, the way its clients reach it")
        elif word == "no-check-ssl":
            ctx.notes.translated(line.number, line.words, f"{server.name}: checked in clear")
        elif word == "check-sni" and tls is not None and value == tls.get("sni"):
            ctx.notes.translated(line.number, line.words, f"{server.name}: checks send tls.sni too")
        else:
            ctx.notes.approximated(line.number, line.words, f"{server.name}: {shown}: checks send the name "
                                   "the traffic uses (the server's tls.sni, else its address)")


def _place_tls(table: Table, servers: list[_Server]) -> None:
    """What the TLS servers share goes to ``[backends.<name>.tls]``, the rest to each server's ``tls``.

    Servers reached in clear then get ``tls = false``. When the TLS servers
    share nothing, each gets its whole table and the backend none.
    """
    settings = [server.tls for server in servers if server.tls is not None]
    if not settings:
        return
    common = {key: value for key, value in settings[0].items() if all(tls.get(key, object()) == value
                                                                      for tls in settings[1:])}
    if common:
        table.values["tls"] = common
    for server in servers:
        if server.tls is None:
            if common:
                server.values["tls"] = False
        elif own := {key: value for key, value in server.tls.items() if key not in common}:
            server.values["tls"] = own
        elif not common:
            server.values["tls"] = {"enabled": True}


def _health_option(ctx: HaproxyContext, server: _Server, line: Line, word: str, value: str) -> None:
    key, kind = HEALTH_OPTIONS[word]
    if kind == "time":
        try:
            parsed: object = duration_text(seconds(value))
        except ValueError as error:
            ctx.notes.ignored(line.number, line.words, f"{word}: {error}")
            return
        if word in ("inter", "fastinter", "downinter"):
            check_interval_unit(ctx, line, word, value)
    elif kind == "int":
        if not value.isdigit() or int(value) < 1:
            ctx.notes.ignored(line.number, line.words, f"{word} {value}: expected a positive integer")
            return
        parsed = int(value)
    else:
        if value not in _WORD_VALUES[key]:
            ctx.notes.ignored(line.number, line.words, f"{word} {value}: not supported by Warren")
            return
        parsed = {"fail-check": "none", "sudden-death": "mark-down", "fully-up": "up",
                  "fully-down": "down"}.get(value, value)
    server.health[key] = (parsed, line, f"{word} {value}")


def _health(ctx: HaproxyContext, section: Section, servers: list[_Server], backend: str) -> dict:
    checked = [server for server in servers if server.checked]
    health: dict = {}
    if not checked:
        return health
    health["kinds"] = _check_kinds(ctx, section, health)
    if health["kinds"] == ["http"] and any(server.check_ssl for server in checked):
        health.setdefault("http", {})["tls"] = True
    for key in [key for key, _ in HEALTH_OPTIONS.values() if any(key in server.health for server in checked)]:
        chosen = Counter(repr(server.health[key][0]) for server in checked if key in server.health)
        common = chosen.most_common(1)[0][0]
        for server in checked:
            if key not in server.health:
                continue
            value, line, shown = server.health[key]
            if repr(value) == common:
                health[key] = value
                ctx.notes.translated(line.number, line.words, f"backends.{backend}.health.{key} ({shown})")
            else:
                ctx.notes.approximated(line.number, line.words, f"{server.name}: {shown}: Warren's health "
                                       f"settings are per backend; the value of most servers is used")
    timeout = section.last("timeout", "check")
    if timeout is not None and len(timeout.words) > 2:
        try:
            health["timeout"] = duration_text(seconds(timeout.words[2]))
            ctx.notes.translated(timeout.number, timeout.words, f"backends.{backend}.health.timeout")
        except ValueError as error:
            ctx.notes.ignored(timeout.number, timeout.words, str(error))
    if ctx.spread is not None:
        health["spread"], line = ctx.spread
        ctx.notes.translated(line.number, line.words, f"backends.{backend}.health.spread")
    return health


def _check_kinds(ctx: HaproxyContext, section: Section, health: dict) -> list[str]:
    """HAProxy's check type (tcp connect, tcp-check with the AMQP header, httpchk) as Warren's kinds."""
    tcp_check = section.last("option", "tcp-check")
    httpchk = section.last("option", "httpchk")
    if httpchk is not None:
        path = next((word for word in httpchk.args if word.startswith("/")), None)
        if path is not None and not any(ch in path for ch in "?# "):
            health["http"] = {"path": path}
        ctx.notes.approximated(httpchk.number, httpchk.words, "kinds = [\"http\"] (health.http.path): a GET "
                               "with basic auth, as for the RabbitMQ management API (port 15672 unless port is set)")
        for line in section.find("http-check"):
            ctx.notes.approximated(line.number, line.words, "the http check expects health.http.expect (200)")
        return ["http"]
    if tcp_check is not None:
        rules = section.find("tcp-check")
        sends_header = any(AMQP_HEADER_HEX in "".join(line.args[1:]).lower().replace(" ", "")
                           or "AMQP" in " ".join(line.args[1:]) for line in rules)
        for line in rules:
            ctx.notes.approximated(line.number, line.words, "replaced by Warren's AMQP handshake check"
                                   if sends_header else "replaced by a TCP connect check")
        note = ('kinds = ["amqp"]: a complete AMQP handshake, closed politely (no warning in the broker log)'
                if sends_header else 'kinds = ["tcp"]: Warren does not run tcp-check scripts')
        (ctx.notes.translated if sends_header else ctx.notes.approximated)(tcp_check.number, tcp_check.words, note)
        return ["amqp"] if sends_header else ["tcp"]
    return ["tcp"]
