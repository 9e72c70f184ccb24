"""Notify hooks: run an operator's command when an instance changes state.

Contract (docs/vip.md, "Notify hooks"):

- The command configured for the new state (``master``, ``backup``, ``fault``)
  runs as ``argv + [instance, state, priority]``, split like a shell would but
  never run through one. The same values are in the environment as
  ``WARREN_VIP_INSTANCE``, ``WARREN_VIP_STATE``, ``WARREN_VIP_PRIORITY``,
  ``WARREN_VIP_INTERFACE`` and ``WARREN_VIP_ADDRESSES`` (space-separated).
- One instance's hooks run one at a time, in the order of the transitions:
  keepalived launches each script separately, so a slow ``backup`` script can
  finish after the ``master`` script that followed it. Different instances'
  hooks are independent.
- Each run is bounded by ``timeout``; then the command is terminated (SIGTERM,
  SIGKILL 5 s later) and the next queued hook runs. Failures are logged
  (``vip.notify_failed``) and counted; they never affect the election.
- Output is captured (not mixed into Warren's log stream) and its tail logged
  on failure.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
import trio

from proxy.config.model import VipNotify

log = structlog.get_logger("warren.vip")

_OUTPUT_TAIL = 500  # characters of a failed hook's output worth logging


@dataclass(frozen=True, slots=True)
class HookOutcome:
    """How one run ended: ``returncode`` None means it timed out or could not start."""

    returncode: int | None
    output: str = ""
    error: str | None = None


Runner = Callable[[Sequence[str], dict[str, str], float], Awaitable[HookOutcome]]


async def run_command(argv: Sequence[str], env: dict[str, str], timeout: float) -> HookOutcome:
    """Run ``argv`` to completion within ``timeout`` seconds (the real :data:`Runner`)."""
    try:
        with trio.move_on_after(timeout) as scope:
            done = await trio.run_process(
                list(argv), env={**os.environ, **env}, check=False, stdin=subprocess.DEVNULL,
                capture_stdout=True, stderr=subprocess.STDOUT,
            )  # fmt: skip
    except OSError as error:  # not found, not executable
        return HookOutcome(None, error=f"{type(error).__name__}: {error.strerror or error}")
    if scope.cancelled_caught:
        return HookOutcome(None, error="timeout")
    return HookOutcome(done.returncode, done.stdout.decode(errors="replace")[-_OUTPUT_TAIL:])


class Notifier:
    """The hook queue of one instance; :meth:`run` is its worker, :meth:`notify` enqueues."""

    def __init__(
        self,
        instance: str,
        hooks: VipNotify,
        *,
        interface: str = "",
        addresses: Sequence[str] = (),
        runner: Runner = run_command,
    ) -> None:
        self.instance = instance
        self.hooks = hooks
        self.runs = 0
        self.failures = 0
        self._context = {"WARREN_VIP_INTERFACE": interface, "WARREN_VIP_ADDRESSES": " ".join(addresses)}
        self._runner = runner
        self._send, self._receive = trio.open_memory_channel[tuple[str, int]](math.inf)

    def notify(self, state: str, priority: int) -> None:
        """Queue the hook for ``state`` (if one is configured); never blocks."""
        if self.command_for(state) is not None:
            self._send.send_nowait((state, priority))

    def command_for(self, state: str) -> tuple[str, ...] | None:
        return {"master": self.hooks.master, "backup": self.hooks.backup, "fault": self.hooks.fault}.get(state)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run queued hooks in order, one at a time, until cancelled."""
        task_status.started()
        async for state, priority in self._receive:
            await self._run_one(state, priority)

    async def _run_one(self, state: str, priority: int) -> None:
        command = self.command_for(state)
        assert command is not None
        argv = [*command, self.instance, state, str(priority)]
        env = {
            **self._context,
            "WARREN_VIP_INSTANCE": self.instance,
            "WARREN_VIP_STATE": state,
            "WARREN_VIP_PRIORITY": str(priority),
        }
        started = time.monotonic()
        outcome = await self._runner(argv, env, self.hooks.timeout)
        self.runs += 1
        elapsed = round(time.monotonic() - started, 3)
        if outcome.returncode == 0:
            log.info("vip.notify_ran", instance=self.instance, state=state, command=command[0], seconds=elapsed)
            return
        self.failures += 1
        log.warning(
            "vip.notify_failed", instance=self.instance, state=state, command=command[0],
            returncode=outcome.returncode, error=outcome.error, output=outcome.output, seconds=elapsed,
        )  # fmt: skip
