"""The proxy end to end on loopback, against fake backends (TCP behaviour only).

Real-broker behaviour is covered in test_rabbit_proxy.py; here each test pins
one TCP-level rule: balancing, retries/redispatch, queueing, limits, kills,
PROXY protocol, stop.
"""

from collections import Counter
from dataclasses import replace

import pytest
import structlog
import trio

from lab import wait_until
from proxy.backends.proxy_protocol import parse as parse_proxy_header
from proxy.config.model import SendProxy
from proxy.runtime import AdminState, KillReason
from tests.proxyutil import (
    connect_and_greet, dead_port, front, make_config, read_line, serve_named, server,
    start_warren, unanswered_port,
)

# Every behaviour holds on each relay path (and across the hand-over to the kernel).
pytestmark = pytest.mark.parametrize("relay_path", ["copy", "splice", "kernel", "handover"])


async def named_servers(nursery, names):
    return {name: await nursery.start(serve_named, name) for name in names}


async def test_roundrobin_spreads_by_weight(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "abc")
            config = make_config([server(n, p, weight=w) for (n, p), w in zip(ports.items(), (1, 2, 3))])
            app = await start_warren(nursery, config, relay=relay_path)
            seen = Counter()
            for _ in range(60):
                stream, name = await connect_and_greet(app)
                seen[name] += 1
                await stream.aclose()
            assert seen == {"a": 10, "b": 20, "c": 30}
            nursery.cancel_scope.cancel()


async def test_data_flows_both_ways_and_is_counted(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "a")
            app = await start_warren(nursery, make_config([server("a", ports["a"])]), relay=relay_path)
            stream, _ = await connect_and_greet(app)
            payload = bytes(range(256)) * 4096  # 1 MiB
            async with trio.open_nursery() as io:
                io.start_soon(stream.send_all, payload)
                echoed = b""
                while len(echoed) < len(payload):
                    echoed += await stream.receive_some(65536)
            assert echoed == payload
            stats = app.runtime.statistics().backends[0].servers[0]
            assert stats.bytes_in == len(payload)
            assert stats.bytes_out == len(payload) + len(b"a\n")
            assert stats.current_sessions == 1
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_dead_server_is_redispatched_without_client_error(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "b")
            config = make_config([server("dead", dead_port()), server("b", ports["b"])], retries=2)
            app = await start_warren(nursery, config, relay=relay_path)
            with structlog.testing.capture_logs() as logs:
                for _ in range(4):
                    stream, name = await connect_and_greet(app)
                    assert name == "b"
                    await stream.aclose()
                await wait_until(lambda: len(_closed(logs)) == 4, timeout=15)
            redispatched = [e for e in _closed(logs) if e["redispatched"]]
            assert redispatched and all(e["retries"] == 2 and e["server"] == "b" for e in redispatched)
            dead = app.runtime.server("be", "dead")
            assert dead.connect_errors == 2 * len(redispatched)
            assert dead.redispatches == len(redispatched)
            nursery.cancel_scope.cancel()


async def test_all_servers_dead_closes_client_with_sc(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, make_config([server("x", dead_port())], retries=1), relay=relay_path)
            with structlog.testing.capture_logs() as logs:
                stream = await trio.open_tcp_stream(*front(app))
                assert await stream.receive_some(10) == b""
                await wait_until(lambda: _closed(logs), timeout=15)
            assert _closed(logs)[0]["termination"] == "SC"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("retries", [0, 1])
async def test_a_connect_that_never_completes_ends_with_sc_after_the_timeout(relay_path, retries):
    with trio.fail_after(20), unanswered_port() as port:
        async with trio.open_nursery() as nursery:
            config = make_config([server("x", port)], retries=retries, connect=0.2)
            app = await start_warren(nursery, config, relay=relay_path)
            with structlog.testing.capture_logs() as logs:
                stream = await trio.open_tcp_stream(*front(app))
                assert await stream.receive_some(10) == b""
                await wait_until(lambda: _closed(logs), timeout=15)
            closed = _closed(logs)[0]
            assert (closed["termination"], closed["retries"]) == ("sC", retries)
            assert closed["tc_ms"] >= 200 * (retries + 1) - 20  # every attempt waited its timeout
            assert not app.runtime.server("be", "x").connections
            nursery.cancel_scope.cancel()


