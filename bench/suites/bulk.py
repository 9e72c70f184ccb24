"""Bulk throughput: iperf3, one stream and four streams, through each contender.

iperf3's control connection and its data connections all pass through the
proxy (TCP mode forwards them like any other connection). The figure is what
the receiver counted (`end.sum_received`), in GB/s (10^9 bytes).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C
from ..model import Metric, Target
from ..procs import ProcessFailed, free_ports, spawn, wait_listening
from .base import Benchmark, MeasureError, run_tool

STREAMS = {"stream1": 1, "streams4": 4}
# The iperf3 server runs one test at a time, and both proxies' health checks
# connect to it too (every 2 s, whichever contender is measured): a client
# arriving while the server handles a check's connection is turned away
# before a byte is measured ("the server is busy", or its control connection
# reset), or while it still finishes the previous contender's test. Such a
# run is tried again after a pause, longer each time (the server tells no
# one when it is free); any other failure is the contender's.
_TURNED_AWAY = ("server is busy", "unable to receive control message")
_PAUSES = (0.5, 1.0, 2.0, 4.0, 8.0)  # seconds before each new attempt
_pause = time.sleep


def parse_iperf3(stdout: str) -> float:
    """GB/s received, from `iperf3 -J` output; MeasureError if it failed."""
    try:
        report = json.loads(stdout)
    except ValueError as error:
        raise MeasureError(f"iperf3 printed no JSON: {stdout[:200]!r}") from error
    if report.get("error"):
        raise MeasureError(f"iperf3: {report['error']}")
    try:
        bits = report["end"]["sum_received"]["bits_per_second"]
    except KeyError as error:
        raise MeasureError("iperf3 JSON has no end.sum_received") from error
    if bits <= 0:
        raise MeasureError("iperf3 received nothing")
    return bits / 8 / 1e9


def run_iperf3(argv: list[str], timeout: float) -> float:
    """GB/s of one iperf3 run, tried again when the server turned it away."""
    for pause in (*_PAUSES, None):
        try:
            return parse_iperf3(run_tool(argv, timeout=timeout))
        except (MeasureError, ProcessFailed) as error:
            if pause is None or not any(sign in str(error) for sign in _TURNED_AWAY):
                raise
        _pause(pause)
    raise AssertionError("unreachable")


class Bulk(Benchmark):
    name = "bulk"
    title = "Bulk throughput (iperf3)"
    description = ("iperf3 through the contender to an iperf3 server: one TCP stream, then four "
                   "parallel streams; GB/s received.")
    tools = ("iperf3",)
    metrics = (
        Metric("stream1", "1 stream", "GB/s", True),
        Metric("streams4", "4 streams", "GB/s", True),
    )
    contenders = C.with_warren_paths(C.CONTENDERS, bulk=True)
    targets = (Target("stream1", ">=", 1.0), Target("streams4", ">=", 1.0))

    def __init__(self, lab) -> None:
        super().__init__(lab)
        self.notes.append(C.warren_path_note(bulk=True))

    def seconds(self) -> int:
        return self.mode.pick(5, 2, 1)

    @contextmanager
    def environment(self) -> Iterator[dict[str, C.Contender]]:
        (port,) = free_ports(1)
        work = self.lab.dir(self.name)
        # --rcv-timeout: a test that stalls (a dead proxy) frees the server.
        server = spawn("iperf3-server", ["iperf3", "-s", "-p", str(port), "--rcv-timeout", "10000"],
                       log_path=work / "iperf3-server.log")
        with server:
            wait_listening(port, server)
            spec = C.ProxySpec(servers=(C.Server("iperf3", port),), bulk=True)
            with C.all_running(self.contenders, spec, work) as running:
                yield running

    def measure(self, env: dict[str, C.Contender], contender: str, round_index: int) -> dict[str, float]:
        host, port = env[contender].address
        values = {}
        for key, streams in STREAMS.items():
            argv = ["iperf3", "-c", host, "-p", str(port), "-P", str(streams), "-t", str(self.seconds()),
                    "-J", "--connect-timeout", "5000"]
            self.remember(f"{streams} stream(s)", argv)
            values[key] = run_iperf3(argv, timeout=self.seconds() + 30)
            env[contender].check_alive()
        return values
