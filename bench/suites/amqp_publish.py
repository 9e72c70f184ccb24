"""AMQP publish with confirms: pika publishing persistent messages through the
contender to a real RabbitMQ node, with a consumer (also through it) draining
the queue at the same time.

The publish rate (messages confirmed per second: pika's BlockingChannel
waits for each confirm, so this is dominated by round trips, which is where a
proxy shows), the percentiles of one publish's round trip, the end-to-end
rate (messages consumed per second, from the first publish to the last
delivery), and the proxy's CPU per message (user + system, its publisher and
consumer traffic together: four relayed messages per published one).
"""

from __future__ import annotations

import itertools
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C
from ..model import Metric, Target
from ..procs import cpu_seconds, machine_cpu_seconds, read_event, spawn
from ._amqp import contenders_on_one_node
from .base import Benchmark

_queues = itertools.count(1)


class AmqpPublish(Benchmark):
    name = "amqp"
    title = "AMQP publish with confirms (pika, RabbitMQ)"
    description = ("pika publishes COUNT persistent 1 kB messages with publisher confirms (one at a "
                   "time) to a durable queue while a second pika client consumes and acks them, both "
                   "through the contender to one RabbitMQ node.")
    python_modules = ("pika",)
    needs_rabbit = True
    metrics = (
        Metric("publish", "publish rate (confirmed)", "msg/s", True, 0),
        Metric("p50", "publish round trip p50", "ms", False, 3),
        Metric("p99", "publish round trip p99", "ms", False, 3),
        Metric("e2e", "end-to-end rate (consumed)", "msg/s", True, 0),
        Metric("cpu", "proxy CPU per message", "µs", False, 1),
        Metric("cpu_machine", "machine CPU per message (all processes, kernel workers)", "µs", False, 1,
               compared=False),
    )
    contenders = C.with_warren_paths(C.CONTENDERS)
    metric_contenders = {"cpu": tuple(c for c in contenders if c != "direct")}  # direct: no proxy
    targets = (Target("publish", ">=", 0.95, baseline="direct"), Target("publish", ">=", 1.0))

    client_flags: tuple[str, ...] = ()  # the AMQPS variant adds --tls

    def count(self) -> int:
        return self.mode.pick(4000, 1500, 50)

    def tls_crt(self) -> str | None:
        return None

    @contextmanager
    def environment(self) -> Iterator[dict[str, C.Contender]]:
        note = f"{self.count()} messages per measurement; RabbitMQ node {{node}}."
        # wait_routes_to speaks plain AMQP: an AMQPS client is proven by the measurement itself.
        with contenders_on_one_node(self, note, tls_crt=self.tls_crt(), check_routes=not self.client_flags) as running:
            yield running

    def measure(self, env: dict[str, C.Contender], contender: str, round_index: int) -> dict[str, float]:
        host, port = env[contender].address
        queue = f"bench-{os.getpid()}-{next(_queues)}"
        work = self.lab.dir(self.name, "clients")
        common = [host, str(port), queue, str(self.count()), *self.client_flags]
        consume = [sys.executable, "-m", "bench.tools.amqp_pubsub", "consume", *common]
        publish = [sys.executable, "-m", "bench.tools.amqp_pubsub", "publish", *common, "--size", "1024"]
        self.remember("consumer", consume)
        self.remember("publisher", publish)
        timeout = 60 + self.count() / 50
        pid = env[contender].pid
        with spawn("consumer", consume, log_path=work / "consumer.log", cwd=C.REPO, pipe_stdio=True) as consumer:
            read_event(consumer, "ready", timeout=30)
            proxy_before = cpu_seconds(pid) if pid else None
            machine_before = machine_cpu_seconds()
            with spawn("publisher", publish, log_path=work / "publisher.log", cwd=C.REPO,
                       pipe_stdio=True) as publisher:
                published = read_event(publisher, "done", timeout=timeout)
            consumed = read_event(consumer, "done", timeout=timeout)
            # Both clients' connections set up and closed inside the window: a few ms of CPU in all.
            machine = machine_cpu_seconds() - machine_before
            proxy = cpu_seconds(pid) - proxy_before if pid else None
        env[contender].check_alive()
        count = self.count()
        values = {
            "publish": count / (published["end"] - published["start"]),
            "p50": published["p50"] * 1000,
            "p99": published["p99"] * 1000,
            "e2e": count / (consumed["last"] - published["start"]),
            "cpu_machine": machine / count * 1e6,
        }
        if proxy is not None:
            values["cpu"] = proxy / count * 1e6
        return values
