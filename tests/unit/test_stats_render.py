"""Rendering snapshots: the HTML page, CSV, JSON and Prometheus exports."""

import csv
import io
import json
import re
import time
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest

from proxy.config.model import Backend, BindAddress, CheckKind, Config, Frontend, Health, InitState, Server
from proxy.health.results import CheckCode, CheckResult
from proxy.runtime import AdminState, Runtime
from proxy.stats_ui import view
from proxy.stats_ui.history import History
from proxy.stats_ui.metrics import render_metrics
from proxy.stats_ui.render_csv import COLUMNS, render_csv
from proxy.stats_ui.render_html import PageContext, render_page
from proxy.stats_ui.render_json import render_json

EVIL = '<script>alert(1)</script>"\'&'
CHECKED = Health(kinds=(CheckKind.TCP,), init_state=InitState.UP)

# The start of HAProxy 2.6's `show stat` header, as scripts read it (REFERENCE.md section 3).
HAPROXY_HEADER_START = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,"
    "wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,"
    "lbtot,tracked,type,"
)


def make_runtime(backend_name="rabbit", server_names=("a", "b", "c"), health=CHECKED, **server_kw) -> Runtime:
    servers = tuple(
        Server(name=n, address="127.0.0.1", port=5672 + i, **server_kw) for i, n in enumerate(server_names)
    )
    frontend = Frontend(name="amqp", binds=(BindAddress("127.0.0.1", 5670),), backend=backend_name)
    return Runtime(Config(path="<t>", frontends=(frontend,),
                          backends=(Backend(name=backend_name, servers=servers, health=health),)))


def context(**kw) -> PageContext:
    base = dict(uri="/", refresh=10.0, refresh_configured=10.0, admin=True, hide_version=False,
                user="admin", csrf_token="tok")
    return PageContext(**{**base, **kw})


def evil_runtime() -> Runtime:
    """Every string a config, broker or peer could control carries markup."""
    rt = make_runtime(backend_name=EVIL, server_names=(EVIL, "ok"))
    server = rt.server(EVIL, EVIL)
    server.last_check = CheckResult(CheckCode.L7STS, 0.003, EVIL, CheckKind.HTTP, {"status": EVIL})
    server.status = "DOWN"
    server.up = False
    rt.frontends["amqp"].config = Frontend(name=EVIL, binds=(BindAddress(EVIL, 1),), backend=EVIL)
    vip = SimpleNamespace(name=EVIL, state=EVIL, priority=EVIL, vrid=EVIL, interface=EVIL, addresses=[EVIL],
                          master=EVIL, last_transition=3.0, counters={EVIL: EVIL})
    rt.extra_statistics["vip"] = lambda: [vip]
    return rt


class TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


# --- the page -------------------------------------------------------------------------


def test_page_escapes_every_value_from_config_brokers_and_peers():
    page = render_page(evil_runtime().statistics(), context(user=EVIL, csrf_token=EVIL, notice=EVIL))
    assert "<script" not in page.lower()
    assert "&lt;script&gt;" in page
    parser = TagCollector()
    parser.feed(page)
    for tag, attrs in parser.tags:
        assert tag != "script"
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    # The hostile strings survive as text, and inside attributes they stay whole values.
    hidden = {a["name"]: a["value"] for t, a in parser.tags if t == "input" and a.get("name") == "backend"}
    assert hidden == {"backend": EVIL}
    servers = [a["value"] for t, a in parser.tags if t == "input" and a.get("name") == "server"]
    assert EVIL in servers


def test_page_shows_status_with_time_in_state_and_last_check():
    rt = make_runtime()
    a = rt.server("rabbit", "a")
    a.last_check = CheckResult(CheckCode.L7OK, 0.003, "Connection.Start received", CheckKind.AMQP)
    a.last_change = time.monotonic() - 292
    page = render_page(rt.statistics(), context())
    assert re.search(r"4m5[23]s UP", page)
    assert "L7OK in 3ms" in page and "Connection.Start received" in page


