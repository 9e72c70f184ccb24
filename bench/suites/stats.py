"""The stats page under load, and the cost of rendering it.

Two questions from the issue:

* Does the stats endpoint serve at least 1,000 authenticated requests/s while
  the proxy carries 1,000 connections? wrk (a few keep-alive connections,
  an Authorization header) loads the HTML page, `/;csv` and `/metrics` in
  turn while COUNT idle-but-open connections go through the same proxy:
  AMQP connections (connection and channel open) to a real RabbitMQ node in
  quick/full mode, TCP connections to an echo server in smoke mode (an
  Erlang VM is too slow to start there). After the load every held
  connection must still answer (AMQP: a Channel.Open; echo: a ping), and in
  AMQP mode one message is published and consumed through the proxy.
  HAProxy's stats page (`stats uri` + `stats auth`, its Prometheus exporter
  behind the same basic auth) gets the same load, for reference.
* Does rendering the page for 100 servers take under 20 ms? Measured in this
  process on a Runtime with 100 servers (a full chart history too): the
  snapshot plus the HTML page, CSV, JSON and Prometheus text, median ms.

The held connections live in this (driver) process as plain sockets: it only
waits on wrk while the load runs, so they cost the proxies nothing extra.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C
from ..amqpwire import (CHANNEL_OPEN_OK, FRAME_METHOD, ClientHandshake, FrameReader, channel_open,
                        connection_close, method_of)
from ..model import Metric, Target
from ..procs import free_ports, spawn, wait_listening
from ._http import WRK_SCRIPT, parse_wrk
from .base import Benchmark, MeasureError, run_tool

# Clear text for both (HAProxy's `stats auth` is); Warren would pay scrypt once per header anyway.
USER, PASSWORD = "bench", "bench-stats-secret"
ENDPOINTS = (("html", "/"), ("csv", "/;csv"), ("metrics", "/metrics"))
WRK_THREADS = 2  # one per core
WRK_CONNECTIONS = 4  # "a few": a dashboard, a scraper, an operator or two
RENDER_SERVERS = 100
PING = b"ping\n"


class Stats(Benchmark):
    name = "stats"
    title = "Stats page under load (wrk) and render time"
    description = ("wrk -t2 -c4 with basic auth against the stats page, its CSV and /metrics while COUNT "
                   "idle connections are proxied (AMQP to RabbitMQ; echo in smoke mode); requests/s per "
                   "endpoint. Render: snapshot plus HTML/CSV/JSON/metrics for 100 servers, in process, "
                   "median ms (Warren only).")
    contenders = ("haproxy", "warren")
    tools = ("wrk", "haproxy")
    python_modules = ("pika",)
    metrics = (
        Metric("html_rate", "HTML page", "req/s", True, 0),
        Metric("csv_rate", "CSV", "req/s", True, 0),
        Metric("metrics_rate", "/metrics", "req/s", True, 0),
        Metric("render_html_ms", "render HTML, 100 servers", "ms", False, 2, compared=False),
        Metric("render_csv_ms", "render CSV, 100 servers", "ms", False, 2, compared=False),
        Metric("render_json_ms", "render JSON, 100 servers", "ms", False, 2, compared=False),
        Metric("render_metrics_ms", "render /metrics, 100 servers", "ms", False, 2, compared=False),
    )
    targets = (
        Target("html_rate", ">=", 1000.0, baseline=None),
        Target("csv_rate", ">=", 1000.0, baseline=None),
        Target("metrics_rate", ">=", 1000.0, baseline=None),
        Target("render_html_ms", "<=", 20.0, baseline=None),
    )
    # Metrics only some contenders produce (read by tests/integration/test_bench_smoke.py).
    metric_contenders = {m.key: ("warren",) for m in metrics if m.key.startswith("render_")}

    def count(self) -> int:
        return 1000

    def seconds(self) -> int:
        return self.mode.pick(5, 3, 1)

    def render_repeats(self) -> int:
        return self.mode.pick(200, 100, 10)

    def amqp(self) -> bool:
        return self.mode.name != "smoke"

    def missing(self) -> str | None:
        return super().missing() or (self.lab.rabbit_missing() if self.amqp() else None)

    @contextmanager
    def environment(self) -> Iterator[dict]:
        with self._backend() as spec:
            work = self.lab.dir(self.name)
            started: dict[str, tuple[C.Contender, tuple[str, int]]] = {}
            try:
                for name in self.contenders:
                    started[name] = start_with_stats(name, spec, work / name)
                yield started
            finally:
                for contender, _ in started.values():
                    contender.stop()

    @contextmanager
    def _backend(self) -> Iterator[C.ProxySpec]:
        if self.amqp():
            node = self.lab.rabbit_nodes()[0]
            self.notes.append(f"{self.count()} AMQP connections (connection and channel open, heartbeats off) "
                              f"held through the proxy to {node.nodename} during the load.")
            yield C.ProxySpec(servers=(C.Server(node.spec.name, node.spec.amqp_port),),
                              health=C.Health(protocol="amqp"))
            return
        (port,) = free_ports(1)
        work = self.lab.dir(self.name)
        backend = spawn("echo-server", [sys.executable, "-m", "bench.tools.echo_server", str(port)],
                        log_path=work / "echo-server.log", cwd=C.REPO)
        with backend:
            wait_listening(port, backend)
            self.notes.append(f"smoke mode: {self.count()} TCP connections to an echo server held through "
                              "the proxy during the load (AMQP connections to RabbitMQ in quick/full mode).")
            yield C.ProxySpec(servers=(C.Server("echo", port),))

    def measure(self, env: dict, contender: str, round_index: int) -> dict[str, float]:
        proxy, stats_address = env[contender]
        held = hold_connections(proxy.address, self.count(), amqp=self.amqp())
        try:
            values = {f"{key}_rate": self._load(stats_address, key, path) for key, path in ENDPOINTS}
            proxy.check_alive()
            check_held(held, amqp=self.amqp())
        finally:
            release(held, amqp=self.amqp())
        if self.amqp():
            publish_and_consume(proxy.address)
        if contender == "warren":
            values.update(time_renders(self.render_repeats()))
        return values

    def _load(self, address: tuple[str, int], key: str, path: str) -> float:
        host, port = address
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        argv = ["wrk", "-t", str(WRK_THREADS), "-c", str(WRK_CONNECTIONS), "-d", f"{self.seconds()}s",
                "--timeout", "5s", "-H", f"Authorization: Basic {token}", "-s", str(WRK_SCRIPT),
                f"http://{host}:{port}{path}"]
        self.remember(f"wrk {key}", argv)
        report = parse_wrk(run_tool(argv, timeout=self.seconds() + 30))
        return report["requests"] / (report["duration_us"] / 1e6)


# --- the contenders with a stats page ---------------------------------------------------


def config_haproxy_stats(port: int) -> str:
    """A `listen` section serving HAProxy's stats page at / (so `/;csv` too)
    and its Prometheus exporter at /metrics, both behind basic auth."""
    return "\n".join([
        "userlist stats_users",
        f"    user {USER} insecure-password {PASSWORD}",
        "listen stats",
        "    mode http",
        f"    bind {C.HOST}:{port}",
        "    timeout client 30s",
        "    http-request auth realm stats if { path /metrics } !{ http_auth(stats_users) }",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    stats enable",
        "    stats uri /",
        f"    stats auth {USER}:{PASSWORD}",
    ]) + "\n"


def config_warren_stats(port: int) -> str:
    """Warren's `[stats]` on HOST:port with one clear-text user (defaults otherwise)."""
    return "\n".join([
        "",
        "[stats]",
        f'bind = ["{C.HOST}:{port}"]',
        'uri = "/"',
        f'users = {{ {USER} = "{PASSWORD}" }}',
    ]) + "\n"


