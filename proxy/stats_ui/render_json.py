"""The JSON export (`<uri>;json`): the snapshot as nested objects.

Not HAProxy's typed field list (one object per cell): a document a script
can read with `jq '.backends[].servers[] | {name, status}'`. Durations are
seconds, byte counts are integers, `status` is the text the page shows.
"""

from __future__ import annotations

import json
from typing import Any

from . import view


def render_json(stats: Any, *, hide_version: bool = False) -> str:
    document: dict[str, Any] = {}
    if not hide_version:
        document["version"] = stats.version
    document.update(
        pid=stats.pid,
        uptime=round(stats.uptime, 3),
        relay=stats.relay,
        frontends=[_frontend(f) for f in stats.frontends],
        backends=[_backend(b) for b in stats.backends],
        vip=[_vip(v) for v in view.vip_instances(stats)],
        services=[_service(s) for s in view.services(stats)],
        certificates=[_certificate(c) for c in getattr(stats, "certificates", ())],
    )
    return json.dumps(document, indent=1, ensure_ascii=False, default=str) + "\n"


def _frontend(frontend: Any) -> dict[str, Any]:
    return {
        "name": frontend.name,
        "status": "OPEN",
        "binds": list(frontend.binds),
        "backend": frontend.backend,
        "sessions": {
            "current": frontend.current_sessions, "max": frontend.max_sessions,
            "limit": frontend.limit, "total": frontend.total_sessions,
        },
        **({"tls": _tls(frontend.tls)} if getattr(frontend, "tls", None) is not None else {}),
    }


def _tls(tls: Any) -> dict[str, Any]:
    return {
        "handshakes": tls.handshakes,
        "reused": tls.reused,
        "failures": dict(tls.failures),
        "versions": dict(tls.versions),
        "in_use": dict(tls.in_use),
        "client_certificates": tls.client_certificates,
        "recent_client_subjects": list(tls.recent_subjects),
    }


def _certificate(certificate: Any) -> dict[str, Any]:
    return {
        "where": certificate.where, "path": certificate.path, "subject": certificate.subject,
        "not_after": round(certificate.not_after), "seconds_left": round(certificate.seconds_left),
    }


def _backend(backend: Any) -> dict[str, Any]:
    return {
        "name": backend.name,
        "status": view.backend_state(backend),
        "balance": backend.balance,
        "weight": view.backend_weight(backend),
        "active_servers": backend.active_servers,
        "backup_servers": backend.backup_servers,
        "sessions": {"current": backend.current_sessions, "total": backend.total_sessions},
        "queue": {"current": backend.queue_current, "max": backend.queue_max},
        "bytes": {"in": backend.bytes_in, "out": backend.bytes_out},
        "no_server": backend.no_server,
        "servers": [_server(s) for s in backend.servers],
    }


def _server(server: Any) -> dict[str, Any]:
    return {
        "name": server.name,
        "address": server.address,
        "port": server.port,
        "status": view.server_state(server),
        "health": server.status,
        "admin": server.admin,
        "weight": server.weight,
        "backup": server.backup,
        "checked": server.checked,
        "last_change": round(server.last_change, 3),
        "downtime": round(server.downtime, 3),
        "check_failures": server.check_failures,
        "down_transitions": server.down_transitions,
        "last_check": _check(server),
        "sessions": {
            "current": server.current_sessions, "max": server.max_sessions,
            "limit": server.limit, "total": server.total_sessions,
        },
        "bytes": {"in": server.bytes_in, "out": server.bytes_out},
        "errors": {"connect": server.connect_errors},
        "warnings": {"retries": server.retries, "redispatches": server.redispatches},
    }


def _check(server: Any) -> dict[str, Any] | None:
    if getattr(server, "last_check", None) is None:
        return None
    return {
        "code": view.check_code(server),
        "passed": bool(getattr(server.last_check, "passed", False)),
        "duration_ms": view.check_duration_ms(server),
        "description": view.check_description(server),
        "summary": view.check_short(server),
    }


def _vip(instance: Any) -> dict[str, Any]:
    last = view.vip_field(instance, "last_transition", None)
    return {
        "name": str(view.vip_field(instance, "name")),
        "state": str(view.vip_field(instance, "state")),
        "priority": view.vip_field(instance, "priority", None),
        "vrid": view.vip_field(instance, "vrid", None),
        "interface": str(view.vip_field(instance, "interface")),
        "addresses": list(view.vip_addresses(instance)),
        "master": view.vip_field(instance, "master", None),
        "last_transition": None if last is None else round(float(last), 3),
        "counters": {str(k): v for k, v in view.vip_counters(instance).items()},
    }


def _service(service: Any) -> dict[str, Any]:
    return {
        "name": service.name,
        "state": service.state,
        "crashes": service.crashes,
        "restarts": service.restarts,
        "last_crash": None if service.last_crash is None else round(service.last_crash, 3),
        "last_error": service.last_error,
        "restart_in": None if service.restart_in is None else round(service.restart_in, 3),
    }
