"""The canary of publishers with confirms (lab/canary.py) as a trio test drives it.

The canary runs as its own process inside a namespace of the test's NetLab
(killed with it); this class talks its JSON-lines protocol: wait for an
event, ask for the status, stop and get the verdict ("lost" must be 0).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from lab import NetLab, wait_until

REPO = Path(__file__).resolve().parents[1]


class Canary:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    @classmethod
    async def start(cls, net: NetLab, ns: str, url: str, queue: str, *, publishers: int,
                    confirm_timeout: float = 2.0) -> Canary:
        """The canary publishing through ``url`` from namespace ``ns``, once every publisher connected."""
        argv = [sys.executable, "-m", "lab.canary", "--url", url, "--queue", queue,
                "--publishers", str(publishers), "--confirm-timeout", str(confirm_timeout)]
        process = await net.open_process(ns, argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        canary = cls(process)
        await canary.expect("ready", timeout=60)
        return canary

    async def expect(self, event: str, timeout: float = 10) -> dict:
        """The next line announcing ``event`` (earlier lines are skipped)."""
        with trio.fail_after(timeout):
            while True:
                while b"\n" not in self._buffer:
                    chunk = await self.process.stdout.receive_some()
                    if not chunk:
                        raise AssertionError(f"the canary exited before {event!r}")
                    self._buffer += chunk
                line, self._buffer = self._buffer.split(b"\n", 1)
                message = json.loads(line)
                if message["event"] == event:
                    return message

    async def status(self) -> dict:
        """Totals and, under "publishers", each one's confirmed, connections, connected, last_confirm."""
        await self.process.stdin.send_all(b"status\n")
        return await self.expect("status")

    async def all_confirming_since(self, moment: float) -> bool:
        """Every publisher is connected and had a message confirmed after ``moment`` (time.time())."""
        status = await self.status()
        return all(p["connected"] and p["last_confirm"] > moment for p in status["publishers"])

    async def progress_past(self, before: dict | None, what: str, *, by: int = 5, timeout: float = 60,
                            each: bool = True) -> dict:
        """Waits until every publisher confirmed ``by`` more messages than in the
        status ``before`` (None: than nothing); returns the status then.
        ``each=False``: the publishers together confirmed ``by`` more per
        publisher, and every one of them is connected."""
        marks = [p["confirmed"] for p in before["publishers"]] if before else None
        last: list[dict] = []

        async def progressed() -> dict | None:
            status = await self.status()
            last[:] = [status]
            counts = [p["confirmed"] for p in status["publishers"]]
            floors = [(marks[i] if marks else 0) + by for i in range(len(counts))]
            if each:
                done = all(n > floor for n, floor in zip(counts, floors))
            else:
                done = sum(counts) > sum(floors) and all(p["connected"] for p in status["publishers"])
            return status if done else None

        try:
            return await wait_until(progressed, timeout=timeout, interval=0.2, what=f"publishers progressing {what}")
        except AssertionError as error:
            raise AssertionError(f"{error}; the canary's last status: {last[0] if last else None}") from None

    async def stop(self) -> dict:
        """Stops publishing; the canary drains the queue and reports (``lost`` must be 0)."""
        await self.process.stdin.send_all(b"stop\n")
        return await self.expect("done", timeout=120)
