"""A small HTTP/1.1 server: h11 for the protocol, trio for the I/O.

The shape is h11's trio example: one task per connection, every read and
write bounded by a deadline, a clean close that drains what the client still
sends. What a hostile client can cost is bounded by :class:`Limits`:

- the request head (request line + headers) is capped by h11's
  `max_incomplete_event_size` -> 431;
- the body is capped by its declared Content-Length before reading it, and
  while reading a chunked one -> 413;
- the request head must arrive within `header_timeout` of the connection
  (or of its first byte, on a keep-alive connection), and the body within
  `body_timeout` of the head -> 408; a keep-alive connection idle for
  `idle_timeout` is closed quietly. The head timeout is short: a real client
  sends its head at once, a slowloris trickles it;
- a response must be taken within `send_timeout`, else the connection is
  dropped;
- malformed HTTP -> h11's status hint (400, 501, ...), then close; so is a
  request that frames its body twice (Content-Length and Transfer-Encoding,
  RFC 9112 section 6.1: a smuggling vector) or carries a header that must be
  single (Authorization, Content-Length) more than once -> 400.

Nothing raised while serving one connection reaches the caller: protocol
errors are answered and logged, bugs in the handler are logged with their
traceback and answered 500, and the connection always ends closed.

The caller may pass a :class:`~.admission.Slot`, told when the connection
is busy (a whole request is in and being answered) and when it waits for
a request again (then it may be evicted to make room), and a logger (the
service's rate-limited one).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11
import structlog
import trio

from .admission import Slot

log = structlog.get_logger("warren.stats")

RECEIVE_SIZE = 16384


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 16384
    max_body_bytes: int = 65536
    header_timeout: float = 5.0  # connection (or first byte of a keep-alive request) -> whole head
    body_timeout: float = 10.0  # whole head -> whole body
    idle_timeout: float = 30.0  # keep-alive: answer sent -> first byte of the next request
    send_timeout: float = 10.0
    close_drain_timeout: float = 1.0
    # Per service: beyond them the longest-waiting connection (of that client) is
    # evicted, or the newcomer closed at once if every slot is busy (see .admission).
    max_connections: int = 256
    max_connections_per_client: int = 16


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased, values decoded as latin-1
    body: bytes
    client: str  # "host:port" or "[v6]:port"

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def client_host(self) -> str:
        """The client's address without its port: what rate limits count by."""
        host = self.client.rsplit(":", 1)[0] if ":" in self.client else self.client
        return host[1:-1] if host.startswith("[") and host.endswith("]") else host

    @property
    def path(self) -> str:
        return _split_target(self.target)[0]

    @property
    def query(self) -> str:
        return _split_target(self.target)[1]


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())
    close: bool = False


Handler = Callable[[Request], Awaitable[Response]]


