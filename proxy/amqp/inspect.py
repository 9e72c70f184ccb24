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

Cost: every AMQP connection's handshake goes through here, so frames are
read in place by offset (no frame, cursor or slice object per frame), a
direction's buffer exists only while a frame spans reads, and the property
tables, the same for every connection of one application or broker, are
decoded once per distinct table (:class:`_TableCache`).

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
from typing import Any, Final

from ..health.amqp_methods import ReplyCode
from ..health.amqp_wire import (
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    PROTOCOL_HEADER,
    Cursor,
    Truncated,
    pick_strings,
    printable,
    skip_value,
)

HANDSHAKE_BUDGET: Final = 64 * 1024  # bytes per direction; real handshakes take 0.3-2 KiB
MAX_TEXT: Final = 128  # characters kept of any property, user or vhost

_FRAME_HEAD: Final = struct.Struct("!BHI")  # type, channel, payload size
_FRAME_TYPES: Final = frozenset((FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT))
_TUNE_OK: Final = struct.Struct("!HIH")  # channel-max, frame-max, heartbeat
_CLOSE_CODE: Final = struct.Struct("!H")
_LONG: Final = struct.Struct("!I")
# Connection methods, as the method frame's first four bytes read as one
# big-endian number (class id << 16 | method id): an int compares in C.
START: Final = 10 << 16 | 10
START_OK: Final = 10 << 16 | 11
SECURE: Final = 10 << 16 | 20
SECURE_OK: Final = 10 << 16 | 21
TUNE: Final = 10 << 16 | 30
TUNE_OK: Final = 10 << 16 | 31
OPEN: Final = 10 << 16 | 40
OPEN_OK: Final = 10 << 16 | 41
CLOSE: Final = 10 << 16 | 50
CLOSE_OK: Final = 10 << 16 | 51


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
    """One direction's unparsed bytes, while a frame spans reads.

    The buffer grows by doubling into a new bytearray and zeroes the one it
    leaves, so a secret in a partial frame is never left behind in freed
    memory; ``wipe`` zeroes the bytes of a parsed frame.
    """

    __slots__ = ("data", "size")

    def __init__(self) -> None:
        self.data = bytearray()
        self.size = 0

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


class _TableCache:
    """Field tables already read: raw bytes -> the strings picked from them.

    Every connection of one application sends the same client properties,
    every connection to one broker gets the same server properties: each
    distinct table is walked once. Bounded: tables up to MAX_BYTES, at most
    MAX_ENTRIES of them (forgotten all at once when full).
    """

    MAX_BYTES = 2048
    MAX_ENTRIES = 512
    __slots__ = ("wanted", "tables")

    def __init__(self, wanted: frozenset[bytes]) -> None:
        self.wanted = wanted
        self.tables: dict[bytes, dict[bytes, str]] = {}

    def pick(self, data: memoryview, pos: int, end: int) -> tuple[dict[bytes, str], int]:
        """The wanted strings of the table (length prefix included) at
        data[pos:end], and where the table ends; Truncated or ValueError."""
        if pos + 4 > end:
            raise Truncated
        stop = pos + 4 + _LONG.unpack_from(data, pos)[0]
        if stop > end:
            raise Truncated
        if stop - pos > self.MAX_BYTES:
            return pick_strings(Cursor(data[pos:stop]), self.wanted, MAX_TEXT), stop
        raw = bytes(data[pos:stop])
        found = self.tables.get(raw)
        if found is None:
            found = pick_strings(Cursor(raw), self.wanted, MAX_TEXT)
            if len(self.tables) >= self.MAX_ENTRIES:
                self.tables.clear()
            self.tables[raw] = found
        return found, stop


_CLIENT_TABLES: Final = _TableCache(frozenset((b"connection_name", b"product", b"version", b"platform")))
_SERVER_TABLES: Final = _TableCache(frozenset((b"cluster_name", b"version", b"product")))
CLIENT_PROPERTY_KEYS: Final = _CLIENT_TABLES.wanted
SERVER_PROPERTY_KEYS: Final = _SERVER_TABLES.wanted


