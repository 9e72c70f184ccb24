"""The checker shell under trio's mock clock, with scripted check results.

The check functions are replaced by a script of verdicts; everything else
(counter, schedule, runtime model, consequences) is the real thing.
"""

from dataclasses import replace

import pytest
import structlog
import trio
import trio.testing

from lab import wait_until
from proxy.config.model import (
    Backend, CheckKind, Config, Health, InitState, OnError, OnMarkedDown, Server,
)
from proxy.health import checker as checker_module
from proxy.health.checker import HealthService
from proxy.health.results import CheckCode, CheckResult
from proxy.runtime import Connection, Runtime
from proxy.io.relay import Traffic

VIRTUAL = 3600  # seconds of the autojump clock: bounds every wait, never reached when passing


class Script:
    """Verdicts for the AMQP check, consumed in order; then the last repeats."""

    def __init__(self, *verdicts: bool):
        self.verdicts = list(verdicts)
        self.times: list[float] = []

    async def __call__(self, host, port, settings, timeout, *, proxy_header=None, tls=None):
        self.times.append(trio.current_time())
        passed = self.verdicts.pop(0) if len(self.verdicts) > 1 else self.verdicts[0]
        code = CheckCode.L7OK if passed else CheckCode.L4CON
        return CheckResult(code, 0.001, "scripted", CheckKind.AMQP)


def config(**health) -> Config:
    settings = dict(kinds=(CheckKind.AMQP,), inter=2.0, rise=2, fall=3, timeout=1.0)
    settings.update(health)
    h = Health(**settings)
    backend = Backend(name="be", servers=(Server("a", "127.0.0.1", 5672),), health=h)
    return Config(path="<test>", backends=(backend,))


async def run_service(nursery, cfg, script, monkeypatch):
    monkeypatch.setattr(checker_module, "check_amqp", script)
    runtime = Runtime(cfg)
    service = HealthService(cfg)
    await nursery.start(service.run, runtime)
    return runtime.server("be", "a"), service


async def test_first_check_runs_at_once_and_decides(autojump_clock, monkeypatch):
    async with trio.open_nursery() as nursery:
        script = Script(True)
        server, _ = await run_service(nursery, config(), script, monkeypatch)
        assert not server.up and server.status == "DOWN"
        await wait_until(lambda: server.up, timeout=VIRTUAL)
        assert script.times[0] == 0.0  # not one interval later
        assert server.status == "UP"
        nursery.cancel_scope.cancel()


async def test_init_state_up_serves_before_the_first_check(autojump_clock, monkeypatch):
    async with trio.open_nursery() as nursery:
        server, _ = await run_service(nursery, config(init_state=InitState.UP), Script(True), monkeypatch)
        assert server.up
        nursery.cancel_scope.cancel()


async def test_fall_failures_mark_down_at_fastinter_and_log(autojump_clock, monkeypatch):
    script = Script(True, False, False, False, False)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            server, _ = await run_service(nursery, config(fastinter=0.5), script, monkeypatch)
            await wait_until(lambda: server.up, timeout=VIRTUAL)
            await wait_until(lambda: not server.up, timeout=VIRTUAL)
            nursery.cancel_scope.cancel()
    # up at 0; failures: first after inter (fully up), then fastinter while going down
    assert script.times[:4] == pytest.approx([0.0, 2.0, 2.5, 3.0])
    assert server.down_transitions == 1 and server.check_failures == 3
    down = [e for e in logs if e["event"] == "server.down"]
    assert down and down[0]["remaining"] == 0 and down[0]["check"].startswith("L4CON")
    assert any(e["event"] == "backend.no_server" for e in logs)


async def test_down_server_checked_at_downinter_and_rises(autojump_clock, monkeypatch):
    script = Script(False, False, True, True)
    async with trio.open_nursery() as nursery:
        server, _ = await run_service(nursery, config(downinter=5.0, fastinter=1.0), script, monkeypatch)
        await wait_until(lambda: server.up, timeout=VIRTUAL)
        nursery.cancel_scope.cancel()
    # 0 fail (fully down) -> 5 fail -> 10 pass (DOWN 1/2, changing) -> 11 pass (UP)
    assert script.times == pytest.approx([0.0, 5.0, 10.0, 11.0])


