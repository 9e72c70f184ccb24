"""The stats page: plain HTML and inline SVG, readable at a glance, no JavaScript.

Layout, as HAProxy users expect it: a header (version unless hidden,
uptime, PID, totals), the floating-IP instances when an election runs, the
supervised services (state, crashes, restarts), one table per frontend, then one table per backend with a row per server and a
total row, coloured by state. Admin forms (one per server row, plain POSTs)
appear only for a user who may act.

Every value that comes from the config, a broker or a peer goes through
:func:`esc`; the page also ships with a Content-Security-Policy that allows
no script at all, so a missed escape cannot run code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from . import view
from .charts import Series, line_chart
from .history import Sample
from .style import STYLESHEET


def esc(value: Any) -> str:
    return escape(str(value), quote=True)


@dataclass(frozen=True, slots=True)
class PageContext:
    uri: str
    refresh: float | None  # None: auto-refresh off (by config or by ?norefresh)
    refresh_configured: float | None
    admin: bool  # this user may act: the forms are shown
    hide_version: bool
    user: str
    csrf_token: str
    notice: str | None = None
    error: bool = False
    metrics_path: str = "/metrics"
    history_capacity: int = 150
    sample_interval: float = 2.0
    read_only: bool = False  # admin actions exist, but not for this user


def render_page(stats: Any, context: PageContext, history: Any | None = None) -> str:
    parts = [_head(context), _header(stats, context)]
    if context.notice:
        kind = "notice error" if context.error else "notice"
        parts.append(f'<p class="{kind}" role="status">{esc(context.notice)}</p>')
    instances = view.vip_instances(stats)
    if instances:
        parts.append(_vip_section(instances))
    if view.services(stats):
        parts.append(_services_section(view.services(stats)))
    if stats.frontends:
        parts.append('<section class="frontends"><h2>Frontends</h2>')
        parts.extend(_frontend_table(f, context) for f in stats.frontends)
        parts.append("</section>")
    for backend in stats.backends:
        samples = history.samples(backend.name) if history is not None else ()
        parts.append(_backend_section(backend, context, samples))
    parts.append(_legend())
    parts.append("</main></body></html>\n")
    return "".join(parts)


# --- head and header ------------------------------------------------------------------


def _head(context: PageContext) -> str:
    refresh = f'<meta http-equiv="refresh" content="{int(context.refresh)}">' if context.refresh else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{refresh}<title>Warren statistics</title><style>{STYLESHEET}</style></head>"
        '<body><main>'
    )


def _header(stats: Any, context: PageContext) -> str:
    version = "" if context.hide_version else f' <span class="version">{esc(stats.version)}</span>'
    sessions = sum(f.current_sessions for f in stats.frontends)
    total = sum(f.total_sessions for f in stats.frontends)
    servers = [s for b in stats.backends for s in b.servers]
    usable = sum(1 for s in servers if view.server_state_label(s) == "UP")
    facts = [
        ("uptime", view.human_duration(stats.uptime)),
        ("pid", stats.pid),
        ("current sessions", sessions),
        ("total sessions", total),
        ("servers usable", f"{usable}/{len(servers)}"),
        ("relay", stats.relay),
        ("user", f"{context.user} (read only)" if context.read_only else context.user),
    ]
    facts_html = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in facts)
    return (
        f'<header><h1>Warren{version}</h1><dl class="facts">{facts_html}</dl>'
        f"{_nav(context)}</header>"
    )


def _nav(context: PageContext) -> str:
    uri = esc(context.uri)
    if context.refresh:
        refresh = f'refreshing every {esc(view.human_duration(context.refresh))} · <a href="{uri}?norefresh">stop refreshing</a>'
    elif context.refresh_configured:
        refresh = f'auto-refresh off · <a href="{uri}">turn it on</a>'
    else:
        refresh = f'<a href="{uri}">refresh</a>'
    exports = (
        f'<a href="{uri};connections">connections</a> · '
        f'<a href="{uri};csv">CSV</a> · <a href="{uri};json">JSON</a> · '
        f'<a href="{esc(context.metrics_path)}">metrics</a>'
    )
    return f'<nav><span>{refresh}</span><span>export: {exports}</span></nav>'


# --- floating IPs ---------------------------------------------------------------------


def _vip_section(instances: Sequence[Any]) -> str:
    rows = []
    for instance in instances:
        state = str(view.vip_field(instance, "state", "INIT"))
        last = view.vip_field(instance, "last_transition", None)
        since = view.human_duration(float(last)) if isinstance(last, (int, float)) else ""
        counters = " ".join(f"{k}={v}" for k, v in sorted(view.vip_counters(instance).items()))
        master = view.vip_field(instance, "master", None)
        rows.append(
            f'<tr class="vip-{esc(state.lower())}"><th scope="row">{esc(view.vip_field(instance, "name"))}</th>'
            f'<td class="state"><span class="pill">{esc(since + " " if since else "")}{esc(state)}</span></td>'
            f'<td>{esc(view.vip_field(instance, "priority", ""))}</td><td>{esc(view.vip_field(instance, "vrid", ""))}</td>'
            f'<td>{esc(view.vip_field(instance, "interface", ""))}</td>'
            f'<td>{esc(", ".join(view.vip_addresses(instance)))}</td><td>{esc(master or "")}</td>'
            f'<td class="counters">{esc(counters)}</td></tr>'
        )
    return (
        '<section class="vips"><h2>Floating IPs</h2><table class="vip"><thead><tr>'
        "<th>Instance</th><th>State</th><th>Priority</th><th>VRID</th><th>Interface</th>"
        "<th>Addresses</th><th>Master</th><th>Counters</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></section>"
    )


# --- supervised services --------------------------------------------------------------


def _services_section(services: Sequence[Any]) -> str:
    rows = []
    for service in services:
        last = service.last_crash
        crashed = f"{view.human_duration(last)} ago ({service.last_error})" if last is not None else ""
        restart = f" in {view.human_duration(service.restart_in)}" if service.restart_in is not None else ""
        rows.append(
            f'<tr class="{view.service_class(service)}"><th scope="row">{esc(service.name)}</th>'
            f'<td class="state"><span class="pill">{esc(service.state)}{esc(restart)}</span></td>'
            f'<td class="num">{esc(service.crashes)}</td><td class="num">{esc(service.restarts)}</td>'
            f"<td>{esc(crashed)}</td></tr>"
        )
    return (
        '<section class="services"><h2>Services</h2><table class="services"><thead><tr>'
        "<th>Service</th><th>State</th><th>Crashes</th><th>Restarts</th><th>Last crash</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>"
    )


# --- frontends ------------------------------------------------------------------------


def _frontend_table(frontend: Any, context: PageContext) -> str:
    link = f'{esc(context.uri)};connections?frontend={esc(frontend.name)}'
    return (
        f'<div class="scroll"><table class="proxy frontend"><caption>{esc(frontend.name)} '
        f'<small>{esc(frontend.mode)} → {esc(frontend.backend)} · <a href="{link}">connections</a></small></caption>'
        '<thead><tr><th rowspan="2">Listening on</th><th colspan="4">Sessions</th>'
        '<th colspan="4">New connections</th><th rowspan="2">Status</th></tr>'
        "<tr><th>Cur</th><th>Max</th><th>Limit</th><th>Total</th>"
        '<th title="per second, last 10 s">Rate</th><th title="rate limit per second (per source)">Limit</th>'
        "<th>Queued</th><th>Rejected</th></tr></thead><tbody>"
        f'<tr class="open"><th scope="row">{esc(", ".join(frontend.binds))}</th>'
        f"{_num(frontend.current_sessions)}{_num(frontend.max_sessions)}{_num(frontend.limit)}"
        f"{_num(frontend.total_sessions)}{_admission_cells(frontend.admission)}"
        '<td class="state"><span class="pill">OPEN</span></td></tr>'
        "</tbody></table>" + _frontend_tls(getattr(frontend, "tls", None)) + "</div>"
    )


def _frontend_tls(tls: Any) -> str:
    """One line under a TLS frontend's table: handshakes, failures by reason, versions, client subjects."""
    if tls is None:
        return ""
    failures = ", ".join(f"{esc(reason)} {count}" for reason, count in tls.failures) or "none"
    versions = ", ".join(f"{esc(version)} {count}" for version, count in tls.in_use) or "none"
    subjects = ", ".join(esc(subject) for subject in tls.recent_subjects) or "none"
    return (
        f'<p class="tls">TLS: {tls.handshakes} handshakes ({tls.reused} resumed), failures: {failures}; '
        f"in use: {versions}; client certificates: {tls.client_certificates}, latest: {subjects}</p>"
    )


