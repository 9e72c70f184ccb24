"""Rebalancing after a broker returns: how long until the connections are spread again.

COUNT AMQP clients (bench.tools.storm_client) through the contender to two
RabbitMQ nodes, leastconn. One node is SIGKILLed: its clients reconnect to
the survivor. The node is restarted; from the moment it serves again, how
long until the clients are spread evenly again (within 10 % of an even
share). Warren's backend has `[backends.*.rebalance]` (the close rate below,
no minimum age); HAProxy has no equivalent, so its clients stay where they
are: its figure is the deadline, with the spread it still had.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C
from ..model import Metric, Target
from ..procs import read_event, send_line
from ._amqp import contenders_on_two_nodes, kill_and_recover, routed_to_both, storm_clients
from .base import Benchmark, MeasureError

TOLERANCE = 0.1


class Rebalance(Benchmark):
    name = "rebalance"
    title = "Rebalancing after a broker returns (AMQP clients)"
    description = ("COUNT clients through the contender to two RabbitMQ nodes (leastconn); one node is "
                   "killed and its clients move to the other; the node is restarted; seconds from when it "
                   "serves again until the clients are spread within 10 % of even (HAProxy: never, shown "
                   "as the deadline).")
    contenders = ("haproxy", "warren")
    needs_rabbit = True
    metrics = (
        Metric("balanced", "spread within 10 % after", "s", False, 2),
        Metric("on_returned", "clients on the returned node at the end", "clients", True, 0, compared=False),
    )
    targets = (Target("balanced", "<=", 30.0, baseline=None),)

    def rounds(self) -> int:
        return self.mode.rounds or self.mode.pick(3, 2, 1)

    def count(self) -> int:
        return self.mode.pick(1000, 1000, 20)

    def deadline(self) -> float:
        return self.mode.pick(60.0, 40.0, 20.0)

    def close_rate(self) -> float:
        return self.mode.pick(100.0, 100.0, 20.0)

    @contextmanager
    def environment(self) -> Iterator[dict]:
        note = (f"{{count}} clients, leastconn; Warren rebalances at most {self.close_rate():g} closes/s, "
                f"tolerance {TOLERANCE:g}, no minimum age; health checks inter {{inter}}; "
                f"deadline {self.deadline():g} s.")
        with contenders_on_two_nodes(self, note, balance="leastconn",
                                     rebalance=C.Rebalancing(rate=self.close_rate(), tolerance=TOLERANCE)) as env:
            yield env

    def measure(self, env: dict, contender: str, round_index: int) -> dict[str, float]:
        victim = env["nodes"][0]
        proxy = routed_to_both(env, contender)
        with storm_clients(self, proxy, env["nodes"], "rebalance-client") as client:
            kill_and_recover(client, victim)
            # The clients watch from now (they cannot be balanced before the node
            # is back: it has none); the clock starts when the node serves.
            send_line(client, {"command": "wait_balanced", "tolerance": TOLERANCE,
                               "deadline": self.deadline() + 90})
            returned = self._start_timed(victim)
            answer = read_event(client, ("balanced", "unbalanced"), timeout=self.deadline() + 120)
        proxy.check_alive()
        on_returned = float(answer["per_node"].get(victim.nodename, 0))
        if answer["event"] == "balanced" and answer["at"] - returned <= self.deadline():
            return {"balanced": answer["at"] - returned, "on_returned": on_returned}
        if contender == "warren":
            raise MeasureError(f"not balanced within {self.deadline():g} s: {answer['per_node']}")
        return {"balanced": self.deadline(), "on_returned": on_returned}

    @staticmethod
    def _start_timed(node) -> float:
        """Starts `node`; returns when (time.monotonic()) its AMQP port first answered."""
        node.start()
        deadline = time.monotonic() + 90
        while not node.is_serving():
            if time.monotonic() > deadline:
                raise MeasureError(f"{node.nodename} did not come back within 90 s")
            time.sleep(0.02)
        served = time.monotonic()
        node.wait_ready(90)
        return served
