"""HAProxy's ``frontend``, ``backend`` and ``listen`` sections into Warren's frontends and backends.

A ``listen`` section becomes a frontend and a backend of the same name. The
directives a section does not set come from the ``defaults`` section in
force, as in HAProxy; each is reported at the line where it is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .context import (
    AMQP_PORTS,
    FrontendFacts,
    HaproxyContext,
    UniqueNames,
    bind_text,
    duration_text,
    integer_value,
    name_note,
    taken_note,
    time_value,
    warren_name,
)
from .haproxy import Line, Section
from .haproxy_servers import translate_servers
from .haproxy_tls import BIND_WORDS, bind_tls, options
from .haproxy_tls import VALUED as TLS_VALUED
from .traps import check_frontend_maxconn, check_idle_timeouts

BALANCES = {"roundrobin": "roundrobin", "leastconn": "leastconn", "first": "first", "source": "source"}
_UNSUPPORTED_BIND_PREFIXES = ("unix@", "abns@", "fd@", "sockpair@", "/", "quic4@", "quic6@", "udp@")
_BIND_FLAGS_IGNORED = {
    "v4v6": "Warren's IPv6 wildcard follows the kernel's IPV6_V6ONLY default",
    "v6only": "Warren's IPv6 wildcard follows the kernel's IPV6_V6ONLY default",
    "transparent": "Warren binds with IP_FREEBIND: addresses not yet on the host are fine",
    "defer-accept": "not needed: AMQP clients speak first",
    "tfo": "TCP fast open is not used",
    "accept-proxy": "Warren does not accept PROXY headers from clients",
}
_BIND_VALUED = frozenset({
    "backlog", "maxconn", "name", "id", "process", "interface", "mss", "nice", "namespace", "tcp-ut",
    "mode", "uid", "gid", "user", "group", "level", "severity-output", "thread", "shards",
    *TLS_VALUED,
})  # fmt: skip


@dataclass
class BindGroup:
    """Bind lines that become one Warren listener: the same TLS table (None: plaintext)."""

    name: str  # the Warren frontend's
    tls: dict | None
    wanted: str = ""  # the name it would have had, had no other section taken it
    binds: list[str] = field(default_factory=list)
    ports: set[int] = field(default_factory=set)
    lines: list[Line] = field(default_factory=list)


def is_stats_section(section: Section) -> bool:
    return any(line.keyword == "stats" and line.args[:1] != ("socket",) for line in section.lines)


def translate_proxies(ctx: HaproxyContext) -> None:
    sections = [s for s in ctx.cfg.of_kind("backend", "listen") if not is_stats_section(s)]
    names = UniqueNames([section.name for section in sections])
    own = [names.own(section.name) for section in sections]
    # HAProxy refuses two proxies of one name; each is still translated (a second one under a
    # free name, flagged), and a reference by name means the first, as it is read first.
    backends: dict[str, Section] = {}
    for section, name in zip(sections, own):
        if section.name in backends:
            _duplicate(ctx, section, backends[section.name], f"[backends.{name}]; references to "
                       f"\"{section.name}\" mean the first")
        else:
            backends[section.name] = section
            ctx.backend_names[section.name] = name
    frontends = []
    for section in ctx.cfg.of_kind("frontend", "listen"):
        if is_stats_section(section):
            continue
        if section.find("disabled"):
            line = section.find("disabled")[-1]
            ctx.notes.ignored(line.number, line.words, f"{section.kind} {section.name} is disabled: left out")
            continue
        frontends.append(section)
    ctx.frontend_names = UniqueNames([section.name for section in frontends])
    first_frontends: dict[str, Section] = {}
    for section in frontends:
        first = first_frontends.setdefault(section.name, section)
        if first is not section and "frontend" in (first.kind, section.kind):  # two listens: flagged as backends
            _duplicate(ctx, section, first, "another frontend")
        _frontend(ctx, section, backends)
    for section, name in zip(sections, own):
        _backend(ctx, section, name)


def _duplicate(ctx: HaproxyContext, section: Section, first: Section, translated_as: str) -> None:
    ctx.notes.suspicious(section.line, (section.kind, section.name),
                         f"HAProxy refuses a second proxy named \"{section.name}\" (the first is at line "
                         f"{first.line}): translated as {translated_as}")


# --- frontends -------------------------------------------------------------------------


def _frontend(ctx: HaproxyContext, section: Section, backends: dict[str, Section]) -> None:
    base = ctx.frontend_names.own(section.name)
    target = _target_backend(ctx, section)
    groups = translate_binds(ctx, section, base, names=ctx.frontend_names)
    if not groups:
        ctx.notes.ignored(section.line, (section.kind, section.name), "no bind line Warren can listen on: the "
                          "frontend is left out")
        return
    for group in groups:
        name = group.name
        table = ctx.draft.new(("frontends", name), ctx.source(section))
        wanted = warren_name(section.name) if name == base else group.wanted
        notes = [name_note(section.name, warren_name(section.name)), taken_note(wanted, name)]
        note = "; ".join([f"[frontends.{name}]", *filter(None, notes)])
        if len(groups) > 1:
            note += (f": its {'TLS' if group.tls is not None else 'plaintext'} listeners (Warren's TLS settings are "
                     "per frontend)")
        ctx.notes.translated(section.line, (section.kind, section.name), note)
        table.values["bind"] = group.binds
        table.values["backend"] = ctx.backend_name(target)
        _frontend_settings(ctx, section, table.values, name, split=len(groups) > 1)
        if group.tls is not None:
            table.values["tls"] = group.tls
        _mode(ctx, section, group.ports, backends.get(target))
        hosts = tuple(b.rsplit(":", 1)[0].strip("[]").replace("*", "0.0.0.0") for b in group.binds)
        ctx.frontends.append(FrontendFacts(name, hosts, ctx.backend_name(target)))
        if target in backends:
            check_frontend_maxconn(ctx, section, table.values.get("maxconn", 2000), backends[target])


def _target_backend(ctx: HaproxyContext, section: Section) -> str:
    if section.kind == "listen":
        return section.name
    default = section.last("default_backend")
    for line in section.find("use_backend"):
        ctx.notes.ignored(line.number, line.words, "Warren has no ACLs: every client goes to the default backend")
    if default is not None and default.args:
        ctx.notes.translated(default.number, default.words, "backend")
        return default.args[0]
    uses = section.find("use_backend")
    if uses and uses[0].args:
        ctx.notes.approximated(uses[0].number, uses[0].words, "no default_backend: this backend is the default")
        return uses[0].args[0]
    ctx.notes.ignored(section.line, (section.kind, section.name), "no default_backend: frontend has no backend")
    return section.name


def _frontend_settings(ctx: HaproxyContext, section: Section, values: dict, name: str, split: bool = False) -> None:
    maxconn = section.last("maxconn")
    if maxconn is not None and (value := integer_value(ctx, maxconn, maxconn.arg(), 1)) is not None:
        values["maxconn"] = value
        if split:
            ctx.notes.approximated(maxconn.number, maxconn.words, f"frontends.{name}.maxconn: the limit HAProxy "
                                   "applied to all the section's listeners applies to each Warren frontend")
        else:
            ctx.notes.translated(maxconn.number, maxconn.words, f"frontends.{name}.maxconn")
    elif ctx.global_maxconn is not None:
        value, line = ctx.global_maxconn
        values["maxconn"] = value
        ctx.notes.approximated(line.number, line.words, f"frontends.{name}.maxconn: Warren has no process-wide "
                               "limit; the global maxconn becomes each frontend's")
    backlog = section.last("backlog")
    if backlog is not None and (value := integer_value(ctx, backlog, backlog.arg(), 1, 65535)) is not None:
        values["backlog"] = value
        ctx.notes.translated(backlog.number, backlog.words, f"frontends.{name}.backlog")
    for keyword, key in (("client", "client"), ("client-fin", "client_fin")):
        line = section.last("timeout", keyword)
        if line is not None and (value := time_value(ctx, line, line.arg(2))) is not None:
            values.setdefault("timeout", {})[key] = duration_text(value)
            ctx.notes.translated(line.number, line.words, f"frontends.{name}.timeout.{key}")
    check_idle_timeouts(ctx, section)


def translate_binds(ctx: HaproxyContext, section: Section, name: str, stats: bool = False,
                    names: UniqueNames | None = None) -> list[BindGroup]:
    """The section's bind lines grouped into listeners, plaintext first (empty when none is usable).

    Bind lines with the same TLS options share a listener; the first listener
    has the section's name, the next ``<name>-tls``, ``<name>-tls2``... (or,
    with ``names``, a free variant of those when another section has it).
    """
    made: dict[int, tuple[str, str]] = {}  # ordinal -> (name, wanted name)
    lines = section.find("bind")
    plaintext = any("ssl" not in line.args[1:] for line in lines)
    tls_words: list[tuple[str, ...]] = []  # distinct option lists of the TLS binds, in order
    groups: dict[str, BindGroup] = {}
    handshake = _handshake_timeout(ctx, section) if not stats else None
    for line in lines:
        words = list(line.args[1:])
        if "ssl" in words:
            if tuple(words) not in tls_words:
                tls_words.append(tuple(words))
            ordinal = tls_words.index(tuple(words)) + plaintext
            if ordinal not in made:
                wanted = listener_name(name, ordinal)
                made[ordinal] = (names.new(wanted) if names is not None and ordinal else wanted, wanted)
            listener, wanted = made[ordinal]
            key = "stats.tls" if stats else f"frontends.{listener}.tls"
            tls = bind_tls(ctx.tls, ctx.notes, line, _tls_options(line, words), key, handshake)
            if tls is None:
                continue
        else:
            listener, wanted, tls = name, name, None
        translated = list(_bind_addresses(ctx, line))
        if not translated:
            continue
        group = groups.setdefault(listener, BindGroup(listener, tls, wanted))
        group.binds += [text for text, _ in translated if text not in group.binds]
        group.ports |= {port for _, port in translated}
        group.lines.append(line)
        _bind_options(ctx, line, name, tls is not None)
    return sorted(groups.values(), key=lambda group: group.tls is not None)


def listener_name(base: str, ordinal: int) -> str:
    """The name of a section's ``ordinal``-th listener: its own, then ``<name>-tls``, ``<name>-tls2``..."""
    if ordinal == 0:
        return base
    suffix = "-tls" if ordinal == 1 else f"-tls{ordinal}"
    return warren_name(base[:64 - len(suffix)] + suffix)


