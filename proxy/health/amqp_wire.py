"""AMQP 0-9-1 wire format, sans-I/O: frames, field tables, argument domains.

Everything here is about bytes, not about any class or method: the
protocol header, cutting frames out of a byte stream (spec 4.2.3), field
tables with RabbitMQ's errata type letters (spec 4.2.5.5), and how each
argument domain (octet, short, long, shortstr, longstr, table) is read and
written.  :mod:`proxy.health.amqp_methods` builds the Connection methods on
it and :mod:`proxy.health.amqp_client` the handshake state machine.  Spec
references are to the AMQP 0-9-1 specification (section 4.2 "Protocol
grammar"/"frame format") and RabbitMQ's errata for field-table types.

Hostile input costs bounded time and space: a frame larger than the limit is
refused as soon as its 7-byte header arrives, every length is checked against
the bytes actually present before anything is sliced, and field tables nest
at most :data:`MAX_TABLE_DEPTH` deep.  Every malformed input surfaces as a
:class:`HandshakeError` carrying the HAProxy code it means; it is defined
here, the lowest layer, because framing, method decoding and the client all
raise it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from proxy.health.results import CheckCode, CheckFailed

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_HEARTBEAT: Final = 8
FRAME_END: Final = 0xCE
FRAME_MIN_SIZE = 4096  # spec 4.2.3: every peer accepts frames this large
DEFAULT_MAX_FRAME = 128 * 1024  # before Tune, and what we offer in Tune-Ok
MAX_TABLE_DEPTH = 8
_FRAME_HEAD = struct.Struct("!BHI")  # type, channel, payload size
_OVERHEAD = _FRAME_HEAD.size + 1  # header plus the frame-end octet


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


def framing_error(description: str) -> HandshakeError:
    """L6RSP: the bytes are not AMQP 0-9-1 framing."""
    return HandshakeError(CheckCode.L6RSP, description)


def protocol_error(description: str) -> HandshakeError:
    """L7RSP: well-framed AMQP, but the wrong method or malformed arguments."""
    return HandshakeError(CheckCode.L7RSP, description)


def printable(data: bytes, limit: int = 32) -> str:
    """Foreign bytes as a short, safe string for a description."""
    text = repr(bytes(data[:limit]))[2:-1]
    return text + ("..." if len(data) > limit else "")


# --- Field tables (spec 4.2.5.5, RabbitMQ errata type letters) -------------


class Truncated(Exception):
    """Fewer bytes than a length field announced.

    Never escapes the codec: decoders turn it into ValueError (tables) or
    HandshakeError (methods), with the context the caller needs.
    """


class Cursor:
    """Reads big-endian fields from bytes, never past the end.

    `data` may be a memoryview (the connection inspector parses frames in
    place, so a password never gets a copy of its own): strings are decoded
    straight from the buffer and opaque byte strings copied out.
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise Truncated
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
        return str(self.take(self.octet()), "utf-8", "replace")

    def longstr(self) -> bytes | memoryview:
        return self.take(self.long())

    def skip(self, n: int) -> None:
        """Steps over `n` bytes without reading them (Truncated if absent)."""
        if self.pos + n > len(self.data):
            raise Truncated
        self.pos += n


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


def _decode_value(cur: Cursor, depth: int) -> Any:
    kind = cur.octet()
    if kind in _NUMBERS:
        return cur.unpack(_NUMBERS[kind])
    if kind == ord("t"):
        return cur.octet() != 0
    if kind == ord("S"):
        return str(cur.longstr(), "utf-8", "replace")
    if kind == ord("x"):
        return bytes(cur.longstr())
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


def _nested(cur: Cursor, depth: int) -> Cursor:
    if depth > MAX_TABLE_DEPTH:
        raise ValueError("field tables nested too deep")
    return Cursor(cur.longstr())


def _decode_table(cur: Cursor, depth: int = 0) -> dict[str, Any]:
    inner = _nested(cur, depth)
    table: dict[str, Any] = {}
    while not inner.at_end():
        key = inner.shortstr()
        table[key] = _decode_value(inner, depth)
    return table


def _decode_array(cur: Cursor, depth: int) -> list[Any]:
    inner = _nested(cur, depth)
    items = []
    while not inner.at_end():
        items.append(_decode_value(inner, depth))
    return items


_FIXED_SIZES = {kind: fmt.size for kind, fmt in _NUMBERS.items()} | {ord("t"): 1, ord("D"): 5, ord("V"): 0}


