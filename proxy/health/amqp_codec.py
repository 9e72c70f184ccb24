"""AMQP 0-9-1 connection handshake, sans-I/O: frames, field tables, methods.

Only what a polite health check and a watch connection need: the
Connection class (10) on channel 0, heartbeats, both directions encoded so
tests can script a broker.  Spec references are to the AMQP 0-9-1
specification (section 4.2 "Protocol grammar"/"frame format") and RabbitMQ's
errata for field-table types.

Hostile input costs bounded time and space: a frame larger than the limit is
refused as soon as its 7-byte header arrives, every length is checked against
the bytes actually present before anything is sliced, and field tables nest
at most :data:`MAX_TABLE_DEPTH` deep.  Every malformed input surfaces as a
:class:`HandshakeError` carrying the HAProxy code it means.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, ClassVar

from proxy.health.results import CheckCode, CheckFailed

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
FRAME_MIN_SIZE = 4096  # spec 4.2.3: every peer accepts frames this large
DEFAULT_MAX_FRAME = 128 * 1024  # before Tune, and what we offer in Tune-Ok
MAX_TABLE_DEPTH = 8
_FRAME_HEAD = struct.Struct("!BHI")  # type, channel, payload size
_METHOD_HEAD = struct.Struct("!HH")  # class id, method id
_OVERHEAD = _FRAME_HEAD.size + 1  # header plus the frame-end octet


class ReplyCode(enum.IntEnum):
    """AMQP reply codes a broker uses in Connection.Close."""

    REPLY_SUCCESS = 200
    CONNECTION_FORCED = 320  # RabbitMQ: the node is stopping (or an operator closed us)
    INVALID_PATH = 402
    ACCESS_REFUSED = 403  # bad credentials
    NOT_FOUND = 404
    FRAME_ERROR = 501
    SYNTAX_ERROR = 502
    COMMAND_INVALID = 503
    CHANNEL_ERROR = 504
    UNEXPECTED_FRAME = 505
    RESOURCE_ERROR = 506
    NOT_ALLOWED = 530  # RabbitMQ: vhost missing or not permitted
    NOT_IMPLEMENTED = 540
    INTERNAL_ERROR = 541


class HandshakeError(CheckFailed):
    """The broker did not complete the conversation; `code` is the HAProxy verdict.

    L6RSP: not AMQP 0-9-1 framing (foreign bytes, the broker's own protocol
    header, bad or oversized frames, EOF mid-frame).  L7RSP: AMQP, but the
    wrong method or malformed arguments.  L7STS: the broker refused with
    Connection.Close; `reply_code` is its reply code, also in
    ``details["status"]`` (so results read "L7STS/403").  L4CON: an open
    connection ended without Connection.Close.
    """

    def __init__(self, code: CheckCode, description: str, *, reply_code: int | None = None):
        status = {"status": str(reply_code)} if reply_code is not None else {}
        super().__init__(code, description, status)
        self.reply_code = reply_code


def _framing(description: str) -> HandshakeError:
    return HandshakeError(CheckCode.L6RSP, description)


def _protocol(description: str) -> HandshakeError:
    return HandshakeError(CheckCode.L7RSP, description)


def printable(data: bytes, limit: int = 32) -> str:
    """Foreign bytes as a short, safe string for a description."""
    text = repr(bytes(data[:limit]))[2:-1]
    return text + ("..." if len(data) > limit else "")


# --- Field tables (spec 4.2.5.5, RabbitMQ errata type letters) -------------


class _Short(Exception):
    """Fewer bytes than a length field announced."""


class _Cursor:
    """Reads big-endian fields from bytes, never past the end."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _Short
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: struct.Struct) -> Any:
        return fmt.unpack(self.take(fmt.size))[0]

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def octet(self) -> int:
        return self.unpack(_U8)

    def short(self) -> int:
        return self.unpack(_U16)

    def long(self) -> int:
        return self.unpack(_U32)

    def shortstr(self) -> str:
        return self.take(self.octet()).decode("utf-8", "replace")

    def longstr(self) -> bytes:
        return self.take(self.long())


_U8, _U16, _U32 = struct.Struct("!B"), struct.Struct("!H"), struct.Struct("!I")
_NUMBERS = {
    ord("b"): struct.Struct("!b"),
    ord("B"): struct.Struct("!B"),
    ord("s"): struct.Struct("!h"),
    ord("u"): struct.Struct("!H"),
    ord("I"): struct.Struct("!i"),
    ord("i"): struct.Struct("!I"),
    ord("l"): struct.Struct("!q"),
    ord("L"): struct.Struct("!Q"),
    ord("f"): struct.Struct("!f"),
    ord("d"): struct.Struct("!d"),
    ord("T"): struct.Struct("!Q"),  # timestamp, seconds since the epoch
}


