"""No service takes the proxy down: faults injected into each service of a running Warren.

In-process (a real App on loopback, the fault put in place with monkeypatch)
for the health checks, DNS names, the stats page and the control socket; the
floating IP's instances are covered in tests/unit/test_vip_instance.py, where
a fake host shows what reaches the wire. One test injects a fault into a real
`warren run` process (tests/faults.py) and watches it from outside: its log,
its /metrics, a client relayed through it.
"""

from __future__ import annotations

import io
import re
from dataclasses import replace

import trio
from structlog.testing import capture_logs

from lab import wait_until
from proxy.app import App
from proxy.backends import names as names_module
from proxy.config.model import BindAddress, CheckKind, Global, Health, InitState, Resolvers, Stats
from proxy.health import checker as checker_module
from proxy.stats_ui import control as control_module
from proxy.stats_ui.control import ctl_main
from proxy.stats_ui.history import History
from proxy.stats_ui.service import StatsService
from tests.dnsserver import serve_dns
from tests.faults import Fault, InjectedFault
from tests.integration.test_stats_http import CREDENTIALS, http
from tests.proxyutil import (
    connect_and_greet, make_config, read_line, serve_named, server, start_warren, use_service,
)  # fmt: skip
from tests.warrenproc import PYTHON, WarrenProcess, json_global, write

HEALTH = Health(kinds=(CheckKind.TCP,), inter=0.1, rise=1, fall=1, timeout=1.0, init_state=InitState.UP)
STATS = Stats(binds=(BindAddress("127.0.0.1", 0),), users=(CREDENTIALS,))


def crashes(logs, service: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == "service.crashed" and entry["service"] == service]


def running_again(app, service: str, restarts: int = 1):
    supervisor = app.runtime.supervisors[service]
    return lambda: supervisor.restarts >= restarts and supervisor.state == "RUNNING"


async def echo(stream) -> str:
    await stream.send_all(b"still here\n")
    return await read_line(stream)


async def test_a_crashing_health_service_restarts_while_clients_relay(monkeypatch):
    fault = Fault(on=3).patch(monkeypatch, checker_module, "check_tcp")
    with capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            config = replace(make_config([server("a", port)], health=HEALTH), stats=STATS)
            app = await start_warren(nursery, config)
            client, name = await connect_and_greet(app)
            assert name == "a"
            await wait_until(running_again(app, "health"), timeout=20)
            assert await echo(client) == "still here"  # relayed across the crash
            await wait_until(lambda: fault.calls >= 6, timeout=10)  # checking again
            broker = app.runtime.server("be", "a")
            assert broker.up and broker.down_transitions == 0  # the crash changed no verdict
            stats_address = stats_service(app).addresses[0]
            metrics = (await http(stats_address, "/metrics")).text
            page = (await http(stats_address, "/")).text
            await client.aclose()
            nursery.cancel_scope.cancel()
    [crash] = crashes(logs, "health")
    assert isinstance(crash["exc_info"], BaseException) and crash["error"] == "InjectedFault"
    assert 'warren_service_crashes_total{service="health"} 1' in metrics
    assert 'warren_service_status{service="health",state="RUNNING"} 1' in metrics
    assert 'warren_service_crashes_total{service="dns"} 0' in metrics
    assert re.search(r'<th scope="row">health</th><td class="state"><span class="pill">RUNNING</span></td>'
                     r'<td class="num">1</td><td class="num">1</td><td>\d+s ago \(InjectedFault\)</td>', page)


def stats_service(app: App) -> StatsService:
    [stats] = [s for s in app.services if isinstance(s, StatsService)]
    return stats


async def test_a_crashing_dns_service_keeps_the_last_addresses_and_resolves_again(monkeypatch):
    # The first change to 127.0.0.2 fails (a slow first lookup may deliver 127.0.0.1 as a change too).
    fault = Fault(on=1, when=lambda service, name, addresses: addresses == ("127.0.0.2",))
    fault.patch(monkeypatch, names_module.NamesService, "_changed")
    records = {"broker.test": ["127.0.0.1"]}
    with capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            dns = await nursery.start(serve_dns, records)
            port = await nursery.start(serve_named, "a")
            config = make_config([replace(server("a", port), address="broker.test")])
            config = replace(config, resolvers=Resolvers(nameservers=(BindAddress(*dns),), interval=0.1, timeout=2))
            app = await start_warren(nursery, config)
            broker = app.runtime.server("be", "a")
            await wait_until(lambda: broker.addresses == ("127.0.0.1",), timeout=10)
            records["broker.test"] = ["127.0.0.2"]  # the change reaches the faulty callback: a crash
            await wait_until(lambda: fault.raised == 1, timeout=10)
            assert broker.addresses == ("127.0.0.1",)  # the last good answer stays meanwhile
            await wait_until(running_again(app, "dns"), timeout=10)
            await wait_until(lambda: broker.addresses == ("127.0.0.2",), timeout=10)
            nursery.cancel_scope.cancel()
    assert len(crashes(logs, "dns")) == 1