def skip_value(cur: Cursor) -> None:
    """Steps over one typed field value without decoding it (a password stays unread).

    Raises Truncated, or ValueError for an unknown type letter.
    """
    kind = cur.octet()
    size = _FIXED_SIZES.get(kind)
    if size is not None:
        cur.skip(size)
    elif kind in (ord("S"), ord("x"), ord("F"), ord("A")):
        cur.skip(cur.long())
    else:
        raise ValueError(f"unknown field type {kind:#04x}")


_LONG = struct.Struct("!I")
_LENGTH_PREFIXED = frozenset(map(ord, "SxFA"))


def pick_strings(cur: Cursor, wanted: frozenset[bytes], limit: int = 256) -> dict[bytes, str]:
    """Reads one field table (length prefix included) at the cursor, decoding
    only the string values of the `wanted` keys (cut to `limit` characters);
    every other value is stepped over unread. Much cheaper than decoding the
    whole table (nested capabilities and all) when a few properties are needed.
    Raises Truncated, or ValueError for an unknown type letter.
    """
    data = cur.data
    size = cur.long()
    pos, end = cur.pos, cur.pos + size
    if end > len(data):
        raise Truncated
    found: dict[bytes, str] = {}
    while pos < end:
        key_end = pos + 1 + data[pos]
        if key_end >= end:
            raise Truncated
        key = bytes(data[pos + 1 : key_end])
        kind = data[key_end]
        pos = key_end + 1
        if kind in _LENGTH_PREFIXED:
            if pos + 4 > end:
                raise Truncated
            length = _LONG.unpack_from(data, pos)[0]
            if kind == 83 and key in wanted and pos + 4 + length <= end:  # "S"
                found[key] = str(data[pos + 4 : pos + 4 + min(length, 4 * limit)], "utf-8", "replace")[:limit]
            pos += 4 + length
        else:
            fixed = _FIXED_SIZES.get(kind)
            if fixed is None:
                raise ValueError(f"unknown field type {kind:#04x}")
            pos += fixed
    if pos != end:
        raise Truncated
    cur.pos = end
    return found


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
    cur = Cursor(data)
    try:
        table = _decode_table(cur)
    except Truncated:
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
        span = scan_frame(self._buffer, 0, self.max_frame)
        if span is None:
            return None
        payload = bytes(self._buffer[span.payload_start : span.end - 1])
        del self._buffer[: span.end]
        return Frame(span.type, span.channel, payload)


@dataclass(frozen=True, slots=True)
class FrameSpan:
    """Where one complete frame sits in a buffer: payload at [payload_start, end - 1)."""

    type: int
    channel: int
    payload_start: int
    end: int  # just past the frame-end octet


def scan_frame(data: bytes | bytearray | memoryview, pos: int, max_frame: int) -> FrameSpan | None:
    """Locates the frame starting at `pos` without copying it (spec 4.2.3).

    None if it is not complete yet; HandshakeError(L6RSP) for an unknown
    frame type, a frame over `max_frame` (decided from its 7-byte header) or
    a wrong frame-end octet.
    """
    if len(data) - pos < _FRAME_HEAD.size:
        return None
    frame_type, channel, size = _FRAME_HEAD.unpack_from(data, pos)
    if frame_type not in (FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT):
        raise framing_error(f"unknown frame type {frame_type} ({printable(bytes(data[pos : pos + 32]))})")
    if size + _OVERHEAD > max_frame:
        raise framing_error(f"frame of {size + _OVERHEAD} bytes exceeds frame-max {max_frame}")
    end = pos + _FRAME_HEAD.size + size
    if len(data) <= end:
        return None
    if data[end] != FRAME_END:
        raise framing_error(f"frame-end octet is {data[end]:#04x}, not 0xce")
    return FrameSpan(frame_type, channel, pos + _FRAME_HEAD.size, end + 1)


# --- Argument domains (spec 4.2.5) --------------------------------------------

# Argument types by name: how to read one from a cursor and how to write one.
ARGUMENT_READERS = {
    "octet": Cursor.octet,
    "short": Cursor.short,
    "long": Cursor.long,
    "shortstr": Cursor.shortstr,
    "longstr": lambda cur: str(cur.longstr(), "utf-8", "replace"),
    "bytes": lambda cur: bytes(cur.longstr()),
    "table": _decode_table,
}
ARGUMENT_WRITERS = {
    "octet": _U8.pack,
    "short": _U16.pack,
    "long": _U32.pack,
    "shortstr": encode_shortstr,
    "longstr": encode_longstr,
    "bytes": encode_longstr,
    "table": encode_table,
}
