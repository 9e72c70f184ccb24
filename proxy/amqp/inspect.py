"""Passive, bounded inspection of an AMQP 0-9-1 connection handshake, sans-I/O.

The relay shows every byte it moves during a connection's handshake to a
:class:`HandshakeInspector`: client to broker with :meth:`~HandshakeInspector.from_client`,
broker to client with :meth:`~HandshakeInspector.from_server`. The inspector
reads them and never changes them; it only learns who is connecting
(:class:`Identity`) and says when there is nothing more to learn:

    client: protocol header, Start-Ok (client properties, mechanism, user),
            Tune-Ok (channel-max, frame-max, heartbeat), Open (vhost)
    broker: Start (server properties), Tune, Open-Ok -- or Close, a refusal

Phases (:class:`Phase`): INSPECTING until the broker's Open-Ok (OPEN) or
Close (REFUSED); PASSED as soon as the bytes are not AMQP 0-9-1 (an AMQP 1.0
or SASL header, HTTP, a TLS ClientHello, garbage, a malformed frame) or a
direction exceeds its byte budget: the connection is then relayed untouched,
as if it had never been looked at. HELD when an admission check refused the
client's Connection.Open: the Open frame was withheld (``held``), the caller
refuses the client.

Bounded time and space on hostile input: each direction reads at most
``budget`` bytes, a frame is judged from its 7-byte header, tables nest at
most 8 deep, kept strings are cut to :data:`MAX_TEXT` characters.

Secrets: Start-Ok's response is parsed where it lies (the relay's buffer, or
the inspector's own when the frame spans reads); only the user name is
decoded (PLAIN's authentication identity, AMQPLAIN's LOGIN). The password is
stepped over, never decoded or copied into an object of its own, and the
inspector's buffer bytes that held the frame are zeroed once it is parsed.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..health.amqp_methods import ReplyCode
from ..health.amqp_wire import (
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    PROTOCOL_HEADER,
    Cursor,
    HandshakeError,
    Truncated,
    pick_strings,
    scan_frame,
    skip_value,
)

HANDSHAKE_BUDGET = 64 * 1024  # bytes per direction; real handshakes take 0.3-2 KiB
MAX_TEXT = 128  # characters kept of any property, user or vhost

_METHOD_HEAD = struct.Struct("!HH")
START, SECURE, TUNE, OPEN, OPEN_OK, CLOSE, CLOSE_OK = (
    (10, 10), (10, 20), (10, 30), (10, 40), (10, 41), (10, 50), (10, 51),
)  # fmt: skip
START_OK, SECURE_OK, TUNE_OK = (10, 11), (10, 21), (10, 31)
CLIENT_PROPERTY_KEYS = frozenset((b"connection_name", b"product", b"version", b"platform"))
SERVER_PROPERTY_KEYS = frozenset((b"cluster_name", b"version", b"product"))


class Phase(enum.Enum):
    INSPECTING = "inspecting"
    OPEN = "open"  # the broker's Open-Ok: the handshake is over
    REFUSED = "refused"  # the broker sent Connection.Close during the handshake
    HELD = "held"  # an admission check refused the client's Open (withheld)
    PASSED = "passed"  # not AMQP 0-9-1, or over budget: relayed untouched


@dataclass(slots=True)
class Identity:
    """What the handshake told about a connection (None: not seen)."""

    connection_name: str | None = None
    product: str | None = None
    version: str | None = None
    platform: str | None = None
    mechanism: str | None = None
    user: str | None = None
    vhost: str | None = None
    channel_max: int | None = None
    frame_max: int | None = None
    heartbeat: int | None = None  # seconds, as the client's Tune-Ok settled it
    server_cluster: str | None = None
    server_version: str | None = None
    server_product: str | None = None
    broker_close: tuple[int, str] | None = None  # (reply code, text) of a refusal

    @property
    def name(self) -> str | None:
        """How to call the client: its connection_name, else its product."""
        return self.connection_name or self.product


def reply_name(code: int) -> str:
    """ACCESS_REFUSED for 403; the number for a code AMQP does not name."""
    try:
        return ReplyCode(code).name
    except ValueError:
        return str(code)


def describe_foreign(data: bytes | memoryview) -> str:
    """What a client that does not speak AMQP 0-9-1 seems to speak."""
    head = bytes(data[:8])
    if head.startswith(b"AMQP") and len(head) == 8:
        protocol_id, major, minor, revision = head[4:8]
        kind = {0: "AMQP", 2: "AMQP TLS", 3: "AMQP SASL"}.get(protocol_id, f"AMQP protocol-id {protocol_id}")
        return f"{kind} {major}.{minor}.{revision} header"
    if head[:1] == b"\x16" and head[1:2] == b"\x03":
        return "a TLS handshake"
    if head.split(b" ", 1)[0] in (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"CONNECT", b"PATCH"):
        return "HTTP"
    if head.startswith(b"PROXY"):
        return "a PROXY protocol header"
    return "unknown bytes"


class _Passed(Exception):
    """Inspection stops: the reason is kept, the connection relayed untouched."""


class _Stream:
    """One direction's unparsed bytes: a frame that spans reads waits here.

    The buffer grows by doubling into a new bytearray and zeroes the one it
    leaves, so a secret in a partial frame is never left behind in freed
    memory; ``wipe`` zeroes the bytes of a parsed frame.
    """

    __slots__ = ("data", "size", "seen", "budget", "done")

    def __init__(self, budget: int) -> None:
        self.data = bytearray()
        self.size = 0
        self.seen = 0  # bytes shown so far
        self.budget = budget
        self.done = False  # nothing more to read from this side

    def keep(self, chunk: memoryview) -> None:
        needed = self.size + len(chunk)
        if needed > len(self.data):
            grown = bytearray(max(needed, 2 * len(self.data), 256))
            grown[: self.size] = self.data[: self.size]
            self.wipe(0, len(self.data))
            self.data = grown
        self.data[self.size : needed] = chunk
        self.size = needed

    def consume(self, count: int) -> None:
        """Drops the first `count` bytes (zeroing them), keeps the rest in front."""
        rest = self.size - count
        if rest:
            self.data[:rest] = self.data[count : self.size]
        self.wipe(rest, self.size)
        self.size = rest

    def wipe(self, start: int, end: int) -> None:
        self.data[start:end] = bytes(end - start)


class HandshakeInspector:
    """Reads one connection's handshake; see the module docstring.

    `admit`, when given, is asked once the client's Connection.Open is
    complete: it returns None to let the connection in, or the text of the
    refusal (the phase becomes HELD, the caller answers 530 NOT_ALLOWED).
    Neither method raises on any input.
    """

    __slots__ = ("identity", "phase", "reason", "refusal", "held", "header_seen", "_admit", "_client",
                 "_server", "_client_step", "_server_step")

    def __init__(self, *, budget: int = HANDSHAKE_BUDGET,
                 admit: Callable[[Identity], str | None] | None = None) -> None:
        self.identity = Identity()
        self.phase = Phase.INSPECTING
        self.reason: str | None = None  # why inspection PASSED
        self.refusal: str | None = None  # why admission HELD the Open
        self.held = b""  # the part of the Open frame not forwarded (HELD)
        self.header_seen = False
        self._admit = admit
        self._client = _Stream(budget)
        self._server = _Stream(budget)
        self._client_step = START_OK
        self._server_step = START

    @property
    def watching(self) -> bool:
        return self.phase is Phase.INSPECTING

    @property
    def client_done(self) -> bool:
        """The client's Open went by: nothing more to read from the client."""
        return self._client.done

    # -- the two directions ---------------------------------------------------------

    def from_client(self, data: bytes | memoryview) -> int:
        """Shows bytes the client sent; returns how many of them may be forwarded
        (all of them, unless the Open is HELD: then those before it)."""
        if self.phase is not Phase.INSPECTING or self._client.done:
            return len(data)
        try:
            return self._read(self._client, memoryview(data), self._client_frame, header=not self.header_seen)
        except _Passed as passed:
            self._pass(str(passed))
        return len(data)

    def from_server(self, data: bytes | memoryview) -> None:
        """Shows bytes the broker sent (always forwarded as they are)."""
        if self.phase is not Phase.INSPECTING:
            return
        try:
            self._read(self._server, memoryview(data), self._server_frame, header=False)
        except _Passed as passed:
            self._pass(str(passed))

    # -- framing ---------------------------------------------------------------------

    def _read(self, stream: _Stream, chunk: memoryview, on_frame, *, header: bool) -> int:
        """Parses what `chunk` completes; returns how much of it may be forwarded."""
        stream.seen += len(chunk)
        if stream.seen > stream.budget:
            raise _Passed(f"handshake larger than {stream.budget} bytes")
        if stream.size:
            # A frame spans reads: parse from our own buffer.
            offset = -stream.size  # where our buffer starts, relative to the chunk
            stream.keep(chunk)
            with memoryview(stream.data)[: stream.size] as data:
                consumed, forward = self._frames(data, offset, on_frame, header, stream)
            stream.consume(consumed)
            return forward if forward is not None else len(chunk)
        consumed, forward = self._frames(chunk, 0, on_frame, header, stream)
        if consumed < len(chunk) and self.phase is Phase.INSPECTING and not stream.done:
            stream.keep(chunk[consumed:])
        return forward if forward is not None else len(chunk)

    def _frames(self, data: memoryview, offset: int, on_frame, header: bool, stream: _Stream):
        """Parses complete frames in `data`; (bytes consumed, bytes of the chunk to forward or None).

        `offset` is where `data` starts relative to the current chunk (negative
        when it begins with bytes kept from earlier reads).
        """
        pos = 0
        if header:
            pos = self._protocol_header(data)
            if pos == 0:
                return 0, None
        while self.phase is Phase.INSPECTING and not stream.done:
            try:
                span = scan_frame(data, pos, stream.budget)
            except HandshakeError as error:
                raise _Passed(f"not AMQP 0-9-1 framing: {error.description}") from None
            if span is None:
                break
            forward = on_frame(data, span, offset)
            if forward is not None:
                return span.end, forward
            pos = span.end
        return pos, None

    def _protocol_header(self, data: memoryview) -> int:
        head = bytes(data[: len(PROTOCOL_HEADER)])
        if not PROTOCOL_HEADER.startswith(head):
            raise _Passed(f"client speaks {describe_foreign(head)}, not AMQP 0-9-1")
        if len(head) < len(PROTOCOL_HEADER):
            return 0
        self.header_seen = True
        return len(PROTOCOL_HEADER)

    @staticmethod
    def _method(data: memoryview, span) -> tuple[tuple[int, int], Cursor] | None:
        """(class, method) and a cursor on the arguments; None for a heartbeat."""
        if span.type == FRAME_HEARTBEAT:
            return None
        if span.type != FRAME_METHOD or span.channel != 0:
            raise _Passed(f"frame type {span.type} on channel {span.channel} during the handshake")
        cur = Cursor(data[span.payload_start : span.end - 1])
        try:
            ids = _METHOD_HEAD.unpack(cur.take(_METHOD_HEAD.size))
        except Truncated:
            raise _Passed("method frame shorter than its class and method ids") from None
        return ids, cur

    # -- the client's side -------------------------------------------------------------

    def _client_frame(self, data: memoryview, span, offset: int) -> int | None:
        method = self._method(data, span)
        if method is None:
            return None
        ids, cur = method
        if ids == CLOSE:
            raise _Passed("the client closed during the handshake")
        if ids == SECURE_OK and self._client_step == TUNE_OK:
            return None  # a SASL exchange round: nothing we read
        if ids != self._client_step:
            raise _Passed(f"client sent method {ids[0]}.{ids[1]} where {self._client_step} was expected")
        try:
            if ids == START_OK:
                try:
                    self._start_ok(cur)
                finally:
                    # The frame held the password: no copy of ours keeps it.
                    if offset < 0:
                        self._client.wipe(span.payload_start, span.end)
                self._client_step = TUNE_OK
            elif ids == TUNE_OK:
                identity = self.identity
                identity.channel_max, identity.frame_max, identity.heartbeat = (
                    cur.short(), cur.long(), cur.short()
                )
                self._client_step = OPEN
            else:
                return self._open(cur, span, data, offset)
        except (Truncated, ValueError, struct.error) as error:
            raise _Passed(f"malformed method {ids[0]}.{ids[1]} from the client: {error or 'truncated'}") from None
        return None

    def _start_ok(self, cur: Cursor) -> None:
        identity = self.identity
        properties = pick_strings(cur, CLIENT_PROPERTY_KEYS, MAX_TEXT)
        identity.connection_name = properties.get(b"connection_name")
        identity.product = properties.get(b"product")
        identity.version = properties.get(b"version")
        identity.platform = properties.get(b"platform")
        identity.mechanism = _cut(cur.shortstr())
        response = Cursor(cur.longstr())
        if identity.mechanism == "PLAIN":
            identity.user = _plain_user(response)
        elif identity.mechanism == "AMQPLAIN":
            identity.user = _amqplain_user(response)

    def _open(self, cur: Cursor, span, data: memoryview, offset: int) -> int | None:
        self.identity.vhost = _cut(cur.shortstr())
        self._client.done = True
        refusal = self._admit(self.identity) if self._admit is not None else None
        if refusal is None:
            return None
        # Withhold the Open: forward what came before it in this chunk, keep
        # the part of the frame that did not go out yet.
        self.phase, self.refusal = Phase.HELD, refusal
        first = max(span.payload_start - 7, -offset)  # the frame's start, or the chunk's
        self.held = bytes(data[first : span.end])
        return first + offset

    # -- the broker's side --------------------------------------------------------------

    def _server_frame(self, data: memoryview, span, offset: int) -> None:
        method = self._method(data, span)
        if method is None:
            return None
        ids, cur = method
        try:
            if ids == CLOSE:
                code, text = cur.short(), cur.shortstr()
                self.identity.broker_close = (code, _cut(text))
                self.phase = Phase.REFUSED
                return None
            if ids == SECURE and self._server_step == TUNE:
                return None
            if ids != self._server_step:
                raise _Passed(f"broker sent method {ids[0]}.{ids[1]} where {self._server_step} was expected")
            if ids == START:
                cur.skip(2)  # version major, minor
                properties = pick_strings(cur, SERVER_PROPERTY_KEYS, MAX_TEXT)
                identity = self.identity
                identity.server_cluster = properties.get(b"cluster_name")
                identity.server_version = properties.get(b"version")
                identity.server_product = properties.get(b"product")
                self._server_step = TUNE
            elif ids == TUNE:
                self._server_step = OPEN_OK
            else:
                self.phase = Phase.OPEN
        except (Truncated, ValueError, struct.error) as error:
            raise _Passed(f"malformed method {ids[0]}.{ids[1]} from the broker: {error or 'truncated'}") from None
        return None

    def _pass(self, reason: str) -> None:
        self.phase, self.reason = Phase.PASSED, reason
        self.release()

    def release(self) -> None:
        """Frees the buffers once inspection is over (the identity stays);
        the inspector then only counts what it is shown."""
        for stream in (self._client, self._server):
            stream.consume(stream.size)
            stream.data = bytearray()


