"""Reconnect storm: COUNT AMQP clients through the proxy to two RabbitMQ nodes;
one node is SIGKILLed; how long until every client has a working connection
(connection and channel open) again, all on the surviving node.

The proxies are set up as for AMQP in production: HAProxy with an AMQP
tcp-check (inter 2s rise 2 fall 3) and `on-marked-down shutdown-sessions`,
Warren with kinds ["amqp", "watch"] and on_marked_down = "shutdown-sessions"
(see bench.contenders). The clients (bench.tools.storm_client, one asyncio
process) retry at once, then every ~100 ms. Between measurements the killed
node is restarted and the next one begins only once the proxy routes to both
nodes again.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C
from ..model import Metric, Target
from ..procs import read_event, send_line, spawn
from ._amqp import restart, wait_routes_to
from .base import Benchmark, MeasureError


class Storm(Benchmark):
    name = "storm"
    title = "Reconnect storm (AMQP clients after a broker is killed)"
    description = ("COUNT clients connected through the contender to two RabbitMQ nodes (roundrobin); "
                   "one node is SIGKILLed; seconds from the kill until every client has an open "
                   "connection and channel again.")
    contenders = ("haproxy", "warren")
    needs_rabbit = True
    metrics = (
        Metric("recovery", "all reconnected after", "s", False, 3),
        Metric("lost", "clients that lost their broker", "clients", False, 0, compared=False),
        Metric("peak", "survivor's peak new connections", "conn/s", False, 0, compared=False),
    )
    targets = (Target("recovery", "<=", 1.0),)

    def rounds(self) -> int:
        return self.mode.rounds or self.mode.pick(5, 2, 1)

    def count(self) -> int:
        return self.mode.pick(1000, 1000, 20)

    def rate_limit(self) -> float | None:
        return None

    def health(self) -> C.Health:
        # The smoke run checks faster so that the restarted node is back sooner.
        inter = self.mode.pick(2.0, 2.0, 0.5)
        return C.Health(protocol="amqp", inter=inter, timeout=min(2.0, inter), shutdown_sessions=True)

    @contextmanager
    def environment(self) -> Iterator[dict]:
        nodes = self.lab.rabbit_nodes()
        spec = C.ProxySpec(servers=tuple(C.Server(n.spec.name, n.spec.amqp_port) for n in nodes),
                           health=self.health(), rate_limit=self.rate_limit())
        h = spec.health
        limited = (f"; new connections limited to {spec.rate_limit:g}/s (HAProxy `rate-limit sessions`, "
                   "Warren a token bucket with a tenth of a second's burst, action queue)" if spec.rate_limit else "")
        self.notes.append(f"{self.count()} clients; health checks inter {h.inter:g}s rise {h.rise} "
                          f"fall {h.fall}; node {nodes[0].nodename} is killed, {nodes[1].nodename} survives; "
                          "the brokers listen with tcp_listen_options.backlog = 4096 (see bench/README.md)"
                          + limited + ".")
        with C.all_running(self.contenders, spec, self.lab.dir(self.name)) as running:
            yield {"nodes": nodes, "proxies": running, "measured": 0}

    def _total_measurements(self) -> int:
        return self.rounds() * len(self.contenders)

    def measure(self, env: dict, contender: str, round_index: int) -> dict[str, float]:
        victim, survivor = env["nodes"]
        names = [victim.nodename, survivor.nodename]
        proxy = env["proxies"][contender]
        env["measured"] += 1
        if not victim.is_serving():
            restart(victim)
        wait_routes_to(proxy.address, names, names, timeout=60)
        try:
            return self._storm(proxy, victim, names)
        finally:
            if env["measured"] < self._total_measurements():
                restart(victim)  # ready for the next measurement

    def _storm(self, proxy: C.Contender, victim, names: list[str]) -> dict[str, float]:
        host, port = proxy.address
        argv = [sys.executable, "-m", "bench.tools.storm_client", host, str(port), str(self.count()),
                "--nodes", ",".join(names), "--deadline", "60"]
        self.remember("clients", argv)
        work = self.lab.dir(self.name, "clients")
        with spawn("storm-client", argv, log_path=work / f"{proxy.name}.log", cwd=C.REPO,
                   pipe_stdio=True) as client:
            connected = read_event(client, "connected", timeout=120)
            if not connected["per_node"].get(victim.nodename):
                raise MeasureError(f"no client landed on {victim.nodename}: {connected['per_node']}")
            send_line(client, {"killing": victim.nodename})
            read_event(client, "armed", timeout=10)
            killed_at = time.monotonic()
            victim.kill()
            recovered = read_event(client, "recovered", timeout=90)
            send_line(client, {"command": "quit"})
            read_event(client, "closed", timeout=30)
        proxy.check_alive()
        return {"recovery": recovered["at"] - killed_at, "lost": float(recovered["lost"]),
                "peak": float(recovered["peak_rate"])}



class StormLimited(Storm):
    """The storm with 5,000 clients and a new-connection rate limit on both proxies."""

    name = "storm_limited"
    title = "Reconnect storm with a rate limit (5,000 AMQP clients)"
    description = ("COUNT clients through the contender to two RabbitMQ nodes, new connections limited "
                   "to RATE/s; one node is SIGKILLed; seconds until every client is back, and the most new "
                   "connections the surviving broker got in any one second.")
    targets = (Target("peak", "<=", 1.15, baseline=None),)  # replaced per mode in __init__

    def __init__(self, lab) -> None:
        super().__init__(lab)
        # Warren's peak within 15 % of the limit; its recovery no slower than HAProxy's.
        self.targets = (Target("peak", "<=", 1.15 * self.rate_limit(), baseline=None), Target("recovery", "<=", 1.0))

    def count(self) -> int:
        return self.mode.pick(5000, 2000, 20)

    def rate_limit(self) -> float:
        return self.mode.pick(500.0, 500.0, 50.0)
