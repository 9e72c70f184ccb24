"""Health-check detection time: from a broker's failure until the proxy counts
the server DOWN, for HAProxy and Warren alternately; and the broker log
warnings the checks themselves cause.

Both proxies front the two RabbitMQ nodes with inter 2s rise 2 fall 3 and a
1 s check timeout (see bench.contenders): HAProxy with its AMQP `tcp-check`
(protocol header out, Connection.Start expected, then it hangs up), Warren
with kinds ["amqp", "watch"] and a 1 s watch heartbeat. Each measurement
starts the contender alone (so the broker logs hold only its checks), waits
until it counts both servers UP, then

* counts the broker log's warning lines over a window in which only the
  checks run, per 100 checks (a check is one accepted AMQP connection, which
  the broker logs at info level);
* fails one node per failure kind (SIGKILL, graceful stop, SIGSTOP), taking
  the nodes in turn, and polls the proxy's `show stat` (HAProxy's stats
  socket, Warren's control socket: the same CSV) every POLL seconds until
  the victim's status reads DOWN. Detection time = first DOWN answer minus
  the moment just before the signal; resolution: the poll interval plus one
  `show stat` round trip.

A failed node is healed (restarted, or resumed after SIGSTOP) just before it
is needed again, and the contender must count it UP again first.
"""

from __future__ import annotations

import csv
import io
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .. import contenders as C
from ..model import Metric, Target
from .base import Benchmark, MeasureError

POLL = 0.010  # seconds between two `show stat` queries
FAILURES = ("kill", "stop", "hang")
SMOKE_FAILURES = ("kill",)
BACKEND = "servers"  # the backend name bench.contenders gives both proxies
# RabbitMQ logs every accepted AMQP connection at info level (rabbit_reader).
ACCEPTED = re.compile(r"accepting AMQP connection")
WARNING_LEVELS = ("[warning]", "[error]", "[critical]", "[alert]", "[emergency]")


# -- reading the proxies' statistics (no I/O) ----------------------------------

def server_status(stat_csv: str, server: str, backend: str = BACKEND) -> str | None:
    """The `status` column of `backend`/`server` in a `show stat` CSV answer
    (HAProxy's layout: a '# '-prefixed header line), or None if absent."""
    lines = stat_csv.splitlines()
    if not lines or not lines[0].startswith("# "):
        return None
    rows = csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]])))
    for row in rows:
        if row.get("pxname") == backend and row.get("svname") == server:
            return (row.get("status") or "").strip()
    return None


def is_down(status: str | None) -> bool:
    """DOWN, including "DOWN 1/2" (rising again); "UP 1/3" is still UP."""
    return bool(status) and status.split()[0] == "DOWN"


def warnings_per_100_checks(log_text: str) -> tuple[float, int, int]:
    """(warning lines per 100 accepted connections, warnings, accepted) in a
    stretch of broker log; MeasureError if no connection was accepted."""
    lines = log_text.splitlines()
    accepted = sum(1 for line in lines if ACCEPTED.search(line))
    # A multi-line message repeats its "<time> [level] <pid>" prefix on each
    # line ("closing AMQP connection ...:" / "client unexpectedly closed TCP
    # connection"): count messages, not lines.
    warnings = len({_message_key(line) for line in lines if any(level in line for level in WARNING_LEVELS)})
    if accepted == 0:
        raise MeasureError("no health check reached the brokers during the window")
    return 100.0 * warnings / accepted, warnings, accepted


def _message_key(line: str) -> str:
    """The "<timestamp> [level] <erlang pid>" prefix shared by a message's lines."""
    return " ".join(line.split(" ", 4)[:4])


# -- talking to them -----------------------------------------------------------

def show_stat(path: Path, timeout: float = 2.0) -> str:
    """One `show stat` exchange on a UNIX stats socket (both proxies answer
    and close, HAProxy's non-interactive mode)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def current_status(proxy: C.Contender, server: str) -> str | None:
    try:
        return server_status(show_stat(proxy.stats_socket), server)
    except OSError:
        return None


def wait_status(proxy: C.Contender, server: str, want: str, timeout: float) -> None:
    """Polls until `server`'s status is exactly `want` ("UP": up and not failing)."""
    deadline = time.monotonic() + timeout
    while (status := current_status(proxy, server)) != want:
        proxy.check_alive()
        if time.monotonic() > deadline:
            raise MeasureError(f"{proxy.name}: {server} is {status!r}, not {want}, after {timeout:.0f}s")
        time.sleep(0.05)


class DownWatch:
    """Polls a proxy's `show stat` in a thread until `server` reads DOWN;
    `down_at` is the monotonic time the first DOWN query was sent."""

    def __init__(self, proxy: C.Contender, server: str):
        self.proxy, self.server = proxy, server
        self.down_at: float | None = None
        self.polls = 0
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"downwatch-{server}")

    def __enter__(self) -> DownWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            status = current_status(self.proxy, self.server)
            self.polls += 1
            if is_down(status):
                self.down_at = sent
                self._done.set()
                return
            time.sleep(POLL)

    def wait(self, timeout: float) -> float:
        if not self._done.wait(timeout):
            raise MeasureError(f"{self.proxy.name} did not mark {self.server} DOWN within {timeout:.0f}s")
        return self.down_at


# -- the benchmark ---------------------------------------------------------------