def _admission_cells(admission: Any) -> str:
    if admission is None:
        return '<td class="num"></td>' * 4
    limits = [f"{admission.rate_limit:g}" if admission.rate_limit else "",
              f"({admission.source_rate_limit:g})" if admission.source_rate_limit else ""]
    return (f'<td class="num">{admission.rate:.1f}</td><td class="num">{esc(" ".join(filter(None, limits)))}</td>'
            f"{_num(admission.queued)}{_num(admission.rejected + admission.alarms)}")


# --- backends -------------------------------------------------------------------------

_SERVER_HEAD = (
    "<thead><tr>"
    '<th rowspan="2">Server</th><th rowspan="2">Status</th><th rowspan="2">Last check</th>'
    '<th rowspan="2" title="weight">Wght</th><th rowspan="2" title="active">Act</th>'
    '<th rowspan="2" title="backup">Bck</th><th colspan="4">Sessions</th><th colspan="2">Queue</th>'
    '<th colspan="2">Bytes</th><th title="connection errors">Errors</th><th colspan="2">Warnings</th>'
    '<th colspan="3">Checks</th>{admin_head}</tr><tr>'
    "<th>Cur</th><th>Max</th><th>Limit</th><th>Total</th><th>Cur</th><th>Max</th>"
    "<th>In</th><th>Out</th><th>Conn</th><th title=\"retries\">Retr</th><th title=\"redispatches\">Redis</th>"
    '<th title="failed checks">Fail</th><th title="UP to DOWN transitions">Dwn</th>'
    '<th title="total downtime">Downtime</th></tr></thead>'
)


