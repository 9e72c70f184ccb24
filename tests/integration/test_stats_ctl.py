"""`warren ctl` over a real UNIX socket: the file, the permissions, the exchange."""

from __future__ import annotations

import io
import os
import socket
import stat
import sys
import tempfile
from dataclasses import replace
from functools import partial

import pytest
import trio
from structlog.testing import capture_logs

from lab import wait_until

from proxy.app import App
from proxy.runtime import AdminState
from proxy.stats_ui.commands import MAX_COMMANDS
from proxy.lograte import RateLimitedLog
from proxy.stats_ui.control import (
    LINE_TIMEOUT, LOG_RATES, MAX_CONNECTIONS, ControlService, ControlSocketError, bind_control_socket, ctl_main,
)
from tests.proxyutil import use_service, connect_and_greet, make_config, read_line, read_to_end, serve_named, server


async def start_with_ctl(nursery, path, names=("a", "b"), brokers_nursery=None, log_clock=None) -> App:
    ports = {name: await (brokers_nursery or nursery).start(serve_named, name) for name in names}
    config = make_config([server(n, p) for n, p in ports.items()])
    config = replace(config, global_=replace(config.global_, control_socket=str(path)))
    app = App(config, handle_signals=False)
    service = ControlService(config)
    if log_clock is not None:
        service.log = RateLimitedLog(service.log._logger, LOG_RATES, clock=log_clock)
    use_service(app, service)
    await nursery.start(app.serve)
    return app