async def test_a_session_killed_while_connecting_ends_at_once_with_kd(relay_path):
    with trio.fail_after(20), unanswered_port() as port:
        async with trio.open_nursery() as nursery:
            app = await start_warren(nursery, make_config([server("x", port)], connect=30.0), relay=relay_path)
            target = app.runtime.server("be", "x")
            with structlog.testing.capture_logs() as logs:
                stream = await trio.open_tcp_stream(*front(app))
                await wait_until(lambda: target.connections, timeout=15)  # attached: connecting
                assert target.kill_sessions(KillReason.KILLED) == 1
                assert await stream.receive_some(10) == b""
                await wait_until(lambda: _closed(logs), timeout=15)
            assert _closed(logs)[0]["termination"] == "KD"
            assert not target.connections and not app.sessions.live
            nursery.cancel_scope.cancel()


async def test_no_available_server_accepts_then_closes_and_logs_why(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "a")
            app = await start_warren(nursery, make_config([server("a", ports["a"])]), relay=relay_path)
            app.runtime.server("be", "a").set_admin(AdminState.MAINT, trio.current_time())
            with structlog.testing.capture_logs() as logs:
                stream = await trio.open_tcp_stream(*front(app))
                assert await stream.receive_some(10) == b""
                await wait_until(lambda: _closed(logs), timeout=15)
            assert any(e["event"] == "backend.no_server" and e["backend"] == "be" for e in logs)
            assert _closed(logs)[0]["termination"] == "SC"
            nursery.cancel_scope.cancel()


async def test_backup_used_only_when_no_active_server(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, ["act", "bak"])
            config = make_config([server("act", ports["act"]), server("bak", ports["bak"], backup=True)])
            app = await start_warren(nursery, config, relay=relay_path)
            for _ in range(3):
                stream, name = await connect_and_greet(app)
                assert name == "act"
                await stream.aclose()
            app.runtime.server("be", "act").set_admin(AdminState.DRAIN, trio.current_time())
            stream, name = await connect_and_greet(app)
            assert name == "bak"
            nursery.cancel_scope.cancel()


async def test_drained_server_keeps_existing_connections(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "ab")
            app = await start_warren(nursery, make_config([server(n, p) for n, p in ports.items()]), relay=relay_path)
            kept, first = await connect_and_greet(app)
            app.runtime.server("be", first).set_admin(AdminState.DRAIN, trio.current_time())
            for _ in range(4):
                stream, name = await connect_and_greet(app)
                assert name != first
                await stream.aclose()
            await kept.send_all(b"still here\n")
            assert await read_line(kept) == "still here"
            nursery.cancel_scope.cancel()


async def test_server_maxconn_queues_until_a_slot_frees(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "a")
            app = await start_warren(nursery, make_config([server("a", ports["a"], maxconn=1)]), relay=relay_path)
            first, _ = await connect_and_greet(app)
            second = await trio.open_tcp_stream(*front(app))
            await wait_until(lambda: app.runtime.statistics().backends[0].queue_current == 1, timeout=15)
            await first.aclose()
            assert await read_line(second) == "a"
            assert app.runtime.statistics().backends[0].queue_max == 1
            nursery.cancel_scope.cancel()


async def _full_server(nursery, relay_path, queue: float):
    """Warren in front of one server with maxconn 1, and the client holding it."""
    ports = await named_servers(nursery, "a")
    config = make_config([server("a", ports["a"], maxconn=1)], queue=queue)
    app = await start_warren(nursery, config, relay=relay_path)
    first, _ = await connect_and_greet(app)
    return app, first