def _backend_section(backend: Any, context: PageContext, samples: Sequence[Sample]) -> str:
    state = view.backend_state(backend)
    admin_head = '<th rowspan="2">Admin</th>' if context.admin else ""
    rows = "".join(_server_row(s, context) for s in backend.servers)
    return (
        f'<section class="backend" id="backend-{esc(backend.name)}">'
        f'<h2>{esc(backend.name)} <span class="badge {state.lower()}">{state}</span>'
        f' <small>{esc(backend.balance)} · <a href="{esc(context.uri)};connections?backend={esc(backend.name)}">'
        f'connections</a>{_amqp_counts(backend)}</small>{_rebalance_form(backend, context)}</h2>'
        f"{_charts(samples, context)}"
        f'<div class="scroll"><table class="proxy"><caption class="sr">Servers of {esc(backend.name)}</caption>'
        f"{_SERVER_HEAD.format(admin_head=admin_head)}<tbody>{rows}</tbody>"
        f"<tfoot>{_backend_row(backend, context)}</tfoot></table></div></section>"
    )


def _rebalance_form(backend: Any, context: PageContext) -> str:
    if not context.admin:
        return ""
    return (
        f'<form class="rebalance" method="post" action="{esc(context.uri)}" aria-label="rebalance {esc(backend.name)}">'
        f'<input type="hidden" name="csrf" value="{esc(context.csrf_token)}">'
        f'<input type="hidden" name="backend" value="{esc(backend.name)}">'
        '<button name="action" value="rebalance-dry-run" title="show which connections rebalancing would close">'
        "Rebalance: dry run</button>"
        '<button name="action" value="rebalance" class="danger" title="close connections over their share, '
        'oldest first, at the backend\'s close rate, until balanced">Rebalance now</button></form>'
    )


def _amqp_counts(backend: Any) -> str:
    """The busiest vhosts and users, and connection-limit hits, in the backend's heading."""
    amqp = getattr(backend, "amqp", None)
    if amqp is None or not (amqp.vhosts or amqp.hits):
        return ""
    def top(pairs):
        return ", ".join(f"{name} {count}" for name, count in sorted(pairs, key=lambda p: -p[1])[:5])
    parts = [f"vhosts: {top(amqp.vhosts)}" if amqp.vhosts else "", f"users: {top(amqp.users)}" if amqp.users else "",
             "limit hits: " + ", ".join(f"{kind} {count}" for kind, count in amqp.hits) if amqp.hits else ""]
    return " · " + esc(" · ".join(filter(None, parts)))


def _server_row(server: Any, context: PageContext) -> str:
    state = view.server_state(server)
    check = view.check_short(server)
    check_title = view.check_description(server)
    check_cell = (
        f'<td class="check" title="{esc(check_title)}">{esc(check)}'
        f'{"<br><small>" + esc(check_title) + "</small>" if check_title else ""}</td>'
        if check else '<td class="check"></td>'
    )
    checked = getattr(server, "checked", False)
    dash = '<td class="num"></td>'
    return (
        f'<tr class="{view.state_class(server)}" id="server-{esc(server.backend)}-{esc(server.name)}">'
        f'<th scope="row" title="{esc(_address(server))}">'
        f'<a href="{esc(context.uri)};connections?backend={esc(server.backend)}&amp;server={esc(server.name)}">'
        f'{esc(server.name)}</a><small>{esc(_address(server))}</small></th>'
        f'<td class="state"><span class="pill">{esc(view.human_duration(server.last_change))} {esc(state)}</span></td>'
        f"{check_cell}{_num(server.weight)}"
        f'<td class="flag">{"" if server.backup else "Y"}</td><td class="flag">{"Y" if server.backup else ""}</td>'
        f"{_num(server.current_sessions)}{_num(server.max_sessions)}{_num(server.limit or '')}"
        f"{_num(server.total_sessions)}{dash}{dash}{_bytes(server.bytes_in)}{_bytes(server.bytes_out)}"
        f"{_num(server.connect_errors)}{_num(server.retries)}{_num(server.redispatches)}"
        + (f"{_num(server.check_failures)}{_num(server.down_transitions)}"
           f'<td class="num">{esc(view.human_duration(server.downtime))}</td>' if checked else dash * 3)
        + (_admin_cell(server, context) if context.admin else "")
        + "</tr>"
    )


