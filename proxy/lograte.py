"""Events a remote peer can trigger at will, logged without letting it flood the log.

A refused connection, a failed login or a malformed request deserves a log
line, but a peer can cause thousands a second (500 slow connections to the
stats page once wrote 85,000 warnings in 30 s). :class:`RateLimitedLog`
wraps a structlog logger: each event listed in its `rates` is logged in full
for its first `burst` occurrences of every `interval`, then only counted; one
summary line per interval, under the same stable event name, says how many
were left out (``suppressed``), from how many clients and which client sent
most. Events not listed pass straight through.

Summaries of a finished interval are written by :meth:`RateLimitedLog.flush`,
which the owner's timer calls (and which every event calls first), so a
burst that stops is still summed up. The clock is injected; nothing here
sleeps.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_TRACKED_CLIENTS = 1024  # a spray of addresses costs bounded memory; the rest count as "other"


@dataclass(frozen=True, slots=True)
class Rate:
    burst: int  # occurrences logged in full per interval
    interval: float  # seconds


class _Window:
    __slots__ = ("start", "level", "logged", "suppressed", "clients")

    def __init__(self, start: float, level: str):
        self.start, self.level = start, level
        self.logged = self.suppressed = 0
        self.clients: Counter[str] = Counter()


class RateLimitedLog:
    """A logger with the methods structlog's have; rate-limits the events in `rates`."""

    def __init__(self, logger: Any, rates: Mapping[str, Rate], *, clock: Callable[[], float] = time.monotonic):
        self._logger, self._rates, self._clock = logger, dict(rates), clock
        self._windows: dict[str, _Window] = {}

    def debug(self, event: str, **fields: Any) -> None:
        self._log("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._logger.exception(event, **fields)  # a bug's traceback is never summed up

    def flush(self) -> None:
        """Writes the summary of every finished interval that left events out."""
        now = self._clock()
        for event, window in list(self._windows.items()):
            if now - window.start >= self._rates[event].interval:
                self._summarise(event, window, now)
                del self._windows[event]

    def _log(self, level: str, event: str, fields: dict[str, Any]) -> None:
        rate = self._rates.get(event)
        if rate is None:
            getattr(self._logger, level)(event, **fields)
            return
        self.flush()
        window = self._windows.get(event)
        if window is None:
            window = self._windows[event] = _Window(self._clock(), level)
        if window.logged < rate.burst:
            window.logged += 1
            getattr(self._logger, level)(event, **fields)
            return
        window.suppressed += 1
        client = str(fields.get("client", "?"))
        if client in window.clients or len(window.clients) < MAX_TRACKED_CLIENTS:
            window.clients[client] += 1
        else:
            window.clients["other"] += 1

    def _summarise(self, event: str, window: _Window, now: float) -> None:
        if not window.suppressed:
            return
        top, top_count = window.clients.most_common(1)[0]
        getattr(self._logger, window.level)(
            event, summary=True, suppressed=window.suppressed, seconds=round(now - window.start, 1),
            clients=len(window.clients), top_client=top, top_client_events=top_count,
        )
