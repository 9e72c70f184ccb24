"""A bounded in-memory history of each backend's load, for the page's charts.

The stats service records one sample per backend every few seconds; the page
draws the last `capacity` of them. Throughput is derived from the byte
totals of consecutive snapshots, so nothing on the proxy path has to count
rates. Memory is bounded: `capacity` samples per backend, and backends that
disappear on reload are forgotten.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # monotonic seconds
    sessions: int
    bytes_in_rate: float  # bytes/s from clients to brokers since the previous sample
    bytes_out_rate: float  # bytes/s from brokers to clients


class History:
    def __init__(self, capacity: int = 150):
        self.capacity = capacity
        self._samples: dict[str, deque[Sample]] = {}
        self._totals: dict[str, tuple[float, int, int]] = {}

    def record(self, stats: Any, now: float) -> None:
        """Adds one sample per backend of `stats` (a runtime Statistics snapshot)."""
        present = set()
        for backend in stats.backends:
            present.add(backend.name)
            rate_in, rate_out = self._rates(backend.name, backend.bytes_in, backend.bytes_out, now)
            ring = self._samples.setdefault(backend.name, deque(maxlen=self.capacity))
            ring.append(Sample(now, backend.current_sessions, rate_in, rate_out))
        for name in [n for n in self._samples if n not in present]:
            del self._samples[name]
            self._totals.pop(name, None)

    def samples(self, backend: str) -> tuple[Sample, ...]:
        """Oldest first; empty for a backend never sampled."""
        return tuple(self._samples.get(backend, ()))

    def _rates(self, name: str, bytes_in: int, bytes_out: int, now: float) -> tuple[float, float]:
        previous = self._totals.get(name)
        self._totals[name] = (now, bytes_in, bytes_out)
        if previous is None or now <= previous[0]:
            return 0.0, 0.0
        elapsed = now - previous[0]
        # Totals can shrink when a reload removes a server with its counters.
        return max(0, bytes_in - previous[1]) / elapsed, max(0, bytes_out - previous[2]) / elapsed