# -- helpers -----------------------------------------------------------------------------


def _cut(text: str) -> str:
    return text[:MAX_TEXT]


def _plain_user(response: Cursor) -> str | None:
    """RFC 4616: [authzid] NUL authcid NUL passwd; the authcid is the user.

    Only the bytes up to the second NUL are looked at.
    """
    data = response.data
    first = _find_nul(data, 0)
    second = _find_nul(data, first + 1) if first >= 0 else -1
    if second < 0:
        return None
    return _cut(str(data[first + 1 : second], "utf-8", "replace"))


def _find_nul(data: bytes | memoryview, start: int) -> int:
    for index in range(start, min(len(data), start + 1024)):
        if data[index] == 0:
            return index
    return -1


def _amqplain_user(response: Cursor) -> str | None:
    """AMQPLAIN: a field table without its length prefix; LOGIN is decoded,
    every other value (PASSWORD) is stepped over unread."""
    user = None
    while not response.at_end():
        key = response.shortstr()
        if key == "LOGIN" and not response.at_end() and response.data[response.pos] == ord("S"):
            response.octet()
            user = _cut(str(response.longstr(), "utf-8", "replace"))
        else:
            skip_value(response)
    return user


def describe_identity(identity: Identity) -> Mapping[str, Any]:
    """The identity fields worth a log line or a page (never a secret: there is none here)."""
    fields = {
        "amqp_name": identity.name,
        "amqp_user": identity.user,
        "amqp_vhost": identity.vhost,
        "amqp_heartbeat": identity.heartbeat,
    }
    return {key: value for key, value in fields.items() if value is not None}
