"""Small request/response: wrk keep-alive, 50 connections, through each
contender to a fast HTTP responder; rate and latency.

Latency added by a proxy is its median (or 99th percentile) minus the direct
connection's in the same round, so a slow spell of the machine cancels out.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C
from ..model import BenchResult, Metric, Target, add_difference
from ._http import HttpBenchmark, responder_and_contenders, run_wrk


class KeepAlive(HttpBenchmark):
    name = "requests"
    title = "Small requests, keep-alive (wrk)"
    description = ("wrk -t2 -c50 with keep-alive through the contender to an HTTP responder answering "
                   "2 bytes; requests per second and latency percentiles (latency added = the "
                   "contender's percentile minus the direct connection's, same round).")
    tools = ("wrk", "haproxy")
    metrics = (
        Metric("rate", "rate", "req/s", True, 0),
        Metric("p50", "p50 latency", "ms", False, 3),
        Metric("p99", "p99 latency", "ms", False, 3),
        Metric("p50_added", "p50 added by proxy", "ms", False, 3),
        Metric("p99_added", "p99 added by proxy", "ms", False, 3),
        Metric("cpu", "proxy CPU per request", "µs", False, 1),
        Metric("cpu_machine", "machine CPU per request (all processes, kernel workers)", "µs", False, 1,
               compared=False),
    )
    targets = (
        Target("rate", ">=", 1.2),
        Target("p50_added", "<=", 1.0),
        # Under this load the direct connection's own p99 (wrk saturating the
        # machine) often exceeds the proxies': "added" is then negative and
        # the absolute p99 is compared instead.
        Target("p99_added", "<=", 2.0, fallback="p99"),
    )

    def seconds(self) -> int:
        return self.mode.pick(8, 3, 1)

    @contextmanager
    def environment(self) -> Iterator[dict[str, C.Contender]]:
        with responder_and_contenders(self) as running:
            yield running

    def measure(self, env: dict[str, C.Contender], contender: str, round_index: int) -> dict[str, float]:
        report = run_wrk(self, "wrk keep-alive", env[contender], self.seconds())
        env[contender].check_alive()
        latency = report["latency_us"]
        values = {"rate": report["rate"], "p50": latency["p50"] / 1000, "p99": latency["p99"] / 1000}
        for key in ("cpu", "cpu_machine"):
            if key in report:
                values[key] = report[key]
        return values

    def after_round(self, result: BenchResult, round_index: int) -> None:
        add_difference(result, round_index, "p50", "p50_added")
        add_difference(result, round_index, "p99", "p99_added")
