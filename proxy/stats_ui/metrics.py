"""Prometheus text exposition (format 0.0.4) at `/metrics`.

Names and labels mirror HAProxy's built-in exporter with `warren_` instead of
`haproxy_`, so dashboards and alert rules port by renaming: labels `proxy`
and `server`; state gauges carry one series per possible state, 1 for the
current one (`warren_server_status{proxy,server,state}`); counters end in
`_total`, durations in `_seconds`. Every family gets `# HELP` and `# TYPE`
lines and its samples are contiguous, as the format requires.
"""

from __future__ import annotations

from typing import Any

from ..amqp.admission import top_labels
from . import view

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

CHECK_CODES = (
    "SOCKERR", "L4OK", "L4TOUT", "L4CON", "L6OK", "L6TOUT", "L6RSP",
    "L7OK", "L7OKC", "L7TOUT", "L7RSP", "L7STS",
)

GAUGE, COUNTER = "gauge", "counter"


class Exposition:
    """Collects samples by family and writes them in the text format."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, labels: dict[str, Any], value: float) -> None:
        family = self._families.setdefault(name, (kind, help_text, []))
        family[2].append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        lines = []
        for name, (kind, help_text, samples) in self._families.items():
            lines.append(f"# HELP {name} {_escape_help(help_text)}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


def render_metrics(stats: Any, *, hide_version: bool = False, label_limit: int = 20) -> str:
    """`label_limit` bounds the vhost and user labels per backend (the rest: "other")."""
    out = Exposition()
    _process(out, stats, hide_version)
    for frontend in stats.frontends:
        _frontend(out, frontend)
    for frontend in stats.frontends:
        _admission(out, frontend)
    for backend in stats.backends:
        _backend(out, backend)
    for backend in stats.backends:
        _amqp(out, backend, label_limit)
    for backend in stats.backends:
        for server in backend.servers:
            _server(out, server)
    for instance in view.vip_instances(stats):
        _vip(out, instance)
    for service in view.services(stats):
        _service(out, service)
    for certificate in getattr(stats, "certificates", ()):
        out.add("warren_certificate_expiry_seconds", GAUGE,
                "When a certificate Warren presents expires (Unix time, as notAfter); alert on it minus time()",
                {"where": certificate.where, "path": certificate.path, "subject": certificate.subject},
                round(certificate.not_after))
    return out.text()


def _process(out: Exposition, stats: Any, hide_version: bool) -> None:
    if not hide_version:
        out.add("warren_build_info", GAUGE, "Warren's version, as a label", {"version": stats.version}, 1)
    out.add("warren_process_uptime_seconds", GAUGE, "Seconds since Warren started", {}, round(stats.uptime, 3))


def _frontend(out: Exposition, frontend: Any) -> None:
    px = {"proxy": frontend.name}
    for state in ("DOWN", "UP"):
        out.add("warren_frontend_status", GAUGE, "Current status of the frontend, per state label value",
                {**px, "state": state}, 1 if state == "UP" else 0)
    out.add("warren_frontend_current_sessions", GAUGE, "Number of current sessions on the frontend",
            px, frontend.current_sessions)
    out.add("warren_frontend_max_sessions", GAUGE, "Highest value of current sessions since Warren started",
            px, frontend.max_sessions)
    out.add("warren_frontend_limit_sessions", GAUGE, "The frontend's maxconn", px, frontend.limit)
    out.add("warren_frontend_sessions_total", COUNTER, "Total number of sessions since Warren started",
            px, frontend.total_sessions)
    tls = getattr(frontend, "tls", None)
    if tls is not None:
        _frontend_tls(out, px, tls)


def _frontend_tls(out: Exposition, px: dict[str, str], tls: Any) -> None:
    out.add("warren_frontend_tls_handshakes_total", COUNTER, "TLS handshakes completed on the frontend",
            px, tls.handshakes)
    out.add("warren_frontend_tls_reused_sessions_total", COUNTER, "TLS handshakes that resumed a session",
            px, tls.reused)
    for reason, count in tls.failures or (("none", 0),):
        out.add("warren_frontend_tls_handshake_failures_total", COUNTER,
                "TLS handshakes that failed, by reason", {**px, "reason": reason}, count)
    for version, count in tls.versions:
        out.add("warren_frontend_tls_sessions_total", COUNTER, "TLS sessions established, by protocol version",
                {**px, "version": version}, count)
    for version, count in tls.in_use:
        out.add("warren_frontend_tls_current_sessions", GAUGE, "Live TLS sessions, by protocol version",
                {**px, "version": version}, count)
    out.add("warren_frontend_tls_client_certificates_total", COUNTER,
            "TLS handshakes with a verified client certificate", px, tls.client_certificates)


def _admission(out: Exposition, frontend: Any) -> None:
    admission = getattr(frontend, "admission", None)
    if admission is None:
        return
    px = {"proxy": frontend.name}
    out.add("warren_frontend_connection_rate", GAUGE, "New connections per second, averaged over 10 s",
            px, round(admission.rate, 3))
    if admission.rate_limit is not None:
        out.add("warren_frontend_connection_rate_limit", GAUGE, "The frontend's new-connection rate limit",
                px, admission.rate_limit)
    for outcome, value in (("queued", admission.queued), ("rejected", admission.rejected),
                           ("alarm", admission.alarms)):
        out.add("warren_frontend_rate_limited_total", COUNTER,
                "New connections over a rate limit, by what was done with them", {**px, "action": outcome}, value)


def _amqp(out: Exposition, backend: Any, label_limit: int) -> None:
    amqp = getattr(backend, "amqp", None)
    if amqp is None:
        return
    px = {"proxy": backend.name}
    for label, pairs, name in (("vhost", amqp.vhosts, "warren_amqp_vhost_connections"),
                               ("user", amqp.users, "warren_amqp_user_connections")):
        for value, count in top_labels(dict(pairs), label_limit).items():
            out.add(name, GAUGE, f"Live AMQP connections per {label} (the busiest {label_limit}, the rest as other)",
                    {**px, label: value}, count)
    hits = dict(amqp.hits)
    for kind in ("vhost", "user"):
        out.add("warren_amqp_limit_hits_total", COUNTER, "Connections that reached a connection limit at Open",
                {**px, "kind": kind}, hits.get(kind, 0))


def _backend(out: Exposition, backend: Any) -> None:
    px = {"proxy": backend.name}
    state = view.backend_state(backend)
    for candidate in ("DOWN", "UP"):
        out.add("warren_backend_status", GAUGE, "Current status of the backend, per state label value",
                {**px, "state": candidate}, 1 if candidate == state else 0)
    servers = backend.servers
    for name, kind, help_text, value in (
        ("active_servers", GAUGE, "Number of active servers that may take connections", backend.active_servers),
        ("backup_servers", GAUGE, "Number of backup servers that may take connections", backend.backup_servers),
        ("weight", GAUGE, "Sum of the usable active servers' weights", view.backend_weight(backend)),
        ("current_sessions", GAUGE, "Number of current sessions on the backend", backend.current_sessions),
        ("sessions_total", COUNTER, "Total number of sessions since Warren started", backend.total_sessions),
        ("current_queue", GAUGE, "Number of clients waiting for a server", backend.queue_current),
        ("max_queue", GAUGE, "Highest number of clients waiting for a server", backend.queue_max),
        ("bytes_in_total", COUNTER, "Bytes from clients to the backend's servers", backend.bytes_in),
        ("bytes_out_total", COUNTER, "Bytes from the backend's servers to clients", backend.bytes_out),
        ("connection_errors_total", COUNTER, "Failed connections to the backend's servers",
         sum(s.connect_errors for s in servers)),
        ("retry_warnings_total", COUNTER, "Connection retries", sum(s.retries for s in servers)),
        ("redispatch_warnings_total", COUNTER, "Retries moved to another server",
         sum(s.redispatches for s in servers)),
        ("no_server_total", COUNTER, "Clients turned away because no server was available", backend.no_server),
    ):
        out.add(f"warren_backend_{name}", kind, help_text, px, value)


def _server(out: Exposition, server: Any) -> None:
    sv = {"proxy": server.backend, "server": server.name}
    current = view.server_state_label(server)
    for state in view.SERVER_STATES:
        out.add("warren_server_status", GAUGE, "Current status of the server, per state label value",
                {**sv, "state": state}, 1 if state == current else 0)
    for name, kind, help_text, value in (
        ("current_sessions", GAUGE, "Number of current sessions on the server", server.current_sessions),
        ("max_sessions", GAUGE, "Highest value of current sessions since Warren started", server.max_sessions),
        ("sessions_total", COUNTER, "Total number of sessions since Warren started", server.total_sessions),
        ("bytes_in_total", COUNTER, "Bytes from clients to the server", server.bytes_in),
        ("bytes_out_total", COUNTER, "Bytes from the server to clients", server.bytes_out),
        ("connection_errors_total", COUNTER, "Failed connections to the server", server.connect_errors),
        ("retry_warnings_total", COUNTER, "Connection retries on the server", server.retries),
        ("redispatch_warnings_total", COUNTER, "Retries moved away from the server", server.redispatches),
        ("weight", GAUGE, "The server's current weight", server.weight),
        ("check_failures_total", COUNTER, "Failed health checks", server.check_failures),
        ("check_up_down_total", COUNTER, "UP to DOWN transitions", server.down_transitions),
        ("check_last_change_seconds", GAUGE, "How long ago the server's state last changed",
         round(server.last_change, 3)),
        ("downtime_seconds_total", COUNTER, "Total time spent DOWN", round(server.downtime, 3)),
    ):
        out.add(f"warren_server_{name}", kind, help_text, sv, value)
    if server.limit:
        out.add("warren_server_limit_sessions", GAUGE, "The server's maxconn", sv, server.limit)
    _server_check(out, server, sv)


def _server_check(out: Exposition, server: Any, sv: dict[str, str]) -> None:
    code = view.check_code(server)
    if not code:
        return
    codes = CHECK_CODES if code in CHECK_CODES else CHECK_CODES + (code,)
    for candidate in codes:
        out.add("warren_server_check_status", GAUGE, "Status of the last health check, per state label value",
                {**sv, "state": candidate}, 1 if candidate == code else 0)
    duration = view.check_duration_ms(server)
    if duration is not None:
        out.add("warren_server_check_duration_seconds", GAUGE, "Duration of the last health check",
                sv, duration / 1000)
    detail = view.check_status_detail(server)
    if detail.isascii() and detail.isdigit():
        out.add("warren_server_check_code", GAUGE, "Application status of the last check (HTTP status, AMQP reply)",
                sv, int(detail))


def _vip(out: Exposition, instance: Any) -> None:
    # "vip", not "instance": Prometheus sets "instance" to the scrape target itself.
    vi = {"vip": str(view.vip_field(instance, "name"))}
    state = str(view.vip_field(instance, "state"))
    states = view.VIP_STATES if state in view.VIP_STATES else view.VIP_STATES + (state,)
    for candidate in states:
        out.add("warren_vip_state", GAUGE, "VRRP state of the floating-IP instance, per state label value",
                {**vi, "state": candidate}, 1 if candidate == state else 0)
    priority = view.vip_field(instance, "priority", None)
    if isinstance(priority, (int, float)):
        out.add("warren_vip_priority", GAUGE, "VRRP priority of this node", vi, priority)
    last = view.vip_field(instance, "last_transition", None)
    if isinstance(last, (int, float)):
        out.add("warren_vip_last_transition_seconds", GAUGE, "How long ago the instance last changed state",
                vi, round(last, 3))
    for event, count in sorted(view.vip_counters(instance).items()):
        if isinstance(count, (int, float)) and not isinstance(count, bool):
            out.add("warren_vip_events_total", COUNTER, "VRRP events of the instance, per event label value",
                    {**vi, "event": str(event)}, count)


def _service(out: Exposition, service: Any) -> None:
    sv = {"service": service.name}
    for state in view.SERVICE_STATES:
        out.add("warren_service_status", GAUGE, "State of a supervised service, per state label value",
                {**sv, "state": state}, 1 if state == service.state else 0)
    out.add("warren_service_crashes_total", COUNTER, "Unexpected failures of the service (each logged as "
            "service.crashed)", sv, service.crashes)
    out.add("warren_service_restarts_total", COUNTER, "Restarts of the service after a crash", sv, service.restarts)
    if service.last_crash is not None:
        out.add("warren_service_last_crash_seconds", GAUGE, "How long ago the service last crashed",
                sv, round(service.last_crash, 3))


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape_label(str(value))}"' for key, value in labels.items())
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