def _decode_value(cur: _Cursor, depth: int) -> Any:
    kind = cur.octet()
    if kind in _NUMBERS:
        return cur.unpack(_NUMBERS[kind])
    if kind == ord("t"):
        return cur.octet() != 0
    if kind == ord("S"):
        return cur.longstr().decode("utf-8", "replace")
    if kind == ord("x"):
        return cur.longstr()
    if kind == ord("D"):
        scale = cur.octet()
        return Decimal(cur.unpack(_NUMBERS[ord("I")])).scaleb(-scale)
    if kind == ord("V"):
        return None
    if kind == ord("F"):
        return _decode_table(cur, depth + 1)
    if kind == ord("A"):
        return _decode_array(cur, depth + 1)
    raise ValueError(f"unknown field type {kind:#04x}")


def _nested(cur: _Cursor, depth: int) -> _Cursor:
    if depth > MAX_TABLE_DEPTH:
        raise ValueError("field tables nested too deep")
    return _Cursor(cur.longstr())


def _decode_table(cur: _Cursor, depth: int = 0) -> dict[str, Any]:
    inner = _nested(cur, depth)
    table: dict[str, Any] = {}
    while not inner.at_end():
        key = inner.shortstr()
        table[key] = _decode_value(inner, depth)
    return table


def _decode_array(cur: _Cursor, depth: int) -> list[Any]:
    inner = _nested(cur, depth)
    items = []
    while not inner.at_end():
        items.append(_decode_value(inner, depth))
    return items


