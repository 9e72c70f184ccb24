"""The h11-on-trio server against in-memory streams: framing, limits, timeouts."""

import re
from functools import partial

import structlog
import trio
import trio.testing

from proxy.stats_ui.server import Limits, Request, Response, serve_connection

LIMITS = Limits(max_header_bytes=2048, max_body_bytes=1024, header_timeout=10, body_timeout=20, idle_timeout=30,
                send_timeout=5)


async def echo(request: Request) -> Response:
    body = f"{request.method} {request.target} {len(request.body)}".encode()
    return Response(200, body)


async def exchange(payload: bytes, handler=echo, limits=LIMITS, *, eof=True) -> bytes:
    """Sends `payload`, then reads everything the server says until it closes."""
    server_side, client = trio.testing.memory_stream_pair()
    received = b""
    with trio.fail_after(120):  # virtual seconds under autojump_clock
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server_side, handler, limits, "test:1")
            await client.send_all(payload)
            if eof:
                await client.send_eof()
            while chunk := await client.receive_some(65536):
                received += chunk
    return received


def statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1.1 (\d{3}) ", raw)]


async def test_keep_alive_serves_pipelined_requests_in_order():
    raw = await exchange(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(raw) == [200, 200]
    assert raw.index(b"GET /a 0") < raw.index(b"GET /b 0")


async def test_body_is_read():
    raw = await exchange(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert b"POST / 5" in raw


async def test_head_gets_headers_without_body():
    raw = await exchange(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(raw) == [200]
    assert b"content-length: 9\r\n" in raw and raw.endswith(b"\r\n\r\n")


async def test_http10_connection_closes_after_the_answer():
    raw = await exchange(b"GET / HTTP/1.0\r\n\r\n", eof=False)
    assert statuses(raw) == [200]


async def test_response_close_ends_the_connection(autojump_clock):
    async def closing(request):
        return Response(200, b"bye", close=True)

    raw = await exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", closing, eof=False)
    assert statuses(raw) == [200] and b"connection: close" in raw


async def test_oversized_head_gets_431():
    raw = await exchange(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
    assert statuses(raw) == [431]


async def test_declared_oversized_body_gets_413_before_it_is_sent(autojump_clock):
    raw = await exchange(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n", eof=False)
    assert statuses(raw) == [413]


async def test_chunked_body_over_the_limit_gets_413():
    chunk = b"400\r\n" + b"a" * 1024 + b"\r\n"
    raw = await exchange(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2 + b"0\r\n\r\n")
    assert statuses(raw) == [413]


async def test_malformed_requests_get_4xx_or_501():
    assert statuses(await exchange(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")) == [400]  # a TLS hello
    assert statuses(await exchange(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")) == [400]
    assert statuses(await exchange(b"GET / HTTP/1.1\r\n\r\n")) == [400]  # HTTP/1.1 requires Host
    raw = await exchange(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert statuses(raw) == [501]


async def test_connection_closed_mid_request_is_logged_not_raised():
    with structlog.testing.capture_logs() as logs:
        raw = await exchange(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert statuses(raw) == [400]
    assert logs[0]["event"] == "stats.request_refused"


async def test_slow_request_head_gets_408_after_the_header_timeout(autojump_clock):
    start = trio.current_time()
    with structlog.testing.capture_logs() as logs:
        raw = await exchange(b"GET / HTTP/1.1\r\nHost: x\r\n", eof=False)
    assert statuses(raw) == [408]
    assert 10 <= trio.current_time() - start < 12
    assert logs[0]["status"] == 408 and logs[0]["reason"] == "request head not received in time"


async def test_the_body_has_its_own_clock_from_the_end_of_the_head(autojump_clock):
    server_side, client = trio.testing.memory_stream_pair()
    received = b""
    with structlog.testing.capture_logs() as logs, trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server_side, echo, LIMITS, "test:1")
            await trio.sleep(9)  # the head comes in just within its 10 s
            await client.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            head_in = trio.current_time()
            while chunk := await client.receive_some(65536):
                received += chunk
    assert statuses(received) == [408]
    assert 20 <= trio.current_time() - head_in < 22  # body_timeout, counted from the head
    assert logs[0]["reason"] == "request body not received in time"


async def test_a_slot_is_busy_while_a_request_is_answered_and_waiting_otherwise(autojump_clock):
    states = []

    class Slot:
        def busy(self):
            states.append("busy")

        def waiting(self):
            states.append("waiting")

    async def handler(request):
        return Response(200, b"ok")

    server_side, client = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_connection, server_side, handler, LIMITS, "test:1", slot=Slot()))
        await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await client.send_eof()
        while await client.receive_some(65536):
            pass
    assert states == ["busy", "waiting", "busy", "waiting"]


async def test_silent_client_gets_408_after_the_header_timeout(autojump_clock):
    assert statuses(await exchange(b"", eof=False)) == [408]


async def test_idle_keep_alive_connection_is_closed_quietly(autojump_clock):
    start = trio.current_time()
    raw = await exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", eof=False)
    assert statuses(raw) == [200]
    assert 30 <= trio.current_time() - start < 32


async def test_handler_bug_is_a_logged_500_and_the_connection_closes():
    async def broken(request):
        raise RuntimeError("bug")

    with structlog.testing.capture_logs() as logs:
        raw = await exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", broken)
    assert statuses(raw) == [500]
    assert logs[0]["event"] == "stats.handler_failed"


async def test_expect_continue_is_honoured():
    raw = await exchange(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi")
    assert statuses(raw) == [100, 200]


async def test_client_that_never_reads_is_dropped_after_the_send_timeout(autojump_clock):
    async def big(request):
        return Response(200, b"x" * 100_000)

    server_side, client = trio.testing.lockstep_stream_pair()
    start = trio.current_time()
    with structlog.testing.capture_logs() as logs, trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server_side, big, LIMITS, "test:1")
            await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await trio.sleep(60)  # never read
    assert 5 <= trio.current_time() - start <= 60
    assert any(e["event"] == "stats.send_timeout" for e in logs)


async def test_head_refused_for_its_size_gets_a_bodiless_answer():
    # h11 frames the answer to a HEAD without a body: refusing with a body
    # raised inside h11 and the client got nothing.
    raw = await exchange(b"HEAD / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
    assert statuses(raw) == [431] and raw.endswith(b"\r\n\r\n")
    raw = await exchange(b"HEAD / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", eof=False)
    assert statuses(raw) == [413] and raw.endswith(b"\r\n\r\n")


async def test_content_length_of_thousands_of_digits_is_refused():
    raw = await exchange(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", eof=False)
    assert statuses(raw) in ([400], [413])


async def test_body_framed_twice_is_refused_and_the_connection_closed():
    # RFC 9112 section 6.1: Content-Length with Transfer-Encoding is a
    # request-smuggling vector; the second request must never be served.
    raw = await exchange(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert statuses(raw) == [400] and b"connection: close" in raw and b"/second" not in raw


async def test_two_authorization_headers_are_refused():
    raw = await exchange(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic a\r\nAuthorization: Basic b\r\n\r\n")
    assert statuses(raw) == [400]


def test_an_absolute_target_with_a_broken_authority_still_has_a_path():
    # Found by the property tests: urlsplit() raised on "http://[", which
    # answered 500 with a traceback before any authentication.
    for target, path, query in (("http://[", "/", ""), ("http://[::1/x?y", "/x", "y"), ("HTTPS://h?q", "/", "q"),
                                ("http://h/a/b", "/a/b", ""), ("/p?q#frag", "/p", "q")):
        request = Request("GET", target, (), b"", "t:1")
        assert (request.path, request.query) == (path, query), target


async def test_connect_is_refused_whatever_the_handler_says():
    # Found by the property tests: after a 200 to CONNECT h11 switches
    # protocols and refuses the body; the client got nothing, the log an error.
    with structlog.testing.capture_logs() as logs:
        raw = await exchange(b"CONNECT 0 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert statuses(raw) == [501]
    assert not [e for e in logs if e["log_level"] == "error"], logs
