"""The floating-IP service: every ``[vip.<name>]`` instance, beside the proxy.

A :class:`proxy.supervisor.Service`. It starts last, once every listener is bound, so
a host only competes for the address when it can serve it (listeners set
IP_FREEBIND, so a standby listens on the VIP before it owns it). On SIGTERM
:meth:`VipService.stopping` runs before the listeners close: masters send
priority 0 and remove their addresses, so clients go to the peer instead of
to a closed port.

Each instance runs under its own supervisor (``vip.<name>`` on the stats
page): an instance that crashes gives its address up on the way out (a
priority-0 advert, then the addresses removed; see
:meth:`VipInstance.run`), so two hosts never both hold it, and a fresh
instance starts again as a backup after the restart delay. The other
instances are untouched.

Reload: an instance whose section is unchanged keeps running untouched; a
changed one hands over like a graceful stop and starts again with its new
settings; a removed one stops; a new one starts.

State goes to the runtime model as ``runtime.extra_statistics["vip"]``: a
callable returning a tuple of :class:`VipStats`, one per instance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import structlog
import trio

from proxy.config.model import Config, Vip
from proxy.supervisor import RestartPolicy, Supervisor
from proxy.vip.instance import VipInstance, VipStats
from proxy.vip.links import LinkServer
from proxy.vip.rawsock import LinuxPlumbing, Plumbing

if TYPE_CHECKING:
    from proxy.runtime import Runtime

__all__ = ["VipService", "VipStats"]

log = structlog.get_logger("warren.vip")

STOP_BUDGET = 4.0  # within the app's 5 s pre-stop budget


@dataclass
class _Running:
    """One configured instance: its supervisor, the scope that ends it, its current incarnation."""

    vip: Vip
    supervisor: Supervisor | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    instance: VipInstance | None = None


class VipService:
    """Runs one supervised :class:`VipInstance` per configured section; see the module docstring."""

    name = "vip"

    def __init__(self, config: Config, *, plumbing: Plumbing | None = None,
                 restart_policy: RestartPolicy | None = None, peer_links: bool | None = None) -> None:
        self.config = config
        self._plumbing = plumbing or LinuxPlumbing()
        # The peer link is real TCP: by default only beside the real host's plumbing, so a
        # test's fake host never sends a SYN to its imaginary peers.
        self._peer_links = isinstance(self._plumbing, LinuxPlumbing) if peer_links is None else peer_links
        self._links: LinkServer | None = None
        self._restart_policy = restart_policy
        self._runtime: Runtime | None = None
        self._nursery: trio.Nursery | None = None
        self._running: dict[str, _Running] = {}
        self._swapping = trio.Lock()  # two quick reloads: swaps of one instance never interleave

    async def run(self, runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._runtime = runtime
        runtime.extra_statistics["vip"] = self.statistics
        try:
            async with trio.open_nursery() as nursery:
                if self._peer_links:
                    self._links = LinkServer()
                    await nursery.start(self._links.run)
                self._nursery = nursery
                for vip in self.config.vip:
                    await self._start(vip)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = self._links = None
            for running in self._running.values():
                self._forget(running)
            self._running.clear()

    def reconfigure(self, config: Config) -> None:
        old = {vip.name: vip for vip in self.config.vip}
        new = {vip.name: vip for vip in config.vip}
        self.config = config
        if self._nursery is None:  # not running: the next run starts from the new config
            return
        for name in old.keys() | new.keys():
            if old.get(name) != new.get(name):
                self._nursery.start_soon(self._swap, name, new.get(name))

    async def stopping(self) -> None:
        """Hand every address over before the proxy stops accepting (bounded here too)."""
        with trio.move_on_after(STOP_BUDGET):
            async with trio.open_nursery() as nursery:
                for running in self._running.values():
                    if running.instance is not None:
                        nursery.start_soon(running.instance.stop)

    def statistics(self) -> tuple[VipStats, ...]:
        return tuple(r.instance.statistics() for r in self._running.values() if r.instance is not None)

    async def _start(self, vip: Vip) -> None:
        assert self._nursery is not None and self._runtime is not None
        running = _Running(vip)
        running.supervisor = Supervisor(
            f"vip.{vip.name}", partial(self._run_instance, running), policy=self._restart_policy,
            registry=self._runtime.supervisors,
        )  # fmt: skip
        self._running[vip.name] = running
        await self._nursery.start(self._supervise, running)

    @staticmethod
    async def _supervise(running: _Running, *, task_status: trio.TaskStatus[None]) -> None:
        assert running.supervisor is not None
        with running.scope:
            await running.supervisor.run(task_status=task_status)

    async def _run_instance(self, running: _Running, *, task_status: trio.TaskStatus[None]) -> None:
        """One incarnation of an instance: a fresh machine, starting as a backup (or owner)."""
        running.instance = VipInstance(
            running.vip, plumbing=self._plumbing, health=self._health_of(running.vip.track), links=self._links
        )
        await running.instance.run(task_status=task_status)

    async def _swap(self, name: str, vip: Vip | None) -> None:
        """Replace (or just remove, when ``vip`` is None) the instance called ``name``."""
        async with self._swapping:
            running = self._running.pop(name, None)
            if running is not None:
                if running.instance is not None:
                    with trio.move_on_after(STOP_BUDGET):
                        await running.instance.stop()
                running.scope.cancel()
                self._forget(running)
            if vip is not None:
                await self._start(vip)
        log.info("vip.reconfigured", instance=name, running=vip is not None)

    def _forget(self, running: _Running) -> None:
        if running.supervisor is not None and self._runtime is not None:
            self._runtime.supervisors.remove(running.supervisor)

    def _health_of(self, backend: str | None) -> Callable[[], bool] | None:
        if backend is None:
            return None
        runtime = self._runtime
        assert runtime is not None
        return partial(runtime.backend_available, backend)  # looked up each time: reloads replace it