@pytest.mark.parametrize("mutate, text, css", [
    (lambda s: None, "UP", "up"),
    (lambda s: setattr(s, "status", "UP 2/3"), "UP 2/3", "going-down"),
    (lambda s: (setattr(s, "up", False), setattr(s, "status", "DOWN 1/2")), "DOWN 1/2", "going-up"),
    (lambda s: (setattr(s, "up", False), setattr(s, "status", "DOWN")), "DOWN", "down"),
    (lambda s: setattr(s, "admin", AdminState.DRAIN), "DRAIN", "drain"),
    (lambda s: setattr(s, "weight", 0), "DRAIN", "drain"),
    (lambda s: setattr(s, "admin", AdminState.MAINT), "MAINT", "maint"),
])
def test_server_rows_carry_state_text_and_colour_class(mutate, text, css):
    rt = make_runtime()
    mutate(rt.server("rabbit", "b"))
    page = render_page(rt.statistics(), context())
    row = re.search(r'<tr class="([a-z-]+)" id="server-rabbit-b">.*?</tr>', page).group(0)
    assert f'class="{css}"' in row
    assert re.search(rf'<span class="pill">\d+s {re.escape(text)}</span>', row)


def test_unchecked_servers_show_no_check():
    rt = make_runtime(health=Health())
    assert "no check" in render_page(rt.statistics(), context())


def test_auto_refresh_follows_the_context():
    rt = make_runtime()
    assert '<meta http-equiv="refresh" content="10">' in render_page(rt.statistics(), context())
    page = render_page(rt.statistics(), context(refresh=None))
    assert 'http-equiv="refresh"' not in page and "turn it on" in page
    assert 'href="/?norefresh"' in render_page(rt.statistics(), context())


def test_admin_forms_only_when_admin_is_on():
    rt = make_runtime()
    with_admin = render_page(rt.statistics(), context(admin=True))
    assert with_admin.count('<form method="post"') == 3
    assert 'value="drain"' in with_admin and 'name="csrf" value="tok"' in with_admin
    assert "<form" not in render_page(rt.statistics(), context(admin=False))


def test_version_can_be_hidden():
    rt = make_runtime()
    version = rt.statistics().version
    assert f'class="version">{version}<' in render_page(rt.statistics(), context())
    assert 'class="version"' not in render_page(rt.statistics(), context(hide_version=True))


def test_exports_are_linked_with_the_stats_uri():
    page = render_page(make_runtime().statistics(), context(uri="/haproxy"))
    assert 'href="/haproxy;csv"' in page and 'href="/haproxy;json"' in page
    assert 'action="/haproxy"' in page


def test_vip_section_appears_only_with_an_election():
    rt = make_runtime()
    assert "Floating IPs" not in render_page(rt.statistics(), context())
    rt.extra_statistics["vip"] = lambda: [SimpleNamespace(
        name="amqp-vip", state="MASTER", priority=150, vrid=51, interface="eth0",
        addresses=["10.0.0.100/24"], master="10.0.0.1", last_transition=65.0, counters={"adverts_sent": 3})]
    page = render_page(rt.statistics(), context())
    assert "Floating IPs" in page and "1m05s MASTER" in page and "10.0.0.100/24" in page
    assert 'class="vip-master"' in page and "adverts_sent=3" in page


def test_vip_counters_may_be_a_dataclass():
    from proxy.vip.machine import Counters

    rt = make_runtime()
    rt.extra_statistics["vip"] = lambda: [SimpleNamespace(
        name="v", state="BACKUP", priority=100, vrid=1, interface="eth0", addresses=[], master=None,
        last_transition=1.0, counters=Counters(adverts_received=7))]
    assert "adverts_received=7" in render_page(rt.statistics(), context())
    assert 'warren_vip_events_total{vip="v",event="adverts_received"} 7' in render_metrics(rt.statistics())


def test_charts_are_drawn_from_history():
    rt = make_runtime()
    history = History(capacity=10)
    history.record(rt.statistics(), 0.0)
    history.record(rt.statistics(), 2.0)
    page = render_page(rt.statistics(), context(history_capacity=10), history)
    assert page.count('<svg class="chart"') == 2
    assert "<polyline" in page


