"""The check shells against small fake servers on 127.0.0.1.

Fake brokers are scripted with the codec's server-side encoders; every
test is bounded by trio.fail_after.  Watch tests that wait for heartbeats
run on a MockClock that jumps only after 50 ms of real idleness, so socket
I/O on loopback is never overtaken by virtual time.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from lab import wait_until
from proxy.config.model import AmqpCheck, CheckKind, HttpCheck
from proxy.health.amqp import check_amqp
from proxy.health.amqp_methods import (
    ConnectionClose,
    ConnectionCloseOk,
    ConnectionOpen,
    ConnectionOpenOk,
    ConnectionStart,
    ConnectionStartOk,
    ConnectionTune,
    ConnectionTuneOk,
    Method,
    decode_method,
)
from proxy.health.amqp_wire import FRAME_HEARTBEAT, HEARTBEAT_FRAME, PROTOCOL_HEADER, FrameBuffer
from proxy.health.http import MAX_BODY, check_http
from proxy.health.results import CheckCode, CheckResult
from proxy.health.tcp import check_tcp
from proxy.health.watch import WatchOpenFailed, watch_amqp

LOCAL = "127.0.0.1"
SETTINGS = AmqpCheck(user="warren", password="s3cret", vhost="/prod", heartbeat=1.0)
PROPERTIES = {"product": "RabbitMQ", "version": "3.10.8", "cluster_name": "rabbit@test", "platform": "Erlang/OTP 25"}
PROXY_V1 = b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 5672\r\n"

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler):
    """Run `handler` for each connection to a fresh 127.0.0.1 port; yield the port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=LOCAL))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def closed_port() -> int:
    sock = socket.socket()
    sock.bind((LOCAL, 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def idle_jump_clock():
    return trio.testing.MockClock(autojump_threshold=0.05)


class Broker:
    """The broker's end of one connection, scripted by a test."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.raw = bytearray()
        self.frames = FrameBuffer()
        self.heartbeats = 0
        self.received: list[Method | None] = []

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.raw += data
        return bool(data)

    async def read_exact(self, n: int) -> bytes:
        while len(self.raw) < n:
            if not await self._fill():
                raise EOFError
        chunk = bytes(self.raw[:n])
        del self.raw[:n]
        return chunk

    async def read_method(self) -> Method | None:
        """The next method from the client (heartbeats counted), None at EOF."""
        while True:
            self.frames.feed(bytes(self.raw))
            self.raw.clear()
            frame = self.frames.next_frame()
            if frame is not None and frame.type == FRAME_HEARTBEAT:
                self.heartbeats += 1
            elif frame is not None:
                method = decode_method(frame.payload)
                self.received.append(method)
                return method
            elif not await self._fill():
                self.received.append(None)
                return None

    async def send(self, *methods: Method) -> None:
        await self.stream.send_all(b"".join(m.frame() for m in methods))

    async def handshake(self, *, heartbeat: int = 60, proxy_header: bytes = b"") -> None:
        """Up to and including Open-Ok, checking what the client sends."""
        if proxy_header:
            assert await self.read_exact(len(proxy_header)) == proxy_header
        assert await self.read_exact(8) == PROTOCOL_HEADER
        await self.send(ConnectionStart(server_properties=PROPERTIES))
        start_ok = await self.read_method()
        assert isinstance(start_ok, ConnectionStartOk)
        await self.send(ConnectionTune(2047, 131072, heartbeat))
        assert isinstance(await self.read_method(), ConnectionTuneOk)
        assert isinstance(await self.read_method(), ConnectionOpen)
        await self.send(ConnectionOpenOk())

    async def answer_close(self) -> None:
        assert isinstance(await self.read_method(), ConnectionClose)
        await self.send(ConnectionCloseOk())
        assert await self.read_method() is None  # then the client hangs up


def broker(script: Callable[[Broker], Awaitable[None]], seen: list[Broker] | None = None) -> Handler:
    async def handler(stream: trio.SocketStream) -> None:
        conversation = Broker(stream)
        if seen is not None:
            seen.append(conversation)
        await script(conversation)

    return handler


async def polite(b: Broker) -> None:
    await b.handshake()
    await b.answer_close()


# --- TCP ------------------------------------------------------------------------


async def test_tcp_check_passes_on_connect():
    got = []

    async def handler(stream):
        got.append(await stream.receive_some(100))

    with trio.fail_after(5):
        async with serving(handler) as port:
            result = await check_tcp(LOCAL, port, None, 1.0, proxy_header=PROXY_V1)
            await wait_until(lambda: got, timeout=5, interval=0)
    assert (result.code, result.kind, result.passed) == (CheckCode.L4OK, CheckKind.TCP, True)
    assert got == [PROXY_V1]


async def test_refused_connect_is_l4con():
    with trio.fail_after(5):
        result = await check_tcp(LOCAL, closed_port(), None, 1.0)
    assert result.code is CheckCode.L4CON and result.description == "Connection refused"
    assert not result.passed and result.short().startswith("L4CON in ")


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no ::1")
async def test_tcp_check_over_ipv6():
    async def handler(stream):
        await stream.receive_some(1)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="::1"))
            port = listeners[0].socket.getsockname()[1]
            assert (await check_tcp("::1", port, None, 1.0)).code is CheckCode.L4OK
            nursery.cancel_scope.cancel()


async def test_connect_timeout_is_l4tout():
    # A listener whose accept queue is full drops SYNs, so connect hangs.
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    try:
        with trio.fail_after(5):
            result = await check_tcp(LOCAL, listener.getsockname()[1], None, 0.3)
    finally:
        for sock in [listener, *fillers]:
            sock.close()
    assert result.code is CheckCode.L4TOUT and 0.3 <= result.duration < 1.0


# --- AMQP -----------------------------------------------------------------------


async def test_polite_broker_passes_and_sees_a_clean_close():
    seen: list[Broker] = []
    with trio.fail_after(5):
        async with serving(broker(polite, seen)) as port:
            result = await check_amqp(LOCAL, port, SETTINGS, 2.0)
    assert result.code is CheckCode.L7OK and result.kind is CheckKind.AMQP
    assert dict(result.details) == PROPERTIES
    assert "RabbitMQ 3.10.8" in result.description
    [start_ok, tune_ok, open_, close, end] = seen[0].received
    assert start_ok.response == b"\x00warren\x00s3cret" and start_ok.mechanism == "PLAIN"
    assert tune_ok.heartbeat == 0  # a check needs no heartbeats
    assert open_.virtual_host == "/prod"
    assert close.reply_code == 200
    assert end is None  # the socket closed only after Close-Ok: no broker warning


async def test_proxy_header_goes_first():
    async def script(b: Broker) -> None:
        await b.handshake(proxy_header=PROXY_V1)
        await b.answer_close()

    with trio.fail_after(5):
        async with serving(broker(script)) as port:
            result = await check_amqp(LOCAL, port, SETTINGS, 2.0, proxy_header=PROXY_V1)
    assert result.code is CheckCode.L7OK


@pytest.mark.parametrize(
    "step, reply_code, reply_text",
    [
        ("start-ok", 403, "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN"),
        ("open", 530, "NOT_ALLOWED - vhost /prod not found"),
    ],
)
async def test_broker_refusal_is_l7sts_and_answered_with_close_ok(step, reply_code, reply_text):
    async def script(b: Broker) -> None:
        assert await b.read_exact(8) == PROTOCOL_HEADER
        await b.send(ConnectionStart(server_properties=PROPERTIES))
        await b.read_method()
        if step == "open":
            await b.send(ConnectionTune())
            await b.read_method()
            await b.read_method()
        await b.send(ConnectionClose(reply_code, reply_text, 10, 11 if step == "start-ok" else 40))
        assert isinstance(await b.read_method(), ConnectionCloseOk)

    with trio.fail_after(5):
        async with serving(broker(script)) as port:
            result = await check_amqp(LOCAL, port, SETTINGS, 2.0)
    assert result.code is CheckCode.L7STS and reply_text in result.description
    assert result.short().startswith(f"L7STS/{reply_code} in ")


@pytest.mark.parametrize(
    "answer, words",
    [
        (b"AMQP\x00\x01\x00\x00", "protocol version mismatch"),
        (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "not an AMQP 0-9-1 answer"),
        (b"", "closed before Connection.Start"),
        (ConnectionStart().frame()[:40], "middle of a frame"),
    ],
)
async def test_foreign_or_broken_answers_are_l6rsp(answer, words):
    async def handler(stream: trio.SocketStream) -> None:
        await Broker(stream).read_exact(8)
        await stream.send_all(answer)
        await stream.aclose()

    with trio.fail_after(5):
        async with serving(handler) as port:
            result = await check_amqp(LOCAL, port, SETTINGS, 2.0)
    assert result.code is CheckCode.L6RSP and words in result.description


async def test_wrong_method_is_l7rsp():
    async def script(b: Broker) -> None:
        await b.read_exact(8)
        await b.send(ConnectionStart(server_properties=PROPERTIES))
        await b.read_method()
        await b.send(ConnectionOpenOk())  # skipping Tune
        await b.read_method()

    with trio.fail_after(5):
        async with serving(broker(script)) as port:
            result = await check_amqp(LOCAL, port, SETTINGS, 2.0)
    assert result.code is CheckCode.L7RSP and "expected Connection.Tune" in result.description


async def test_silent_broker_is_l6tout():
    async def handler(stream: trio.SocketStream) -> None:
        await Broker(stream).read_exact(8)
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with serving(handler) as port:
            result = await check_amqp(LOCAL, port, SETTINGS, 0.3)
    assert result.code is CheckCode.L6TOUT and "Connection.Start" in result.description
    assert 0.3 <= result.duration < 1.0


async def test_broker_stalling_after_start_is_l7tout():
    async def script(b: Broker) -> None:
        await b.read_exact(8)
        await b.send(ConnectionStart(server_properties=PROPERTIES))
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with serving(broker(script)) as port:
            result = await check_amqp(LOCAL, port, SETTINGS, 0.3)
    assert result.code is CheckCode.L7TOUT and "Connection.Tune" in result.description


async def test_reset_mid_handshake_is_sockerr():
    async def handler(stream: trio.SocketStream) -> None:
        await Broker(stream).read_exact(8)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()  # linger 0: RST instead of FIN

    with trio.fail_after(5):
        async with serving(handler) as port:
            result = await check_amqp(LOCAL, port, SETTINGS, 2.0)
    assert result.code is CheckCode.SOCKERR and "reset" in result.description.lower()


async def test_amqp_check_on_a_closed_port_is_l4con():
    with trio.fail_after(5):
        result = await check_amqp(LOCAL, closed_port(), SETTINGS, 1.0)
    assert result.code is CheckCode.L4CON


# --- HTTP -----------------------------------------------------------------------


def http_server(response: bytes, requests: list[bytes] | None = None, *, then: str = "close") -> Handler:
    async def handler(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            data = await stream.receive_some(4096)
            if not data:
                return
            request += data
        if requests is not None:
            requests.append(request)
        try:
            await stream.send_all(response)
            if then == "stream":
                while True:
                    await stream.send_all(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")
            if then == "hang":
                await trio.sleep_forever()
        except trio.BrokenResourceError:
            return  # the check stopped reading, as it should
        await stream.aclose()

    return handler


def http_response(status: str, body: bytes = b"", extra: bytes = b"") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + extra + b"\r\n" + body


async def run_http(handler: Handler, settings: HttpCheck = HttpCheck(), timeout: float = 2.0) -> CheckResult:
    with trio.fail_after(5):
        async with serving(handler) as port:
            return await check_http(LOCAL, port, settings, timeout)


async def test_http_200_passes_and_sends_basic_auth():
    requests: list[bytes] = []
    settings = HttpCheck(path="/api/health/checks/alarms", user="monitor", password="pw")
    result = await run_http(http_server(http_response("200 OK", b'{"status":"ok"}'), requests), settings)
    assert result.code is CheckCode.L7OK and result.short().startswith("L7OK/200 in ")
    assert result.details["body"] == '{"status":"ok"}'
    head = requests[0].decode()
    assert head.startswith("GET /api/health/checks/alarms HTTP/1.1\r\n")
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if line)
    assert headers["Authorization"] == "Basic bW9uaXRvcjpwdw=="  # monitor:pw
    assert headers["Host"].startswith(f"{LOCAL}:") and headers["Connection"] == "close"


async def test_http_alarm_503_is_l7sts_with_the_reason():
    body = b'{"status":"failed","reason":"There are alarms in effect in the cluster"}'
    result = await run_http(http_server(http_response("503 Service Unavailable", body)))
    assert result.code is CheckCode.L7STS and result.short().startswith("L7STS/503 in ")
    assert result.description == "HTTP 503 Service Unavailable"
    assert "alarms in effect" in result.details["body"]


async def test_http_expect_list_decides():
    result = await run_http(http_server(http_response("204 No Content")), HttpCheck(expect=(200, 204)))
    assert result.code is CheckCode.L7OK
    result = await run_http(http_server(http_response("401 Unauthorized")), HttpCheck(expect=(200, 204)))
    assert result.code is CheckCode.L7STS and result.details["status"] == "401"


@pytest.mark.parametrize("answer", [b"AMQP\x00\x00\x09\x01", b"HTTP/1.1 abc\r\n\r\n", b""])
async def test_http_garbage_or_nothing_is_l7rsp(answer):
    result = await run_http(http_server(answer))
    assert result.code is CheckCode.L7RSP


async def test_http_silence_is_l7tout():
    result = await run_http(http_server(b"", then="hang"), timeout=0.3)
    assert result.code is CheckCode.L7TOUT


async def test_http_endless_body_is_read_only_up_to_the_bound():
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    result = await run_http(http_server(head, then="stream"))
    assert result.code is CheckCode.L7OK and len(result.details["body"]) <= MAX_BODY


# --- watch ----------------------------------------------------------------------


class Lost:
    """Collects on_lost calls."""

    def __init__(self):
        self.results: list[CheckResult] = []

    def __call__(self, result: CheckResult) -> None:
        self.results.append(result)


async def test_watch_reports_a_graceful_stop_320_once():
    lost, go, seen = Lost(), trio.Event(), []

    async def script(b: Broker) -> None:
        await b.handshake(heartbeat=60)
        await go.wait()
        await b.send(ConnectionClose(320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"))
        assert isinstance(await b.read_method(), ConnectionCloseOk)

    with trio.fail_after(5):
        async with serving(broker(script, seen)) as port:
            async with trio.open_nursery() as nursery:
                opened = await nursery.start(watch_amqp, LOCAL, port, SETTINGS, lost)
                assert opened.heartbeat == 1 and not lost.results
                go.set()
    [result] = lost.results
    assert result.code is CheckCode.L7STS and result.kind is CheckKind.WATCH
    assert result.short().startswith("L7STS/320 in ") and "CONNECTION_FORCED" in result.description
    assert seen[0].received[1] == ConnectionTuneOk(1, 131072, 1)


async def test_watch_reports_320_even_when_the_broker_resets_right_after():
    # RabbitMQ 3.10.8 on SIGTERM: Connection.Close 320, then RST 0.1 ms later,
    # so sending the Close-Ok fails; the verdict must still be the 320.
    lost, go = Lost(), trio.Event()

    async def script(b: Broker) -> None:
        await b.handshake()
        await go.wait()
        # Close then RST with no checkpoint between: the watch wakes to both.
        sock = b.stream.socket
        os.write(sock.fileno(), ConnectionClose(320, "CONNECTION_FORCED - shutdown").frame())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    with trio.fail_after(5):
        async with serving(broker(script)) as port:
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_amqp, LOCAL, port, SETTINGS, lost)
                go.set()
    [result] = lost.results
    assert result.short().startswith("L7STS/320 in ")


@pytest.mark.parametrize("how, code", [("eof", CheckCode.L4CON), ("reset", CheckCode.SOCKERR)])
async def test_watch_reports_a_killed_broker(how, code):
    lost, go = Lost(), trio.Event()

    async def script(b: Broker) -> None:
        await b.handshake()
        await go.wait()
        if how == "reset":
            b.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.stream.socket.close()

    with trio.fail_after(5):
        async with serving(broker(script)) as port:
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_amqp, LOCAL, port, SETTINGS, lost)
                go.set()
    [result] = lost.results
    assert result.code is code


async def test_watch_heartbeats_and_detects_a_broker_gone_silent(idle_jump_clock):
    lost, seen = Lost(), []
    stopped_at: list[float] = []

    async def read_all(b: Broker) -> None:
        while await b.read_method() is not None:  # counts the watch's heartbeats too
            pass

    async def script(b: Broker) -> None:
        await b.handshake(heartbeat=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, b)
            for _ in range(10):  # heartbeat for 5 s, then hang
                await b.stream.send_all(HEARTBEAT_FRAME)
                await trio.sleep(0.5)
            stopped_at.append(trio.current_time())

    with trio.fail_after(60):
        async with serving(broker(script, seen)) as port:
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_amqp, LOCAL, port, SETTINGS, lost)
            detected_at = trio.current_time()
    [result] = lost.results
    assert result.code is CheckCode.L7TOUT and "2s" in result.description
    # Last heartbeat at ~4.5 s; two 1 s intervals of silence later, lost.
    assert stopped_at and 6.0 <= detected_at <= 7.0
    assert result.duration == pytest.approx(2.0, abs=0.1)
    assert seen[0].heartbeats >= 11  # one every half interval, from the watch


async def test_cancelled_watch_closes_politely_without_reporting():
    lost, seen, closed = Lost(), [], trio.Event()

    async def script(b: Broker) -> None:
        await b.handshake()
        await b.answer_close()
        closed.set()

    with trio.fail_after(5):
        async with serving(broker(script, seen)) as port:
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_amqp, LOCAL, port, SETTINGS, lost)
                nursery.cancel_scope.cancel()
            await closed.wait()
    assert lost.results == []
    assert isinstance(seen[0].received[-2], ConnectionClose) and seen[0].received[-1] is None


async def test_cancel_close_is_bounded_when_the_broker_ignores_close():
    lost = Lost()

    async def script(b: Broker) -> None:
        await b.handshake()
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with serving(broker(script)) as port:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial_watch(port, lost, close_timeout=0.2))
                began = trio.current_time()
                nursery.cancel_scope.cancel()
            assert trio.current_time() - began < 1.0
    assert lost.results == []


def partial_watch(port: int, lost: Lost, **kwargs):
    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await watch_amqp(LOCAL, port, SETTINGS, lost, task_status=task_status, **kwargs)

    return run


async def test_watch_that_cannot_open_raises_to_the_starter():
    async def script(b: Broker) -> None:
        await b.read_exact(8)
        await b.send(ConnectionStart(server_properties=PROPERTIES))
        await b.read_method()
        await b.send(ConnectionClose(403, "ACCESS_REFUSED - Login was refused"))
        await b.read_method()

    lost = Lost()
    with trio.fail_after(5):
        async with serving(broker(script)) as port:
            async with trio.open_nursery() as nursery:
                with pytest.raises(WatchOpenFailed) as caught:
                    await nursery.start(watch_amqp, LOCAL, port, SETTINGS, lost)
        async with trio.open_nursery() as nursery:
            with pytest.raises(WatchOpenFailed) as refused:
                await nursery.start(watch_amqp, LOCAL, closed_port(), SETTINGS, lost)
    assert caught.value.result.short().startswith("L7STS/403")
    assert refused.value.result.code is CheckCode.L4CON
    assert lost.results == []


async def test_watch_open_is_bounded_by_open_timeout():
    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with serving(handler) as port:
            async with trio.open_nursery() as nursery:
                with pytest.raises(WatchOpenFailed) as caught:
                    await nursery.start(partial_watch(port, Lost(), open_timeout=0.3))
    assert caught.value.result.code is CheckCode.L6TOUT
