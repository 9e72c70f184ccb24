"""Helpers for running Warren in-process against small fake backends on loopback."""

from __future__ import annotations

import functools
import socket
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import pytest
import trio

from proxy.app import App
from proxy.config.model import (
    Backend, BackendTimeouts, Balance, BindAddress, Config, Frontend, Global, RelayPath, Server,
)
from proxy.io import sockmap
from proxy.io.pipes import splice_supported


async def serve_named(name: str, *, task_status=trio.TASK_STATUS_IGNORED):
    """A fake broker: greets each client with its name and a newline, then echoes."""

    async def handler(stream):
        try:
            await stream.send_all(name.encode() + b"\n")
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        task_status.started(port)
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


def dead_port() -> int:
    """A loopback port nothing listens on (connects are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose listener never completes a new connect: its
    accept queue (backlog 0) is full and never drained, so the kernel drops
    further SYNs. Yields the port; everything is closed afterwards."""
    listener = socket.socket()
    fillers = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(2):  # the queue holds backlog + 1
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex(("127.0.0.1", port))
        yield port
    finally:
        for sock in (*fillers, listener):
            sock.close()


def make_config(servers, *, balance="roundrobin", retries=3, redispatch=True,
                maxconn=2000, queue=5.0, connect=2.0, grace=30.0, **backend_kw) -> Config:
    backend = Backend(
        name="be",
        servers=tuple(servers),
        balance=Balance(balance),
        retries=retries,
        redispatch=redispatch,
        timeout=BackendTimeouts(connect=connect, queue=queue),
        **backend_kw,
    )
    frontend = Frontend(name="fe", binds=(BindAddress("127.0.0.1", 0),), backend="be", maxconn=maxconn)
    return Config(path="<test>", global_=Global(grace=grace), frontends=(frontend,), backends=(backend,))


def server(name: str, port: int, **kw) -> Server:
    return Server(name=name, address="127.0.0.1", port=port, **kw)


async def start_warren(nursery: trio.Nursery, config: Config, *, relay: str | None = None, **kw) -> App:
    """Warren serving `config`, on the relay path `relay` ("copy", "splice",
    "kernel", "handover": see with_relay; skipped where this machine has not
    got it) if given."""
    if relay is not None:
        config = with_relay(config, relay)
    app = App(config, handle_signals=False, **kw)
    await nursery.start(app.serve)
    return app


def on_the_kernel_path(config: Config) -> Config:
    """`config` insisting on the kernel path (``relay = "kernel"``, its other
    defaults kept): ``auto`` does not take it on a kernel with a hazard
    (proxy.io.sockmap.overlap_hazard). Skipped where it is unavailable."""
    availability = kernel_availability()
    if not availability.available:
        pytest.skip(f"kernel path unavailable: {availability.reason}")
    return replace(config, global_=replace(config.global_, relay=RelayPath.KERNEL))


def with_relay(config: Config, relay: str) -> Config:
    """`config` on relay path `relay`: "copy", "splice", "kernel" (TCP
    connections enter the socket map at once: kernel_after = 0) or
    "handover" (the kernel path after one quiet round on splice/copy)."""
    if relay in ("kernel", "handover"):
        availability = kernel_availability()
        if not availability.available:
            pytest.skip(f"kernel path unavailable: {availability.reason}")
        after = 0 if relay == "kernel" else 1
        return replace(config, global_=replace(config.global_, relay=RelayPath.KERNEL, kernel_after=after))
    if relay == "splice" and not splice_supported():
        pytest.skip("splice(2) unavailable")
    return replace(config, global_=replace(config.global_, relay=RelayPath(relay)))


@functools.cache
def kernel_availability():
    """The kernel path's self-test, once per test process."""
    return sockmap.probe()


def front(app: App) -> tuple[str, int]:
    return app.addresses["fe"][0]


async def connect_and_greet(app: App) -> tuple[trio.SocketStream, str]:
    """Connects a client through Warren and reads the backend's name line."""
    stream = await trio.open_tcp_stream(*front(app))
    name = await read_line(stream)
    return stream, name


async def read_line(stream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(256)
        if not chunk:
            return data.decode()
        data += chunk
    return data.decode().strip()


async def read_to_end(stream) -> bytes:
    """Everything the peer sends until it closes; a reset after its last byte ends it too."""
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


def with_servers(config: Config, servers) -> Config:
    backend = replace(config.backends[0], servers=tuple(servers))
    return replace(config, backends=(backend,))


def use_service(app: App, service) -> None:
    """Puts `service` in place of the app's default service of the same kind
    (tests configure theirs, e.g. with a faster sampling interval)."""
    kind = type(service)
    app.services = [s for s in app.services if not isinstance(s, kind)] + [service]


async def socket_pair(kind: str = "tcp") -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """Two connected trio sockets: over loopback TCP, or a Unix socket pair."""
    if kind == "unix":
        return trio.socket.socketpair()
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = trio.socket.socket()
        await near.connect(listener.getsockname())
        far, _ = await listener.accept()
    return near, far
