"""The stats service over real sockets, beside a proxy carrying real connections.

The client is a small h11 client of our own, so every byte on the wire is
what a test says it is.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass, replace

import pytest
import structlog
import trio

from lab import wait_until
from proxy.app import App
from proxy.config.model import BindAddress, BindTls, Stats
from proxy.runtime import AdminState
from proxy.stats_ui.auth import FailureLimiter
from proxy.stats_ui.server import Limits
from proxy.stats_ui.service import StatsService
from tests.proxyutil import use_service, connect_and_greet, dead_port, make_config, read_line, serve_named, server
from tests.statsclient import CREDENTIALS, Reply, basic, http, raw, status_of


async def csrf_token(address, auth=CREDENTIALS) -> str:
    page = (await http(address, auth=auth)).text
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


async def post_form(address, fields: dict[str, str], *, auth=CREDENTIALS, target="/") -> Reply:
    body = "&".join(f"{k}={v}" for k, v in fields.items()).encode()
    return await http(address, target, "POST", auth=auth, body=body,
                      headers=[("content-type", "application/x-www-form-urlencoded")])


# --- Warren with a stats page ---------------------------------------------------------


@dataclass
class Running:
    app: App
    service: StatsService
    ports: dict[str, int]

    @property
    def address(self) -> tuple[str, int]:
        return self.service.addresses[0]


async def start_with_stats(nursery, names=("a", "b", "c"), *, limits=Limits(), users=(CREDENTIALS,),
                           backend_kw=None, frontend_kw=None, login_failures=None, brokers_nursery=None,
                           **stats_kw) -> Running:
    """Fake brokers (in `brokers_nursery`, default `nursery`), Warren and its stats page (in `nursery`)."""
    ports = {name: await (brokers_nursery or nursery).start(serve_named, name) for name in names}
    config = make_config([server(n, p) for n, p in ports.items()], **(backend_kw or {}))
    if frontend_kw:
        config = replace(config, frontends=(replace(config.frontends[0], **frontend_kw),))
    stats = Stats(binds=(BindAddress("127.0.0.1", 0),), users=tuple(users), **{"admin": True, **stats_kw})
    config = replace(config, stats=stats)
    app = App(config, handle_signals=False)
    service = StatsService(config, limits=limits, sample_interval=0.2, login_failures=login_failures)
    use_service(app, service)
    await nursery.start(app.serve)
    return Running(app, service, ports)


# --- auth -----------------------------------------------------------------------------

ENDPOINTS = ["/", "/;csv", "/;json", "/metrics"]


async def test_every_endpoint_needs_credentials():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, login_failures=FailureLimiter(max_failures=100))
            for path in ENDPOINTS + ["/unknown"]:
                for auth in (None, ("admin", "wrong"), ("nobody", "pw")):
                    reply = await http(running.address, path, auth=auth)
                    assert reply.status == 401, (path, auth)
                    assert reply.headers["www-authenticate"].startswith('Basic realm="Warren statistics"')
            for path in ENDPOINTS:
                assert (await http(running.address, path)).status == 200, path
            assert (await http(running.address, "/unknown")).status == 404
            nursery.cancel_scope.cancel()


async def test_metrics_open_without_auth_only_when_configured():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, metrics_auth=False)
            assert (await http(running.address, "/metrics", auth=None)).status == 200
            assert (await http(running.address, "/;csv", auth=None)).status == 401
            nursery.cancel_scope.cancel()


async def test_repeated_failures_from_one_address_get_429():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery)
            for _ in range(5):
                assert (await http(running.address, auth=("admin", "guess"))).status == 401
            reply = await http(running.address)
            assert reply.status == 429 and int(reply.headers["retry-after"]) > 0
            nursery.cancel_scope.cancel()


async def test_guesses_from_rotating_addresses_meet_the_global_budget():
    # Each address stays under its own limit of 5; 1,340 guesses a second got through before.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, users=(CREDENTIALS, ("alice", "right")))
            assert (await http(running.address)).status == 200  # an operator logged in before
            limiter = running.service._limiter
            with structlog.testing.capture_logs() as logs:
                for i in range(limiter.global_max_failures):
                    reply = await http(running.address, auth=("admin", f"guess{i}"), source=f"127.0.{i}.1")
                    assert reply.status == 401
                # A right password not verified before waits too: a guess cannot tell it is right.
                reply = await http(running.address, auth=("alice", "right"), source="127.0.200.1")
                assert reply.status == 429 and int(reply.headers["retry-after"]) > 0
            assert any(e["event"] == "stats.login_throttled" for e in logs)
            assert (await http(running.address)).status == 200  # the operator's browser still works
            nursery.cancel_scope.cancel()


# --- exports --------------------------------------------------------------------------


async def test_csv_parses_and_counts_a_live_connection():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, uri="/haproxy")
            stream, name = await connect_and_greet(running.app)
            reply = await http(running.address, "/haproxy;csv")
            assert reply.status == 200 and reply.headers["content-type"].startswith("text/csv")
            lines = reply.text.splitlines()
            assert lines[0].startswith("# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,")
            rows = list(csv.DictReader(io.StringIO("\n".join([lines[0][2:]] + lines[1:]))))
            assert [(r["pxname"], r["svname"]) for r in rows] == [
                ("fe", "FRONTEND"), ("be", "a"), ("be", "b"), ("be", "c"), ("be", "BACKEND")]
            used = next(r for r in rows if r["svname"] == name)
            assert (used["scur"], used["stot"], used["status"], used["type"]) == ("1", "1", "no check", "2")
            assert rows[0]["scur"] == "1" and rows[-1]["scur"] == "1"
            assert (await http(running.address, "/;csv")).status == 404
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_metrics_and_json_parse():
    with trio.fail_after(30):
        parser = pytest.importorskip("prometheus_client.parser")
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery)
            reply = await http(running.address, "/metrics")
            families = {f.name: f for f in parser.text_string_to_metric_families(reply.text)}
            up = [s for s in families["warren_server_status"].samples if s.labels["state"] == "UP"]
            assert [s.value for s in up] == [1, 1, 1]
            document = json.loads((await http(running.address, "/;json")).body)
            assert [s["name"] for s in document["backends"][0]["servers"]] == ["a", "b", "c"]
            nursery.cancel_scope.cancel()


async def test_page_draws_history_charts():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery)
            await wait_until(lambda: len(running.service.history.samples("be")) >= 2, timeout=5)
            page = (await http(running.address)).text
            assert page.count('<svg class="chart"') == 2
            nursery.cancel_scope.cancel()


# --- admin ----------------------------------------------------------------------------


async def test_every_admin_action_changes_the_runtime():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, names=("a",))
            runtime = running.app.runtime
            token = await csrf_token(running.address)
            base = {"csrf": token, "backend": "be", "server": "a"}
            for action, state in (("drain", AdminState.DRAIN), ("maint", AdminState.MAINT), ("ready", AdminState.READY)):
                reply = await post_form(running.address, {**base, "action": action})
                assert reply.status == 303, reply.text
                assert runtime.server("be", "a").admin is state
            assert (await post_form(running.address, {**base, "action": "weight", "weight": "5"})).status == 303
            assert runtime.server("be", "a").weight == 5
            stream, _ = await connect_and_greet(running.app)
            reply = await post_form(running.address, {**base, "action": "kill"})
            notice_page = (await http(running.address, reply.headers["location"])).text
            assert "be/a: 1 session(s) killed" in notice_page
            with trio.fail_after(5):
                assert await read_line(stream) == ""  # the proxy closed it
            nursery.cancel_scope.cancel()


async def test_bad_csrf_and_disabled_admin_are_refused():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, names=("a",))
            reply = await post_form(running.address, {"csrf": "1.forged", "backend": "be", "server": "a",
                                                      "action": "maint"})
            assert reply.status == 403
            assert running.app.runtime.server("be", "a").admin is AdminState.READY
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, names=("a",), admin=False)
            assert "<form" not in (await http(running.address)).text
            reply = await post_form(running.address, {"backend": "be", "server": "a", "action": "maint"})
            assert reply.status == 403
            nursery.cancel_scope.cancel()


async def test_admin_values_int_refuses_are_400_or_403_never_500():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, names=("a",))
            with structlog.testing.capture_logs() as logs:
                token = await csrf_token(running.address)
                for weight in ("%C2%B2", "%E2%91%A0", "9" * 5000):
                    reply = await post_form(running.address, {"csrf": token, "backend": "be", "server": "a",
                                                              "action": "weight", "weight": weight})
                    assert reply.status == 400, reply
                reply = await post_form(running.address, {"csrf": "%C2%B2.x", "backend": "be", "server": "a",
                                                          "action": "maint"})
                assert reply.status == 403
            assert not [e for e in logs if e["log_level"] == "error"], logs
            assert running.app.runtime.server("be", "a").admin is AdminState.READY
            nursery.cancel_scope.cancel()


# --- hostile clients ------------------------------------------------------------------

HOSTILE = [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    (b"PUT /;csv HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic(*CREDENTIALS).encode() + b"\r\n\r\n", 405),
    (b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic(*CREDENTIALS).encode() + b"\r\n\r\n", 404),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(64)), 400),  # TLS to a plain port
    # Each of these answered 500 with a traceback, or nothing at all, before.
    (b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xe9\r\n\r\n", 401),
    (b"HEAD / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"HEAD / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", 413),
    (b"GET /?a&b&c&d&e&f&g&h&i HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic(*CREDENTIALS).encode()
     + b"\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic(*CREDENTIALS).encode() + b"\r\nAuthorization: "
     + basic("other", "pw").encode() + b"\r\n\r\n", 400),
    # Found by the property tests: a 500 with a traceback before any login, and no answer at all.
    (b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    (b"CONNECT stats:8404 HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic(*CREDENTIALS).encode() + b"\r\n\r\n", 501),
]


async def test_hostile_requests_get_4xx_and_are_logged_and_the_server_keeps_serving():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery)
            for payload, expected in HOSTILE:
                with structlog.testing.capture_logs() as logs:
                    answer = await raw(running.address, payload)
                assert status_of(answer) == expected, (payload[:40], answer[:80])
                assert any(e["event"] == "stats.request_refused" and e["status"] == expected for e in logs), logs
                assert not [e for e in logs if e["log_level"] == "error"], logs  # no traceback, no 500
            assert (await http(running.address)).status == 200
            await wait_until(lambda: running.service.open_connections == 0, timeout=5)
            nursery.cancel_scope.cancel()


async def test_slow_client_gets_408():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, limits=Limits(header_timeout=0.3))
            start = trio.current_time()
            answer = await raw(running.address, b"GET / HTTP/1.1\r\nHost: x\r\n", eof=False)
            assert status_of(answer) == 408
            assert 0.3 <= trio.current_time() - start < 3
            nursery.cancel_scope.cancel()


async def test_at_the_limit_the_longest_silent_connection_makes_room():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, limits=Limits(max_connections=2))
            oldest = await trio.open_tcp_stream(*running.address)
            await wait_until(lambda: running.service.open_connections == 1, timeout=5)
            newer = await trio.open_tcp_stream(*running.address)
            await wait_until(lambda: running.service.open_connections == 2, timeout=5)
            with structlog.testing.capture_logs() as logs:
                assert (await http(running.address)).status == 200
            assert await oldest.receive_some(100) == b""  # evicted, without a word
            assert [(e["event"], e["reason"]) for e in logs if e["log_level"] == "warning"] == [
                ("stats.connection_limit", "evicted")]
            await newer.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # still served
            assert status_of(await newer.receive_some(100)) == 401
            for stream in (oldest, newer):
                await stream.aclose()
            await wait_until(lambda: running.service.open_connections == 0, timeout=5)
            nursery.cancel_scope.cancel()


# --- HTTPS ([stats.tls]) ------------------------------------------------------------


async def test_over_https_a_connection_in_its_handshake_holds_a_slot_and_makes_room_for_a_real_client(pki):
    """The HTTPS page's connections go through the same slots: one that never
    sends its ClientHello waits, as one that never sends its request head,
    and is evicted for a real client from the same address."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, limits=Limits(max_connections_per_client=2),
                                             tls=BindTls(crt=(pki.server.pem,)))
            silent = [await trio.open_tcp_stream(*running.address) for _ in range(2)]
            await wait_until(lambda: running.service.open_connections == 2, timeout=5)
            with structlog.testing.capture_logs() as logs:
                reply = await http(running.address, tls=pki.server_context())
            assert reply.status == 200 and b"<!DOCTYPE html>" in reply.body
            assert await silent[0].receive_some(100) == b""  # evicted in its handshake, without a word
            assert [e["reason"] for e in logs if e["event"] == "stats.connection_limit"] == ["evicted"]
            await wait_until(lambda: running.service.open_connections == 1, timeout=5)  # the other silent one
            for stream in silent:
                await stream.aclose()
            await wait_until(lambda: running.service.open_connections == 0, timeout=5)
            nursery.cancel_scope.cancel()


