"""The floating-IP service: every ``[vip.<name>]`` instance, beside the proxy.

A :class:`proxy.app.Service`. It starts last, once every listener is bound, so
a host only competes for the address when it can serve it (listeners set
IP_FREEBIND, so a standby listens on the VIP before it owns it). On SIGTERM
:meth:`VipService.stopping` runs before the listeners close: masters send
priority 0 and remove their addresses, so clients go to the peer instead of
to a closed port.

Reload: an instance whose section is unchanged keeps running untouched; a
changed one hands over like a graceful stop and starts again with its new
settings; a removed one stops; a new one starts.

State goes to the runtime model as ``runtime.extra_statistics["vip"]``: a
callable returning a tuple of :class:`VipStats`, one per instance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
import trio

from proxy.config.model import Config, Vip
from proxy.vip.instance import VipInstance, VipStats
from proxy.vip.rawsock import LinuxPlumbing, Plumbing

if TYPE_CHECKING:
    from proxy.app import App
    from proxy.runtime import Runtime

__all__ = ["VipService", "VipStats"]

log = structlog.get_logger("warren.vip")

STOP_BUDGET = 4.0  # within the app's 5 s pre-stop budget


class VipService:
    """Runs one :class:`VipInstance` per configured section; see the module docstring."""

    def __init__(self, config: Config, *, plumbing: Plumbing | None = None) -> None:
        self.config = config
        self._plumbing = plumbing or LinuxPlumbing()
        self._runtime: Runtime | None = None
        self._nursery: trio.Nursery | None = None
        self._running: dict[str, tuple[VipInstance, trio.CancelScope]] = {}
        self._swapping = trio.Lock()  # two quick reloads: swaps of one instance never interleave

    async def run(self, app: App, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._runtime = app.runtime
        app.runtime.extra_statistics["vip"] = self.statistics
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for vip in self.config.vip:
                await self._start(vip)
            task_status.started()
            await trio.sleep_forever()

    def reconfigure(self, config: Config) -> None:
        old = {vip.name: vip for vip in self.config.vip}
        new = {vip.name: vip for vip in config.vip}
        self.config = config
        if self._nursery is None:
            return
        for name in old.keys() | new.keys():
            if old.get(name) != new.get(name):
                self._nursery.start_soon(self._swap, name, new.get(name))

    async def stopping(self) -> None:
        """Hand every address over before the proxy stops accepting (bounded here too)."""
        with trio.move_on_after(STOP_BUDGET):
            async with trio.open_nursery() as nursery:
                for instance, _ in self._running.values():
                    nursery.start_soon(instance.stop)

    def statistics(self) -> tuple[VipStats, ...]:
        return tuple(instance.statistics() for instance, _ in self._running.values())

    async def _start(self, vip: Vip) -> None:
        assert self._nursery is not None
        instance = VipInstance(vip, plumbing=self._plumbing, health=self._health_of(vip.track))
        scope = await self._nursery.start(self._run_instance, instance)
        self._running[vip.name] = (instance, scope)

    @staticmethod
    async def _run_instance(instance: VipInstance, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            await instance.run(task_status=_StartedWith(task_status, scope))

    async def _swap(self, name: str, vip: Vip | None) -> None:
        """Replace (or just remove, when ``vip`` is None) the instance called ``name``."""
        async with self._swapping:
            running = self._running.pop(name, None)
            if running is not None:
                instance, scope = running
                with trio.move_on_after(STOP_BUDGET):
                    await instance.stop()
                scope.cancel()
            if vip is not None:
                await self._start(vip)
        log.info("vip.reconfigured", instance=name, running=vip is not None)

    def _health_of(self, backend: str | None) -> Callable[[], bool] | None:
        if backend is None:
            return None

        def has_a_server() -> bool:
            assert self._runtime is not None
            runtime = self._runtime.backends.get(backend)  # looked up each time: reloads replace it
            return runtime is not None and bool(runtime.candidates())

        return has_a_server


class _StartedWith:
    """Reports ``value`` when the wrapped task reports started (a cancel scope, here)."""

    def __init__(self, task_status: trio.TaskStatus, value: object) -> None:
        self._task_status, self._value = task_status, value

    def started(self, value: object = None) -> None:
        self._task_status.started(self._value)
