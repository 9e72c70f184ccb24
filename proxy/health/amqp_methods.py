"""AMQP 0-9-1 Connection class methods (spec 1.4.2, class 10), sans-I/O.

Only what a polite health check and a watch connection need: the
Connection class (10) on channel 0, both directions encoded so tests can
script a broker.  Each method is a frozen dataclass listing its argument
domains, so one generic codec built on the domain readers and writers of
:mod:`proxy.health.amqp_wire` encodes and decodes them all.  A malformed
method raises :class:`~proxy.health.amqp_wire.HandshakeError` with L7RSP;
a well-framed method this module does not model decodes to
:class:`UnknownMethod` so the caller can name it in its error.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from proxy.health.amqp_wire import (
    ARGUMENT_READERS,
    ARGUMENT_WRITERS,
    FRAME_METHOD,
    Cursor,
    Truncated,
    encode_frame,
    protocol_error,
)

_METHOD_HEAD = struct.Struct("!HH")  # class id, method id


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
        arguments = b"".join(ARGUMENT_WRITERS[kind](value) for kind, value in zip(self.ARGS, values))
        head = _METHOD_HEAD.pack(self.CLASS_ID, self.METHOD_ID)
        return encode_frame(FRAME_METHOD, channel, head + arguments)

    @classmethod
    def decode_arguments(cls, cur: Cursor) -> Method:
        return cls(*(ARGUMENT_READERS[kind](cur) for kind in cls.ARGS))


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
    cur = Cursor(payload)
    try:
        class_id, method_id = _METHOD_HEAD.unpack(cur.take(_METHOD_HEAD.size))
    except Truncated:
        raise protocol_error("method frame shorter than its class and method ids") from None
    cls = _METHODS.get((class_id, method_id))
    if cls is None:
        return UnknownMethod(class_id, method_id)
    try:
        return cls.decode_arguments(cur)
    except (Truncated, ValueError, struct.error) as exc:
        detail = str(exc) or "arguments truncated"
        raise protocol_error(f"malformed {cls.NAME}: {detail}") from None