async def test_over_https_a_handshake_not_done_in_time_or_plain_http_is_closed_and_logged(pki):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, tls=BindTls(crt=(pki.server.pem,), handshake_timeout=0.3))
            with structlog.testing.capture_logs() as logs:
                start = trio.current_time()
                assert await raw(running.address, b"", eof=False) == b""  # never a ClientHello
                assert 0.3 <= trio.current_time() - start < 3
                answer = await raw(running.address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert status_of(answer) is None  # no plaintext answer on the HTTPS port
            failed = [e for e in logs if e["event"] == "stats.tls_handshake_failed"]
            assert [e["reason"] for e in failed][0] == "handshake timeout"
            assert len(failed) == 2 and failed[1]["reason"] != "handshake timeout", failed
            assert (await http(running.address, tls=pki.server_context())).status == 200
            await wait_until(lambda: running.service.open_connections == 0, timeout=5)
            nursery.cancel_scope.cancel()


def fuzz_payload(rng: random.Random) -> bytes:
    """Malformed HTTP of many kinds: truncated, binary, huge, split oddly."""
    valid = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic(*CREDENTIALS).encode() + b"\r\n\r\n"
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 3000))
    if kind == 1:
        return valid[: rng.randrange(1, len(valid))]  # truncated, then EOF
    if kind == 2:
        cut = bytearray(valid)
        for _ in range(rng.randrange(1, 8)):
            cut[rng.randrange(len(cut))] = rng.randrange(256)
        return bytes(cut)
    if kind == 3:
        return b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + rng.randbytes(200)
    if kind == 4:
        return b"GET /" + b"A" * rng.randrange(10000, 40000) + b" HTTP/1.1\r\n"
    return valid * rng.randrange(1, 20)  # pipelined


