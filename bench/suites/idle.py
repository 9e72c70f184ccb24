"""Idle connections: the proxy's memory per proxied connection held open.

Three processes: the proxy, an echo backend and a client (bench.tools.
idle_client) opening COUNT connections, each proven end to end by one echoed
ping, then left idle. The proxy's VmRSS (summed over its processes) is read
before and after; growth / COUNT is the cost of one idle connection. A fresh
proxy each time, warmed up first with a few connections, so memory freed by
an earlier round (which allocators keep) does not hide the cost.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C
from ..model import Metric, Target
from ..procs import free_ports, read_event, rss_kb, send_line, spawn, wait_listening
from .base import Benchmark, MeasureError

WARMUP_CONNECTIONS = 50
SETTLE_SECONDS = 1.0  # let the proxy finish what it does after the last ping


class Idle(Benchmark):
    name = "idle"
    title = "Idle connections (memory)"
    description = ("COUNT proxied connections held open (each proven by one echoed ping); growth "
                   "of the proxy's VmRSS divided by COUNT.")
    contenders = C.with_warren_paths(("haproxy", "warren"))
    metrics = (
        Metric("per_conn", "RSS growth per connection", "kB", False, 2),
        Metric("rss_mb", "RSS with all connections", "MB", False, 1, compared=False),
    )
    targets = (Target("per_conn", "<=", 4.0, baseline=None),)

    def __init__(self, lab) -> None:
        super().__init__(lab)
        self.notes.append(C.warren_path_note())

    client_flags: tuple[str, ...] = ()  # the TLS variant adds --tls

    def count(self) -> int:
        return self.mode.pick(8000, 8000, 100)

    def tls_crt(self) -> str | None:
        return None

    @contextmanager
    def environment(self) -> Iterator[int]:
        (port,) = free_ports(1)
        work = self.lab.dir(self.name)
        backend = spawn("echo-server", [sys.executable, "-m", "bench.tools.echo_server", str(port)],
                        log_path=work / "echo-server.log", cwd=C.REPO)
        with backend:
            wait_listening(port, backend)
            self.notes.append(f"{self.count()} connections; the proxy's VmRSS read from "
                              "/proc/PID/status (summed over its processes) before and after.")
            yield port

    def measure(self, env: int, contender: str, round_index: int) -> dict[str, float]:
        spec = C.ProxySpec(servers=(C.Server("echo", env),), tls_crt=self.tls_crt())
        work = self.lab.dir(self.name, f"{contender}-{round_index}")
        with C.running(contender, spec, work) as proxy:
            self._hold(proxy, WARMUP_CONNECTIONS, work, "warmup")
            before = rss_kb(proxy.pid)
            after = self._hold(proxy, self.count(), work, "client")
        growth = after - before
        return {"per_conn": growth / self.count(), "rss_mb": after / 1024}

    def _hold(self, proxy: C.Contender, count: int, work, name: str) -> int:
        """Opens `count` connections through `proxy`; returns the proxy's RSS
        (kB) while they are all open, then closes them."""
        host, port = proxy.address
        argv = [sys.executable, "-m", "bench.tools.idle_client", host, str(port), str(count), *self.client_flags]
        if name == "client":
            self.remember("client", argv)
        client = spawn(name, argv, log_path=work / f"{name}.log", cwd=C.REPO, pipe_stdio=True)
        with client:
            read_event(client, "established", timeout=60 + count / 100)
            time.sleep(SETTLE_SECONDS)
            proxy.check_alive()
            rss = rss_kb(proxy.pid)
            send_line(client, {"command": "close"})
            read_event(client, "closed", timeout=30)
        if rss <= 0:
            raise MeasureError(f"no VmRSS for {proxy.name} (pid {proxy.pid})")
        return rss
