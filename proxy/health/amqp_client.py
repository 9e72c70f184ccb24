"""The client side of the AMQP 0-9-1 connection handshake, sans-I/O (h11 style).

:class:`HandshakeClient` is the state machine the AMQP check
(:mod:`proxy.health.amqp`) and the watch (:mod:`proxy.health.watch`) drive
over a socket: it queues the protocol header and our methods, consumes the
broker's frames and reports :class:`Opened`, :class:`ServerClosed` or
:class:`Closed`, or raises :class:`~proxy.health.amqp_wire.HandshakeError`
with the HAProxy code the failure means.  Frames and tables come from
:mod:`proxy.health.amqp_wire`, the methods from
:mod:`proxy.health.amqp_methods`; this module adds only the conversation.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.health.amqp_methods import (
    ConnectionBlocked,
    ConnectionClose,
    ConnectionCloseOk,
    ConnectionOpen,
    ConnectionOpenOk,
    ConnectionStart,
    ConnectionStartOk,
    ConnectionTune,
    ConnectionTuneOk,
    ConnectionUnblocked,
    Method,
    ReplyCode,
    decode_method,
    method_name,
)
from proxy.health.amqp_wire import (
    DEFAULT_MAX_FRAME,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_MIN_SIZE,
    HEARTBEAT_FRAME,
    PROTOCOL_HEADER,
    Frame,
    FrameBuffer,
    HandshakeError,
    framing_error,
    printable,
    protocol_error,
)
from proxy.health.results import CheckCode

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
            raise framing_error(f"protocol version mismatch: broker answered AMQP {version}".rstrip())
        raise framing_error(f"not an AMQP 0-9-1 answer: {printable(self._frames.peek(64))}")

    def _eof_error(self) -> HandshakeError:
        if self._frames.pending:
            return framing_error(f"connection closed in the middle of a frame ({self._frames.pending} bytes)")
        code, description = _EOF_DESCRIPTIONS[self.state]
        return HandshakeError(code, description)

    def _handle(self, frame: Frame) -> Event | None:
        if frame.type == FRAME_HEARTBEAT:
            return None
        if frame.type != FRAME_METHOD or frame.channel != 0:
            raise protocol_error(f"unexpected frame type {frame.type} on channel {frame.channel}")
        method = decode_method(frame.payload)
        if isinstance(method, ConnectionClose):
            return self._on_close(method)
        if self.state is ClientState.AWAIT_CLOSE_OK:
            return self._on_close_ok(method)
        if self.state is ClientState.OPEN:
            return self._on_open_traffic(method)
        expected = _EXPECTED[self.state]
        if type(method) is not expected:
            raise protocol_error(f"expected {expected.NAME}, got {method_name(method)}")
        if isinstance(method, ConnectionStart):
            return self._on_start(method)
        if isinstance(method, ConnectionTune):
            return self._on_tune(method)
        return self._on_open_ok()

    def _on_start(self, start: ConnectionStart) -> None:
        if (start.version_major, start.version_minor) != (0, 9):
            raise protocol_error(f"broker offers AMQP {start.version_major}-{start.version_minor}, not 0-9")
        if "PLAIN" not in start.mechanisms.split():
            raise protocol_error(f"broker does not offer PLAIN authentication ({start.mechanisms[:64]})")
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
        raise protocol_error(f"unexpected {method_name(method)} on an open connection")

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
