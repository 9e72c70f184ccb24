"""The Grafana dashboard and the Prometheus alert rules query only metrics Warren really exports.

A Warren with a stats page, health-checked servers, a TLS frontend (its
handshake counters and certificate expiry) and a floating-IP snapshot
serves /metrics over HTTP; every `warren_*` name in every query of
dashboards/ must be a family of that exposition (a renamed metric would
silently empty a panel or disarm an alert).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lab import wait_until
from proxy.config.model import BindTls, CheckKind, Health
from proxy.vip.machine import Counters
from tests.integration.test_stats_http import http, start_with_stats

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
METRIC = re.compile(r"\b(warren_[a-z0-9_]+)\b")


def dashboard_queries() -> list[str]:
    board = json.loads((DASHBOARDS / "warren-dashboard.json").read_text())
    queries = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    queries += [var["query"] for var in board["templating"]["list"] if var["type"] == "query"]
    return queries


def alert_queries() -> list[str]:
    rules = yaml.safe_load((DASHBOARDS / "warren-alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_the_files_cover_what_operators_expect():
    rules = yaml.safe_load((DASHBOARDS / "warren-alerts.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert names >= {"WarrenServerDown", "WarrenBackendHasNoServer", "WarrenVipHasNoMaster", "WarrenVipHasTwoMasters",
                     "WarrenVipFlapping", "WarrenFrontendNearMaxconn", "WarrenServiceCrashed",
                     "WarrenCertificateExpiresSoon", "WarrenTlsHandshakesFailing"}
    queried = {name for query in dashboard_queries() for name in METRIC.findall(query)}
    for needed in ("warren_server_status", "warren_frontend_sessions_total", "warren_server_sessions_total",
                   "warren_backend_bytes_in_total", "warren_server_check_duration_seconds",
                   "warren_server_check_failures_total", "warren_backend_current_queue", "warren_vip_state",
                   "warren_vip_events_total", "warren_certificate_expiry_seconds",
                   "warren_frontend_tls_handshake_failures_total"):
        assert needed in queried, needed


async def test_every_metric_queried_is_exported_by_metrics(pki):
    health = Health(kinds=(CheckKind.TCP,), inter=0.05, rise=1, fall=1, timeout=1.0)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, backend_kw={"health": health},
                                             frontend_kw={"tls": BindTls(crt=(pki.server.pem,))})
            running.app.runtime.extra_statistics["vip"] = lambda: [SimpleNamespace(
                name="amqp", state="MASTER", priority=150, vrid=51, interface="eth0", addresses=["10.0.0.100/24"],
                master="10.0.0.11", last_transition=3.0, counters=Counters(became_master=1))]
            servers = list(running.app.runtime.servers())
            await wait_until(lambda: all(server.last_check is not None for server in servers), timeout=10,
                             interval=0.05, what="every server checked")
            reply = await http(running.address, "/metrics")
            nursery.cancel_scope.cancel()
    exported = {family.name for family in text_string_to_metric_families(reply.body.decode())}
    # prometheus_client names counters without their _total suffix.
    exported |= {f"{name}_total" for name in exported}
    queried = {name for query in dashboard_queries() + alert_queries() for name in METRIC.findall(query)}
    assert queried and queried - exported == set()
    assert 'event="became_master"' in reply.body.decode()  # the label value the flapping rule counts
    assert f'path="{pki.server.pem}"' in reply.body.decode()  # the expiry the certificate rules watch
