"""Warren on the kernel relay path: chosen at start-up, per frontend and per
connection, shown to operators, and the fallback where it is unavailable.

The data-path behaviours themselves (half-close, resets, kills, timeouts,
PROXY header...) are specified on all three paths in test_proxy_local.py and
tests/unit/test_relay_paths.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import replace

import pytest
import structlog
import trio

from lab import wait_until
from proxy.config.model import FrontendTimeouts
from proxy.stats_ui.commands import execute
from proxy.stats_ui.render_json import render_json
from tests.proxyutil import (
    connect_and_greet,
    kernel_availability,
    make_config,
    on_the_kernel_path,
    read_line,
    server,
    serve_named,
    start_warren,
)
from tests.warrenproc import PYTHON, WarrenProcess, json_global, write

needs_kernel = pytest.mark.skipif(
    not kernel_availability().available, reason=f"kernel path unavailable: {kernel_availability().reason}"
)
# nobody, keeping only the right to read this checkout wherever it lies.
UNPRIVILEGED = [
    "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
    "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
]  # fmt: skip


def closed_lines(logs):
    return [e for e in logs if e["event"] == "connection.closed"]


async def warren_in_front_of_a(nursery, adjust=lambda config: config):
    """Warren (in this process) on the kernel path with its defaults, in front of one
    fake broker "a" (tests.proxyutil.serve_named); ``adjust`` changes the
    configuration first."""
    port = await nursery.start(serve_named, "a")
    return await start_warren(nursery, adjust(on_the_kernel_path(make_config([server("a", port)]))))


@needs_kernel
async def test_a_connection_enters_the_kernel_once_it_proved_long_lived_and_is_counted_whole():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app = await warren_in_front_of_a(nursery)
            assert app.relay.path == "kernel" and app.config.global_.kernel_after == 8
            with structlog.testing.capture_logs() as logs:
                stream, name = await connect_and_greet(app)
                assert name == "a"
                # The greeting was one quiet round; each line echoed is two.
                for count in range(3):
                    await stream.send_all(b"ping\n")
                    assert await read_line(stream) == "ping"
                    assert app.relay.sockmap.pairs == 0, f"in the map after {2 * count + 3} rounds"
                await stream.send_all(b"ping\n")
                assert await read_line(stream) == "ping"
                assert app.relay.sockmap.pairs == 1  # the eighth round: handed over
                await stream.send_all(b"x" * 100_000 + b"\n")
                echoed = b""
                while len(echoed) < 100_001:
                    echoed += await stream.receive_some(1 << 16)
                await stream.send_eof()
                assert await stream.receive_some(10) == b""
                await wait_until(lambda: closed_lines(logs), timeout=10, interval=0.005)
            (line,) = closed_lines(logs)
            # Counted whole: the bytes relayed before the hand-over and after.
            assert (line["bytes_in"], line["bytes_out"], line["termination"]) == (100_021, 100_023, "--")
            assert app.relay.sockmap.pairs == 0
            stats = app.runtime.statistics()
            # With the kernel's hazard, if it has one (proxy.io.sockmap.overlap_hazard).
            hazard = kernel_availability().hazard
            assert stats.relay == "kernel (bulk frontends: splice)" + (f" — {hazard}" if hazard else "")
            assert json.loads(render_json(stats))["relay"] == stats.relay
            answer, ok = execute("show info", app.runtime, 0.0)
            assert ok and f"Relay: {stats.relay}\n" in answer
            nursery.cancel_scope.cancel()


@needs_kernel
async def test_a_short_connection_never_enters_the_map():
    """The map's entry costs more than a short connection's whole relay."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app = await warren_in_front_of_a(nursery)
            added = []
            real_add = type(app.relay.sockmap).add
            app.relay.sockmap.add = lambda client, sock: added.append(1) or real_add(app.relay.sockmap, client, sock)
            with structlog.testing.capture_logs() as logs:
                for _ in range(5):
                    stream, name = await connect_and_greet(app)
                    await stream.send_all(b"one request\n")
                    assert await read_line(stream) == "one request"
                    await stream.aclose()
                await wait_until(lambda: len(closed_lines(logs)) == 5, timeout=10, interval=0.005)
            assert added == []
            assert {line["termination"] for line in closed_lines(logs)} == {"--"}
            nursery.cancel_scope.cancel()


def _immediate(config):
    """TCP connections enter the map at once (kernel_after = 0)."""
    return replace(config, global_=replace(config.global_, kernel_after=0))


@needs_kernel
async def test_a_bulk_frontend_is_spliced_and_never_enters_the_map():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app = await warren_in_front_of_a(
                nursery, lambda config: replace(config, frontends=(replace(config.frontends[0], bulk=True),))
            )
            stream, _ = await connect_and_greet(app)
            await stream.send_all(b"y" * (8 << 20))
            received = 0
            while received < 8 << 20:
                received += len(await stream.receive_some(1 << 20))
                assert app.relay.sockmap.pairs == 0
            assert app.pipes.statistics().created >= 1
            nursery.cancel_scope.cancel()


