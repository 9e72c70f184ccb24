"""The CSV export (`<uri>;csv`, `warren ctl show stat`) in HAProxy 2.6's layout.

Scripts and monitoring written against HAProxy read columns by these names,
so the header is HAProxy 2.6's `show stat` header up to `agg_check_status`
(its 103 base columns; the per-module HTTP/2 and HTTP/1 columns mean
nothing for TCP and are left out), then the SSL module's three columns
(`ssl_sess`, `ssl_reused_sess`, `ssl_failed_handshake`), filled on the
FRONTEND rows of frontends that terminate TLS. Columns Warren has no value for are empty,
as HAProxy leaves them. Each line ends with a comma, as HAProxy's do.

Rows, as HAProxy writes them: each frontend as a FRONTEND row (type 0); each
backend as one row per server (type 2) then a BACKEND row (type 1). Warren's
frontends and backends are separate proxies, so `iid` numbers them in that
order from 1; `sid` numbers servers within their backend from 1.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from . import view

COLUMNS = (
    "pxname", "svname", "qcur", "qmax", "scur", "smax", "slim", "stot", "bin", "bout",
    "dreq", "dresp", "ereq", "econ", "eresp", "wretr", "wredis", "status", "weight", "act",
    "bck", "chkfail", "chkdown", "lastchg", "downtime", "qlimit", "pid", "iid", "sid", "throttle",
    "lbtot", "tracked", "type", "rate", "rate_lim", "rate_max", "check_status", "check_code",
    "check_duration", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other",
    "hanafail", "req_rate", "req_rate_max", "req_tot", "cli_abrt", "srv_abrt", "comp_in",
    "comp_out", "comp_byp", "comp_rsp", "lastsess", "last_chk", "last_agt", "qtime", "ctime",
    "rtime", "ttime", "agent_status", "agent_code", "agent_duration", "check_desc", "agent_desc",
    "check_rise", "check_fall", "check_health", "agent_rise", "agent_fall", "agent_health",
    "addr", "cookie", "mode", "algo", "conn_rate", "conn_rate_max", "conn_tot", "intercepted",
    "dcon", "dses", "wrew", "connect", "reuse", "cache_lookups", "cache_hits", "srv_icur",
    "src_ilim", "qtime_max", "ctime_max", "rtime_max", "ttime_max", "eint", "idle_conn_cur",
    "safe_conn_cur", "used_conn_cur", "need_conn_est", "uweight", "agg_server_status",
    "agg_server_check_status", "agg_check_status",
)

# HAProxy's "ssl" stats module, as its `show stat` appends it after the base columns.
SSL_COLUMNS = ("ssl_sess", "ssl_reused_sess", "ssl_failed_handshake")
HEADER = COLUMNS + SSL_COLUMNS

TYPE_FRONTEND, TYPE_BACKEND, TYPE_SERVER = 0, 1, 2


def render_csv(stats: Any) -> str:
    """The whole export: header line, then FRONTEND, server and BACKEND rows."""
    out = io.StringIO()
    out.write("# " + ",".join(HEADER) + ",\n")
    writer = csv.writer(out, lineterminator="\n")
    for row in stat_rows(stats):
        writer.writerow([_cell(row.get(name)) for name in HEADER] + [""])
    return out.getvalue()


def stat_rows(stats: Any) -> list[dict[str, Any]]:
    """Every row as a dict keyed by column name (absent: empty)."""
    rows: list[dict[str, Any]] = []
    iid = 0
    for frontend in stats.frontends:
        iid += 1
        rows.append(_frontend_row(frontend, stats.pid, iid))
    for backend in stats.backends:
        iid += 1
        for sid, server in enumerate(backend.servers, start=1):
            rows.append(_server_row(server, stats.pid, iid, sid))
        rows.append(_backend_row(backend, stats.pid, iid))
    return rows


def _frontend_row(frontend: Any, pid: int, iid: int) -> dict[str, Any]:
    return {
        "pxname": frontend.name, "svname": "FRONTEND",
        "scur": frontend.current_sessions, "smax": frontend.max_sessions, "slim": frontend.limit,
        "stot": frontend.total_sessions,
        "bin": getattr(frontend, "bytes_in", None), "bout": getattr(frontend, "bytes_out", None),
        "status": "OPEN", "pid": pid, "iid": iid, "sid": 0, "type": TYPE_FRONTEND,
        "mode": "tcp", "conn_tot": frontend.total_sessions,
        **_ssl_cells(getattr(frontend, "tls", None)),
    }


def _ssl_cells(tls: Any) -> dict[str, Any]:
    if tls is None:
        return {}
    return {"ssl_sess": tls.handshakes, "ssl_reused_sess": tls.reused, "ssl_failed_handshake": tls.failed}


def _server_row(server: Any, pid: int, iid: int, sid: int) -> dict[str, Any]:
    checked = getattr(server, "checked", False)
    duration = view.check_duration_ms(server)
    return {
        "pxname": server.backend, "svname": server.name,
        "qcur": 0, "qmax": 0,
        "scur": server.current_sessions, "smax": server.max_sessions, "slim": server.limit or None,
        "stot": server.total_sessions, "bin": server.bytes_in, "bout": server.bytes_out,
        "econ": server.connect_errors, "wretr": server.retries, "wredis": server.redispatches,
        "status": view.server_state(server), "weight": server.weight,
        "act": 0 if server.backup else 1, "bck": 1 if server.backup else 0,
        "chkfail": server.check_failures if checked else None,
        "chkdown": server.down_transitions if checked else None,
        "lastchg": int(server.last_change),
        "downtime": int(server.downtime) if checked else None,
        "pid": pid, "iid": iid, "sid": sid, "lbtot": server.total_sessions, "type": TYPE_SERVER,
        "check_status": view.check_code(server) or None,
        "check_code": view.check_status_detail(server) or None,
        "check_duration": duration,
        "last_chk": view.check_description(server) or None,
        "check_desc": view.check_meaning(server) or None,
        "addr": _address(server.address, server.port), "mode": "tcp",
        "uweight": server.weight,
    }


def _backend_row(backend: Any, pid: int, iid: int) -> dict[str, Any]:
    servers = backend.servers
    checked = [s for s in servers if getattr(s, "checked", False)]
    return {
        "pxname": backend.name, "svname": "BACKEND",
        "qcur": backend.queue_current, "qmax": backend.queue_max,
        "scur": backend.current_sessions, "smax": max((s.max_sessions for s in servers), default=0),
        "stot": backend.total_sessions, "bin": backend.bytes_in, "bout": backend.bytes_out,
        "econ": sum(s.connect_errors for s in servers),
        "wretr": sum(s.retries for s in servers), "wredis": sum(s.redispatches for s in servers),
        "status": view.backend_state(backend), "weight": view.backend_weight(backend),
        "act": backend.active_servers, "bck": backend.backup_servers,
        "chkdown": sum(s.down_transitions for s in checked),
        "pid": pid, "iid": iid, "sid": 0, "lbtot": backend.total_sessions, "type": TYPE_BACKEND,
        "mode": "tcp", "algo": backend.balance,
        "uweight": sum(s.weight for s in servers if not s.backup),
    }


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    if text.isprintable():  # the common case; excludes \r \n \t and other controls
        return text
    # One record per line whatever a broker put in a check description.
    return "".join(ch if ch.isprintable() else " " for ch in text)
