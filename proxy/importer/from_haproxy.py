"""A parsed haproxy.cfg into the Warren draft: global, resolvers, proxies, the stats page.

After the translators ran, :func:`account_for_the_rest` reports every line
no translator looked at, with the reason it has no meaning for Warren when
the directive is known (``daemon``, ``nbproc``...), so each directive of the
file appears in the report at least once.
"""

from __future__ import annotations

import secrets

from .context import HaproxyContext, duration_text, integer_value, time_value
from .haproxy import Line, Section
from .haproxy_proxies import is_stats_section, translate_binds, translate_proxies
from .haproxy_tls import read_global

CONTROL_SOCKET = "warren.sock"

_NO_TLS_BIND = "no TLS listener (bind ... ssl) uses it"
_NO_TLS_SERVER = "no TLS server (server ... ssl) uses it"
_OPENSSL_TUNING = "HAProxy's OpenSSL tuning: Warren uses OpenSSL's defaults there"

# keyword (or "option <name>", "timeout <name>") -> why Warren has no use for it
IGNORED = {
    "daemon": "Warren runs in the foreground; systemd starts and supervises it",
    "master-worker": "Warren runs in the foreground; systemd starts and supervises it",
    "nbproc": "Warren is one process with one event loop",
    "nbthread": "Warren is one process with one event loop",
    "cpu-map": "Warren is one process with one event loop",
    "chroot": "the systemd unit confines Warren instead (ProtectSystem=strict, NoNewPrivileges)",
    "user": "the systemd unit runs Warren as the warren user (User=)",
    "group": "the systemd unit runs Warren as the warren user (Group=)",
    "uid": "the systemd unit runs Warren as the warren user (User=)",
    "gid": "the systemd unit runs Warren as the warren user (Group=)",
    "pidfile": "systemd tracks the main process itself",
    "ulimit-n": "set LimitNOFILE= in the systemd unit",
    "node": "Warren's stats page names the host itself",
    "description": "no description on Warren's stats page",
    "server-state-file": "Warren keeps check state across reloads by itself",
    "server-state-base": "Warren keeps check state across reloads by itself",
    "load-server-state-from-file": "Warren keeps check state across reloads by itself",
    "lua-load": "no Lua in Warren",
    "setenv": "set Environment= in the systemd unit",
    "presetenv": "set Environment= in the systemd unit",
    "ssl-default-bind-ciphers": _NO_TLS_BIND,
    "ssl-default-bind-ciphersuites": _NO_TLS_BIND,
    "ssl-default-bind-options": _NO_TLS_BIND,
    "ssl-default-server-ciphers": _NO_TLS_SERVER,
    "ssl-default-server-ciphersuites": _NO_TLS_SERVER,
    "ssl-default-server-options": _NO_TLS_SERVER,
    "ssl-server-verify": _NO_TLS_SERVER,
    "ssl-dh-param-file": "Warren's ciphers use ECDHE: no DH parameters",
    "ssl-passphrase-cmd": "Warren decrypts keys with key_password in the tls table",
    "ssl-load-extra-files": "Warren reads <crt>.key when the key is not in the PEM file; no .ocsp, .issuer or .sctl",
    "log-send-hostname": "Warren logs to stderr (the journal under systemd)",
    "log-tag": "Warren logs to stderr (the journal under systemd)",
    "log": "Warren logs structured events to stderr (the journal under systemd); see docs/operations.md",
    "spread-checks": "no health checks to spread",
    "option dontlognull": "Warren logs every connection",
    "option logasap": "Warren logs a connection when it ends",
    "option tcpka": "Warren leaves TCP keepalive to AMQP heartbeats",
    "option clitcpka": "Warren leaves TCP keepalive to AMQP heartbeats",
    "option srvtcpka": "Warren leaves TCP keepalive to AMQP heartbeats",
    "option splice-auto": "Warren splices by default where the kernel supports it",
    "option splice-request": "Warren splices by default where the kernel supports it",
    "option splice-response": "Warren splices by default where the kernel supports it",
    "option httplog": "HTTP only; Warren relays TCP",
    "option http-server-close": "HTTP only; Warren relays TCP",
    "option forwardfor": "HTTP only; Warren relays TCP (send_proxy passes the client address)",
    "option abortonclose": "Warren closes a queued client's attempt when the client leaves",
    "timeout http-request": "HTTP only; Warren relays TCP",
    "timeout http-keep-alive": "HTTP only; Warren relays TCP",
    "timeout check": "no checks in this section",
    "timeout client-hs": "no TLS listener in this section",
    "errorfile": "HTTP only; Warren relays TCP",
    "hash-type": "Warren's source balancing uses its own hash",
    "fullconn": "no dynamic maxconn in Warren",
    "stick-table": "no stick tables",
    "stick": "no stick tables",
    "acl": "Warren has no ACLs",
    "tcp-request": "Warren has no ACLs or content rules",
    "tcp-response": "Warren has no ACLs or content rules",
    "http-request": "HTTP only; Warren relays TCP",
    "http-response": "HTTP only; Warren relays TCP",
    "tune": "tuning knobs of HAProxy's own internals",
    "stats timeout": "Warren's control socket has no idle timeout",
    "stats maxconn": "Warren's control socket serves one command per connection",
    "default-server": "server options are translated with each server line",
    "mode": "Warren relays TCP",
    "maxconn": "HAProxy's process-wide limit: Warren has none; each frontend has its own maxconn",
    "email-alert": "use alert rules on Warren's metrics (dashboards/warren-alerts.yml)",
}
SECTION_IGNORED = {
    "peers": "no stick tables to synchronise",
    "userlist": "HTTP authentication lists; Warren's stats users are in [stats.users]",
    "mailers": "use alert rules on Warren's metrics instead",
    "program": "systemd runs other programs",
    "http-errors": "HTTP only",
    "ring": "Warren logs to stderr (the journal under systemd)",
    "cache": "HTTP only",
    "log-forward": "Warren logs to stderr (the journal under systemd)",
    "traces": "HAProxy's own tracing",
    "crt-store": "crt-store sections are not read: name the certificate files in the tls tables",
}