@needs_kernel
@pytest.mark.parametrize("after", [0, 1], ids=["at-once", "at-hand-over"])
async def test_a_pair_the_kernel_refuses_is_relayed_another_way(monkeypatch, after):
    """E.g. a client whose FIN came before its broker connection: the map
    takes only established sockets (EOPNOTSUPP)."""

    def refuse(self, client, server):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app = await warren_in_front_of_a(
                nursery, lambda config: replace(config, global_=replace(config.global_, kernel_after=after))
            )
            monkeypatch.setattr(type(app.relay.sockmap), "add", refuse)
            with structlog.testing.capture_logs() as logs:
                stream, name = await connect_and_greet(app)
                for _ in range(3):
                    await stream.send_all(b"still relayed\n")
                    assert await read_line(stream) == "still relayed"
            assert name == "a"
            assert any(e["event"] == "relay.kernel_refused" for e in logs)
            nursery.cancel_scope.cancel()


@needs_kernel
async def test_an_idle_client_times_out_on_the_kernel_path_by_the_kernels_clock():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            def idle_after_300_ms(config):
                frontend = replace(config.frontends[0], timeout=FrontendTimeouts(client=0.3))
                return _immediate(replace(config, frontends=(frontend,)))

            app = await warren_in_front_of_a(nursery, idle_after_300_ms)
            with structlog.testing.capture_logs() as logs:
                stream, _ = await connect_and_greet(app)
                for _ in range(4):  # the client talking keeps it alive
                    await trio.sleep(0.15)
                    await stream.send_all(b"ping\n")
                    assert await read_line(stream) == "ping"
                assert await stream.receive_some(10) == b""
                await wait_until(lambda: closed_lines(logs), timeout=10, interval=0.005)
            (line,) = closed_lines(logs)
            assert line["termination"] == "cD" and line["tt_ms"] >= 800
            nursery.cancel_scope.cancel()


def _config_text(port: int, relay: str | None = None) -> str:
    return json_global(f'relay = "{relay}"' if relay else "") + (
        '[frontends.fe]\nbind = "127.0.0.1:0"\nbackend = "be"\n'
        f'[backends.be]\n[[backends.be.servers]]\nname = "a"\naddress = "127.0.0.1"\nport = {port}\n'
    )


needs_setpriv = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")


@needs_kernel
async def test_by_default_warren_takes_the_kernel_path_only_where_it_found_no_hazard(tmp_path):
    """relay = "auto": a kernel that may corrupt a stream (the self-test's
    retransmission overlapping received bytes comes out twice) gets splice
    and one warning saying why; a kernel without that hazard, the kernel path."""
    hazard = kernel_availability().hazard
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            async with WarrenProcess(write(tmp_path / "w.toml", _config_text(port))) as warren:
                started = await warren.start(nursery)
                fallbacks = [e for e in warren.events if e["event"] == "relay.fallback"]
                if hazard:
                    assert started["relay"] == "splice"
                    assert [f["reason"] for f in fallbacks] == [f"kernel path not chosen automatically: {hazard}"]
                else:
                    assert started["relay"] == "kernel" and fallbacks == []
                stream = await trio.open_tcp_stream(*warren.front("fe"))
                assert await read_line(stream) == "a"
                await stream.aclose()
                assert await warren.stop() == 0
            nursery.cancel_scope.cancel()


@needs_setpriv
async def test_without_the_capabilities_warren_starts_on_splice_and_says_why(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            async with WarrenProcess(write(tmp_path / "w.toml", _config_text(port))) as warren:
                warren.command = [*UNPRIVILEGED, PYTHON, "-m", "proxy"]
                started = await warren.start(nursery)
                assert started["relay"] == "splice"
                (fallback,) = [e for e in warren.events if e["event"] == "relay.fallback"]
                assert fallback["level"] == "warning" and fallback["path"] == "splice"
                assert fallback["reason"] == (
                    "kernel path unavailable: missing CAP_BPF and CAP_NET_ADMIN "
                    "(the kernel path needs CAP_BPF and CAP_NET_ADMIN)"
                )
                stream = await trio.open_tcp_stream(*warren.front("fe"))
                assert await read_line(stream) == "a"
                await stream.aclose()
                assert await warren.stop() == 0
            nursery.cancel_scope.cancel()


@needs_setpriv
async def test_a_configuration_that_insists_on_the_kernel_path_does_not_start_without_it(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "a")
            path = write(tmp_path / "w.toml", _config_text(port, relay="kernel"))
            process = await trio.run_process(
                [*UNPRIVILEGED, PYTHON, "-m", "proxy", "run", str(path)], capture_stderr=True, check=False,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )  # fmt: skip
            assert process.returncode == 1
            # Refused before anything is bound, naming each capability and how to grant it.
            stderr = process.stderr.decode()
            assert "warren: global.relay: needs CAP_BPF" in stderr and "AmbientCapabilities=CAP_BPF" in stderr
            assert "warren: global.relay: needs CAP_NET_ADMIN" in stderr
            nursery.cancel_scope.cancel()
