"""Properties of the `warren ctl` command language on any line.

A line on the control socket is outside input (a script, a paste, a typo):
whatever it holds, every command answers text or an "error: " line, no
command fails inside Warren, and the answer's last line is empty.
"""

from __future__ import annotations

import structlog
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.model import Backend, Config, Server
from proxy.runtime import Runtime
from proxy.stats_ui.commands import MAX_LINE, execute


def runtime() -> Runtime:
    servers = tuple(Server(name=n, address="127.0.0.1", port=5672 + i) for i, n in enumerate(("a", "b")))
    return Runtime(Config(path="<t>", backends=(Backend(name="rabbit", servers=servers),)))


WORDS = ["help", "show", "stat", "info", "servers", "state", "vip", "set", "server", "weight", "shutdown",
         "sessions", "rabbit/a", "rabbit/b", "rabbit/", "/a", "rabbit/zz", "nope/a", "ready", "drain", "maint",
         "READY", "0", "256", "257", "-1", "\u00b2", "9" * 30, "rabbit", ";", '"', "'", "\\", '"rabbit/a"', "#"]
lines = st.one_of(
    st.text(max_size=MAX_LINE + 50),
    st.lists(st.sampled_from(WORDS) | st.text(max_size=6), max_size=14).map(" ".join),
    st.lists(st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join), max_size=6).map(";".join),
)


def check(line: str) -> tuple[str, bool]:
    with structlog.testing.capture_logs() as logs:
        answer, ok = execute(line, runtime(), 100.0)
    assert answer.endswith("\n") and (answer == "\n" or answer.endswith("\n\n"))
    assert "internal error" not in answer, answer
    assert not [event for event in logs if event["log_level"] in ("error", "critical")], logs
    errors = [row for row in answer.splitlines() if row.startswith("error: ")]
    assert ok == (not errors), answer
    return answer, ok


@given(lines)
def test_any_line_answers_text_or_errors_never_an_internal_error(line):
    check(line)


@given(st.sampled_from(["a", "b"]), st.integers(0, 256), st.sampled_from(["ready", "drain", "maint"]))
def test_well_formed_admin_commands_succeed(server, weight, state):
    answer, ok = check(f"set server rabbit/{server} weight {weight}; set server rabbit/{server} state {state}")
    assert ok and f"rabbit/{server}: weight {weight}" in answer and f"rabbit/{server}: {state.upper()}" in answer