def translate_haproxy(ctx: HaproxyContext) -> None:
    for section in ctx.cfg.of_kind("global"):
        _global(ctx, section)
    for section in ctx.cfg.of_kind("resolvers")[:1]:
        _resolvers(ctx, section)
    for section in ctx.cfg.of_kind("resolvers")[1:]:
        ctx.notes.ignored(section.line, (section.kind, section.name), "Warren has one [resolvers]: the first is used")
    translate_proxies(ctx)
    stats = [s for s in ctx.cfg.of_kind("frontend", "listen", "backend") if is_stats_section(s)]
    if stats:
        _stats(ctx, stats[0])
    for section in stats[1:]:
        ctx.notes.ignored(section.line, (section.kind, section.name), "Warren has one stats page: the first is used")
    for section in ctx.cfg.of_kind(*SECTION_IGNORED):
        ctx.notes.ignored(section.line, (section.kind, section.name), SECTION_IGNORED[section.kind])
    account_for_the_rest(ctx)


def _global(ctx: HaproxyContext, section: Section) -> None:
    global_ = ctx.draft.table(("global",), ctx.source(section))
    ctx.notes.translated(section.line, ("global",), "[global]")
    for line in section.lines:
        keyword = line.keyword
        if keyword == "maxconn" and (value := integer_value(ctx, line, line.arg(), 1)) is not None:
            ctx.global_maxconn = (value, line)
        elif keyword == "spread-checks" and (value := integer_value(ctx, line, line.arg(), 0, 50)) is not None:
            ctx.spread = (value / 100, line)
        elif keyword == "hard-stop-after" and (value := time_value(ctx, line, line.arg())) is not None:
            global_.values["grace"] = duration_text(value)
            ctx.notes.translated(line.number, line.words, "global.grace: how long live connections may finish")
        elif line.starts("stats", "socket"):
            path = f"{ctx.runtime_dir.rstrip('/')}/{CONTROL_SOCKET}"
            global_.values["control_socket"] = path
            ctx.notes.approximated(line.number, line.words, f'global.control_socket = "{path}" (the unit\'s '
                                   "RuntimeDirectory); `warren ctl` speaks HAProxy's show stat / set server "
                                   "commands; mode, level and user options are not kept")
        elif read_global(ctx.tls, ctx.notes, line):
            continue
        elif keyword == "log":
            global_.values["log_format"] = "json"
            ctx.notes.approximated(line.number, line.words, 'global.log_format = "json": structured events on '
                                   "stderr, to the journal under systemd; forward them from journald")


def _resolvers(ctx: HaproxyContext, section: Section) -> None:
    table = ctx.draft.table(("resolvers",), ctx.source(section))
    ctx.notes.translated(section.line, (section.kind, section.name), "[resolvers]")
    nameservers = []
    for line in section.lines:
        if line.keyword == "nameserver" and len(line.args) >= 2:
            nameservers.append(line.args[1])
            ctx.notes.translated(line.number, line.words, "resolvers.nameservers")
        elif line.keyword == "parse-resolv-conf":
            ctx.notes.translated(line.number, line.words, "no nameservers: /etc/resolv.conf is read")
        elif line.starts("hold", "valid") and (value := time_value(ctx, line, line.arg(2))) is not None:
            table.values["interval"] = duration_text(value)
            ctx.notes.approximated(line.number, line.words, "resolvers.interval: names are resolved again this often")
        elif line.starts("timeout", "retry") and (value := time_value(ctx, line, line.arg(2))) is not None:
            table.values["timeout"] = duration_text(value)
            ctx.notes.translated(line.number, line.words, "resolvers.timeout")
    if nameservers:
        table.values["nameservers"] = nameservers


