"""What the AMQP benchmarks share: probing which node a proxy routes to,
restarting a node, the contenders in front of one node or two, clients
that reconnect when a node is killed, and what the survivor saw."""

from __future__ import annotations

import json
import socket
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C
from ..amqpwire import ClientHandshake, ProtocolError, connection_close, node_in
from ..procs import Managed, read_event, send_line, spawn
from ..tools.storm_client import most_within
from .base import MeasureError


def probe(address: tuple[str, int], node_names: list[str], timeout: float = 5.0) -> str | None:
    """Opens one AMQP connection and channel through `address` and closes it
    politely; returns the node that answered ("?" if unknown), None on failure."""
    handshake = ClientHandshake()
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(handshake.start())
            while not handshake.ready:
                data = sock.recv(65536)
                if not data:
                    return None
                sock.sendall(handshake.received(data))
            sock.sendall(connection_close())
            _wait_close_ok(sock)
    except (OSError, ProtocolError):
        return None
    return node_in(handshake.greeting, node_names) or "?"


def _wait_close_ok(sock: socket.socket) -> None:
    # Closing before Close-Ok would make the broker log a warning.
    sock.settimeout(2.0)
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def wait_routes_to(address: tuple[str, int], wanted: list[str], all_nodes: list[str],
                   timeout: float) -> None:
    """Probes through `address` until every node in `wanted` has answered
    (roundrobin takes turns, so both show up within a few probes once the
    proxy counts both as up); MeasureError after `timeout`."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while not set(wanted) <= seen:
        if time.monotonic() > deadline:
            raise MeasureError(f"{address} routed only to {sorted(seen)} within {timeout}s; wanted {wanted}")
        node = probe(address, all_nodes)
        if node is not None:
            seen.add(node)
        if not set(wanted) <= seen:
            time.sleep(0.1)  # do not flood the brokers while a proxy still counts one as down


def restart(node) -> None:
    """Stops `node` if it runs, starts it and waits until it serves."""
    if node.is_running():
        node.stop()
    node.start()
    node.wait_ready(90)


@contextmanager
def contenders_on_one_node(bench, note: str, *, tls_crt: str | None = None,
                           check_routes: bool = True) -> Iterator[dict[str, C.Contender]]:
    """Every contender of `bench` in front of the lab's first RabbitMQ node,
    each proven to route to it (unless not `check_routes`); `note` (with
    {node}) goes to the report; with `tls_crt` the contenders terminate TLS."""
    node = bench.lab.rabbit_nodes()[0]
    spec = C.ProxySpec(servers=(C.Server(node.spec.name, node.spec.amqp_port),), health=C.Health(protocol="amqp"),
                       tls_crt=tls_crt)
    bench.notes.append(note.format(node=node.nodename))
    bench.notes.append("Warren's frontend is in mode amqp: its connections take the splice path, where the AMQP "
                       "tap reads each handshake (the kernel path serves TCP frontends).")
    with C.all_running(bench.contenders, spec, bench.lab.dir(bench.name)) as running:
        for contender in running.values():
            if check_routes:
                wait_routes_to(contender.address, [node.nodename], [node.nodename], timeout=30)
        yield running


@contextmanager
def contenders_on_two_nodes(bench, note: str, **spec_options) -> Iterator[dict]:
    """Every contender of `bench` in front of the lab's two RabbitMQ nodes,
    health-checked as AMQP is in production (HAProxy's AMQP tcp-check and
    `on-marked-down shutdown-sessions`, Warren's ["amqp", "watch"] and
    on_marked_down = "shutdown-sessions"; inter 2 s, 0.5 s in the smoke run so
    that a restarted node is back sooner). `spec_options` go to the ProxySpec;
    `note` (with {count}, {inter}, {victim}, {survivor}) goes to the report.
    Yields {"nodes": [victim, survivor], "proxies": {name: Contender}, "spec"}."""
    nodes = bench.lab.rabbit_nodes()
    inter = bench.mode.pick(2.0, 2.0, 0.5)
    health = C.Health(protocol="amqp", inter=inter, timeout=min(2.0, inter), shutdown_sessions=True)
    spec = C.ProxySpec(servers=tuple(C.Server(n.spec.name, n.spec.amqp_port) for n in nodes), health=health,
                       **spec_options)
    bench.notes.append(note.format(count=bench.count(), inter=f"{inter:g}s rise {health.rise} fall {health.fall}",
                                   victim=nodes[0].nodename, survivor=nodes[1].nodename))
    with C.all_running(bench.contenders, spec, bench.lab.dir(bench.name)) as running:
        yield {"nodes": nodes, "proxies": running, "spec": spec}


def routed_to_both(env: dict, contender: str) -> C.Contender:
    """The contender, once the victim serves again and the contender routes to both nodes."""
    victim, survivor = env["nodes"]
    names = [victim.nodename, survivor.nodename]
    if not victim.is_serving():
        restart(victim)
    proxy = env["proxies"][contender]
    wait_routes_to(proxy.address, names, names, timeout=60)
    return proxy


@contextmanager
def storm_clients(bench, proxy: C.Contender, nodes: list, label: str) -> Iterator[Managed]:
    """bench.count() clients (bench.tools.storm_client) connected through
    `proxy`, some of them on the first node (the victim); quit and closed on exit."""
    host, port = proxy.address
    names = [node.nodename for node in nodes]
    argv = [sys.executable, "-m", "bench.tools.storm_client", host, str(port), str(bench.count()),
            "--nodes", ",".join(names), "--deadline", "90"]
    bench.remember("clients", argv)
    work = bench.lab.dir(bench.name, "clients")
    with spawn(label, argv, log_path=work / f"{proxy.name}.log", cwd=C.REPO, pipe_stdio=True) as client:
        connected = read_event(client, "connected", timeout=120)
        if not connected["per_node"].get(names[0]):
            raise MeasureError(f"no client landed on {names[0]}: {connected['per_node']}")
        yield client
        send_line(client, {"command": "quit"})
        read_event(client, "closed", timeout=30)


def kill_and_recover(client: Managed, victim) -> tuple[float, float, dict]:
    """Kills `victim` (SIGKILL) once the clients are armed; waits until every
    client is connected again, none on the victim. Returns when it was killed
    (time.monotonic() and time.time()) and the clients' "recovered" event."""
    send_line(client, {"killing": victim.nodename})
    read_event(client, "armed", timeout=10)
    killed_at, killed_wall = time.monotonic(), time.time()
    victim.kill()
    recovered = read_event(client, "recovered", timeout=90)
    return killed_at, killed_wall, recovered


def new_connections_peak(node, since: float, window: float = 1.0) -> tuple[int, int]:
    """(the most connections `node` accepted within any `window` seconds
    since `since` (time.time()), how many it accepted since then), from its
    own record: RabbitMQ stamps each connection's `connected_at` (ms, the
    system clock) when its reader starts on an accepted socket, before any
    AMQP byte: later than the connection reached its listener by however
    long the broker was starved of CPU, and bunched by its catching up
    (bench.syns has the listener's side). Only connections still open are listed (health
    checks and probes have closed theirs), which after a storm are the
    clients that reconnected."""
    out = node.ctl("list_connections", "connected_at", "--formatter", "json", "--quiet", timeout=120)
    stamps = [row["connected_at"] / 1000 for row in json.loads(out)]
    recent = [at for at in stamps if at >= since]
    return most_within(recent, window), len(recent)