def _handshake_timeout(ctx: HaproxyContext, section: Section) -> tuple[float, Line] | None:
    line = section.last("timeout", "client-hs")
    if line is None or (value := time_value(ctx, line, line.arg(2))) is None:
        return None
    return value, line


def _tls_options(line: Line, words: list[str]) -> list:
    """The TLS options of a bind line, with their values."""
    return [option for option in options(line, words, _BIND_VALUED) if option[1] in BIND_WORDS]


def _bind_addresses(ctx: HaproxyContext, line: Line) -> Iterator[tuple[str, int]]:
    for item in line.arg().split(","):
        if item.startswith(_UNSUPPORTED_BIND_PREFIXES):
            ctx.notes.ignored(line.number, line.words, f'"{item}": Warren listens on TCP addresses only')
            continue
        family = ""
        for prefix in ("ipv4@", "ipv6@", "tcp@", "tcp4@", "tcp6@"):
            if item.startswith(prefix):
                family, item = prefix, item[len(prefix):]
        host, _, port_text = item.rpartition(":")
        host = host.strip("[]")
        first, _, last = port_text.partition("-")
        if not first.isdigit() or not 1 <= int(first) <= 65535:
            ctx.notes.ignored(line.number, line.words, f'"{item}": no port Warren can listen on')
            continue
        port = int(first)
        if last:
            ctx.notes.approximated(line.number, line.words, f"port range {port_text}: only port {port} is bound")
        if host == "" and family in ("ipv6@", "tcp6@"):
            host = "::"
        text = bind_text(host, port)
        note = f'bind "{text}"'
        if host == "":
            note += " (HAProxy reads an empty address as every IPv4 address)"
        ctx.notes.translated(line.number, line.words, note)
        yield text, port


