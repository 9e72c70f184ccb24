"""Which relay path this process uses, chosen once at start-up.

``[global] relay``: ``auto`` (the default) takes the kernel path where its
self-test passes on this machine (:func:`proxy.io.sockmap.probe`: the
capabilities, the kernel's support, and the behaviour Warren relies on,
proven on a loopback pair) and finds no hazard (a kernel that relays a
retransmitted segment's overlap twice, :func:`proxy.io.sockmap.overlap_hazard`),
else splice with one warning saying why; ``kernel`` insists (start-up
fails with the reason; a hazard is logged, and shown with the path,
``relay.kernel_hazard``); ``splice`` and
``copy`` are taken as asked (splice falls back to copy where the kernel
cannot splice). A frontend with ``bulk = true`` is relayed with splice (or
copy) even when the kernel path is in use. A connection's path is chosen
when it is relayed; on the kernel path a TCP connection starts on
splice/copy and moves into the socket map once, after ``[global]
kernel_after`` quiet rounds (proxy.io.kernel_relay.hand_over), and never
leaves it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import structlog

from ..config.model import Config, RelayPath
from ..errors import StartupError
from ..io import sockmap
from ..io.pipes import PipePool, splice_supported

log = structlog.get_logger("warren.relay")

_MIN_CAPACITY = 4096
_MAX_CAPACITY = 1 << 20


@dataclass
class RelayChoice:
    """The path in use (``kernel``, ``splice`` or ``copy``), what it needs,
    and why it is not the one asked for, or the hazard of the kernel path
    taken where asked for (empty when neither)."""

    path: str
    pipes: PipePool | None
    sockmap: sockmap.Sockmap | None
    reason: str = ""
    required_but_unavailable: bool = False

    def check(self) -> None:
        """Raises StartupError if the configuration insists on a path this
        machine cannot give."""
        if self.required_but_unavailable:
            raise StartupError(f'relay = "kernel": the {self.reason}')

    def describe(self) -> str:
        """One line for the stats page and `warren ctl show info`."""
        bulk = " (bulk frontends: splice)" if self.path == "kernel" and self.pipes is not None else ""
        return f"{self.path}{bulk}" + (f" — {self.reason}" if self.reason else "")

    def close(self) -> None:
        if self.pipes is not None:
            self.pipes.close()
        if self.sockmap is not None:
            self.sockmap.close()

    def close_if_idle(self) -> None:
        """Release the pipes and the socket map once no connection uses
        them (a connection still relayed after a stop keeps them)."""
        in_use = (self.pipes is not None and self.pipes.statistics().in_use) or (
            self.sockmap is not None and self.sockmap.pairs
        )
        if not in_use:
            self.close()


def choose_relay(config: Config, *, splice: bool | None = None) -> RelayChoice:
    """The relay path for `config` on this machine; `splice=False` forbids
    splice (``warren run --no-splice``). When the kernel path is required
    and unavailable, the choice falls back but carries the problem
    (``required_but_unavailable``): the App refuses to start with it."""
    wanted = config.global_.relay
    splice_ok = splice_supported() if splice is None else splice
    pipes = PipePool() if splice_ok and wanted is not RelayPath.COPY else None
    fallback = "splice" if pipes is not None else "copy"
    if wanted in (RelayPath.AUTO, RelayPath.KERNEL):
        availability = _probe()
        if availability.available and (wanted is RelayPath.KERNEL or not availability.hazard):
            capacity = _capacity(config)
            if availability.hazard:
                log.warning("relay.kernel_hazard", hazard=availability.hazard)
            log.info("relay.path", path="kernel", attach=availability.attach, capacity=capacity,
                     repaired=availability.repaired)  # fmt: skip
            return RelayChoice("kernel", pipes, sockmap.Sockmap(capacity), availability.hazard)
        if not availability.available and wanted is RelayPath.KERNEL:
            return RelayChoice(fallback, pipes, None, f"kernel path unavailable: {availability.reason}",
                               required_but_unavailable=True)  # fmt: skip
        if availability.available:
            reason = f"kernel path not chosen automatically: {availability.hazard}"
        else:
            reason = f"kernel path unavailable: {availability.reason}"
        log.warning("relay.fallback", path=fallback, reason=reason)
        return RelayChoice(fallback, pipes, None, reason)
    if wanted is RelayPath.SPLICE and pipes is None:
        log.warning("relay.fallback", path="copy", reason="splice(2) unavailable")
        return RelayChoice("copy", None, None, "splice(2) unavailable")
    log.info("relay.path", path=fallback)
    return RelayChoice(fallback, pipes, None)


@functools.cache
def _probe() -> sockmap.Availability:
    """The self-test, once per process (the kernel does not change)."""
    return sockmap.probe()


def _capacity(config: Config) -> int:
    """Sockets the map holds: two per connection the frontends may hold at
    once, with room for frontends a reload adds (beyond it, a connection is
    relayed by splice)."""
    connections = sum(frontend.maxconn for frontend in config.frontends)
    return max(_MIN_CAPACITY, min(_MAX_CAPACITY, 4 * connections))
