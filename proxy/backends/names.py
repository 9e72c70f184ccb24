"""Keeps servers configured by DNS name pointed at their current addresses.

Names are resolved once before Warren reports itself started, then again every
`resolvers.interval`. A changed address set is applied at once (new
connections go to the new addresses, established ones stay); a failed lookup
keeps the last good addresses. A server whose name never resolved has no
address and takes no connections. The answers outlive a restart of the
service after a crash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ..config.model import Config
from .resolve import Resolver, keep_resolved, literal_ip

if TYPE_CHECKING:
    from ..runtime import Runtime


def server_names(config: Config) -> frozenset[str]:
    return frozenset(
        s.address for b in config.backends for s in b.servers if literal_ip(s.address) is None
    )


class NamesService:
    """A :class:`proxy.supervisor.Service`: DNS for server addresses."""

    name = "dns"

    def __init__(self, config: Config):
        self.config = config
        self.known: dict[str, tuple[str, ...]] = {}
        self._runtime: Runtime | None = None
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None

    async def run(self, runtime: Runtime, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._runtime = runtime
        self._apply_known()  # a restart: what was known before the crash, at once
        try:
            async with trio.open_nursery() as nursery:
                self._nursery, self._scope = nursery, None
                await self._restart()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = self._scope = None

    def reconfigure(self, config: Config) -> None:
        old = self.config
        self.config = config
        if self._runtime is not None:
            self._apply_known()
        changed = server_names(config) != server_names(old) or config.resolvers != old.resolvers
        if changed and self._nursery is not None:  # not running: the next run resolves the new names
            self._nursery.start_soon(self._restart)

    async def _restart(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        names = server_names(self.config)
        if not names:
            return
        settings = self.config.resolvers
        resolver = Resolver(
            [(ns.host, ns.port) for ns in settings.nameservers], timeout=settings.timeout
        )
        self._scope = await self._nursery.start(self._resolve_forever, resolver, names)

    async def _resolve_forever(self, resolver, names, *, task_status) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                initial = await nursery.start(
                    keep_resolved, resolver, names, self.config.resolvers.interval, self._changed
                )
                self.known.update(initial)
                self._apply_known()
                task_status.started(scope)

    def _changed(self, name: str, addresses: tuple[str, ...]) -> None:
        self.known[name] = addresses
        self._apply_known()

    def _apply_known(self) -> None:
        for server in self._runtime.servers():
            addresses = self.known.get(server.config.address)
            if addresses is not None:
                server.addresses = addresses
