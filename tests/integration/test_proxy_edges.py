"""Edges of the proxy: DNS-named servers, IPv6 binds, idle timeouts, EMFILE."""

from __future__ import annotations

import resource
import socket
from dataclasses import replace
from functools import partial

import pytest
import structlog
import trio

from lab import wait_until
from proxy.config.model import BackendTimeouts, BindAddress, Resolvers, Server
from tests.dnsserver import serve_dns
from tests.proxyutil import (
    connect_and_greet, front, make_config, read_line, serve_named, server, start_warren,
)
from tests.warrenproc import WarrenProcess, json_global, write


async def test_dns_named_server_follows_its_records(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            # two fake brokers on distinct loopback addresses, same port
            port = await nursery.start(serve_named, "first")
            other = await nursery.start(partial(_serve_named_on, "127.0.0.2", port, "second"))
            assert other == port
            records = {"rabbit.test": ["127.0.0.1"]}
            servfail: set[str] = set()
            dns = await nursery.start(partial(serve_dns, records, servfail=servfail))
            config = make_config([Server(name="named", address="rabbit.test", port=port)])
            config = replace(config, resolvers=Resolvers(nameservers=(BindAddress(*dns),), interval=0.1, timeout=1.0))
            app = await start_warren(nursery, config)
            stream, name = await connect_and_greet(app)
            assert name == "first"
            await stream.aclose()

            records["rabbit.test"] = ["127.0.0.2"]
            named = app.runtime.server("be", "named")
            await wait_until(lambda: named.addresses == ("127.0.0.2",), timeout=15)
            stream, name = await connect_and_greet(app)
            assert name == "second"
            await stream.aclose()

            with structlog.testing.capture_logs() as logs:
                servfail.add("rabbit.test")
                await wait_until(lambda: any(e["event"] == "dns.failed" for e in logs), timeout=15)
            assert named.addresses == ("127.0.0.2",)  # the last good answer stays
            stream, name = await connect_and_greet(app)
            assert name == "second"
            nursery.cancel_scope.cancel()


async def _serve_named_on(host, port, name, *, task_status=trio.TASK_STATUS_IGNORED):
    async def handler(stream):
        await stream.send_all(name.encode() + b"\n")
        async for data in stream:
            await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_unresolvable_server_takes_no_clients_and_others_do():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "ip")
            dns = await nursery.start(partial(serve_dns, {}))
            config = make_config([
                server("ip", port),
                Server(name="nxdomain", address="missing.test", port=port),
            ])
            config = replace(config, resolvers=Resolvers(nameservers=(BindAddress(*dns),), interval=1.0, timeout=0.5))
            app = await start_warren(nursery, config)
            assert app.runtime.server("be", "nxdomain").addresses == ()
            for _ in range(4):
                stream, name = await connect_and_greet(app)
                assert name == "ip"
                await stream.aclose()
            nursery.cancel_scope.cancel()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_listens_on_ipv4_and_ipv6_binds():
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            config = make_config([server("a", port)])
            frontend = replace(config.frontends[0], binds=(BindAddress("127.0.0.1", 0), BindAddress("::1", 0)))
            app = await start_warren(nursery, replace(config, frontends=(frontend,)))
            for address in app.addresses["fe"]:
                stream = await trio.open_tcp_stream(*address)
                assert await read_line(stream) == "a"
                await stream.aclose()
            assert {a[0] for a in app.addresses["fe"]} == {"127.0.0.1", "::1"}
            nursery.cancel_scope.cancel()


async def test_tunnel_timeout_closes_idle_connections_with_cd():
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            config = make_config([server("a", port)])
            backend = replace(config.backends[0], timeout=BackendTimeouts(tunnel=0.3))
            app = await start_warren(nursery, replace(config, backends=(backend,)))
            with structlog.testing.capture_logs() as logs:
                stream, _ = await connect_and_greet(app)
                for _ in range(5):  # traffic keeps it alive past the timeout
                    await trio.sleep(0.1)
                    await stream.send_all(b"ping\n")
                    assert await read_line(stream) == "ping"
                assert await stream.receive_some(10) == b""  # then idle: closed
                await wait_until(lambda: any(e["event"] == "connection.closed" for e in logs), timeout=15)
            closed = [e for e in logs if e["event"] == "connection.closed"][0]
            assert closed["termination"] == "cD" and closed["tt_ms"] >= 700  # as HAProxy logs it
            nursery.cancel_scope.cancel()


async def test_out_of_file_descriptors_backs_off_and_recovers(tmp_path):
    """accept() failing with EMFILE is logged and retried; Warren keeps serving.

    accept() itself fails only if no descriptor is left once the previous
    clients hold theirs (two each): with one left, accept() takes it and the
    broker socket fails instead (RC). Which happens depends on how many
    descriptors Warren holds at rest (its relay path's among them), so the
    limit is tried at both parities.
    """
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            text = json_global() + (
                '[frontends.fe]\nbind = "127.0.0.1:0"\nbackend = "be"\n'
                f'[backends.be]\n[[backends.be.servers]]\nname = "a"\naddress = "127.0.0.1"\nport = {port}\n'
            )
            for limit in (64, 65):
                if await _run_out_of_descriptors(nursery, write(tmp_path / "w.toml", text), limit):
                    break
            else:
                pytest.fail("accept() never ran out of descriptors at either parity")
            nursery.cancel_scope.cancel()


async def _run_out_of_descriptors(nursery, path, limit: int) -> bool:
    """False if the broker sockets ran out first (the other parity)."""

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    async with WarrenProcess(path) as warren:
        warren.preexec = low_fd_limit
        await warren.start(nursery)
        address = warren.front("fe")
        held = []
        while not any(e["event"] == "listener.accept_failed" for e in warren.events):
            if len(held) >= limit:
                for stream in held:
                    await stream.aclose()
                assert await warren.stop() == 0
                return False
            held.append(await trio.open_tcp_stream(*address))
            await trio.sleep(0.005)
        failed = next(e for e in warren.events if e["event"] == "listener.accept_failed")
        assert failed["error"] == "EMFILE"
        for stream in held:
            await stream.aclose()
        # recovered: once descriptors are free again, clients are served
        while True:
            stream = await trio.open_tcp_stream(*address)
            try:
                if await read_line(stream) == "a":
                    break
            except trio.BrokenResourceError:
                pass  # closed for lack of a socket (RC) while the backlog drained
            finally:
                await stream.aclose()
            assert warren.process.returncode is None, "warren died out of descriptors"
            await trio.sleep(0.05)
        terminations = {e["termination"] for e in warren.events if e["event"] == "connection.closed"}
        assert terminations <= {"--", "CD", "SD", "RC"}, terminations
        assert warren.process.returncode is None
        assert await warren.stop() == 0
    return True
