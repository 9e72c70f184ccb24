"""The progress display: one line per measurement, with a count and an ETA.

On a terminal the measurement under way is shown on a status line that the
result then replaces; otherwise (CI logs, pytest) only finished lines are
printed. Everything goes to stderr, so stdout stays free.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts measurements done out of `total` (set by the driver)."""

    def __init__(self, stream: TextIO | None = None, total: int = 0):
        self.stream = stream or sys.stderr
        self.total = total
        self.done_count = 0
        self.started = time.monotonic()
        self.tty = self.stream.isatty()
        self._status_shown = False

    def _prefix(self) -> str:
        elapsed = time.monotonic() - self.started
        eta = ""
        if 0 < self.done_count < self.total:
            eta = f", ~{_clock(elapsed / self.done_count * (self.total - self.done_count))} left"
        width = len(str(self.total))
        return f"[{self.done_count:>{width}}/{self.total} {_clock(elapsed)}{eta}]"

    def _clear_status(self) -> None:
        if self._status_shown:
            self.stream.write("\r\033[K")
            self._status_shown = False

    def begin(self, label: str) -> None:
        """Shows that `label` is being measured (terminal only)."""
        if self.tty:
            self._clear_status()
            self.stream.write(f"{self._prefix()} {label} ...")
            self.stream.flush()
            self._status_shown = True

    def finish(self, label: str, summary: str, *, failed: bool = False) -> None:
        """Counts one measurement and prints its result line."""
        self.done_count += 1
        self._clear_status()
        mark = "FAILED: " if failed else ""
        self.stream.write(f"{self._prefix()} {label}: {mark}{summary}\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line that is not a measurement (a benchmark starting, skipped...)."""
        self._clear_status()
        self.stream.write(f"{message}\n")
        self.stream.flush()