async def test_queue_timeout_closes_client_with_sq(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app, first = await _full_server(nursery, relay_path, queue=0.2)
            with structlog.testing.capture_logs() as logs:
                second = await trio.open_tcp_stream(*front(app))
                assert await second.receive_some(10) == b""
                await wait_until(lambda: _closed(logs), timeout=15)
            assert _closed(logs)[0]["termination"] == "sQ"
            nursery.cancel_scope.cancel()


async def test_frontend_maxconn_holds_extra_clients_in_backlog_not_reset(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "a")
            app = await start_warren(nursery, make_config([server("a", ports["a"])], maxconn=1), relay=relay_path)
            first, _ = await connect_and_greet(app)
            second = await trio.open_tcp_stream(*front(app))  # completes in the kernel backlog
            with trio.move_on_after(0.3) as waited:
                await second.receive_some(10)
            assert waited.cancelled_caught, "second client was served beyond maxconn"
            await first.aclose()
            assert await read_line(second) == "a"
            nursery.cancel_scope.cancel()


async def test_half_close_is_propagated(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "a")
            app = await start_warren(nursery, make_config([server("a", ports["a"])]), relay=relay_path)
            stream, _ = await connect_and_greet(app)
            await stream.send_all(b"last words\n")
            await stream.send_eof()
            assert await read_line(stream) == "last words"
            assert await stream.receive_some(10) == b""  # the echo server closed after our EOF
            nursery.cancel_scope.cancel()


async def test_killed_sessions_are_closed_and_logged_kd(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "a")
            app = await start_warren(nursery, make_config([server("a", ports["a"])]), relay=relay_path)
            stream, _ = await connect_and_greet(app)
            with structlog.testing.capture_logs() as logs:
                assert app.runtime.server("be", "a").kill_sessions(KillReason.KILLED) == 1
                assert await stream.receive_some(10) == b""
                await wait_until(lambda: _closed(logs), timeout=15)
            assert _closed(logs)[0]["termination"] == "KD"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("version", [SendProxy.V1, SendProxy.V2])
async def test_proxy_protocol_header_carries_client_address(relay_path, version):
    received = trio.Event()
    headers = []

    async def broker(stream):
        data = b""
        while (parsed := parse_proxy_header(data)) is None:
            data += await stream.receive_some(256)
        headers.append(parsed[0])
        received.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, broker, 0)
            port = listeners[0].socket.getsockname()[1]
            app = await start_warren(nursery, make_config([server("a", port, send_proxy=version)]), relay=relay_path)
            client = await trio.open_tcp_stream(*front(app))
            await received.wait()
            header = headers[0]
            assert header.src == client.socket.getsockname()[:2]
            assert header.dst == front(app)
            nursery.cancel_scope.cancel()


async def test_stop_closes_listeners_and_lets_connections_finish(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "a")
            app = await start_warren(nursery, make_config([server("a", ports["a"])], grace=30), relay=relay_path)
            stream, _ = await connect_and_greet(app)
            address = front(app)
            app.stop()
            await wait_until(lambda: _refused(address), timeout=15, what="the front port closed")
            await stream.send_all(b"ping\n")
            assert await read_line(stream) == "ping"
            nursery.cancel_scope.cancel()


async def test_stop_kills_what_outlives_the_grace_period(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "a")
            app = await start_warren(nursery, make_config([server("a", ports["a"])], grace=0.2), relay=relay_path)
            stream, _ = await connect_and_greet(app)
            app.stop()
            assert await stream.receive_some(10) == b""
            nursery.cancel_scope.cancel()


def _closed(logs):
    return [e for e in logs if e["event"] == "connection.closed"]


async def _refused(address) -> bool:
    try:
        stream = await trio.open_tcp_stream(*address)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_a_failing_session_is_closed_alone(relay_path):
    # The connection path and the live model are compiled (proxy/_native.py):
    # their methods cannot be patched, so the bug is in the server's passive
    # health observer, which the dispatch reaches as the connect completes.
    class BrokenObserver:
        def connect_ok(self, server):
            raise RuntimeError("a bug in one connection")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "a")
            app = await start_warren(nursery, make_config([server("a", ports["a"])]), relay=relay_path)
            target = app.runtime.server("be", "a")
            observer, target.observer = target.observer, BrokenObserver()
            with structlog.testing.capture_logs() as logs:
                victim = await trio.open_tcp_stream(*front(app))
                assert await victim.receive_some(10) in (b"", b"a\n")
                await wait_until(lambda: _closed(logs), timeout=15)
            assert any(e["event"] == "session.failed" for e in logs)
            assert _closed(logs)[0]["termination"] == "PD"
            target.observer = observer
            stream, name = await connect_and_greet(app)  # the proxy still serves
            assert name == "a"
            nursery.cancel_scope.cancel()