class HandshakeInspector:
    """Reads one connection's handshake; see the module docstring.

    `admit`, when given, is asked once the client's Connection.Open is
    complete: it returns None to let the connection in, or the text of the
    refusal (the phase becomes HELD, the caller answers 530 NOT_ALLOWED).
    Neither method raises on any input.
    """

    __slots__ = ("identity", "phase", "reason", "refusal", "held", "header_seen", "client_done", "budget",
                 "_admit", "_client", "_server", "_client_seen", "_server_seen", "_client_step", "_server_step")

    def __init__(self, *, budget: int = HANDSHAKE_BUDGET,
                 admit: Callable[[Identity], str | None] | None = None) -> None:
        self.identity = Identity()
        self.phase = Phase.INSPECTING
        self.reason: str | None = None  # why inspection PASSED
        self.refusal: str | None = None  # why admission HELD the Open
        self.held = b""  # the part of the Open frame not forwarded (HELD)
        self.header_seen = False
        self.client_done = False  # the client's Open went by: nothing more to read from the client
        self.budget = budget  # bytes per direction
        self._admit = admit
        self._client: _Stream | None = None  # a frame from the client spanning reads
        self._server: _Stream | None = None
        self._client_seen = self._server_seen = 0  # bytes shown so far
        self._client_step = START_OK
        self._server_step = START

    @property
    def watching(self) -> bool:
        return self.phase is Phase.INSPECTING

    # -- the two directions ---------------------------------------------------------

    def from_client(self, data: bytes | memoryview) -> int:
        """Shows bytes the client sent; returns how many of them may be forwarded
        (all of them, unless the Open is HELD: then those before it)."""
        length = len(data)
        if self.phase is not Phase.INSPECTING or self.client_done:
            return length
        self._client_seen += length
        try:
            if self._client_seen > self.budget:
                raise _Passed(f"handshake larger than {self.budget} bytes")
            if type(data) is not memoryview:
                data = memoryview(data)  # slices are views: the password is never copied
            stream = self._client
            if stream is not None and stream.size:
                return self._spanning(stream, data, True)
            pos = 0
            if not self.header_seen:
                pos = self._protocol_header(data)
                if not pos:
                    self._keep(True, data)
                    return length
            consumed, forward = self._frames(data, pos, True, 0)
            if forward is not None:
                return forward
            if consumed < length and self.phase is Phase.INSPECTING and not self.client_done:
                self._keep(True, data[consumed:])
        except _Passed as passed:
            self._pass(str(passed))
        return length

    def from_server(self, data: bytes | memoryview) -> None:
        """Shows bytes the broker sent (always forwarded as they are)."""
        if self.phase is not Phase.INSPECTING:
            return
        self._server_seen += len(data)
        try:
            if self._server_seen > self.budget:
                raise _Passed(f"handshake larger than {self.budget} bytes")
            if type(data) is not memoryview:
                data = memoryview(data)
            stream = self._server
            if stream is not None and stream.size:
                self._spanning(stream, data, False)
                return
            consumed, _ = self._frames(data, 0, False, 0)
            if consumed < len(data) and self.phase is Phase.INSPECTING:
                self._keep(False, data[consumed:])
        except _Passed as passed:
            self._pass(str(passed))

    def _keep(self, client: bool, rest: memoryview) -> None:
        stream = self._client if client else self._server
        if stream is None:
            stream = _Stream()
            if client:
                self._client = stream
            else:
                self._server = stream
        stream.keep(rest)

    # -- framing ---------------------------------------------------------------------

    def _spanning(self, stream: _Stream, chunk: memoryview, client: bool) -> int:
        """A frame (or the client's protocol header) spans reads: parse from
        our own buffer. Returns how much of `chunk` may be forwarded."""
        offset = -stream.size  # where our buffer starts, relative to the chunk
        stream.keep(chunk)
        with memoryview(stream.data)[: stream.size] as data:
            pos = 0
            if client and not self.header_seen:
                pos = self._protocol_header(data)
                if not pos:
                    return len(chunk)
            consumed, forward = self._frames(data, pos, client, offset)
        stream.consume(consumed)
        return len(chunk) if forward is None else forward

    def _frames(self, data: memoryview, pos: int, client: bool, offset: int) -> tuple[int, int | None]:
        """Parses the complete frames in `data` from `pos`; (bytes consumed,
        bytes of the chunk to forward, or None: all of them).

        `offset` is where `data` starts relative to the current chunk (negative
        when it begins with bytes kept from earlier reads).
        """
        size_all, budget = len(data), self.budget
        while self.phase is Phase.INSPECTING:
            if size_all - pos < 7:
                break
            kind, channel, size = _FRAME_HEAD.unpack_from(data, pos)
            if kind not in _FRAME_TYPES:
                raise _Passed(f"not AMQP 0-9-1 framing: unknown frame type {kind} "
                              f"({printable(bytes(data[pos : pos + 32]))})")
            if size + 8 > budget:
                raise _Passed(f"not AMQP 0-9-1 framing: frame of {size + 8} bytes exceeds frame-max {budget}")
            end = pos + 7 + size  # the frame-end octet
            if size_all <= end:
                break
            if data[end] != FRAME_END:
                raise _Passed(f"not AMQP 0-9-1 framing: frame-end octet is {data[end]:#04x}, not 0xce")
            if kind != FRAME_HEARTBEAT:
                if kind != FRAME_METHOD or channel != 0:
                    raise _Passed(f"frame type {kind} on channel {channel} during the handshake")
                if size < 4:
                    raise _Passed("method frame shorter than its class and method ids")
                method = _LONG.unpack_from(data, pos + 7)[0]
                if client:
                    forward = self._client_frame(data, method, pos, end, offset)
                    if forward is not None:
                        return end + 1, forward
                else:
                    self._server_frame(data, method, pos, end)
            pos = end + 1
            if client and self.client_done:
                break
        return pos, None

    def _protocol_header(self, data: memoryview) -> int:
        """The header's length once it is all there, 0 while it is not; _Passed if it is not 0-9-1's."""
        head = bytes(data[: len(PROTOCOL_HEADER)])
        if not PROTOCOL_HEADER.startswith(head):
            raise _Passed(f"client speaks {describe_foreign(head)}, not AMQP 0-9-1")
        if len(head) < len(PROTOCOL_HEADER):
            return 0
        self.header_seen = True
        return len(PROTOCOL_HEADER)

    # -- the client's side -------------------------------------------------------------
    # A frame handler gets the method (class id << 16 | method id), where its
    # frame starts (`start`) and where its frame-end octet is (`end`): the
    # arguments are data[start + 11 : end]. The client's returns None, or
    # for a HELD Open how many bytes of the chunk may be forwarded.

    def _client_frame(self, data: memoryview, method: int, start: int, end: int, offset: int) -> int | None:
        if method == CLOSE:
            raise _Passed("the client closed during the handshake")
        step = self._client_step
        if method == SECURE_OK and step == TUNE_OK:
            return None  # a SASL exchange round: nothing we read
        if method != step:
            raise _Passed(f"client sent method {_method_name(method)} where {_method_name(step)} was expected")
        try:
            if method == START_OK:
                try:
                    self._start_ok(data, start + 11, end)
                finally:
                    # The frame held the password: no copy of ours keeps it.
                    if offset < 0:  # parsed in the client's stream (_spanning)
                        stream = self._client
                        assert stream is not None
                        stream.wipe(start, end + 1)
                self._client_step = TUNE_OK
            elif method == TUNE_OK:
                if end - start - 11 < _TUNE_OK.size:
                    raise Truncated
                identity = self.identity
                identity.channel_max, identity.frame_max, identity.heartbeat = _TUNE_OK.unpack_from(data, start + 11)
                self._client_step = OPEN
            else:
                return self._open(data, start, end, offset)
        except (Truncated, ValueError, struct.error) as error:
            raise _Passed(f"malformed method {_method_name(method)} from the client: {error or 'truncated'}") from None
        return None

    def _start_ok(self, data: memoryview, pos: int, end: int) -> None:
        identity = self.identity
        properties, pos = _CLIENT_TABLES.pick(data, pos, end)
        identity.connection_name = properties.get(b"connection_name")
        identity.product = properties.get(b"product")
        identity.version = properties.get(b"version")
        identity.platform = properties.get(b"platform")
        mechanism, pos = _shortstr(data, pos, end)
        identity.mechanism = mechanism
        if pos + 4 > end:
            raise Truncated
        stop = pos + 4 + _LONG.unpack_from(data, pos)[0]
        if stop > end:
            raise Truncated
        # The response holds the password: read in place, only up to the user.
        if mechanism == "PLAIN":
            identity.user = _plain_user(data, pos + 4, stop)
        elif mechanism == "AMQPLAIN":
            identity.user = _amqplain_user(Cursor(data[pos + 4 : stop]))

    def _open(self, data: memoryview, start: int, end: int, offset: int) -> int | None:
        self.identity.vhost = _shortstr(data, start + 11, end)[0]
        self.client_done = True
        refusal = self._admit(self.identity) if self._admit is not None else None
        if refusal is None:
            return None
        # Withhold the Open: forward what came before it in this chunk, keep
        # the part of the frame that did not go out yet.
        self.phase, self.refusal = Phase.HELD, refusal
        first = max(start, -offset)  # the frame's start, or the chunk's
        self.held = bytes(data[first : end + 1])
        return first + offset

    # -- the broker's side --------------------------------------------------------------

    def _server_frame(self, data: memoryview, method: int, start: int, end: int) -> None:
        try:
            if method == CLOSE:
                if end - start - 11 < 2:
                    raise Truncated
                code = _CLOSE_CODE.unpack_from(data, start + 11)[0]
                self.identity.broker_close = (code, _shortstr(data, start + 13, end)[0])
                self.phase = Phase.REFUSED
                return None
            step = self._server_step
            if method == SECURE and step == TUNE:
                return None
            if method != step:
                raise _Passed(f"broker sent method {_method_name(method)} where {_method_name(step)} was expected")
            if method == START:
                properties, _ = _SERVER_TABLES.pick(data, start + 13, end)  # after version major, minor
                identity = self.identity
                identity.server_cluster = properties.get(b"cluster_name")
                identity.server_version = properties.get(b"version")
                identity.server_product = properties.get(b"product")
                self._server_step = TUNE
            elif method == TUNE:
                self._server_step = OPEN_OK
            else:
                self.phase = Phase.OPEN
        except (Truncated, ValueError, struct.error) as error:
            raise _Passed(f"malformed method {_method_name(method)} from the broker: {error or 'truncated'}") from None
        return None

    def _pass(self, reason: str) -> None:
        self.phase, self.reason = Phase.PASSED, reason
        self.release()

    def release(self) -> None:
        """Frees the buffers once inspection is over (the identity stays)
        and lets go of `admit` (no Open is asked about any more); the
        inspector then only counts what it is shown."""
        for stream in (self._client, self._server):
            if stream is not None:
                stream.consume(stream.size)
        self._client = self._server = None
        self._admit = None


# -- helpers -----------------------------------------------------------------------------


def _method_name(method: int) -> str:
    """"10.11" for Connection.Start-Ok: class id, method id."""
    return f"{method >> 16}.{method & 0xFFFF}"


def _cut(text: str) -> str:
    return text[:MAX_TEXT]


def _shortstr(data: memoryview, pos: int, end: int) -> tuple[str, int]:
    """The short string at data[pos] (cut to MAX_TEXT) and where it ends; Truncated."""
    if pos >= end:
        raise Truncated
    stop = pos + 1 + data[pos]
    if stop > end:
        raise Truncated
    return str(data[pos + 1 : stop], "utf-8", "replace")[:MAX_TEXT], stop


def _plain_user(data: memoryview, pos: int, end: int) -> str | None:
    """RFC 4616: [authzid] NUL authcid NUL passwd; the authcid is the user.

    Only the bytes up to the second NUL are looked at.
    """
    first = _find_nul(data, pos, end)
    second = _find_nul(data, first + 1, end) if first >= 0 else -1
    if second < 0:
        return None
    return _cut(str(data[first + 1 : second], "utf-8", "replace"))


def _find_nul(data: memoryview, start: int, end: int) -> int:
    for index in range(start, min(end, start + 1024)):
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
