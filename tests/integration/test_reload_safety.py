"""Reloads that would strand clients are refused; nothing live leaves the accounting.

Regression for the hostile-input probe (issue 12): an empty configuration
file was valid, and a SIGHUP with it closed the front port and the stats
page and dropped every server, while the established connections lived on
outside the runtime's accounting (not counted against maxconn, not reachable
by `shutdown sessions`).
"""

from __future__ import annotations

import signal

import structlog
import trio

from lab import wait_until
from proxy import privileges
from proxy.app import App
from proxy.config import load_config
from proxy.stats_ui.commands import execute
from tests.integration.test_cli import config_text
from tests.proxyutil import read_line, serve_named
from tests.warrenproc import WarrenProcess, run_cli, write


def test_check_refuses_an_empty_file(tmp_path):
    path = write(tmp_path / "empty.toml", "")
    result = run_cli("check", str(path))
    assert result.returncode == 1 and "configuration is NOT valid" in result.stderr
    assert f"{path}: frontends: no frontend" in result.stderr


async def test_sighup_with_an_empty_file_keeps_everything_running(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            path = write(tmp_path / "w.toml", config_text({"a": port}))
            async with WarrenProcess(path) as warren:
                await warren.start(nursery)
                front = warren.front("fe")
                kept = await trio.open_tcp_stream(*front)
                assert await read_line(kept) == "a"
                write(path, "")  # a tool that truncates, then writes
                warren.signal(signal.SIGHUP)
                failed = await warren.wait_for("config.reload_failed")
                assert any("no frontend" in error for error in failed["errors"])
                assert not [e for e in warren.events if e["event"] == "config.reloaded"]
                fresh = await trio.open_tcp_stream(*front)  # the front port is still open
                assert await read_line(fresh) == "a"
                await kept.send_all(b"still here\n")
                assert await read_line(kept) == "still here"
                await fresh.aclose()
                await kept.aclose()
                assert await warren.stop() == 0
                nursery.cancel_scope.cancel()


async def _reload(app: App, path, text: str) -> bool:
    write(path, text)
    return await app.reload()


async def _start(nursery, path, ports: dict[str, int], maxconn: int | None = None) -> App:
    text = config_text(ports)
    if maxconn is not None:
        text = text.replace('backend = "be"', f'backend = "be"\nmaxconn = {maxconn}')
    app = App(load_config(write(path, text)), handle_signals=False)
    await nursery.start(app.serve)
    return app


async def test_a_reload_removing_every_server_in_use_is_refused_until_their_sessions_end(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ports = {n: await nursery.start(serve_named, n) for n in "ab"}
            path = tmp_path / "w.toml"
            app = await _start(nursery, path, {"a": ports["a"]})
            client = await trio.open_tcp_stream(*app.addresses["fe"][0])
            assert await read_line(client) == "a"

            assert not await _reload(app, path, config_text({"b": ports["b"]}))
            assert app.runtime.server("be", "a").current_sessions == 1  # nothing changed

            answer, ok = execute("shutdown sessions server be/a", app.runtime, 0.0)
            assert ok and answer.startswith("be/a: 1 session(s) killed")
            assert await read_line(client) == ""
            assert await _reload(app, path, config_text({"b": ports["b"]}))
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_a_removed_server_stays_accounted_and_killable_until_its_last_connection_ends(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ports = {n: await nursery.start(serve_named, n) for n in "ab"}
            path = tmp_path / "w.toml"
            app = await _start(nursery, path, ports)
            clients = {}
            while set(clients) != {"a", "b"}:
                stream = await trio.open_tcp_stream(*app.addresses["fe"][0])
                name = await read_line(stream)
                if name in clients:
                    await stream.aclose()
                else:
                    clients[name] = stream
            assert await _reload(app, path, config_text({"b": ports["b"]}))

            backend = next(b for b in app.runtime.statistics().backends if b.name == "be")
            removed = {s.name: s for s in backend.servers}["a"]
            assert removed.status == "REMOVED" and removed.current_sessions == 1
            assert backend.current_sessions == 2
            state, ok = execute("show servers state be", app.runtime, 0.0)
            assert ok and "be a " in state
            answer, ok = execute("shutdown sessions server be/a", app.runtime, 0.0)
            assert ok and answer.startswith("be/a: 1 session(s) killed")
            assert await read_line(clients["a"]) == ""
            await wait_until(lambda: "a" not in app.runtime.backends["be"].retired, timeout=5)
            _, ok = execute("shutdown sessions server be/a", app.runtime, 0.0)
            assert not ok  # gone for good once its last connection ended
            for stream in clients.values():
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_frontend_removed_and_restored_still_counts_its_old_connections(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            path = tmp_path / "w.toml"
            app = await _start(nursery, path, {"a": port}, maxconn=1)
            old = await trio.open_tcp_stream(*app.addresses["fe"][0])
            assert await read_line(old) == "a"
            other = config_text({"a": port}).replace("[frontends.fe]", "[frontends.other]")
            other = other.replace('backend = "be"', 'backend = "be"\nmaxconn = 1')
            assert await _reload(app, path, other)
            (retired,) = [f for f in app.runtime.statistics().frontends if f.name == "fe"]
            assert retired.current_sessions == 1

            restored = config_text({"a": port}).replace('backend = "be"', 'backend = "be"\nmaxconn = 1')
            assert await _reload(app, path, restored)
            frontend = app.runtime.frontends["fe"]
            assert frontend.current == 1  # the old client still holds the one slot
            waiting = await trio.open_tcp_stream(*app.addresses["fe"][0])
            with trio.move_on_after(0.3):
                await read_line(waiting)
                raise AssertionError("a second client was served beyond maxconn = 1")
            await old.aclose()
            assert await read_line(waiting) == "a"  # served once the old client left
            await waiting.aclose()
            nursery.cancel_scope.cancel()


async def test_a_reload_that_needs_a_capability_this_process_lacks_is_refused(tmp_path, monkeypatch):
    # Checked before anything changes, like at start-up: a [vip] added by a
    # reload without CAP_NET_ADMIN/CAP_NET_RAW would only fail in its service.
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            path = tmp_path / "w.toml"
            app = await _start(nursery, path, {"a": port})
            monkeypatch.setattr(privileges, "effective_capabilities", lambda: set())
            vip = '\n[vip.front]\ninterface = "lo"\nvrid = 7\naddresses = ["192.0.2.7/32"]\n'
            with structlog.testing.capture_logs() as logs:
                assert not await _reload(app, path, config_text({"a": port}) + vip)
            (failed,) = [e for e in logs if e["event"] == "config.reload_failed"]
            assert any("vip.front: needs CAP_NET_ADMIN" in error for error in failed["errors"])
            assert app.config.vip == ()
            nursery.cancel_scope.cancel()