def text_response(status: int, detail: str = "", **kw) -> Response:
    """A plain-text answer: "404 Not Found" and an optional detail line."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}\n" + (f"{detail}\n" if detail else "")
    return Response(status, body.encode(), **kw)


class HttpError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(status, reason)
        self.status, self.reason = status, reason


async def serve_connection(stream: trio.abc.Stream, handler: Handler, limits: Limits, client: str, *,
                           slot: Slot | None = None, logger: Any = log) -> None:
    """Serves requests on `stream` until it closes; always closes it."""
    connection = _Connection(stream, limits, client, slot, logger)
    try:
        await connection.serve(handler)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client went away: nothing to answer
    except Exception:  # a bug here must end this connection, not the service
        logger.exception("stats.connection_failed", client=client)
        connection.graceful = False
    finally:
        await connection.close()


class _Connection:
    def __init__(self, stream: trio.abc.Stream, limits: Limits, client: str, slot: Slot | None, logger: Any):
        self.stream, self.limits, self.client = stream, limits, client
        self.slot, self.log = slot, logger
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.graceful = True  # False: close at once, without draining (the client stopped reading)
        self.method: bytes | None = None  # of the request being read: a refusal of a HEAD has no body

    async def serve(self, handler: Handler) -> None:
        first = True
        while True:
            try:
                request = await self.read_request(first)
            except HttpError as error:
                await self.refuse(error)
                return
            if request is None:
                return
            first = False
            if self.slot is not None:
                self.slot.busy()
            response = await self.call(handler, request)
            await self.send(response, head_only=request.method == "HEAD")
            if response.close or self.h11.our_state is h11.MUST_CLOSE:
                return
            if self.slot is not None:
                self.slot.waiting()
            try:
                self.h11.start_next_cycle()
            except h11.LocalProtocolError:  # the client is not done with its side
                return

    async def read_request(self, first: bool) -> Request | None:
        """The next whole request, None when the client is done; raises HttpError.

        On a fresh connection the head clock runs from the accept (a client
        that connects and says nothing gets 408); between keep-alive requests
        it starts with the next request's first byte. The body clock starts
        once the head is in.
        """
        in_request = first
        self.method = None
        deadline = trio.current_time() + (self.limits.header_timeout if first else self.limits.idle_timeout)
        late = "request head not received in time"
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as error:
                raise HttpError(error.error_status_hint, str(error)) from None
            if event is h11.NEED_DATA:
                data = await self.receive_before(deadline)
                if data is None:
                    if in_request:
                        raise HttpError(408, late)
                    return None  # idle keep-alive connection: close without a word
                if not in_request:
                    in_request = True
                    deadline = trio.current_time() + self.limits.header_timeout
                try:
                    self.h11.receive_data(data)
                except h11.RemoteProtocolError as error:
                    raise HttpError(error.error_status_hint, str(error)) from None
            elif isinstance(event, h11.Request):
                head = event
                self.method = head.method
                await self.accept_head(head)
                deadline = trio.current_time() + self.limits.body_timeout
                late = "request body not received in time"
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body_bytes:
                    raise HttpError(413, "body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _request(head, bytes(body), self.client)
            elif isinstance(event, h11.ConnectionClosed):
                if head is not None:
                    raise HttpError(400, "connection closed mid-request")
                return None
            else:  # h11.PAUSED cannot happen while we read a request
                raise HttpError(400, f"unexpected {type(event).__name__}")

    async def receive_before(self, deadline: float) -> bytes | None:
        """Received bytes (b"" at end of stream), or None if the deadline passed."""
        with trio.move_on_at(deadline):
            return await self.stream.receive_some(RECEIVE_SIZE)
        return None

    async def accept_head(self, head: h11.Request) -> None:
        """Refuses an oversized head, or a declared body over the limit before reading it.

        h11 bounds only an incomplete head; one that arrives whole in a
        single read is measured here.
        """
        size = len(head.method) + len(head.target) + sum(len(n) + len(v) + 4 for n, v in head.headers)
        if size > self.limits.max_header_bytes:
            raise HttpError(431, "request head too large")
        if head.method == b"CONNECT":
            # h11 switches protocols after a 2xx to CONNECT and then refuses
            # to send the body: refuse it here, whatever the handler would say.
            raise HttpError(501, "CONNECT is not supported")
        names = [name for name, _ in head.headers]
        if b"content-length" in names and b"transfer-encoding" in names:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        for single in _SINGLE_HEADERS:
            if names.count(single) > 1:
                raise HttpError(400, f"more than one {single.decode()} header")
        for name, value in head.headers:
            # h11 has checked the digits; compare lengths first, so a number
            # of thousands of digits is never converted.
            if name == b"content-length" and (len(value) > 18 or int(value) > self.limits.max_body_bytes):
                raise HttpError(413, "declared body too large")
        if self.h11.they_are_waiting_for_100_continue:
            # RFC 7231 section 5.1.1: the client holds the body until we say go.
            await self.stream.send_all(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))

    async def call(self, handler: Handler, request: Request) -> Response:
        try:
            return await handler(request)
        except Exception:
            self.log.exception("stats.handler_failed", client=self.client, method=request.method,
                               target=request.target[:200])
            return text_response(500, close=True)

    async def refuse(self, error: HttpError) -> None:
        self.log.info("stats.request_refused", client=self.client, status=error.status, reason=error.reason)
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            # h11 frames the answer to a HEAD without a body, and refuses one.
            await self.send(text_response(error.status, close=True), head_only=self.method == b"HEAD")

    async def send(self, response: Response, *, head_only: bool) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if response.close:
            headers.append(("connection", "close"))
        with trio.move_on_after(self.limits.send_timeout) as scope:
            await self._send_events(response, headers, head_only)
        if scope.cancelled_caught:
            self.log.info("stats.send_timeout", client=self.client)
            self.graceful = False
            raise trio.BrokenResourceError("response not taken in time")

    async def _send_events(self, response: Response, headers, head_only: bool) -> None:
        data = self.h11.send(h11.Response(status_code=response.status, headers=headers, reason=_phrase(response.status)))
        if not head_only and response.body:
            data += self.h11.send(h11.Data(data=response.body))
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def close(self) -> None:
        """Half-closes, drains briefly so the client reads our last answer, closes.

        Closing a socket with unread input makes Linux send RST, which can
        destroy a response still in flight (RFC 7230 section 6.6); draining
        for a moment first lets the client see it.
        """
        try:
            if self.graceful:
                with trio.move_on_after(self.limits.close_drain_timeout):
                    await self._drain()
        finally:
            await self.stream.aclose()

    async def _drain(self) -> None:
        try:
            send_eof = getattr(self.stream, "send_eof", None)
            if send_eof is not None:  # a TLS stream has none: TLS cannot half-close
                await send_eof()
            drained = 0
            while drained < 4 * RECEIVE_SIZE:
                chunk = await self.stream.receive_some(RECEIVE_SIZE)
                if not chunk:
                    return
                drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


_SINGLE_HEADERS = (b"authorization", b"content-length")


def _request(head: h11.Request, body: bytes, client: str) -> Request:
    headers = tuple((name.decode("ascii").lower(), value.decode("latin-1")) for name, value in head.headers)
    return Request(head.method.decode("ascii"), head.target.decode("latin-1"), headers, body, client)


def _split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request target; never raises.

    RFC 9112 section 3.2.2: a server must accept the absolute form too
    ("http://host/path?query"), whose authority we ignore. It is cut by
    hand: urlsplit() raises on an authority such as "[" (a 500 found by the
    property tests).
    """
    for scheme in ("http://", "https://"):
        if target[: len(scheme)].lower() == scheme:
            rest = target[len(scheme):]
            start = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
            target = rest[start:]
            if not target.startswith("/"):
                target = "/" + target
            break
    path, _, query = target.partition("?")
    return path, query.partition("#")[0]


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
