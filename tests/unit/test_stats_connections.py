"""The connections view (page, JSON, ctl) and the AMQP metrics, on a runtime with made-up connections."""

import json
import re
from types import SimpleNamespace

import pytest

from proxy.amqp.inspect import Identity, Phase
from proxy.io.relay import Traffic
from proxy.runtime import Connection, Runtime
from proxy.stats_ui import commands, connections
from proxy.stats_ui.metrics import render_metrics
from tests.proxyutil import make_config, server


def runtime_with(count: int) -> Runtime:
    runtime = Runtime(make_config([server("a", 1), server("b", 2)]))
    backend = runtime.backends["be"]
    for index in range(count):
        conn = Connection(runtime.new_connection_id(), ("10.0.0.1", 40000 + index), "fe",
                          Traffic(bytes_in=index * 10, bytes_out=index))
        conn.started -= index  # older as the index grows
        identity = Identity(connection_name=f"app-{index:03d}", product="pika", user=f"user{index % 3}",
                            vhost="/v" if index % 2 else "/", heartbeat=60)
        conn.amqp = SimpleNamespace(identity=identity, inspector=SimpleNamespace(phase=Phase.OPEN))
        conn.server = backend.servers["a" if index % 4 else "b"]
        conn.server.attach(conn)
        backend.amqp_counts.add(identity.vhost, identity.user)
    return runtime


def test_rows_are_sorted_and_paged_within_the_bound():
    runtime = runtime_with(250)
    query = connections.ConnectionQuery.from_params({"sort": ["age"], "order": ["desc"], "page": ["2"]})
    page = connections.select(runtime, query)
    assert (page.total, page.pages, len(page.rows)) == (250, 3, connections.PAGE_SIZE)
    ages = [row.age for row in page.rows]
    assert ages == sorted(ages, reverse=True)
    assert page.rows[0].name == "app-149"  # rows 101-200 of the oldest-first order
    last = connections.select(runtime, connections.ConnectionQuery(page=99))
    assert len(last.rows) == 50  # a page past the end shows the last one


def test_filters_by_server_and_sorts_by_text():
    runtime = runtime_with(40)
    query = connections.ConnectionQuery.from_params({"backend": ["be"], "server": ["b"], "sort": ["name"],
                                                    "order": ["asc"]})
    page = connections.select(runtime, query)
    assert page.total == 10 and {row.server for row in page.rows} == {"b"}
    assert [row.name for row in page.rows] == sorted(row.name for row in page.rows)


@pytest.mark.parametrize("params", [{"sort": ["password"]}, {"order": ["up"]}, {"page": ["0"]}, {"page": ["x"]},
                                    {"page": ["²"]}])
def test_bad_queries_are_refused(params):
    with pytest.raises(connections.BadQuery):
        connections.ConnectionQuery.from_params(params)


def test_the_html_json_and_text_show_the_identity():
    runtime = runtime_with(3)
    page = connections.select(runtime, connections.ConnectionQuery())
    html = connections.render_html(page, "/")
    assert "app-002 (pika)" in html and "user2" in html and "60s" in html and "be/a" in html
    assert ";connections?" in html and "sort=idle" in html
    document = json.loads(connections.render_json(page))
    assert document["total"] == 3
    assert document["connections"][0]["amqp"] == {
        "phase": "open", "name": "app-002", "product": "pika", "version": None, "user": "user2", "vhost": "/",
        "heartbeat": 60,
    }
    text = connections.render_text(page)
    assert text.splitlines()[0].startswith("# id client")
    assert re.search(r"^3 10\.0\.0\.1:40002 fe be/a \d+ \d+ 20 2 app-002 user2 / 60$", text, re.M)


def test_escaping_names_that_hold_markup():
    runtime = runtime_with(1)
    conn = next(iter(runtime.backends["be"].servers["b"].connections))
    conn.amqp.identity.connection_name = "<script>alert(1)</script> x"
    page = connections.select(runtime, connections.ConnectionQuery())
    assert "<script>" not in connections.render_html(page, "/")
    assert "<script>alert(1)</script>_x" in connections.render_text(page)  # one word per field


def test_ctl_show_sessions_filters_and_bounds():
    runtime = runtime_with(1200)
    answer, ok = commands.execute("show sessions be/b sort bytes_in", runtime, 0.0)
    assert ok
    lines = answer.strip().splitlines()
    assert len(lines) == 1 + 300  # header, b's 300 connections
    answer, ok = commands.execute("show sessions", runtime, 0.0)
    assert answer.strip().splitlines()[-1] == "# 200 more not shown"
    answer, ok = commands.execute("show sessions nope", runtime, 0.0)
    assert not ok and "no backend nope" in answer
    answer, ok = commands.execute("show sessions be sort password", runtime, 0.0)
    assert not ok and "sort must be" in answer


def test_idle_is_the_time_since_bytes_last_moved(monkeypatch):
    runtime = runtime_with(2)
    clock = [1000.0]
    monkeypatch.setattr("proxy.runtime.time.monotonic", lambda: clock[0])
    runtime.observe_activity()
    moving = next(iter(runtime.backends["be"].servers["b"].connections))
    clock[0] += 30
    moving.traffic.bytes_in += 1
    rows = {row.id: row for row in runtime.connection_stats()}
    assert rows[moving.id].idle == 0
    assert [row.idle for row in rows.values() if row.id != moving.id] == [30]


def test_metrics_count_per_vhost_and_user_with_capped_labels():
    runtime = runtime_with(30)
    counts = runtime.backends["be"].amqp_counts
    for index in range(50):
        counts.add(None, f"many{index}")
    counts.hits["vhost"] += 2
    text = render_metrics(runtime.statistics(), label_limit=3)
    assert 'warren_amqp_vhost_connections{proxy="be",vhost="/"} 15' in text
    assert 'warren_amqp_vhost_connections{proxy="be",vhost="/v"} 15' in text
    users = re.findall(r'^warren_amqp_user_connections\{proxy="be",user="([^"]+)"\} (\d+)$', text, re.M)
    assert len(users) == 4 and users[-1] == ("other", str(50 - 0))
    assert sum(int(count) for _, count in users) == 80
    assert 'warren_amqp_limit_hits_total{proxy="be",kind="vhost"} 2' in text
