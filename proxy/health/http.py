"""The HTTP check: GET a RabbitMQ management health endpoint (h11 on trio).

A broker in a memory or disk alarm still completes the AMQP handshake while
publishers are blocked; the management plugin's
``/api/health/checks/alarms`` answers 503 then, which is what this check is
for (and ``/api/health/checks/is-in-service`` for nodes being drained).
"""

from __future__ import annotations

import base64

import h11
import trio

from proxy.config.model import CheckKind, HttpCheck
from proxy.health.results import CheckCode, CheckFailed, CheckResult
from proxy.health.tcp import CheckRun, CheckTls, close_stream, open_check_stream, run_check

READ_SIZE = 16384
MAX_HEADERS = 16384  # h11's bound on an incomplete head
MAX_BODY = 65536  # read at most this much body; the status already decided
BODY_IN_DETAILS = 256


def _waiting_for_response() -> tuple[CheckCode, str]:
    return CheckCode.L7TOUT, "the HTTP response"


def build_request(host: str, port: int, settings: HttpCheck) -> h11.Request:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    credentials = base64.b64encode(f"{settings.user}:{settings.password}".encode()).decode()
    return h11.Request(
        method="GET",
        target=settings.path,
        headers=[
            ("Host", authority),
            ("Authorization", f"Basic {credentials}"),
            ("User-Agent", "Warren health check"),
            # Not "application/json": RabbitMQ 3.10 then turns a missing endpoint's
            # 404 (e.g. is-in-service, added later) into a puzzling 406.
            ("Accept", "*/*"),
            ("Connection", "close"),
        ],
    )


async def _next_event(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> h11.Event:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise CheckFailed(CheckCode.L7RSP, f"invalid HTTP response: {exc}") from None
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(READ_SIZE))


async def _read_response(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> h11.Response:
    while True:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.ConnectionClosed):
            raise CheckFailed(CheckCode.L7RSP, "connection closed before the HTTP response")
        # h11.InformationalResponse (1xx): keep waiting for the final one.


async def _read_body_start(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> bytes:
    """Up to MAX_BODY bytes of the body; a larger or endless body is cut off."""
    body = bytearray()
    while len(body) < MAX_BODY:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    return bytes(body[:MAX_BODY])


async def check_http(
    host: str, port: int, settings: HttpCheck, timeout: float, *, proxy_header: bytes | None = None,
    tls: CheckTls | None = None,
) -> CheckResult:
    """GET `settings.path` on `host`:`port` with basic auth.

    L7OK when the status is in `settings.expect`, else L7STS; either way
    ``details["status"]`` holds the status (results read "L7STS/503") and
    ``details["body"]`` the start of the body.  L7RSP for a response that is
    not HTTP/1.x, L7TOUT when it is late, L4* / SOCKERR for TCP trouble,
    L6RSP/L6TOUT for the TLS handshake (HTTPS, with `tls`).
    `port` is the management port (the caller picks server or backend's).
    """

    async def get(run: CheckRun) -> CheckResult:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADERS)
        stream = await open_check_stream(host, port, proxy_header, tls, run)
        run.phase = _waiting_for_response
        try:
            request = conn.send(build_request(host, port, settings)) + conn.send(h11.EndOfMessage())
            await stream.send_all(request)
            response = await _read_response(stream, conn)
            body = await _read_body_start(stream, conn)
        finally:
            await close_stream(stream)
        return _judge(run, settings, response, body)

    return await run_check(CheckKind.HTTP, timeout, get)


def _judge(run: CheckRun, settings: HttpCheck, response: h11.Response, body: bytes) -> CheckResult:
    reason = response.reason.decode("latin-1", "replace")
    details = {
        "status": str(response.status_code),
        "body": body[:BODY_IN_DETAILS].decode("utf-8", "replace"),
    }
    code = CheckCode.L7OK if response.status_code in settings.expect else CheckCode.L7STS
    return run.result(code, f"HTTP {response.status_code} {reason}".rstrip(), details)