def start_with_stats(name: str, spec: C.ProxySpec, workdir) -> tuple[C.Contender, tuple[str, int]]:
    """Like contenders.start, with the stats page added to the configuration;
    returns once both the proxy and its stats page listen."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, stats_port = free_ports(2)
    if name == "haproxy":
        path = workdir / "haproxy.cfg"
        path.write_text(C.config_haproxy(spec, port) + config_haproxy_stats(stats_port))
        argv = ["haproxy", "-f", str(path), "-db"]
    elif name == "warren":
        path = workdir / "warren.toml"
        path.write_text(C.config_warren(spec, port) + config_warren_stats(stats_port))
        argv = [sys.executable, "-m", "proxy", "run", str(path)]
    else:
        raise ValueError(f"no stats page for contender {name!r}")
    process = spawn(name, argv, log_path=workdir / f"{name}.log", cwd=C.REPO)
    try:
        wait_listening(port, process, 30)
        wait_listening(stats_port, process, 30)
    except BaseException:
        process.stop()
        raise
    return C.Contender(name, (C.HOST, port), process), (C.HOST, stats_port)


# --- held connections -------------------------------------------------------------------

OPEN_CONCURRENCY = 100
OPEN_TIMEOUT = 60.0


def hold_connections(address: tuple[str, int], count: int, *, amqp: bool) -> list[socket.socket]:
    """Opens `count` connections through `address`, each proven end to end
    (AMQP: connection and channel 1 open; else one echoed ping); MeasureError
    if any fails (those that opened are closed)."""
    return asyncio.run(_open_all(address, count, amqp))


async def _open_all(address: tuple[str, int], count: int, amqp: bool) -> list[socket.socket]:
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    opener = _open_amqp if amqp else _open_echo

    async def one() -> socket.socket:
        async with gate:
            return await asyncio.wait_for(opener(address), 20)

    outcomes = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count)), return_exceptions=True),
                                      OPEN_TIMEOUT)
    opened = [o for o in outcomes if isinstance(o, socket.socket)]
    failed = [o for o in outcomes if not isinstance(o, socket.socket)]
    if failed:
        for sock in opened:
            sock.close()
        raise MeasureError(f"{len(failed)} of {count} held connections failed to open: {failed[0]!r}")
    return opened


async def _connected(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_echo(address: tuple[str, int]) -> socket.socket:
    sock = await _connected(address)
    try:
        await _ping(sock)
    except BaseException:
        sock.close()
        raise
    return sock


async def _ping(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, PING)
    echoed = b""
    while len(echoed) < len(PING):
        data = await loop.sock_recv(sock, 64)
        if not data:
            raise ConnectionError("closed before the echo")
        echoed += data
    if echoed != PING:
        raise ConnectionError(f"echo mismatch: {echoed!r}")


async def _open_amqp(address: tuple[str, int]) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = await _connected(address)
    try:
        handshake = ClientHandshake()
        await loop.sock_sendall(sock, handshake.start())
        while not handshake.ready:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            await loop.sock_sendall(sock, handshake.received(data))
    except BaseException:
        sock.close()
        raise
    return sock


def check_held(held: list[socket.socket], *, amqp: bool) -> None:
    """Every held connection still answers end to end (AMQP: a new channel
    opens; echo: a ping comes back); MeasureError naming how many did not."""
    failures = asyncio.run(_check_all(held, amqp))
    if failures:
        raise MeasureError(f"{len(failures)} of {len(held)} held connections no longer answer "
                           f"after the load: {failures[0]!r}")


async def _check_all(held: list[socket.socket], amqp: bool) -> list[BaseException]:
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    check = _channel_opens if amqp else _ping

    async def one(sock: socket.socket) -> None:
        async with gate:
            await asyncio.wait_for(check(sock), 20)

    outcomes = await asyncio.gather(*(one(s) for s in held), return_exceptions=True)
    return [o for o in outcomes if isinstance(o, BaseException)]


CHECK_CHANNEL = 2  # connections are fresh per measurement, so channel 2 is always new


async def _channel_opens(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, channel_open(CHECK_CHANNEL))
    reader = FrameReader()
    while True:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise ConnectionError("closed by the proxy or the broker")
        reader.feed(data)
        for kind, channel, payload in reader.frames():
            if kind == FRAME_METHOD and channel == CHECK_CHANNEL and method_of(payload)[0] == CHANNEL_OPEN_OK:
                return


def release(held: list[socket.socket], *, amqp: bool) -> None:
    """Closes the held connections (AMQP: politely, so the broker logs no
    abrupt close for each)."""
    for sock in held:
        try:
            if amqp:
                sock.setblocking(True)
                sock.settimeout(1.0)
                sock.sendall(connection_close())
            sock.close()
        except OSError:
            sock.close()


def publish_and_consume(address: tuple[str, int]) -> None:
    """One message through the proxy, out and back (pika); MeasureError if it does not return."""
    import pika

    host, port = address
    params = pika.ConnectionParameters(host=host, port=port, connection_attempts=1, socket_timeout=10,
                                       blocked_connection_timeout=10)
    body = f"stats-bench {time.time()}".encode()
    with pika.BlockingConnection(params) as connection:
        channel = connection.channel()
        queue = channel.queue_declare(queue="", exclusive=True).method.queue
        channel.basic_publish(exchange="", routing_key=queue, body=body)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _method, _props, got = channel.basic_get(queue, auto_ack=True)
            if got is not None:
                if got != body:
                    raise MeasureError(f"consumed {got!r}, published {body!r}")
                return
            connection.sleep(0.05)
    raise MeasureError("the published message did not come back through the proxy")


# --- rendering, in process --------------------------------------------------------------


def runtime_with_servers(count: int = RENDER_SERVERS):
    """A Runtime with one frontend and one backend of `count` checked servers
    with counters and a last check, and a full chart history."""
    from proxy.config.model import Backend, BindAddress, CheckKind, Config, Frontend, Health, InitState, Server
    from proxy.health.results import CheckCode, CheckResult
    from proxy.runtime import Runtime
    from proxy.stats_ui.history import History

    servers = tuple(Server(name=f"rmq-{i:03d}", address="127.0.0.1", port=20000 + i) for i in range(count))
    health = Health(kinds=(CheckKind.AMQP, CheckKind.WATCH), init_state=InitState.UP)
    frontend = Frontend(name="amqp", binds=(BindAddress("127.0.0.1", 5670),), backend="rabbit")
    runtime = Runtime(Config(path="<bench>", frontends=(frontend,),
                             backends=(Backend(name="rabbit", servers=servers, health=health),)))
    for i, server in enumerate(runtime.servers()):
        server.last_check = CheckResult(CheckCode.L7OK, 0.002, "Connection.Start from rabbit", CheckKind.AMQP, {})
        server.total_sessions, server.max_sessions = 1000 + i, 10 + i
        server.closed_bytes_in, server.closed_bytes_out = 10**9 + i, 2 * 10**9 + i
    history = History()
    for step in range(history.capacity):
        history.record(runtime.statistics(), float(step * 2))
    return runtime, history


def time_renders(repeats: int) -> dict[str, float]:
    """Median ms of a snapshot plus each rendering, for RENDER_SERVERS servers."""
    from proxy.stats_ui.metrics import render_metrics
    from proxy.stats_ui.render_csv import render_csv
    from proxy.stats_ui.render_html import PageContext, render_page
    from proxy.stats_ui.render_json import render_json

    runtime, history = runtime_with_servers()
    context = PageContext(uri="/", refresh=10.0, refresh_configured=10.0, admin=True, hide_version=False,
                          user=USER, csrf_token="x" * 43)
    renders = {
        "render_html_ms": lambda: render_page(runtime.statistics(), context, history),
        "render_csv_ms": lambda: render_csv(runtime.statistics()),
        "render_json_ms": lambda: render_json(runtime.statistics()),
        "render_metrics_ms": lambda: render_metrics(runtime.statistics()),
    }
    medians = {}
    for key, render in renders.items():
        render()  # warm-up
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            render()
            samples.append((time.perf_counter() - began) * 1000)
        medians[key] = statistics.median(samples)
    return medians


__all__ = ["Stats", "config_haproxy_stats", "config_warren_stats", "runtime_with_servers", "time_renders"]