def _stats(ctx: HaproxyContext, section: Section) -> None:
    table = ctx.draft.table(("stats",), ctx.source(section))
    ctx.notes.translated(section.line, (section.kind, section.name), "[stats]: Warren's stats page")
    groups = translate_binds(ctx, section, "stats", stats=True)
    if not groups:
        ctx.notes.ignored(section.line, (section.kind, section.name), "no bind line Warren can listen on: no stats "
                          "page")
        ctx.draft.tables.remove(table)
        return
    table.values["bind"] = [bind for group in groups for bind in group.binds]
    secure = next((group for group in groups if group.tls is not None), None)
    if secure is not None:
        table.values["tls"] = secure.tls
        for line in (line for group in groups if group is not secure for line in group.lines):
            ctx.notes.approximated(line.number, line.words, "the page is served over HTTPS with the first TLS "
                                   "bind's settings on every bind: Warren's stats page has one TLS setting (stats.tls)")
    users: dict[str, str] = {}
    for line in section.lines:
        if line.keyword == "mode":
            ctx.notes.translated(line.number, line.words, "the stats page speaks HTTP")
        elif line.keyword == "stats":
            _stats_line(ctx, line, table.values, users)
        elif line.starts("http-request", "use-service", "prometheus-exporter"):
            ctx.notes.approximated(line.number, line.words, "Warren serves /metrics beside the stats page, behind "
                                   "the same login unless stats.metrics_auth = false (HAProxy's has none)")
    if not users:
        users["admin"] = ctx.hash_password(secrets.token_urlsafe(24))
        ctx.notes.approximated(section.line, (section.kind, section.name), "HAProxy's page had no login; Warren "
                               "requires one: users.admin has a random password nobody knows; set your own "
                               "with `warren hash-password`")
    table.values["users"] = users


def _stats_line(ctx: HaproxyContext, line: Line, values: dict, users: dict[str, str]) -> None:
    what = line.arg()
    rest = line.words[2:]
    notes = ctx.notes
    if what == "enable":
        notes.translated(line.number, line.words, "the page is on wherever [stats] exists")
    elif what == "uri" and rest:
        uri = rest[0].split("?", 1)[0].split("#", 1)[0] or "/"
        values["uri"] = uri
        if uri == rest[0]:
            notes.translated(line.number, line.words, f'stats.uri = "{uri}"')
        else:
            notes.approximated(line.number, line.words, f'stats.uri = "{uri}": Warren\'s path has no query')
    elif what == "auth" and rest and ":" in rest[0]:
        user, password = rest[0].split(":", 1)
        users[user] = ctx.hash_password(password)
        notes.translated(line.number, line.words, f"stats.users.{user}: stored as a salted scrypt hash, "
                         "never in clear text")
    elif what == "refresh" and rest and (value := time_value(ctx, line, rest[0])) is not None:
        values["refresh"] = duration_text(value)
        notes.translated(line.number, line.words, "stats.refresh")
    elif what == "realm" and rest:
        values["realm"] = "".join(ch for ch in " ".join(rest) if ch.isascii() and ch.isprintable() and ch not in '"\\')
        notes.translated(line.number, line.words, "stats.realm")
    elif what == "admin":
        values["admin"] = True
        condition = " ".join(rest)
        if condition in ("if TRUE", ""):
            notes.translated(line.number, line.words, "stats.admin = true")
        else:
            notes.approximated(line.number, line.words, "stats.admin = true for every user who logs in "
                               f"(Warren has no ACLs: \"{condition}\" is not kept)")
    elif what == "hide-version":
        values["hide_version"] = True
        notes.translated(line.number, line.words, "stats.hide_version = true")
    else:
        notes.ignored(line.number, line.words, "not on Warren's stats page")


# Directives Warren does by design, whatever the section: translated without a key.
BY_DESIGN = {
    "option tcplog": "Warren logs one connection.closed event per connection with tcplog's fields",
    "mode tcp": "Warren relays TCP",
}


def account_for_the_rest(ctx: HaproxyContext) -> None:
    for section in ctx.cfg.sections:
        if section.kind == "defaults":
            ctx.notes.translated(section.line, ("defaults", section.name), "applied to the sections that follow")
        for line in section.lines:
            if line.number in ctx.notes.lines:
                continue
            if section.kind in SECTION_IGNORED:
                ctx.notes.ignored(line.number, line.words, f"inside {section.kind}: {SECTION_IGNORED[section.kind]}")
            elif " ".join(line.words[:2]) in BY_DESIGN:
                ctx.notes.translated(line.number, line.words, BY_DESIGN[" ".join(line.words[:2])])
            else:
                ctx.notes.ignored(line.number, line.words, _reason(line, section))


def _reason(line: Line, section: Section) -> str:
    words = [word for word in line.words if word != "no"] or list(line.words)
    for key in (" ".join(words[:2]), words[0], words[0].split(".")[0]):
        if key in IGNORED:
            return IGNORED[key]
    if words[0].startswith("ssl-"):
        return _OPENSSL_TUNING
    if section.kind == "defaults":
        return "a default that no translated section uses"
    return "not known to the importer; Warren has no equivalent"