async def ctl(path, *command: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await trio.to_thread.run_sync(partial(ctl_main, str(path), list(command), stdout=out, stderr=err))
    return status, out.getvalue(), err.getvalue()


async def test_socket_is_owner_only_and_removed_at_stop(tmp_path):
    path = tmp_path / "warren.sock"
    with trio.fail_after(20):
        async with trio.open_nursery() as brokers:
            async with trio.open_nursery() as nursery:
                app = await start_with_ctl(nursery, path, brokers_nursery=brokers)
                info = os.stat(path)
                assert stat.S_ISSOCK(info.st_mode)
                assert stat.S_IMODE(info.st_mode) == 0o600
                assert info.st_uid == os.getuid()
                assert not list(tmp_path.glob("*.tmp"))
                app.stop()
            assert not path.exists()
            brokers.cancel_scope.cancel()


async def test_show_commands(tmp_path):
    path = tmp_path / "warren.sock"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await start_with_ctl(nursery, path)
            status, out, _ = await ctl(path, "show", "stat")
            assert status == 0 and out.startswith("# pxname,svname,")
            assert "be,a," in out and "be,BACKEND," in out
            status, out, _ = await ctl(path, "show", "servers", "state")
            assert status == 0 and out.splitlines()[1].split()[:2] == ["be", "a"]
            status, out, _ = await ctl(path, "help")
            assert status == 0 and "set server <b>/<s> state" in out
            status, out, _ = await ctl(path, "show", "vip")
            assert status == 0
            nursery.cancel_scope.cancel()


async def test_set_commands_change_the_runtime(tmp_path):
    path = tmp_path / "warren.sock"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_with_ctl(nursery, path)
            assert (await ctl(path, "set", "server", "be/a", "state", "drain"))[0] == 0
            assert app.runtime.server("be", "a").admin is AdminState.DRAIN
            assert (await ctl(path, "set", "server", "be/a", "state", "maint"))[0] == 0
            assert app.runtime.server("be", "a").admin is AdminState.MAINT
            assert (await ctl(path, "set", "server", "be/b", "weight", "3"))[0] == 0
            assert app.runtime.server("be", "b").weight == 3
            stream, name = await connect_and_greet(app)
            assert name == "b"
            status, out, _ = await ctl(path, "shutdown", "sessions", "server", "be/b")
            assert status == 0 and out == "be/b: 1 session(s) killed\n"
            assert await read_line(stream) == ""
            nursery.cancel_scope.cancel()


async def test_a_client_hammering_the_socket_cannot_flood_the_log_and_changes_are_still_logged(tmp_path):
    path, now = tmp_path / "warren.sock", [0.0]
    burst = LOG_RATES["ctl.command"].burst
    with capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start_with_ctl(nursery, path, log_clock=lambda: now[0])
            for _ in range(burst + 20):
                assert (await ctl(path, "help"))[0] == 0
            assert (await ctl(path, "set", "server", "be/a", "weight", "3"))[0] == 0
            commands = [line for line in logs if line["event"] == "ctl.command"]
            assert len(commands) == burst
            assert [line["weight"] for line in logs if line["event"] == "stats.admin_action"] == [3]
            now[0] += LOG_RATES["ctl.command"].interval
            await wait_until(lambda: any(line.get("summary") for line in logs), timeout=10)
            nursery.cancel_scope.cancel()
    summary = next(line for line in logs if line.get("summary"))
    assert (summary["event"], summary["suppressed"], summary["clients"]) == ("ctl.command", 21, 1)
    assert summary["top_client"] == f"pid {os.getpid()} uid {os.getuid()}"  # `warren ctl` ran in a thread


async def test_errors_give_exit_status_1(tmp_path):
    path = tmp_path / "warren.sock"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await start_with_ctl(nursery, path)
            status, out, _ = await ctl(path, "frobnicate")
            assert status == 1 and out == 'error: unknown command "frobnicate"; try "help"\n'
            status, out, _ = await ctl(path, "set", "server", "be/zz", "state", "drain")
            assert status == 1 and out == "error: no server be/zz\n"
            nursery.cancel_scope.cancel()
    status, _, err = await ctl(path, "help")
    assert status == 1 and "cannot talk to" in err


async def test_a_weight_int_refuses_is_an_error_and_warren_keeps_serving(tmp_path):
    # Regression: "²" passed str.isdigit(), int() raised, and the uncaught
    # ValueError ended the control service and with it the whole process.
    path = tmp_path / "warren.sock"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_with_ctl(nursery, path)
            stream, name = await connect_and_greet(app)
            for weight in ("\u00b2", "\u2460", "9" * 4000):
                status, out, _ = await ctl(path, "set", "server", f"be/{name}", "weight", weight)
                assert status == 1 and out == "error: weight must be a whole number from 0 to 256\n"
            await stream.send_all(b"still here\n")
            assert await read_line(stream) == "still here"
            assert (await ctl(path, "show", "info"))[0] == 0
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_no_answer_at_all_is_a_failure(tmp_path):
    path = str(tmp_path / "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def hang_up():
        peer, _ = listener.accept()
        peer.recv(4096)
        peer.close()

    with listener, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, hang_up)
            status, out, err = await ctl(path, "help")
    assert status == 1 and out == "" and "no answer" in err


def test_usage_errors_give_exit_status_2():
    err = io.StringIO()
    assert ctl_main("/nonexistent", [], stderr=err) == 2
    assert ctl_main("/nonexistent", ["show\nstat"], stderr=err) == 2


async def test_garbage_and_silence_do_not_hurt_the_server(tmp_path):
    path = tmp_path / "warren.sock"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start_with_ctl(nursery, path)
            for payload in (b"\xff\xfe\n", b"x" * 10000 + b"\n", b""):
                stream = await trio.open_unix_socket(str(path))
                async with stream:
                    await stream.send_all(payload)
                    await stream.send_eof()
                    answer = b""
                    while chunk := await stream.receive_some(65536):
                        answer += chunk
                assert payload == b"" or answer.startswith(b"error: ")
            assert (await ctl(path, "help"))[0] == 0
            nursery.cancel_scope.cancel()


async def test_idle_connections_cannot_lock_an_operator_out(tmp_path):
    # 16 idle connections locked `warren ctl` out for 10 s before.
    path = tmp_path / "warren.sock"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start_with_ctl(nursery, path)
            idle = [await trio.open_unix_socket(str(path)) for _ in range(3 * MAX_CONNECTIONS)]
            started = trio.current_time()
            status, out, _ = await ctl(path, "show", "info")
            assert status == 0 and "Name: warren" in out
            assert trio.current_time() - started < LINE_TIMEOUT  # not after an idle one timed out
            # The idle ones are closed: evicted at once, or told off after the line timeout.
            for stream in idle:
                with trio.fail_after(LINE_TIMEOUT + 5):
                    answer = await read_to_end(stream)
                assert answer in (b"", f"error: no command line within {LINE_TIMEOUT:g}s\n\n".encode())
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_line_of_too_many_commands_is_refused_whole(tmp_path):
    path = tmp_path / "warren.sock"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_with_ctl(nursery, path)
            line = ["set", "server", "be/a", "weight", "0;"] * (MAX_COMMANDS + 1)
            status, out, _ = await ctl(path, *line)
            assert status == 1 and out == f"error: at most {MAX_COMMANDS} commands per line\n"
            assert app.runtime.server("be", "a").weight == 1  # none of them ran
            nursery.cancel_scope.cancel()


async def test_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "warren.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: what a killed Warren leaves
    listener, _ = bind_control_socket(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        listener.socket.close()


async def test_live_socket_is_not_stolen(tmp_path):
    path = str(tmp_path / "warren.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen()
    try:
        with pytest.raises(ControlSocketError, match="another process is listening"):
            bind_control_socket(path)
        assert os.path.exists(path)
    finally:
        live.close()


def test_regular_file_is_not_deleted(tmp_path):
    path = tmp_path / "warren.sock"
    path.write_text("precious")
    with pytest.raises(ControlSocketError, match="not a socket"):
        bind_control_socket(str(path))
    assert path.read_text() == "precious"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
async def test_other_users_are_refused_even_if_the_mode_is_loosened():
    directory = tempfile.mkdtemp(prefix="warren-ctl-")  # /tmp: reachable by nobody, unlike tmp_path
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "warren.sock")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await start_with_ctl(nursery, path)
            os.chmod(path, 0o666)
            code = (
                "import os, socket, sys\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                "try:\n"
                "    s.sendall(b'show stat\\n'); s.shutdown(socket.SHUT_WR); data = s.recv(100)\n"
                "except OSError:\n"
                "    data = b''\n"
                "sys.stdout.write(repr(data))\n"
            )
            result = await trio.run_process([sys.executable, "-c", code, str(path)], capture_stdout=True)
            assert result.stdout == b"b''"
            nursery.cancel_scope.cancel()
    os.rmdir(directory)
