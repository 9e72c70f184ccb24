"""The stats page under a slowloris: a real `warren run`, a real attacker process.

Hundreds of connections that never finish their request head, from many
source addresses or from one, reconnecting as soon as they are closed: a
logged-in operator still gets the page within a bounded time on a fresh
connection, and Warren's log stays small (one summary per interval, not a
line per refused connection: 85,000 warnings in 30 s before).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.proxyutil import dead_port
from tests.statsclient import http
from tests.warrenproc import WarrenProcess, json_global, write

ROOT = Path(__file__).resolve().parents[2]
ATTACK_SECONDS = 14.0  # nearly three header timeouts (5 s)
USER_DEADLINE = 5.0  # a fresh connection, a whole page, behind the flood in the accept queue, on a busy machine


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def config_text() -> str:
    return json_global() + f"""
[frontends.amqp]
bind = "127.0.0.1:0"
backend = "rabbit"

[backends.rabbit]
servers = [{{ name = "a", address = "127.0.0.1", port = {dead_port()}, check = false }}]

[stats]
bind = "127.0.0.1:0"
users = {{ admin = "pw" }}
"""


@pytest.mark.parametrize("sources, per_source", [(300, 1), (1, 300)], ids=["300-addresses", "one-address"])
async def test_a_logged_in_user_gets_the_page_through_a_slowloris_and_the_log_stays_small(
        tmp_path, sources, per_source):
    with trio.fail_after(90):
        async with WarrenProcess(write(tmp_path / "warren.toml", config_text())) as warren, \
                trio.open_nursery() as nursery:
            await warren.start(nursery)
            host, port = (await warren.wait_for("stats.listening"))["address"].rsplit(":", 1)
            address = (host, int(port))
            assert (await http(address)).status == 200  # logged in before the attack (a cached login)
            attacker = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.slowloris", host, port, "--sources", str(sources),
                 "--per-source", str(per_source), "--seconds", str(ATTACK_SECONDS)],
                stdout=subprocess.PIPE, cwd=ROOT)
            try:
                output = attacker.stdout
                line = b""
                while not line.endswith(b"\n") and (byte := await output.receive_some(1)):
                    line += byte
                assert line == b"ready\n"
                lines_before = len(warren.stderr_text)
                cpu_before = cpu_seconds(warren.process.pid)
                began, slowest, answered = trio.current_time(), 0.0, 0
                while trio.current_time() - began < ATTACK_SECONDS - 3:
                    start = trio.current_time()
                    with trio.fail_after(USER_DEADLINE):
                        reply = await http(address)
                    assert reply.status == 200 and b"<!DOCTYPE html>" in reply.body
                    slowest = max(slowest, trio.current_time() - start)
                    answered += 1
                    await trio.sleep(0.25)
                tail = b""
                while chunk := await output.receive_some(4096):
                    tail += chunk
                counts = json.loads(tail.decode().strip().splitlines()[-1])
                cpu = cpu_seconds(warren.process.pid) - cpu_before
            finally:
                if attacker.returncode is None:
                    attacker.kill()
                await attacker.wait()
            log_lines = warren.stderr_text[lines_before:]
            events = [json.loads(text) for text in log_lines]
            print(f"user: {answered} pages, slowest {slowest:.3f}s; attacker: {counts}; "
                  f"warren: {len(log_lines)} log lines, {cpu:.1f}s CPU")
            # The attack really happened: connections were closed and reopened many times.
            assert counts["connects"] > 2 * sources * per_source, counts
            # One summary per event and interval, not a line per connection.
            assert len(log_lines) < 150, [e["event"] for e in events][:50]
            limits = [e for e in events if e["event"] == "stats.connection_limit"]
            assert limits and any(e.get("summary") for e in limits), limits[:3]
            assert not [e for e in events if e["level"] in ("error", "critical")]
            await warren.stop()