def test_page_for_100_servers_renders_in_under_20ms():
    rt = make_runtime(server_names=tuple(f"rmq-{i}" for i in range(100)))
    history = History()
    for t in range(150):
        history.record(rt.statistics(), float(t))
    stats = rt.statistics()
    render_page(stats, context(), history)  # warm-up
    best = min(_timed(lambda: render_page(stats, context(), history)) for _ in range(5))
    assert best < 0.020


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- view rules -----------------------------------------------------------------------


@pytest.mark.parametrize("fields, expected", [
    (dict(status="UP", up=True, admin="READY", weight=1), "UP"),
    (dict(status="UP 2/3", up=True, admin="DRAIN", weight=1), "DRAIN 2/3"),
    (dict(status="DOWN", up=False, admin="DRAIN", weight=1), "DOWN"),  # drained but dead is DOWN
    (dict(status="DOWN", up=False, admin="MAINT", weight=1), "MAINT"),
    (dict(status="no check", up=True, admin="READY", weight=1), "no check"),
    (dict(status="no check", up=True, admin="READY", weight=0), "DRAIN"),
])
def test_server_state(fields, expected):
    assert view.server_state(SimpleNamespace(**fields)) == expected


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (59.9, "59s"), (292, "4m52s"), (3600 + 300, "1h05m"), (2 * 86400 + 4 * 3600, "2d4h"), (-3, "0s"),
])
def test_human_duration(seconds, text):
    assert view.human_duration(seconds) == text


# --- CSV ------------------------------------------------------------------------------


def test_csv_header_uses_haproxy_26_names_in_order():
    text = render_csv(make_runtime().statistics())
    header = text.splitlines()[0]
    assert header.startswith(HAPROXY_HEADER_START)
    # HAProxy's 103 base columns, then its SSL module's three.
    assert header.endswith("agg_server_status,agg_server_check_status,agg_check_status,"
                           "ssl_sess,ssl_reused_sess,ssl_failed_handshake,")
    assert len(COLUMNS) == 103 and len(set(COLUMNS)) == 103


def read_csv(text):
    lines = text.splitlines()
    names = lines[0][2:].split(",")
    return [dict(zip(names, row)) for row in csv.reader(io.StringIO("\n".join(lines[1:])))]


def test_csv_rows_are_frontend_servers_backend_like_haproxy():
    rt = make_runtime()
    rt.server("rabbit", "a").last_check = CheckResult(CheckCode.L4CON, 0.0, "Connection refused", CheckKind.TCP)
    rt.server("rabbit", "a").set_health(False, "DOWN", time.monotonic())
    rt.server("rabbit", "b").admin = AdminState.DRAIN
    rt.server("rabbit", "c").status = "UP 2/3"
    rows = read_csv(render_csv(rt.statistics()))
    assert [(r["pxname"], r["svname"], r["type"]) for r in rows] == [
        ("amqp", "FRONTEND", "0"), ("rabbit", "a", "2"), ("rabbit", "b", "2"), ("rabbit", "c", "2"),
        ("rabbit", "BACKEND", "1"),
    ]
    frontend, a, b, c, backend = rows
    assert frontend["status"] == "OPEN" and frontend["slim"] == "2000" and frontend["sid"] == "0"
    assert (a["status"], a["check_status"], a["last_chk"], a["check_desc"]) == (
        "DOWN", "L4CON", "Connection refused", "Layer4 connection problem")
    assert a["chkdown"] == "1" and a["addr"] == "127.0.0.1:5672" and a["sid"] == "1"
    assert b["status"] == "DRAIN" and c["status"] == "UP 2/3"
    assert (backend["status"], backend["act"], backend["bck"], backend["weight"]) == ("UP", "1", "0", "1")
    assert backend["algo"] == "roundrobin" and a["iid"] == backend["iid"] == "2"
    assert all(r["dreq"] == "" for r in rows)  # columns Warren has no value for stay empty


