"""The `warren ctl` command language (sans-I/O)."""

from types import SimpleNamespace

import pytest
import structlog

from proxy.config.model import Backend, Config, Server
from proxy.runtime import AdminState, Runtime
from proxy.stats_ui import commands
from proxy.stats_ui.commands import execute


def runtime() -> Runtime:
    servers = tuple(Server(name=n, address="127.0.0.1", port=5672 + i) for i, n in enumerate(("a", "b")))
    return Runtime(Config(path="<t>", backends=(Backend(name="rabbit", servers=servers),)))


def test_help_lists_the_commands():
    answer, ok = execute("help", runtime(), 0.0)
    assert ok and answer.endswith("\n\n")
    for command in ("show stat", "show servers state", "show vip", "set server", "shutdown sessions server"):
        assert command in answer


def test_show_stat_is_the_csv_export():
    answer, ok = execute("show stat", runtime(), 0.0)
    assert ok and answer.startswith("# pxname,svname,")
    assert "rabbit,a," in answer and "rabbit,BACKEND," in answer


def test_show_servers_state():
    rt = runtime()
    rt.server("rabbit", "b").admin = AdminState.DRAIN
    answer, ok = execute("show servers state rabbit", rt, 0.0)
    lines = answer.splitlines()
    assert ok and lines[0].startswith("# be_name srv_name")
    assert lines[1].split()[:7] == ["rabbit", "a", "127.0.0.1", "5672", "UP", "READY", "1"]
    assert lines[2].split()[5] == "DRAIN"
    assert execute("show servers state nope", rt, 0.0) == ('error: no backend "nope"\n\n', False)


def test_show_vip():
    rt = runtime()
    assert "no floating-IP instance" in execute("show vip", rt, 0.0)[0]
    rt.extra_statistics["vip"] = lambda: [SimpleNamespace(
        name="v", state="MASTER", priority=150, vrid=51, interface="eth0", addresses=["10.0.0.1/24"],
        master="10.0.0.2", last_transition=4.2, counters={})]
    answer, ok = execute("show vip", rt, 0.0)
    assert ok and answer.splitlines()[1] == "v MASTER 150 51 eth0 10.0.0.1/24 10.0.0.2 4"


@pytest.mark.parametrize("state", ["drain", "maint", "ready", "DRAIN"])
def test_set_server_state(state):
    rt = runtime()
    rt.server("rabbit", "a").admin = AdminState.MAINT if state == "ready" else AdminState.READY
    answer, ok = execute(f"set server rabbit/a state {state}", rt, 1.0)
    assert ok and answer == f"rabbit/a: {state.upper()}\n\n"
    assert rt.server("rabbit", "a").admin is AdminState(state.upper())


def test_set_server_weight():
    rt = runtime()
    assert execute("set server rabbit/b weight 7", rt, 0.0) == ("rabbit/b: weight 7\n\n", True)
    assert rt.server("rabbit", "b").weight == 7


def test_shutdown_sessions():
    rt = runtime()
    assert execute("shutdown sessions server rabbit/a", rt, 0.0) == ("rabbit/a: 0 session(s) killed\n\n", True)


@pytest.mark.parametrize("line, message", [
    ("bogus", 'unknown command "bogus"; try "help"'),
    ("show", 'unknown command "show"; try "help"'),
    ("set server rabbit/zz state drain", "no server rabbit/zz"),
    ("set server rabbit state drain", 'expected <backend>/<server>, got "rabbit"'),
    ("set server rabbit/a state off", 'state must be "ready", "drain" or "maint"'),
    ("set server rabbit/a weight 300", "weight must be a whole number from 0 to 256"),
    ("set server rabbit/a", "usage: set server <b>/<s> state ready|drain|maint | weight <0-256>"),
    ("shutdown sessions server", "usage: shutdown sessions server <b>/<s>"),
    ('show "unclosed', "cannot parse command: No closing quotation"),
    ("set server rabbit/a weight \u00b2", "weight must be a whole number from 0 to 256"),
    ("set server rabbit/a weight \u2460", "weight must be a whole number from 0 to 256"),
    ("set server rabbit/a weight " + "1" * 4000, "weight must be a whole number from 0 to 256"),
])
def test_errors_answer_one_error_line(line, message):
    assert execute(line, runtime(), 0.0) == (f"error: {message}\n\n", False)


def test_several_commands_on_one_line():
    rt = runtime()
    answer, ok = execute("set server rabbit/a state drain; set server rabbit/b weight 0", rt, 0.0)
    assert ok and answer == "rabbit/a: DRAIN\n\nrabbit/b: weight 0\n\n"
    answer, ok = execute("set server rabbit/a state ready; nope", rt, 0.0)
    assert not ok and rt.server("rabbit", "a").admin is AdminState.READY


def test_overlong_lines_are_refused():
    assert execute("help " + "x" * 5000, runtime(), 0.0)[1] is False


def test_a_failing_command_answers_an_error_and_the_next_one_still_runs(monkeypatch):
    rt = runtime()

    def broken(*args):
        raise RuntimeError("bug")

    monkeypatch.setitem(commands._COMMANDS, ("show", "info"), broken)
    with structlog.testing.capture_logs() as logs:
        answer, ok = execute("show info; set server rabbit/a weight 3", rt, 0.0)
    assert not ok
    assert answer == "error: internal error (logged as ctl.command_failed)\n\nrabbit/a: weight 3\n\n"
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["ctl.command_failed"]
