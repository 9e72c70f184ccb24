"""What every rendering shares: state names, colours, durations, floating IPs.

Renderers (HTML, CSV, JSON, metrics, `warren ctl`) read frozen snapshots from
:meth:`proxy.runtime.Runtime.statistics` and must agree on what a server's
state is called. The rules follow HAProxy's stats (`stats.c`): MAINT hides
everything, DRAIN shows only while the server is up (a drained DOWN server
is still DOWN), and an unchecked server that may take traffic is "no check".

Capabilities added later (health results, VRRP instances) are read with
getattr and defaults, so a snapshot without them still renders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

# Every state a server can show, in the order of HAProxy's exporter labels.
SERVER_STATES = ("DOWN", "UP", "MAINT", "DRAIN", "NOLB")
VIP_STATES = ("INIT", "BACKUP", "MASTER", "FAULT")
SERVICE_STATES = ("STARTING", "RUNNING", "RESTARTING", "STOPPED")


def server_state(server: Any) -> str:
    """The full status text: "UP", "UP 2/3", "DOWN 1/2", "DRAIN", "MAINT", "no check"."""
    admin = getattr(server, "admin", "READY")
    status = getattr(server, "status", "no check") or "no check"
    if status == "REMOVED":  # removed by a reload; its connections are still open
        return status
    if admin == "MAINT":
        return "MAINT"
    up = getattr(server, "up", True)
    if up and (admin == "DRAIN" or getattr(server, "weight", 1) == 0):
        # HAProxy keeps the "going down" fraction: "DRAIN 2/3".
        return "DRAIN" + status[2:] if status.startswith("UP ") else "DRAIN"
    return status


def server_state_label(server: Any) -> str:
    """The one-word state for metrics labels: DOWN, UP, MAINT, DRAIN (never a fraction)."""
    state = server_state(server)
    if state == "no check":
        return "UP"
    if state == "REMOVED":  # out of rotation for good: what the exporter calls MAINT
        return "MAINT"
    return state.split(" ", 1)[0]


def state_class(server: Any) -> str:
    """The CSS class of a server row, named after what operators see.

    "UP 2/3" (up, failing checks) is going down; "DOWN 1/2" (down, passing
    checks) is going up: the colours HAProxy users read at a glance.
    """
    state = server_state(server)
    if state in ("MAINT", "REMOVED"):
        return "maint"
    if state.startswith("DRAIN"):
        return "drain"
    if state == "no check":
        return "nocheck"
    if state.startswith("UP "):
        return "going-down"
    if state.startswith("DOWN "):
        return "going-up"
    return "up" if state == "UP" else "down"


def backend_state(backend: Any) -> str:
    """UP while at least one server (active or backup) may take connections."""
    usable = getattr(backend, "active_servers", 0) + getattr(backend, "backup_servers", 0)
    return "UP" if usable else "DOWN"


def backend_weight(backend: Any) -> int:
    """HAProxy's backend weight: the sum of the usable active servers' weights."""
    total = 0
    for server in backend.servers:
        if server_state_label(server) == "UP" and not server.backup:
            total += server.weight
    return total


def human_duration(seconds: float) -> str:
    """HAProxy's compact durations: "0s", "52s", "4m52s", "3h05m", "2d4h"."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def human_bytes(count: float) -> str:
    """Bytes with a binary prefix, three significant digits: "912", "1.46K", "23.4M"."""
    value = float(count)
    for unit in ("", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            if unit == "":
                return str(int(value))
            return f"{value:.3g}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --- health checks ------------------------------------------------------------------


def check_code(server: Any) -> str:
    """The last check's code name ("L7OK"), or "" when never checked."""
    result = getattr(server, "last_check", None)
    code = getattr(result, "code", None)
    if code is None:
        return ""
    return str(getattr(code, "name", code))


def check_short(server: Any) -> str:
    """The last check as the page shows it: "L7OK in 3ms", or ""."""
    result = getattr(server, "last_check", None)
    if result is None:
        return ""
    short = getattr(result, "short", None)
    if callable(short):
        return str(short())
    return check_code(server)


def check_duration_ms(server: Any) -> int | None:
    duration = getattr(getattr(server, "last_check", None), "duration", None)
    return None if duration is None else round(duration * 1000)


def check_description(server: Any) -> str:
    return str(getattr(getattr(server, "last_check", None), "description", "") or "")


def check_meaning(server: Any) -> str:
    """HAProxy's meaning of the code ("Layer7 check passed"), for CSV check_desc."""
    code = getattr(getattr(server, "last_check", None), "code", None)
    return str(getattr(code, "info", "") or "")


def check_status_detail(server: Any) -> str:
    """The application status the check saw (HTTP 503, AMQP reply code), or ""."""
    details = getattr(getattr(server, "last_check", None), "details", None) or {}
    try:
        return str(details.get("status", "") or "")
    except AttributeError:
        return ""


# --- floating IPs ---------------------------------------------------------------------


def vip_instances(stats: Any) -> Sequence[Any]:
    """The floating-IP instances of a snapshot; empty when the election is absent."""
    extra = getattr(stats, "extra", None) or {}
    instances = extra.get("vip") if hasattr(extra, "get") else None
    if not instances:
        return ()
    try:
        return tuple(instances)
    except TypeError:
        return ()


def vip_field(instance: Any, name: str, default: Any = "") -> Any:
    """One attribute of a VIP instance (objects or mappings both accepted)."""
    if isinstance(instance, dict):
        return instance.get(name, default)
    return getattr(instance, name, default)


def vip_addresses(instance: Any) -> tuple[str, ...]:
    addresses = vip_field(instance, "addresses", ()) or ()
    return tuple(str(a) for a in addresses)


def vip_counters(instance: Any) -> dict[str, Any]:
    """The instance's counters as a dict (a mapping or a dataclass of counters)."""
    counters = vip_field(instance, "counters", {}) or {}
    if dataclasses.is_dataclass(counters) and not isinstance(counters, type):
        return dataclasses.asdict(counters)
    return dict(counters) if hasattr(counters, "items") else {}


# --- supervised services ----------------------------------------------------------------


def services(stats: Any) -> Sequence[Any]:
    """The supervised services of a snapshot (health, dns, stats, control, vip...)."""
    return tuple(getattr(stats, "services", None) or ())


def service_class(service: Any) -> str:
    """The row colour: running is up, waiting to restart is down, anything else in between."""
    return {"RUNNING": "up", "RESTARTING": "down"}.get(str(getattr(service, "state", "")), "drain")