def _bind_options(ctx: HaproxyContext, line: Line, frontend: str, tls: bool) -> None:
    for _, word, value in options(line, line.args[1:], _BIND_VALUED):
        shown = f"{word} {value}" if value is not None else word
        if word in BIND_WORDS:
            if not tls:
                ctx.notes.ignored(line.number, line.words, f"{shown}: unused, this bind has no ssl")
        elif word == "backlog":
            ctx.notes.approximated(line.number, line.words, f"backlog {value}: per frontend in Warren "
                                   f"(set frontends.{frontend}.backlog)")
        elif word in _BIND_FLAGS_IGNORED:
            ctx.notes.ignored(line.number, line.words, f"{word}: {_BIND_FLAGS_IGNORED[word]}")
        else:
            ctx.notes.ignored(line.number, line.words, f"{shown}: bind option not supported by Warren")


def _mode(ctx: HaproxyContext, section: Section, ports: set[int], backend: Section | None) -> None:
    line = section.last("mode")
    if line is None or line.arg() == "tcp":
        if line is not None:
            ctx.notes.translated(line.number, line.words, "Warren relays TCP")
        return
    server_ports = {_server_port(s) for s in backend.find("server")} if backend is not None else set()
    amqp = (ports | server_ports) & AMQP_PORTS
    if amqp:
        ctx.notes.suspicious(line.number, line.words, f"mode {line.arg()} in front of AMQP port(s) "
                             f"{', '.join(map(str, sorted(amqp)))}: AMQP is not HTTP; translated as TCP relaying")
    else:
        ctx.notes.approximated(line.number, line.words, "Warren relays TCP: HTTP processing and rules are dropped")