async def test_fuzzing_the_stats_port_never_disturbs_proxying():
    with trio.fail_after(30):
        rng = random.Random(1234)
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery, limits=Limits(header_timeout=1.0))
            stream, _ = await connect_and_greet(running.app)
            with structlog.testing.capture_logs() as logs:
                async with trio.open_nursery() as fuzzers:
                    for worker in range(8):
                        payloads = [fuzz_payload(rng) for _ in range(25)]

                        async def fuzz(payloads=payloads):
                            for payload in payloads:
                                await raw(running.address, payload)

                        fuzzers.start_soon(fuzz)
                    for i in range(50):  # the proxied connection keeps echoing meanwhile
                        message = f"ping {i}\n".encode()
                        with trio.fail_after(2):
                            await stream.send_all(message)
                            assert await read_line(stream) == message.decode().strip()
                        await trio.sleep(0.01)
            assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
            assert (await http(running.address)).status == 200
            await wait_until(lambda: running.service.open_connections == 0, timeout=5)
            await stream.aclose()
            nursery.cancel_scope.cancel()


# --- lifecycle ------------------------------------------------------------------------


async def test_stop_closes_open_http_connections():
    with trio.fail_after(30):
        async with trio.open_nursery() as brokers:
            async with trio.open_nursery() as nursery:
                running = await start_with_stats(nursery, brokers_nursery=brokers)
                idle = await trio.open_tcp_stream(*running.address)
                await wait_until(lambda: running.service.open_connections == 1, timeout=5)
                running.app.stop()
                assert await idle.receive_some(100) == b""
            # Warren's nursery exited: every HTTP connection task has ended.
            assert running.service.open_connections == 0
            brokers.cancel_scope.cancel()


