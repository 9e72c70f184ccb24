"""The `warren` command as operators use it: check, run, bad input, signals."""

import signal
import socket

import trio

from tests.proxyutil import read_line, serve_named
from tests.warrenproc import WarrenProcess, json_global, run_cli, write

BACKEND = """
[frontends.fe]
bind = "127.0.0.1:{front}"
backend = "be"

[backends.be]
retries = 1
{servers}
"""

SERVER = """
[[backends.be.servers]]
name = "{name}"
address = "127.0.0.1"
port = {port}
"""


def config_text(servers: dict[str, int], front: int = 0, extra_global: str = "") -> str:
    body = "".join(SERVER.format(name=n, port=p) for n, p in servers.items())
    return json_global(extra_global) + BACKEND.format(front=front, servers=body)


def test_check_accepts_the_shipped_configs():
    for path in ("conf/warren.toml", "conf/examples/haproxy-classic.toml"):
        result = run_cli("check", path)
        assert result.returncode == 0, result.stderr
        assert "configuration is valid" in result.stdout


def test_check_lists_every_error_with_line_and_key(tmp_path):
    text = config_text({"a": 70000}).replace('retries = 1', 'retries = "x"\nbalanse = "first"')
    path = write(tmp_path / "bad.toml", text)
    lines = text.splitlines()
    retries_line = lines.index('retries = "x"') + 1
    port_line = lines.index("port = 70000") + 1
    result = run_cli("check", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "backends.be.servers[0].port" in result.stderr and "70000" in result.stderr
    assert "backends.be.retries" in result.stderr
    assert "backends.be.balanse" in result.stderr and 'did you mean "balance"' in result.stderr
    assert f"{path}:{retries_line}: backends.be.retries" in result.stderr
    assert f"{path}:{port_line}: backends.be.servers[0].port" in result.stderr


def test_run_refuses_missing_file_and_syntax_errors(tmp_path):
    missing = run_cli("run", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr
    broken = write(tmp_path / "broken.toml", "[frontends.fe\nbind = 1\n")
    result = run_cli("run", str(broken))
    assert result.returncode == 1 and f"{broken}:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_a_port_already_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(tmp_path / "w.toml", config_text({"a": 5672}, front=port))
        result = run_cli("run", str(path))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_a_stats_port_already_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stats = f'\n[stats]\nbind = "127.0.0.1:{port}"\nusers = {{ admin = "admin" }}\n'
        path = write(tmp_path / "w.toml", config_text({"a": 5672}) + stats)
        result = run_cli("run", str(path))
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


CLEAR_STATS = '\n[stats]\nbind = "127.0.0.1:0"\nusers = { admin = "pw" }\n'


def test_check_warns_of_a_clear_text_password_with_its_line_and_still_succeeds(tmp_path):
    text = config_text({"a": 5672}) + CLEAR_STATS
    path = write(tmp_path / "w.toml", text)
    line = text.splitlines().index('users = { admin = "pw" }') + 1
    result = run_cli("check", str(path))
    assert result.returncode == 0 and "configuration is valid" in result.stdout
    assert result.stderr.startswith(f"{path}:{line}: warning: stats.users.admin: password stored in clear text")
    assert '"pw"' not in result.stderr  # never the password itself


async def test_run_warns_of_a_clear_text_password_at_start_up(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            path = write(tmp_path / "w.toml", config_text({"a": 5672}) + CLEAR_STATS)
            async with WarrenProcess(path) as warren:
                await warren.start(nursery)
                event = next(e for e in warren.events if e["event"] == "config.warning")
                assert event["level"] == "warning" and "stats.users.admin: password stored in clear text" in (
                    event["warning"])
                assert not any('"pw"' in line or "=pw" in line for line in warren.stderr_text)
                assert await warren.stop() == 0
            nursery.cancel_scope.cancel()


def test_usage_error_without_a_command():
    assert run_cli().returncode == 2


async def test_sighup_adds_and_removes_servers_while_connections_stay(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            ports = {n: await nursery.start(serve_named, n) for n in "abc"}
            path = write(tmp_path / "w.toml", config_text({"a": ports["a"], "b": ports["b"]}))
            async with WarrenProcess(path) as warren:
                await warren.start(nursery)
                front = warren.front("fe")
                kept = []
                for _ in range(4):
                    stream = await trio.open_tcp_stream(*front)
                    kept.append((stream, await read_line(stream)))
                assert {name for _, name in kept} == {"a", "b"}

                write(path, config_text({"b": ports["b"], "c": ports["c"]}))
                warren.signal(signal.SIGHUP)
                event = await warren.wait_for("config.reloaded")
                assert event["servers_added"] == ["be/c"] and event["servers_removed"] == ["be/a"]
                names = set()
                for _ in range(4):
                    stream = await trio.open_tcp_stream(*front)
                    names.add(await read_line(stream))
                    await stream.aclose()
                assert names == {"b", "c"}
                for stream, name in kept:  # established connections survived, even to "a"
                    await stream.send_all(b"hello\n")
                    assert await read_line(stream) == "hello"

                write(path, config_text({"b": ports["b"]}).replace("retries = 1", "retries = -1"))
                warren.signal(signal.SIGHUP)
                failed = await warren.wait_for("config.reload_failed")
                assert any("backends.be.retries" in e for e in failed["errors"])
                stream = await trio.open_tcp_stream(*front)  # old config still in force
                assert await read_line(stream) in {"b", "c"}
                await stream.aclose()
                for stream, _ in kept:
                    await stream.aclose()
                assert await warren.stop() == 0
                nursery.cancel_scope.cancel()


async def test_sigterm_drains_then_exits_zero(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            path = write(tmp_path / "w.toml", config_text({"a": port}, extra_global='grace = "30s"'))
            async with WarrenProcess(path) as warren:
                await warren.start(nursery)
                front = warren.front("fe")
                stream = await trio.open_tcp_stream(*front)
                assert await read_line(stream) == "a"
                warren.signal(signal.SIGTERM)
                await warren.wait_for("warren.stopping", live_connections=1)
                try:
                    refused = await trio.open_tcp_stream(*front)
                except OSError:
                    pass
                else:
                    raise AssertionError(f"listener still open after SIGTERM: {refused}")
                await stream.send_all(b"still served\n")
                assert await read_line(stream) == "still served"
                await stream.aclose()  # the last connection ends: Warren exits before the grace
                assert await warren.process.wait() == 0
                closed = [e for e in warren.events if e["event"] == "connection.closed"]
                assert closed and closed[0]["termination"] == "--"
                nursery.cancel_scope.cancel()


async def test_sigterm_closes_what_outlives_the_grace(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            path = write(tmp_path / "w.toml", config_text({"a": port}, extra_global='grace = "300ms"'))
            async with WarrenProcess(path) as warren:
                await warren.start(nursery)
                stream = await trio.open_tcp_stream(*warren.front("fe"))
                assert await read_line(stream) == "a"
                assert await warren.stop() == 0
                assert await stream.receive_some(10) == b""
                closed = [e for e in warren.events if e["event"] == "connection.closed"]
                assert closed[0]["termination"] == "KD"
                nursery.cancel_scope.cancel()
