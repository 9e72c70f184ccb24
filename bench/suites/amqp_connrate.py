"""AMQP connection rate: full handshakes through the contender to a real broker.

Clients (bench.tools.amqp_connrate, one asyncio process) open a connection,
complete the AMQP 0-9-1 handshake with client properties and a PLAIN login,
close it with Connection.Close / Close-Ok, and start again. Behind Warren
every one of those handshakes is read by its AMQP tap (identity, heartbeat,
limits, the clean close), so this is where inspection would show.

The proxies' CPU per handshake (user + system, /proc/PID/stat) is reported
beside the rate: on a shared machine it moves far less than the rate does.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C
from ..model import Metric, Target
from ..procs import cpu_seconds, read_event, spawn
from ._amqp import contenders_on_one_node
from .base import Benchmark


class AmqpConnRate(Benchmark):
    name = "amqp_connrate"
    title = "AMQP connection rate (full handshakes, RabbitMQ)"
    description = ("WORKERS concurrent clients open a connection through the contender to one RabbitMQ "
                   "node, complete the handshake up to Open-Ok (client properties, PLAIN login), close it "
                   "with Connection.Close / Close-Ok and start again; handshakes per second, and the "
                   "proxy's CPU time (user + system) per handshake.")
    needs_rabbit = True
    metrics = (
        Metric("rate", "handshakes", "conn/s", True, 0),
        Metric("cpu", "proxy CPU per handshake", "µs", False, 0),
        Metric("errors", "failed handshakes", "conn", False, 0, compared=False),
    )
    metric_contenders = {"cpu": ("haproxy", "warren")}  # direct: no proxy (nor any in the smoke test's view)
    targets = (Target("rate", ">=", 0.95),)

    def seconds(self) -> float:
        return self.mode.pick(10, 5, 1)

    def workers(self) -> int:
        return self.mode.pick(20, 20, 4)

    @contextmanager
    def environment(self) -> Iterator[dict[str, C.Contender]]:
        note = (f"{self.workers()} clients for {self.seconds():g} s per measurement; RabbitMQ node {{node}}; "
                "Warren's frontend in mode amqp (every handshake inspected).")
        with contenders_on_one_node(self, note) as running:
            yield running

    def measure(self, env: dict[str, C.Contender], contender: str, round_index: int) -> dict[str, float]:
        host, port = env[contender].address
        argv = [sys.executable, "-m", "bench.tools.amqp_connrate", host, str(port),
                "--workers", str(self.workers()), "--seconds", str(self.seconds())]
        self.remember("clients", argv)
        work = self.lab.dir(self.name, "clients")
        pid = env[contender].pid
        before = cpu_seconds(pid) if pid else None
        with spawn("amqp-connrate", argv, log_path=work / f"{contender}.log", cwd=C.REPO,
                   pipe_stdio=True) as clients:
            done = read_event(clients, "done", timeout=self.seconds() + 60)
        env[contender].check_alive()
        values = {"rate": done["handshakes"] / done["seconds"], "errors": float(done["errors"])}
        if before is not None and done["handshakes"]:
            values["cpu"] = (cpu_seconds(pid) - before) / done["handshakes"] * 1e6
        return values