async def test_a_crashing_stats_page_comes_back_and_says_so(monkeypatch):
    Fault(on=3).patch(monkeypatch, History, "record")
    with capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            config = replace(make_config([server("a", port)]), stats=STATS)
            app = App(config, handle_signals=False)
            service = StatsService(config, sample_interval=0.1)
            use_service(app, service)
            await nursery.start(app.serve)
            client, _ = await connect_and_greet(app)
            await wait_until(running_again(app, "stats"), timeout=10)
            page = await http(service.addresses[0], "/")  # listening again (a new port: it was 0)
            assert page.status == 200 and await echo(client) == "still here"
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert len(crashes(logs, "stats")) == 1
    assert re.search(r'<th scope="row">stats</th><td class="state"><span class="pill">RUNNING</span></td>'
                     r'<td class="num">1</td>', page.text)


async def test_a_crashing_control_socket_comes_back(monkeypatch, tmp_path):
    Fault(on=1).patch(monkeypatch, control_module, "_peer_allowed")
    path = str(tmp_path / "warren.sock")

    def ctl(*words: str) -> tuple[int, str]:
        out = io.StringIO()
        status = ctl_main(path, list(words), stdout=out, stderr=out, timeout=5)
        return status, out.getvalue()

    with capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            config = replace(make_config([server("a", port)]), global_=Global(control_socket=path))
            app = await start_warren(nursery, config)
            status, answer = await trio.to_thread.run_sync(ctl, "show", "servers", "state")
            assert status == 1  # the exchange that met the fault: no answer (or a broken pipe)
            await wait_until(running_again(app, "control"), timeout=10)
            status, answer = await trio.to_thread.run_sync(ctl, "show", "stat")
            assert status == 0 and answer.startswith("# pxname,svname")
            nursery.cancel_scope.cancel()
    assert len(crashes(logs, "control")) == 1


async def test_a_real_warren_process_survives_a_crashing_service(tmp_path):
    """`warren run` with a fault in its health checks: one crash logged, counted in /metrics, relaying goes on."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            config = write(tmp_path / "warren.toml", json_global() + f"""
[frontends.fe]
bind = "127.0.0.1:0"
backend = "be"

[backends.be]
servers = [{{ name = "a", address = "127.0.0.1", port = {port} }}]
health = {{ kinds = ["tcp"], inter = "100ms", rise = 1, fall = 1, init_state = "up" }}

[stats]
bind = "127.0.0.1:0"
users = {{ admin = "pw" }}
""")
            async with WarrenProcess(config) as warren:
                warren.command = [PYTHON, "-m", "tests.faults", "proxy.health.checker:check_tcp", "3"]
                await warren.start(nursery)
                client = await trio.open_tcp_stream(*warren.front("fe"))
                assert await read_line(client) == "a"
                crash = await warren.wait_for("service.crashed", service="health")
                await warren.wait_for("service.restarted", service="health")
                assert "InjectedFault" in crash["exception"] and "Traceback" in crash["exception"]
                assert await echo(client) == "still here"
                host, stats_port = (await warren.wait_for("stats.listening"))["address"].rsplit(":", 1)
                metrics = (await http((host, int(stats_port)), "/metrics")).text
                assert 'warren_service_crashes_total{service="health"} 1' in metrics
                await client.aclose()
                assert await warren.stop() == 0
            assert [e["event"] for e in warren.events].count("service.crashed") == 1
            nursery.cancel_scope.cancel()


def test_the_fault_helper_raises_exactly_on_the_chosen_calls():
    fault = Fault(on={2, 4})
    double = fault.wrap(lambda x: 2 * x)
    results = []
    for n in range(5):
        try:
            results.append(double(n))
        except InjectedFault:
            results.append("fault")
    assert results == [0, "fault", 4, "fault", 8] and (fault.calls, fault.raised) == (5, 2)