class Detection(Benchmark):
    name = "detection"
    title = "Health-check detection time (broker failure until the server is DOWN)"
    description = ("Each contender alone in front of two RabbitMQ nodes (inter 2s rise 2 fall 3, check "
                   "timeout 1s); one node is SIGKILLed / stopped gracefully / SIGSTOPped; seconds from "
                   "the signal until the proxy's `show stat` reads DOWN. Also the broker log warnings "
                   "the checks cause, per 100 checks, with only checks running.")
    contenders = ("haproxy", "warren")
    needs_rabbit = True
    metrics = (
        Metric("kill", "SIGKILL detected after", "s", False, 3),
        Metric("stop", "graceful stop detected after", "s", False, 3),
        Metric("hang", "hung broker (SIGSTOP) detected after", "s", False, 3),
        Metric("warnings", "broker log warnings per 100 checks", "warnings", False, 1),
    )
    # What the smoke run measures (see failures()); the test suite reads this.
    smoke_metrics = tuple(m for m in metrics if m.key not in FAILURES or m.key in SMOKE_FAILURES)
    targets = (
        Target("kill", "<=", 0.1, baseline=None),
        Target("stop", "<=", 0.1, baseline=None),
        Target("hang", "<=", 1.0),
        Target("warnings", "<=", 0.0, baseline=None),
    )

    def rounds(self) -> int:
        return self.mode.rounds or self.mode.pick(3, 2, 1)

    def failures(self) -> tuple[str, ...]:
        # Every killed or stopped node costs a restart of several seconds.
        return self.mode.pick(FAILURES, FAILURES, SMOKE_FAILURES)

    def window(self) -> float:
        """Seconds of checks-only traffic counted for the warnings metric."""
        return self.mode.pick(30.0, 20.0, 3.0)

    def health(self) -> C.Health:
        # heartbeat: Warren's watch notices a hung broker after two silent
        # heartbeat intervals (AMQP 0-9-1 section 4.2.7); HAProxy has no such
        # connection, only its periodic checks with the same timeout.
        # The smoke run checks faster so that it is over sooner.
        inter, timeout = self.mode.pick((2.0, 1.0), (2.0, 1.0), (0.5, 0.5))
        return C.Health(protocol="amqp", inter=inter, rise=2, fall=3, timeout=timeout, heartbeat=1.0)

    @contextmanager
    def environment(self) -> Iterator[dict]:
        nodes = self.lab.rabbit_nodes()
        h = self.health()
        self.notes.append(
            f"inter {h.inter:g}s rise {h.rise} fall {h.fall}, check timeout {h.timeout:g}s; Warren's watch "
            f"heartbeat {h.heartbeat:g}s (HAProxy has no equivalent). Failures: {', '.join(self.failures())}, "
            f"on {nodes[0].nodename} and {nodes[1].nodename} in turn. `show stat` polled every "
            f"{POLL * 1000:.0f} ms. Warnings counted over {self.window():g}s of checks only; a check = one "
            "accepted AMQP connection.")
        try:
            yield {"nodes": nodes, "turn": 0}
        finally:
            for node in nodes:  # a paused VM would hang whoever uses the nodes next
                if node.paused:
                    node.resume()

    def measure(self, env: dict, contender: str, round_index: int) -> dict[str, float]:
        nodes = env["nodes"]
        spec = C.ProxySpec(servers=tuple(C.Server(n.spec.name, n.spec.amqp_port) for n in nodes),
                           health=self.health(), stats_socket=True)
        values: dict[str, float] = {}
        for node in nodes:  # the previous measurement's victims
            heal(node)
        with C.running(contender, spec, self.lab.dir(self.name, contender)) as proxy:
            for node in nodes:
                wait_status(proxy, node.spec.name, "UP", timeout=60)
            values["warnings"] = self._warnings(nodes)
            for failure in self.failures():
                victim = nodes[env["turn"] % len(nodes)]
                env["turn"] += 1
                heal(victim)
                wait_status(proxy, victim.spec.name, "UP", timeout=60)
                time.sleep(1.0)  # Warren opens its watch connection once the server is UP
                values[failure] = self._detect(proxy, victim, failure)
            proxy.check_alive()
        return values

    def _warnings(self, nodes: list) -> float:
        marks = {node: node.log_size() for node in nodes}
        time.sleep(self.window())
        text = "".join(node.log_text(mark) for node, mark in marks.items())
        per_100, _, _ = warnings_per_100_checks(text)
        return per_100

    def _detect(self, proxy: C.Contender, victim, failure: str) -> float:
        with DownWatch(proxy, victim.spec.name) as watch:
            time.sleep(0.05)  # a few UP answers first: the poller runs
            if watch.down_at is not None or watch.polls == 0:
                raise MeasureError(f"{proxy.name}: {victim.spec.name} not seen UP before the {failure}")
            failed_at = time.monotonic()
            inflict(victim, failure)
            down_at = watch.wait(timeout=60)
        return down_at - failed_at


def inflict(node, failure: str) -> None:
    """SIGKILL, graceful stop (returns once the node is down), or SIGSTOP."""
    if failure == "kill":
        node.kill()
    elif failure == "stop":
        node.stop()
    elif failure == "hang":
        node.pause()
    else:
        raise ValueError(f"unknown failure {failure!r}")


def heal(node) -> None:
    """Brings a failed node back to serving: resumes a paused one, restarts
    a stopped or killed one (as the storm benchmark does)."""
    if node.paused:
        node.resume()
    if not node.is_serving():
        if node.is_running():
            node.stop()
        node.start()
        node.wait_ready(90)
