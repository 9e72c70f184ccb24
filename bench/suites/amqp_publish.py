"""AMQP publish with confirms: pika publishing persistent messages through the
contender to a real RabbitMQ node, with a consumer (also through it) draining
the queue at the same time.

Two figures: the publish rate (messages confirmed per second: pika's
BlockingChannel waits for each confirm, so this is dominated by round trips,
which is where a proxy shows) and the end-to-end rate (messages consumed per
second, from the first publish to the last delivery).
"""

from __future__ import annotations

import itertools
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C
from ..model import Metric, Target
from ..procs import read_event, spawn
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
        Metric("e2e", "end-to-end rate (consumed)", "msg/s", True, 0),
    )
    contenders = C.with_warren_paths(C.CONTENDERS)
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
        with spawn("consumer", consume, log_path=work / "consumer.log", cwd=C.REPO, pipe_stdio=True) as consumer:
            read_event(consumer, "ready", timeout=30)
            with spawn("publisher", publish, log_path=work / "publisher.log", cwd=C.REPO,
                       pipe_stdio=True) as publisher:
                published = read_event(publisher, "done", timeout=timeout)
            consumed = read_event(consumer, "done", timeout=timeout)
        env[contender].check_alive()
        count = self.count()
        return {
            "publish": count / (published["end"] - published["start"]),
            "e2e": count / (consumed["last"] - published["start"]),
        }