async def test_a_queued_session_killed_ends_at_once_with_kd_and_frees_its_slot(relay_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app, first = await _full_server(nursery, relay_path, queue=30.0)
            with structlog.testing.capture_logs() as logs:
                queued = await trio.open_tcp_stream(*front(app))
                backend = app.runtime.backends["be"]
                await wait_until(lambda: backend.queue.statistics().tasks_waiting == 1, timeout=15)
                (victim,) = [c for c in app.sessions.live if c.server is None]
                victim.kill(KillReason.KILLED)
                assert await queued.receive_some(10) == b""
                await wait_until(lambda: _closed(logs), timeout=15)
            assert [(e["termination"], e["server"]) for e in _closed(logs)] == [("KD", None)]
            assert app.runtime.frontends["fe"].current == 1
            assert backend.queue.statistics().tasks_waiting == 0
            await first.aclose()
            nursery.cancel_scope.cancel()


async def test_a_connect_retried_after_a_timeout_goes_on_to_the_next_server(relay_path):
    with trio.fail_after(20), unanswered_port() as port:
        async with trio.open_nursery() as nursery:
            ports = await named_servers(nursery, "b")
            config = make_config([server("silent", port), server("b", ports["b"])], retries=1, connect=0.2)
            app = await start_warren(nursery, config, relay=relay_path)
            with structlog.testing.capture_logs() as logs:
                stream, name = await connect_and_greet(app)
                assert name == "b"
                await stream.aclose()
                await wait_until(lambda: _closed(logs), timeout=15)
            closed = _closed(logs)[0]
            assert (closed["server"], closed["retries"], closed["redispatched"]) == ("b", 1, True)
            assert closed["tc_ms"] >= 180
            assert app.runtime.server("be", "silent").connect_errors == 1
            nursery.cancel_scope.cancel()


async def _one_slot_app(nursery, relay_path, **backend_timeouts):
    ports = await named_servers(nursery, "a")
    config = make_config([server("a", ports["a"])], maxconn=1)
    if backend_timeouts:
        backend = replace(config.backends[0], timeout=replace(config.backends[0].timeout, **backend_timeouts))
        config = replace(config, backends=(backend,))
    return await start_warren(nursery, config, relay=relay_path)


async def test_a_session_failing_as_its_relay_ends_is_closed_alone_and_frees_its_slot(relay_path, monkeypatch):
    """A bug in a session's own callback (here: the relay's ending unknown
    to it) ends that session with PD; the poller, the listener and the
    frontend slot (maxconn 1 here) carry on."""
    import proxy.frontends.session as session_module

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await _one_slot_app(nursery, relay_path)
            with structlog.testing.capture_logs() as logs:
                victim, _ = await connect_and_greet(app)
                monkeypatch.setattr(session_module, "_ENDINGS", {})
                await victim.send_eof()  # the echo server closes too: the relay ends
                await wait_until(lambda: _closed(logs), timeout=15)
                monkeypatch.undo()
                stream, name = await connect_and_greet(app)  # the only slot is free again
                assert name == "a"
            assert any(e["event"] == "session.failed" for e in logs)
            assert _closed(logs)[0]["termination"] == "PD"
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_failing_idle_timeout_ends_that_session_alone_and_frees_its_slot(relay_path, monkeypatch):
    import proxy.frontends.session as session_module
    from proxy.io.kernel_relay import KernelLink

    def broken_blame(self, *args):
        raise RuntimeError("a bug in one relay's timeout")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await _one_slot_app(nursery, relay_path, tunnel=0.2)
            with structlog.testing.capture_logs() as logs:
                # The compiled session's expiry fails on its termination code (its
                # methods cannot be patched); the kernel's relay fails in its blame.
                monkeypatch.setattr(session_module, "_ENDINGS", {})
                monkeypatch.setattr(KernelLink, "_idle_blame", broken_blame)
                victim, _ = await connect_and_greet(app)
                assert await victim.receive_some(10) == b""  # closed when its timer fired
                await wait_until(lambda: _closed(logs), timeout=15)
                monkeypatch.undo()
                stream, name = await connect_and_greet(app)
                assert name == "a"
            failed = [e for e in logs if e["event"] == "session.failed"]
            error = failed[0]["exc_info"] if failed else None
            assert "a bug in one relay's timeout" in repr(error) or isinstance(error, KeyError)
            assert _closed(logs)[0]["termination"] == "PD"
            await stream.aclose()
            nursery.cancel_scope.cancel()