def encode_shortstr(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError("short string longer than 255 bytes")
    return _U8.pack(len(raw)) + raw


def encode_longstr(raw: bytes | str) -> bytes:
    if isinstance(raw, str):
        raw = raw.encode()
    return _U32.pack(len(raw)) + raw


def _encode_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"t" + _U8.pack(value)
    if isinstance(value, int):
        small = -(2**31) <= value < 2**31
        return b"I" + struct.pack("!i", value) if small else b"l" + struct.pack("!q", value)
    if isinstance(value, float):
        return b"d" + struct.pack("!d", value)
    if isinstance(value, str):
        return b"S" + encode_longstr(value)
    if isinstance(value, bytes):
        return b"x" + encode_longstr(value)
    if isinstance(value, Mapping):
        return b"F" + encode_table(value)
    if isinstance(value, (list, tuple)):
        return b"A" + encode_longstr(b"".join(_encode_value(item) for item in value))
    if value is None:
        return b"V"
    raise TypeError(f"cannot encode {type(value).__name__} in a field table")


def encode_table(table: Mapping[str, Any]) -> bytes:
    body = b"".join(encode_shortstr(key) + _encode_value(value) for key, value in table.items())
    return encode_longstr(body)


def decode_table(data: bytes) -> dict[str, Any]:
    """Decode one complete field table (length prefix included); ValueError if malformed."""
    cur = _Cursor(data)
    try:
        table = _decode_table(cur)
    except _Short:
        raise ValueError("field table truncated") from None
    if not cur.at_end():
        raise ValueError("bytes after the field table")
    return table


# --- Frames (spec 4.2.3) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    channel: int
    payload: bytes


def encode_frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(frame_type, channel, len(payload)) + payload + bytes([FRAME_END])


HEARTBEAT_FRAME = encode_frame(FRAME_HEARTBEAT, 0, b"")


class FrameBuffer:
    """Accumulates received bytes and cuts complete frames out of them.

    `max_frame` bounds a whole frame (header, payload, end octet), as
    frame-max does in Connection.Tune.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def peek(self, n: int) -> bytes:
        return bytes(self._buffer[:n])

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def next_frame(self) -> Frame | None:
        """The next complete frame, None if more bytes are needed; HandshakeError(L6RSP)."""
        if len(self._buffer) < _FRAME_HEAD.size:
            return None
        frame_type, channel, size = _FRAME_HEAD.unpack_from(self._buffer)
        if frame_type not in (FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT):
            raise _framing(f"unknown frame type {frame_type} ({printable(self._buffer)})")
        if size + _OVERHEAD > self.max_frame:
            raise _framing(f"frame of {size + _OVERHEAD} bytes exceeds frame-max {self.max_frame}")
        end = _FRAME_HEAD.size + size
        if len(self._buffer) <= end:
            return None
        if self._buffer[end] != FRAME_END:
            raise _framing(f"frame-end octet is {self._buffer[end]:#04x}, not 0xce")
        payload = bytes(self._buffer[_FRAME_HEAD.size : end])
        del self._buffer[: end + 1]
        return Frame(frame_type, channel, payload)


# --- Connection methods (spec 1.4.2, class 10) --------------------------------

# Argument types by name: how to read one from a cursor and how to write one.
_READ = {
    "octet": _Cursor.octet,
    "short": _Cursor.short,
    "long": _Cursor.long,
    "shortstr": _Cursor.shortstr,
    "longstr": lambda cur: cur.longstr().decode("utf-8", "replace"),
    "bytes": _Cursor.longstr,
    "table": _decode_table,
}
_WRITE = {
    "octet": _U8.pack,
    "short": _U16.pack,
    "long": _U32.pack,
    "shortstr": encode_shortstr,
    "longstr": encode_longstr,
    "bytes": encode_longstr,
    "table": encode_table,
}


@dataclass(frozen=True)
class Method:
    """A method frame's content; subclasses list their argument types in ARGS,
    in field order, so one generic codec serves them all.  Reserved spec
    fields are modelled as ordinary fields with their required defaults."""

    CLASS_ID: ClassVar[int] = 0
    METHOD_ID: ClassVar[int] = 0
    NAME: ClassVar[str] = "?"
    ARGS: ClassVar[tuple[str, ...]] = ()

    def frame(self, channel: int = 0) -> bytes:
        """The complete method frame, ready to send."""
        values = (getattr(self, f.name) for f in fields(self))
        arguments = b"".join(_WRITE[kind](value) for kind, value in zip(self.ARGS, values))
        head = _METHOD_HEAD.pack(self.CLASS_ID, self.METHOD_ID)
        return encode_frame(FRAME_METHOD, channel, head + arguments)

    @classmethod
    def decode_arguments(cls, cur: _Cursor) -> Method:
        return cls(*(_READ[kind](cur) for kind in cls.ARGS))


@dataclass(frozen=True)
class ConnectionStart(Method):
    CLASS_ID, METHOD_ID, NAME = 10, 10, "Connection.Start"
    ARGS = ("octet", "octet", "table", "longstr", "longstr")
    version_major: int = 0
    version_minor: int = 9
    server_properties: Mapping[str, Any] = field(default_factory=dict)
    mechanisms: str = "PLAIN AMQPLAIN"
    locales: str = "en_US"


@dataclass(frozen=True)
class ConnectionStartOk(Method):
    CLASS_ID, METHOD_ID, NAME = 10, 11, "Connection.Start-Ok"
    ARGS = ("table", "shortstr", "bytes", "shortstr")
    client_properties: Mapping[str, Any] = field(default_factory=dict)
    mechanism: str = "PLAIN"
    response: bytes = b""
    locale: str = "en_US"


@dataclass(frozen=True)
class ConnectionTune(Method):
    CLASS_ID, METHOD_ID, NAME = 10, 30, "Connection.Tune"
    ARGS = ("short", "long", "short")
    channel_max: int = 2047
    frame_max: int = 131072
    heartbeat: int = 60  # seconds


@dataclass(frozen=True)
class ConnectionTuneOk(Method):
    CLASS_ID, METHOD_ID, NAME = 10, 31, "Connection.Tune-Ok"
    ARGS = ("short", "long", "short")
    channel_max: int = 0
    frame_max: int = 0
    heartbeat: int = 0


@dataclass(frozen=True)
class ConnectionOpen(Method):
    CLASS_ID, METHOD_ID, NAME = 10, 40, "Connection.Open"
    ARGS = ("shortstr", "shortstr", "octet")
    virtual_host: str = "/"
    capabilities: str = ""  # reserved-1
    insist: int = 0  # reserved-2, a single bit packed in an octet


@dataclass(frozen=True)
class ConnectionOpenOk(Method):
    CLASS_ID, METHOD_ID, NAME = 10, 41, "Connection.Open-Ok"
    ARGS = ("shortstr",)
    known_hosts: str = ""  # reserved-1


@dataclass(frozen=True)
class ConnectionClose(Method):
    CLASS_ID, METHOD_ID, NAME = 10, 50, "Connection.Close"
    ARGS = ("short", "shortstr", "short", "short")
    reply_code: int = ReplyCode.REPLY_SUCCESS
    reply_text: str = ""
    failing_class_id: int = 0
    failing_method_id: int = 0


@dataclass(frozen=True)
class ConnectionCloseOk(Method):
    CLASS_ID, METHOD_ID, NAME = 10, 51, "Connection.Close-Ok"


@dataclass(frozen=True)
class ConnectionBlocked(Method):
    CLASS_ID, METHOD_ID, NAME = 10, 60, "Connection.Blocked"  # RabbitMQ extension
    ARGS = ("shortstr",)
    reason: str = ""


@dataclass(frozen=True)
class ConnectionUnblocked(Method):
    CLASS_ID, METHOD_ID, NAME = 10, 61, "Connection.Unblocked"


@dataclass(frozen=True)
class UnknownMethod(Method):
    """A well-framed method this codec does not model (kept for the error text)."""

    class_id: int = 0
    method_id: int = 0


_METHODS: dict[tuple[int, int], type[Method]] = {
    (cls.CLASS_ID, cls.METHOD_ID): cls
    for cls in (
        ConnectionStart,
        ConnectionStartOk,
        ConnectionTune,
        ConnectionTuneOk,
        ConnectionOpen,
        ConnectionOpenOk,
        ConnectionClose,
        ConnectionCloseOk,
        ConnectionBlocked,
        ConnectionUnblocked,
    )
}


def method_name(method: Method) -> str:
    if isinstance(method, UnknownMethod):
        return f"method {method.class_id}.{method.method_id}"
    return method.NAME


def decode_method(payload: bytes) -> Method:
    """Decode a method frame's payload; HandshakeError(L7RSP) if malformed.

    Arguments beyond those the method defines are ignored (later protocol
    revisions may append fields); missing ones are an error.
    """
    cur = _Cursor(payload)
    try:
        class_id, method_id = _METHOD_HEAD.unpack(cur.take(_METHOD_HEAD.size))
    except _Short:
        raise _protocol("method frame shorter than its class and method ids") from None
    cls = _METHODS.get((class_id, method_id))
    if cls is None:
        return UnknownMethod(class_id, method_id)
    try:
        return cls.decode_arguments(cur)
    except (_Short, ValueError, struct.error) as exc:
        detail = str(exc) or "arguments truncated"
        raise _protocol(f"malformed {cls.NAME}: {detail}") from None


# --- The client side of the handshake (h11 style) ---------------------------

CLIENT_PROPERTIES: Mapping[str, Any] = {
    "product": "Warren health check",
    "information": "Warren load balancer: broker health check",
    # Without this capability RabbitMQ answers bad credentials by dropping the
    # socket (spec behaviour); with it, by Connection.Close 403 and a reason.
    "capabilities": {"authentication_failure_close": True},
}


class ClientState(enum.Enum):
    AWAIT_START = "await-start"
    AWAIT_TUNE = "await-tune"
    AWAIT_OPEN_OK = "await-open-ok"
    OPEN = "open"  # watch mode only
    AWAIT_CLOSE_OK = "await-close-ok"
    CLOSED = "closed"
    FAILED = "failed"


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _NeedData.NEED_DATA


@dataclass(frozen=True)
class Opened:
    """Connection.Open-Ok arrived: the broker let us in (check mode: Close is queued)."""

    server_properties: Mapping[str, Any]
    channel_max: int
    frame_max: int
    heartbeat: int  # seconds, as sent in Tune-Ok; 0: no heartbeats


@dataclass(frozen=True)
class ServerClosed:
    """The broker closed the open connection (watch mode); Close-Ok is queued."""

    reply_code: int
    reply_text: str


@dataclass(frozen=True)
class Closed:
    """Our Connection.Close was acknowledged; the socket may be closed."""


Event = Opened | ServerClosed | Closed
_EXPECTED = {
    ClientState.AWAIT_START: ConnectionStart,
    ClientState.AWAIT_TUNE: ConnectionTune,
    ClientState.AWAIT_OPEN_OK: ConnectionOpenOk,
}
_EOF_DESCRIPTIONS = {
    ClientState.AWAIT_START: (CheckCode.L6RSP, "connection closed before Connection.Start"),
    ClientState.AWAIT_TUNE: (CheckCode.L7RSP, "connection closed after Start-Ok (credentials?)"),
    ClientState.AWAIT_OPEN_OK: (CheckCode.L7RSP, "connection closed after Connection.Open"),
    ClientState.OPEN: (CheckCode.L4CON, "connection closed by broker without Connection.Close"),
    ClientState.AWAIT_CLOSE_OK: (CheckCode.L7RSP, "connection closed before Close-Ok"),
}


class HandshakeClient:
    """Drives one AMQP connection through the handshake, sans-I/O.

    Feed received bytes with :meth:`receive_data` (``b""`` for EOF), pull
    :meth:`next_event` until it returns :data:`NEED_DATA`, and send whatever
    :meth:`bytes_to_send` returns (the protocol header first).  Sequence:
    header -> Start -> Start-Ok -> Tune -> Tune-Ok + Open -> Open-Ok, then in
    check mode Close -> Close-Ok (events :class:`Opened`, :class:`Closed`);
    in watch mode (`watch=True`) the connection stays open until the broker
    closes it (:class:`ServerClosed`) or :meth:`close` is called.

    `next_event` raises :class:`HandshakeError` for anything else, and again
    on every later call; when the broker refused with Connection.Close,
    Close-Ok is queued first so flushing it keeps the broker's log quiet.
    """

    def __init__(
        self,
        user: str,
        password: str,
        vhost: str = "/",
        *,
        heartbeat: int = 0,
        watch: bool = False,
        max_frame: int = DEFAULT_MAX_FRAME,
    ):
        self.user, self.password, self.vhost = user, password, vhost
        self.heartbeat = heartbeat
        self.watch = watch
        self.max_frame = max_frame
        self.state = ClientState.AWAIT_START
        self.server_properties: Mapping[str, Any] = {}
        self._frames = FrameBuffer(max_frame)
        self._outgoing = bytearray(PROTOCOL_HEADER)
        self._eof = False
        self._error: HandshakeError | None = None
        self._tune_ok: ConnectionTuneOk | None = None

    def bytes_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        if self.state in (ClientState.CLOSED, ClientState.FAILED):
            return
        if self._eof and data:
            raise RuntimeError("data received after EOF")
        if data:
            self._frames.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event | _NeedData:
        if self._error is not None:
            raise self._error
        if self.state is ClientState.CLOSED:
            return NEED_DATA
        try:
            return self._advance()
        except HandshakeError as exc:
            self._error = exc
            self.state = ClientState.FAILED
            raise

    def send_heartbeat(self) -> None:
        """Queue a heartbeat frame (watch mode: the shell's timer calls this)."""
        if self.state is ClientState.OPEN:
            self._outgoing += HEARTBEAT_FRAME

    def close(self, reply_text: str = "Warren watch closing") -> bool:
        """Queue Connection.Close if the connection got far enough for one.

        Returns False before Connection.Open was sent (then just drop the socket).
        """
        if self.state not in (ClientState.OPEN, ClientState.AWAIT_OPEN_OK):
            return False
        self._outgoing += ConnectionClose(ReplyCode.REPLY_SUCCESS, reply_text).frame()
        self.state = ClientState.AWAIT_CLOSE_OK
        return True

    def _advance(self) -> Event | _NeedData:
        while True:
            if self.state is ClientState.AWAIT_START:
                self._reject_foreign_bytes()
            frame = self._frames.next_frame()
            if frame is None:
                if self._eof:
                    raise self._eof_error()
                return NEED_DATA
            event = self._handle(frame)
            if event is not None:
                return event

    def _reject_foreign_bytes(self) -> None:
        """Before the first frame: is this AMQP 0-9-1 at all? (spec 4.2.2)"""
        head = self._frames.peek(len(PROTOCOL_HEADER))
        if not head or head[0] == FRAME_METHOD:
            return
        if head.startswith(b"AMQP") or b"AMQP".startswith(head):
            # A broker that rejects our header answers with the one it speaks.
            if len(head) < len(PROTOCOL_HEADER) and not self._eof:
                return
            version = ".".join(str(b) for b in head[4:])
            raise _framing(f"protocol version mismatch: broker answered AMQP {version}".rstrip())
        raise _framing(f"not an AMQP 0-9-1 answer: {printable(self._frames.peek(64))}")

    def _eof_error(self) -> HandshakeError:
        if self._frames.pending:
            return _framing(f"connection closed in the middle of a frame ({self._frames.pending} bytes)")
        code, description = _EOF_DESCRIPTIONS[self.state]
        return HandshakeError(code, description)

    def _handle(self, frame: Frame) -> Event | None:
        if frame.type == FRAME_HEARTBEAT:
            return None
        if frame.type != FRAME_METHOD or frame.channel != 0:
            raise _protocol(f"unexpected frame type {frame.type} on channel {frame.channel}")
        method = decode_method(frame.payload)
        if isinstance(method, ConnectionClose):
            return self._on_close(method)
        if self.state is ClientState.AWAIT_CLOSE_OK:
            return self._on_close_ok(method)
        if self.state is ClientState.OPEN:
            return self._on_open_traffic(method)
        expected = _EXPECTED[self.state]
        if type(method) is not expected:
            raise _protocol(f"expected {expected.NAME}, got {method_name(method)}")
        if isinstance(method, ConnectionStart):
            return self._on_start(method)
        if isinstance(method, ConnectionTune):
            return self._on_tune(method)
        return self._on_open_ok()

    def _on_start(self, start: ConnectionStart) -> None:
        if (start.version_major, start.version_minor) != (0, 9):
            raise _protocol(f"broker offers AMQP {start.version_major}-{start.version_minor}, not 0-9")
        if "PLAIN" not in start.mechanisms.split():
            raise _protocol(f"broker does not offer PLAIN authentication ({start.mechanisms[:64]})")
        self.server_properties = start.server_properties
        response = b"\x00" + self.user.encode() + b"\x00" + self.password.encode()
        properties = dict(CLIENT_PROPERTIES)
        if self.watch:
            # Named so operators can spot it in the management UI.  Periodic
            # checks stay unnamed: RabbitMQ logs one more line per named connection.
            properties["connection_name"] = "warren-health-watch"
        self._outgoing += ConnectionStartOk(properties, "PLAIN", response, "en_US").frame()
        self.state = ClientState.AWAIT_TUNE

    def _on_tune(self, tune: ConnectionTune) -> None:
        # 0 means "no limit" for channel-max and frame-max (spec 1.4.2.5.3).
        frame_max = min(tune.frame_max or self.max_frame, self.max_frame)
        self._frames.max_frame = max(frame_max, FRAME_MIN_SIZE)
        # We open no channels, so ask for one; heartbeats only on watch connections.
        self._tune_ok = ConnectionTuneOk(1, frame_max, self.heartbeat if self.watch else 0)
        self._outgoing += self._tune_ok.frame() + ConnectionOpen(self.vhost).frame()
        self.state = ClientState.AWAIT_OPEN_OK

    def _on_open_ok(self) -> Opened:
        tuned = self._tune_ok
        assert tuned is not None  # Open-Ok is only expected after Tune
        if self.watch:
            self.state = ClientState.OPEN
        else:
            self._outgoing += ConnectionClose(ReplyCode.REPLY_SUCCESS, "Warren health check done").frame()
            self.state = ClientState.AWAIT_CLOSE_OK
        return Opened(self.server_properties, tuned.channel_max, tuned.frame_max, tuned.heartbeat)

    def _on_open_traffic(self, method: Method) -> None:
        if isinstance(method, (ConnectionBlocked, ConnectionUnblocked)):
            return None  # resource alarms matter to publishers; the watch publishes nothing
        raise _protocol(f"unexpected {method_name(method)} on an open connection")

    def _on_close_ok(self, method: Method) -> Closed | None:
        # Spec 1.4.2.5: after sending Close, discard everything but Close/Close-Ok.
        if not isinstance(method, ConnectionCloseOk):
            return None
        self.state = ClientState.CLOSED
        return Closed()

    def _on_close(self, close: ConnectionClose) -> Event:
        self._outgoing += ConnectionCloseOk().frame()
        previous, self.state = self.state, ClientState.CLOSED
        if previous is ClientState.AWAIT_CLOSE_OK:
            return Closed()  # both sides closed at once; either Close ends it
        if previous is ClientState.OPEN:
            return ServerClosed(close.reply_code, close.reply_text)
        raise HandshakeError(
            CheckCode.L7STS,
            f"broker refused: {close.reply_code} {close.reply_text}".rstrip(),
            reply_code=close.reply_code,
        )


def describe_server(properties: Mapping[str, Any], limit: int = 128) -> dict[str, str]:
    """The server properties worth showing: product, version, cluster_name, platform."""
    keys = ("product", "version", "cluster_name", "platform")
    return {key: str(properties[key])[:limit] for key in keys if isinstance(properties.get(key), str)}