def _backend_row(backend: Any, context: PageContext) -> str:
    servers = backend.servers
    state = view.backend_state(backend)
    return (
        f'<tr class="total {state.lower()}"><th scope="row">Backend</th>'
        f'<td class="state"><span class="pill">{state}</span></td><td></td>'
        f"{_num(view.backend_weight(backend))}{_num(backend.active_servers)}{_num(backend.backup_servers)}"
        f"{_num(backend.current_sessions)}{_num(max((s.max_sessions for s in servers), default=0))}"
        f'<td class="num"></td>{_num(backend.total_sessions)}'
        f"{_num(backend.queue_current)}{_num(backend.queue_max)}{_bytes(backend.bytes_in)}{_bytes(backend.bytes_out)}"
        f"{_num(sum(s.connect_errors for s in servers))}{_num(sum(s.retries for s in servers))}"
        f"{_num(sum(s.redispatches for s in servers))}"
        f'<td class="num"></td>{_num(sum(s.down_transitions for s in servers))}<td class="num"></td>'
        + ('<td class="admin"></td>' if context.admin else "")
        + "</tr>"
    )


def _admin_cell(server: Any, context: PageContext) -> str:
    """One form per server: the pressed button names the action (works without JS)."""
    norefresh = '<input type="hidden" name="norefresh" value="1">' if not context.refresh and context.refresh_configured else ""
    label = f"{server.backend}/{server.name}"
    return (
        f'<td class="admin"><form method="post" action="{esc(context.uri)}" aria-label="admin {esc(label)}">'
        f'<input type="hidden" name="csrf" value="{esc(context.csrf_token)}">'
        f'<input type="hidden" name="backend" value="{esc(server.backend)}">'
        f'<input type="hidden" name="server" value="{esc(server.name)}">{norefresh}'
        f'<button name="action" value="ready" title="READY: take new connections">Ready</button>'
        f'<button name="action" value="drain" title="DRAIN: no new connections, keep existing ones">Drain</button>'
        f'<button name="action" value="maint" title="MAINT: no new connections, not checked">Maint</button>'
        f'<button name="action" value="kill" class="danger" title="close its sessions now">Kill</button>'
        '<span class="sep"></span>'
        f'<input type="number" name="weight" min="0" max="256" value="{esc(server.weight)}" aria-label="weight of {esc(label)}">'
        f'<button name="action" value="weight" title="set the weight (0-256)">Weight</button>'
        "</form></td>"
    )


def _charts(samples: Sequence[Sample], context: PageContext) -> str:
    if not samples:
        return ""
    span = view.human_duration(context.history_capacity * context.sample_interval)
    sessions = line_chart(
        "sessions", [Series("current", [s.sessions for s in samples], "s-sessions")],
        capacity=context.history_capacity, span=span, fmt=lambda v: f"{v:.0f}",
    )
    throughput = line_chart(
        "throughput",
        [Series("in", [s.bytes_in_rate for s in samples], "s-in"),
         Series("out", [s.bytes_out_rate for s in samples], "s-out")],
        capacity=context.history_capacity, span=span, fmt=lambda v: view.human_bytes(v) + "B/s",
    )
    return f'<div class="charts">{sessions}{throughput}</div>'


def _legend() -> str:
    items = [
        ("up", "UP"), ("going-down", "UP, failing checks (going down)"),
        ("going-up", "DOWN, passing checks (going up)"), ("down", "DOWN"),
        ("drain", "DRAIN (no new connections)"), ("maint", "MAINT (stopped by an operator)"),
        ("nocheck", "no check"),
    ]
    spans = "".join(f'<li class="{cls}"><span class="pill">{esc(text)}</span></li>' for cls, text in items)
    return f'<footer><ul class="legend">{spans}</ul></footer>'


def _address(server: Any) -> str:
    host = str(server.address)
    return f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"


def _num(value: Any) -> str:
    return f'<td class="num">{esc(value)}</td>'


def _bytes(count: int) -> str:
    return f'<td class="num" title="{esc(count)} bytes">{esc(view.human_bytes(count))}</td>'