def test_csv_keeps_one_record_per_line_whatever_a_broker_says():
    rt = make_runtime()
    rt.server("rabbit", "a").last_check = CheckResult(CheckCode.L7RSP, 0.0, 'bad,"frame"\nsecond line', CheckKind.AMQP)
    text = render_csv(rt.statistics())
    assert len(text.splitlines()) == 1 + 5
    a = read_csv(text)[1]
    assert a["last_chk"] == 'bad,"frame" second line'


# --- JSON -----------------------------------------------------------------------------


def test_json_export_is_structured():
    rt = evil_runtime()
    document = json.loads(render_json(rt.statistics()))
    assert document["version"] and document["pid"]
    backend = document["backends"][0]
    assert backend["name"] == EVIL
    server = backend["servers"][0]
    assert server["status"] == "DOWN" and server["last_check"]["code"] == "L7STS"
    assert server["last_check"]["summary"] == f"L7STS/{EVIL} in 3ms"
    assert document["vip"][0]["name"] == EVIL
    assert "version" not in json.loads(render_json(rt.statistics(), hide_version=True))


# --- Prometheus -----------------------------------------------------------------------

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? (\S+)$')


def check_exposition(text: str) -> dict[str, str]:
    """A strict reading of the text format: every sample follows its family's HELP and TYPE."""
    assert text.endswith("\n")
    types, current = {}, None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = line.split(" ")[2]
            assert current not in types, f"family {current} split in two"
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and kind in ("gauge", "counter")
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, line
            assert match.group(1) == current, line
            float(match.group(5))
    return types


def test_metrics_follow_the_text_format_and_haproxy_names():
    rt = make_runtime()
    rt.server("rabbit", "a").last_check = CheckResult(CheckCode.L4OK, 0.001, "ok", CheckKind.TCP)
    rt.server("rabbit", "b").admin = AdminState.MAINT
    text = render_metrics(rt.statistics())
    types = check_exposition(text)
    for name in ("warren_server_status", "warren_server_current_sessions", "warren_server_sessions_total",
                 "warren_server_bytes_in_total", "warren_server_bytes_out_total",
                 "warren_server_check_failures_total", "warren_server_connection_errors_total",
                 "warren_server_weight", "warren_backend_active_servers", "warren_frontend_current_sessions"):
        assert name in types
    assert all(n.endswith("_total") == (k == "counter") for n, k in types.items())
    assert 'warren_server_status{proxy="rabbit",server="a",state="UP"} 1' in text
    assert 'warren_server_status{proxy="rabbit",server="a",state="DOWN"} 0' in text
    assert 'warren_server_status{proxy="rabbit",server="b",state="MAINT"} 1' in text
    assert 'warren_server_check_status{proxy="rabbit",server="a",state="L4OK"} 1' in text
    assert 'warren_backend_active_servers{proxy="rabbit"} 2' in text


def test_metrics_escape_label_values_and_include_vip_state():
    text = render_metrics(evil_runtime().statistics())
    check_exposition(text)
    assert 'warren_vip_state{vip="<script>alert(1)</script>\\"\'&",state="MASTER"} 0' in text


def test_metrics_parse_with_the_reference_parser():
    parser = pytest.importorskip("prometheus_client.parser")
    rt = evil_runtime()
    rt.extra_statistics["vip"] = lambda: [SimpleNamespace(
        name="v1", state="BACKUP", priority=100, vrid=1, interface="eth0", addresses=[], master=None,
        last_transition=1.5, counters={"adverts_received": 4})]
    families = {f.name: f for f in parser.text_string_to_metric_families(render_metrics(rt.statistics()))}
    states = {s.labels["state"]: s.value for s in families["warren_vip_state"].samples}
    assert states == {"INIT": 0, "BACKUP": 1, "MASTER": 0, "FAULT": 0}
    server_states = [s for s in families["warren_server_status"].samples if s.labels["server"] == EVIL]
    assert {s.labels["state"]: s.value for s in server_states}["DOWN"] == 1
    assert families["warren_server_sessions"].type == "counter"  # the parser strips _total