def _server_port(line: Line) -> int | None:
    address = line.args[1] if len(line.args) > 1 else ""
    port = address.rpartition(":")[2]
    return int(port) if port.isdigit() else None


# --- backends --------------------------------------------------------------------------


def _backend(ctx: HaproxyContext, section: Section, name: str) -> None:
    table = ctx.draft.new(("backends", name), ctx.source(section))
    if section.kind == "backend":
        notes = [name_note(section.name, warren_name(section.name)), taken_note(warren_name(section.name), name)]
        ctx.notes.translated(section.line, (section.kind, section.name),
                             "; ".join([f"[backends.{name}]", *filter(None, notes)]))
    values = table.values
    _balance(ctx, section, values)
    retries = section.last("retries")
    if retries is not None and (value := integer_value(ctx, retries, retries.arg(), 0, 100)) is not None:
        values["retries"] = value
        ctx.notes.translated(retries.number, retries.words, f"backends.{name}.retries")
    _redispatch(ctx, section, values, name)
    for keyword, key in (("connect", "connect"), ("queue", "queue"), ("server", "server"),
                         ("tunnel", "tunnel"), ("server-fin", "server_fin")):
        line = section.last("timeout", keyword)
        if line is not None and (value := time_value(ctx, line, line.arg(2))) is not None:
            values.setdefault("timeout", {})[key] = duration_text(value)
            ctx.notes.translated(line.number, line.words, f"backends.{name}.timeout.{key}")
    mode = section.find("mode")
    if section.kind == "backend" and mode and mode[-1].arg() != "tcp":
        ctx.notes.approximated(mode[-1].number, mode[-1].words, "Warren relays TCP: HTTP processing is dropped")
    translate_servers(ctx, section, table)


def _balance(ctx: HaproxyContext, section: Section, values: dict) -> None:
    line = section.last("balance")
    if line is None:
        return
    algorithm = line.arg()
    if algorithm in BALANCES:
        values["balance"] = BALANCES[algorithm]
        ctx.notes.translated(line.number, line.words, f'balance = "{algorithm}"')
    elif algorithm == "static-rr":
        values["balance"] = "roundrobin"
        ctx.notes.approximated(line.number, line.words, 'balance = "roundrobin" (weighted like static-rr; '
                               "weights may also change at run time)")
    else:
        values["balance"] = "roundrobin"
        ctx.notes.approximated(line.number, line.words, f'"{algorithm}" needs HTTP or is not supported: '
                               'balance = "roundrobin"')


def _redispatch(ctx: HaproxyContext, section: Section, values: dict, name: str) -> None:
    line = section.last("option", "redispatch")
    negated = section.last("no", "option", "redispatch")
    if negated is not None and (line is None or negated.number > line.number):
        values["redispatch"] = False
        ctx.notes.translated(negated.number, negated.words, f"backends.{name}.redispatch = false")
    elif line is not None:
        values["redispatch"] = True
        ctx.notes.translated(line.number, line.words, f"backends.{name}.redispatch = true")
    else:
        values["redispatch"] = False  # HAProxy's default; Warren's is true
