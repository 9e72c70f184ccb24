"""Running `warren run` as a real process and following its JSON log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

PYTHON = sys.executable
# Every Warren in a session of its own, as systemd starts a service (and bench/procs.py a
# contender). With the kernel's autogroups (sched_autogroup_enabled, on on this kind of
# machine) a session is one scheduling entity: a Warren left in pytest's session shared one
# fair share of the CPU with pytest, the clients and the other hosts' Warrens. Under load
# 5-9 a VIP master was runnable for 310-440 ms but ran about 0.1 ms in every 5 (a second
# Warren starting in the same group), sent no advert and stepped down, reason "stalled",
# and the backup took over with master_down (test_vip_failover's tracked-backend handover).
OWN_SESSION = {"start_new_session": True}


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Runs `python -m proxy ARGS` to completion (for check / bad input)."""
    return subprocess.run(
        [PYTHON, "-m", "proxy", *args], capture_output=True, text=True, timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
    )


class WarrenProcess:
    """A `warren run` child process; `events` is its parsed JSON log so far."""

    def __init__(self, config_path: Path):
        self.config_path = config_path
        self.events: list[dict] = []
        self.stderr_text: list[str] = []
        self.process: trio.Process | None = None
        self.preexec = None  # runs in the child before exec (e.g. setrlimit)
        self.command = [PYTHON, "-m", "proxy"]  # or a wrapper, e.g. tests.faults
        self.prefix: list[str] = []  # runs Warren through it, e.g. ["ip", "netns", "exec", NS, "setpriv", ...]
        self.env: dict[str, str] | None = None
        self._new_event = trio.Event()

    async def start(self, nursery: trio.Nursery, timeout: float = 30) -> dict:
        """Starts Warren and returns its `warren.started` event."""
        self.process = await trio.lowlevel.open_process(
            [*self.prefix, *self.command, "run", str(self.config_path)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent, preexec_fn=self.preexec, env=self.env, **OWN_SESSION,
        )
        nursery.start_soon(self._read_log)
        return await self.wait_for("warren.started", timeout=timeout)

    async def __aenter__(self) -> WarrenProcess:
        return self

    async def __aexit__(self, *exc_info) -> None:
        """Whatever happened in the test, the child does not outlive it."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()

    def front(self, frontend: str) -> tuple[str, int]:
        started = next(e for e in self.events if e["event"] == "warren.started")
        host, port = started["listeners"][frontend][0].rsplit(":", 1)
        return host.strip("[]"), int(port)

    async def _read_log(self) -> None:
        buffer = b""
        async for chunk in self.process.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                self.stderr_text.append(text)
                try:
                    self.events.append(json.loads(text))
                except ValueError:
                    continue
                self._new_event.set()
                self._new_event = trio.Event()

    async def wait_for(self, name: str, timeout: float = 20, **fields) -> dict:
        """Waits for an event `name` whose fields include `fields`. Raises AssertionError
        if Warren exits first or after `timeout` seconds, naming the `name` events it
        did log (another reason, another instance) and its last lines."""
        with trio.move_on_after(timeout):
            return await self._wait_for(name, **fields)
        others = [e for e in self.events if e.get("event") == name]
        raise AssertionError(f"no {name} {fields} within {timeout} s; {name} events logged: {others}\n"
                             + "\n".join(self.stderr_text[-20:]))

    async def _wait_for(self, name: str, **fields) -> dict:
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                    return event
            seen = len(self.events)
            if self.process.returncode is not None and seen == len(self.events):
                raise AssertionError(f"warren exited ({self.process.returncode}) before {name}:\n"
                                     + "\n".join(self.stderr_text[-20:]))
            with trio.move_on_after(0.2):
                await self._new_event.wait()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout):
            return await self.process.wait()
        self.process.kill()
        await self.process.wait()
        raise AssertionError("warren did not stop on SIGTERM")


def json_global(extra: str = "") -> str:
    return f'[global]\nlog_format = "json"\nlog_level = "info"\n{extra}\n'


def one_server_config(port: int) -> str:
    """A whole configuration: JSON logs, a frontend on a free loopback port, one server at ``port``."""
    return json_global() + f"""
[frontends.fe]
bind = "127.0.0.1:0"
backend = "be"

[backends.be]
servers = [{{ name = "a", address = "127.0.0.1", port = {port} }}]
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o644)
    return path