async def test_marked_down_with_shutdown_sessions_kills_its_clients(autojump_clock, monkeypatch):
    script = Script(True, False)
    cfg = config(fall=1, on_marked_down=OnMarkedDown.SHUTDOWN_SESSIONS)
    async with trio.open_nursery() as nursery:
        server, _ = await run_service(nursery, cfg, script, monkeypatch)
        await wait_until(lambda: server.up, timeout=VIRTUAL)
        conn = Connection(1, ("10.0.0.1", 1000), "fe", Traffic())
        interrupted = []
        conn.interrupt = lambda: interrupted.append(conn.kill_reason)
        server.attach(conn)
        await wait_until(lambda: not server.up, timeout=VIRTUAL)
        assert interrupted == [conn.kill_reason] and conn.kill_reason.value == "D"
        nursery.cancel_scope.cancel()


async def test_passive_errors_mark_down_at_error_limit(autojump_clock, monkeypatch):
    cfg = config(error_limit=3, on_error=OnError.MARK_DOWN)
    async with trio.open_nursery() as nursery:
        server, _ = await run_service(nursery, cfg, Script(True), monkeypatch)
        await wait_until(lambda: server.up, timeout=VIRTUAL)
        server.connect_failed()
        server.connect_failed()
        server.connect_ok()  # not consecutive
        server.connect_failed()
        server.connect_failed()
        assert server.up
        server.connect_failed()
        assert not server.up and server.connect_errors == 5
        nursery.cancel_scope.cancel()


async def test_passive_errors_switch_to_fastinter(autojump_clock, monkeypatch):
    script = Script(True)
    cfg = config(error_limit=2, on_error=OnError.FASTINTER, fastinter=0.25)
    async with trio.open_nursery() as nursery:
        server, _ = await run_service(nursery, cfg, script, monkeypatch)
        await wait_until(lambda: server.up, timeout=VIRTUAL)
        await trio.sleep(0.1)
        server.connect_failed()
        server.connect_failed()  # wakes the checker at once
        await wait_until(lambda: len(script.times) >= 3, timeout=VIRTUAL)
        nursery.cancel_scope.cancel()
    woke = script.times[1]
    assert woke == pytest.approx(0.1, abs=0.02)  # at the second error, not after inter
    assert script.times[2] == pytest.approx(woke + 2.0)  # it passed: settled, back to inter


async def test_watch_loss_marks_down_at_once(autojump_clock, monkeypatch):
    lose = trio.Event()

    async def fake_watch(host, port, settings, on_lost, *, proxy_header=None, tls=None, open_timeout=5.0,
                         task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await lose.wait()
        on_lost(CheckResult(CheckCode.L7STS, 0.0, "CONNECTION_FORCED", CheckKind.WATCH, {"status": "320"}))

    monkeypatch.setattr(checker_module, "watch_amqp", fake_watch)
    cfg = config()
    cfg = replace(cfg, backends=(replace(cfg.backends[0], health=replace(cfg.backends[0].health, kinds=(CheckKind.AMQP, CheckKind.WATCH))),))
    script = Script(True, False)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            server, _ = await run_service(nursery, cfg, script, monkeypatch)
            await wait_until(lambda: server.up, timeout=VIRTUAL)
            await trio.sleep(0.5)
            lose.set()
            lost_at = trio.current_time()
            await wait_until(lambda: not server.up, timeout=VIRTUAL)
            assert trio.current_time() - lost_at < 0.05  # not fall x inter
            nursery.cancel_scope.cancel()
    down = [e for e in logs if e["event"] == "server.down"][0]
    assert down["reason"] == "watch connection lost" and down["check"].startswith("L7STS/320")


async def test_health_survives_a_reload(autojump_clock, monkeypatch):
    async with trio.open_nursery() as nursery:
        cfg = config(fall=1)
        server, service = await run_service(nursery, cfg, Script(True, False), monkeypatch)
        await wait_until(lambda: server.down_transitions == 1, timeout=VIRTUAL)
        runtime_cfg = replace(cfg, backends=(replace(cfg.backends[0], health=replace(cfg.backends[0].health, inter=5.0)),))
        # the runtime and the service both see the new config, as on SIGHUP
        service._runtime.apply(runtime_cfg)
        service.reconfigure(runtime_cfg)
        assert not service._runtime.server("be", "a").up  # still DOWN, not reset to init
        nursery.cancel_scope.cancel()
