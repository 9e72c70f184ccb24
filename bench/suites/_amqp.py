"""What the AMQP benchmarks share: probing which node a proxy routes to,
restarting a node, the contenders in front of one node."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from typing import Iterator

from .. import contenders as C

from ..amqpwire import ClientHandshake, ProtocolError, connection_close, node_in
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
