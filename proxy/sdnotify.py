"""systemd's notify protocol and watchdog (``Type=notify``, ``WatchdogSec=``).

The service sends newline-separated ``KEY=VALUE`` datagrams to the AF_UNIX
socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
namespace; see sd_notify(3)). Warren says:

- ``READY=1`` once every listener is bound and every service started;
- ``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC in microseconds,
  required by ``Type=notify-reload``) when a SIGHUP reload begins, and
  ``READY=1`` when it is over, whether the new file was taken or refused;
- ``STOPPING=1`` when a graceful stop begins;
- ``STATUS=`` a one-line summary (servers up, VIP state, sessions), with each
  of the above and every few seconds;
- ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` from a trio task: pings come
  from the event loop itself, so a loop that is stuck (a blocking call, a
  busy loop) stops pinging and systemd restarts the service.

Without ``$NOTIFY_SOCKET`` (not started by systemd) every call does nothing.
Sending never raises: a full or vanished socket costs one warning.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
import trio

log = structlog.get_logger("warren.systemd")

STATUS_EVERY = 10.0  # seconds between STATUS= updates without a watchdog


def message(**fields: Any) -> bytes:
    """``READY=1\\nSTATUS=...`` from keyword arguments (values on one line each)."""
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd compares it (not trio's clock)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), or None when no watchdog is asked of us."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 2 / 1_000_000


def status_line(stats: Any) -> str:
    """One line for ``systemctl status``: "servers up 3/3; vip front MASTER; sessions 12"."""
    servers = [server for backend in stats.backends for server in backend.servers]
    up = sum(1 for server in servers if server.up)
    parts = [f"servers up {up}/{len(servers)}"]
    vips = (stats.extra or {}).get("vip") or ()
    parts += [f"vip {instance.name} {instance.state}" for instance in vips]
    parts.append(f"sessions {sum(frontend.current_sessions for frontend in stats.frontends)}")
    return "; ".join(parts)


def _address(name: str) -> str | bytes:
    return "\0" + name[1:] if name.startswith("@") else name


class Notifier:
    """Talks to systemd's notify socket; a no-op when there is none (see the module docstring)."""

    def __init__(self, socket_name: str | None, watchdog: float | None = None) -> None:
        self.socket_name = socket_name or None
        self.watchdog = watchdog if self.socket_name else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        return cls(environ.get("NOTIFY_SOCKET"), watchdog_interval(environ, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.socket_name is not None

    def send(self, **fields: Any) -> None:
        if self.socket_name is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message(**fields), _address(self.socket_name))
        except OSError as error:
            if not self._warned:  # once: a missing notify socket must not flood the log
                log.warning("systemd.notify_failed", socket=self.socket_name, error=str(error))
                self._warned = True

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS="reloading the configuration")

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping: draining connections")

    async def keep_alive(self, status: Callable[[], str]) -> None:
        """Pings the watchdog (if asked to) and refreshes STATUS=, from the event loop, forever."""
        if self.socket_name is None:
            return
        interval = min(self.watchdog or STATUS_EVERY, STATUS_EVERY)
        next_status = trio.current_time() + STATUS_EVERY
        while True:
            if self.watchdog is not None:
                self.send(WATCHDOG=1)
            if trio.current_time() >= next_status:
                self.send(STATUS=status())
                next_status = trio.current_time() + STATUS_EVERY
            await trio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