async def test_reload_applies_users_and_binds():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await start_with_stats(nursery)
            old_address = running.address
            config = running.app.config
            new_port = dead_port()
            new_stats = replace(config.stats, users=(("ops", "new"),), binds=(BindAddress("127.0.0.1", new_port),))
            running.service.reconfigure(replace(config, stats=new_stats))
            await wait_until(lambda: running.address == ("127.0.0.1", new_port), timeout=5)
            assert (await http(running.address, auth=("ops", "new"))).status == 200
            assert (await http(running.address)).status == 401
            with pytest.raises(OSError):
                await trio.open_tcp_stream(*old_address)
            nursery.cancel_scope.cancel()


async def test_unusable_bind_address_fails_start():
    with trio.fail_after(30):
        from proxy.stats_ui.service import StatsBindError

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                blocker = trio.socket.socket()
                await blocker.bind(("127.0.0.1", 0))
                blocker.listen()
                port = blocker.getsockname()[1]
                config = replace(make_config([server("a", 1)]),
                                 stats=Stats(binds=(BindAddress("127.0.0.1", port),), users=(CREDENTIALS,)))
                app = App(config, handle_signals=False)
                use_service(app, StatsService(config))
                with pytest.raises(BaseException) as caught:
                    await nursery.start(app.serve)
                blocker.close()
        assert caught.group_contains(StatsBindError) if isinstance(caught.value, BaseExceptionGroup) \
            else isinstance(caught.value, StatsBindError)
