"""AMQP connection rate: full handshakes through the contender to a real broker.

Clients (bench.tools.amqp_connrate, one asyncio process) open a connection,
complete the AMQP 0-9-1 handshake with client properties and a PLAIN login,
close it with Connection.Close / Close-Ok, and start again. Behind Warren
every one of those handshakes is read by its AMQP tap (identity, heartbeat,
limits, the clean close), so this is where inspection would show.

The proxies' CPU per handshake (user + system, /proc/PID/stat) is reported
beside the rate: on a shared machine it moves far less than the rate does.
So are the whole machine's (bench/OPTIMISATIONS.md, session 6): the
broker's and the clients' CPU per handshake, the machine's idle share and
its context switches per handshake (/proc/stat), which tell a proxy that
costs the others CPU or leaves the cores idle (latency) from one that only
spends its own.
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
        Metric("broker_cpu", "broker CPU per handshake (beam.smp)", "µs", False, 0, compared=False),
        Metric("client_cpu", "clients' CPU per handshake", "µs", False, 0, compared=False),
        Metric("idle", "machine idle (both cores)", "%", False, 1, compared=False),
        Metric("switches", "context switches per handshake (machine)", "", False, 1, compared=False),
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
        broker = self.lab.rabbit_nodes()[0].beam_pid
        before = cpu_seconds(pid) if pid else None
        broker_before, machine_before = cpu_seconds(broker) if broker else None, _machine()
        with spawn("amqp-connrate", argv, log_path=work / f"{contender}.log", cwd=C.REPO,
                   pipe_stdio=True) as clients:
            done = read_event(clients, "done", timeout=self.seconds() + 60)
        machine_after = _machine()
        env[contender].check_alive()
        values = {"rate": done["handshakes"] / done["seconds"], "errors": float(done["errors"])}
        handshakes = done["handshakes"]
        if handshakes:
            if before is not None:
                values["cpu"] = (cpu_seconds(pid) - before) / handshakes * 1e6
            if broker_before is not None:
                values["broker_cpu"] = (cpu_seconds(broker) - broker_before) / handshakes * 1e6
            values["client_cpu"] = done["cpu_seconds"] / handshakes * 1e6
            (idle0, total0, switches0), (idle1, total1, switches1) = machine_before, machine_after
            values["idle"] = 100 * (idle1 - idle0) / max(1, total1 - total0)
            values["switches"] = (switches1 - switches0) / handshakes
        return values


def _machine() -> tuple[int, int, int]:
    """(idle + iowait ticks, all ticks, context switches) of the whole machine: /proc/stat."""
    lines = open("/proc/stat").read().splitlines()
    ticks = [int(field) for field in lines[0].split()[1:]]
    switches = next(int(line.split()[1]) for line in lines if line.startswith("ctxt "))
    return ticks[3] + ticks[4], sum(ticks), switches

