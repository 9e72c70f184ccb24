"""Connection rate: wrk sending `Connection: close`, so every request opens a
new connection through the contender (and the contender one to the responder)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C
from ..model import Metric, Target
from ._http import HttpBenchmark, responder_and_contenders, run_wrk


class ConnRate(HttpBenchmark):
    name = "connrate"
    title = "Connection rate (wrk, Connection: close)"
    description = ("wrk -t2 -c50 with `Connection: close`: one request per connection; new "
                   "connections (= requests) per second.")
    tools = ("wrk", "haproxy")
    metrics = (
        Metric("rate", "new connections", "conn/s", True, 0),
        Metric("cpu", "proxy CPU per connection", "µs", False, 1),
        Metric("cpu_machine", "machine CPU per connection (all processes, kernel workers)", "µs", False, 1,
               compared=False),
    )
    targets = (Target("rate", ">=", 0.75),)

    def seconds(self) -> int:
        return self.mode.pick(8, 3, 1)

    @contextmanager
    def environment(self) -> Iterator[dict[str, C.Contender]]:
        with responder_and_contenders(self) as running:
            yield running

    def measure(self, env: dict[str, C.Contender], contender: str, round_index: int) -> dict[str, float]:
        report = run_wrk(self, "wrk Connection: close", env[contender], self.seconds(),
                         ("-H", "Connection: close"))
        env[contender].check_alive()
        return {key: report[key] for key in ("rate", "cpu", "cpu_machine") if key in report}
