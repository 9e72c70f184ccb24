"""Just enough AMQP 0-9-1 to open a connection and a channel: plain bytes, no I/O.

The reconnect storm needs a thousand clients that reconnect at once; a real
client library would spend more CPU than the proxies do. A connection here is
the client half of the handshake (AMQP 0-9-1 spec, section 2.2.4):

    C: protocol header          S: Connection.Start
    C: Connection.Start-Ok      S: Connection.Tune
    C: Connection.Tune-Ok, Connection.Open
                                S: Connection.Open-Ok
    C: Channel.Open             S: Channel.Open-Ok

Frames (section 4.2.3): type (1 octet), channel (2), payload size (4),
payload, frame-end 0xCE. A method payload starts with class id and method id
(2 octets each).
"""

from __future__ import annotations

import struct

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD = 1
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE

CONNECTION_START = (10, 10)
CONNECTION_START_OK = (10, 11)
CONNECTION_TUNE = (10, 30)
CONNECTION_OPEN = (10, 40)
CONNECTION_OPEN_OK = (10, 41)
CONNECTION_CLOSE = (10, 50)
CONNECTION_CLOSE_OK = (10, 51)
CHANNEL_OPEN_OK = (20, 11)


class ProtocolError(Exception):
    """The peer sent something a client handshake does not expect."""


def _shortstr(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!B", len(data)) + data


def _longstr(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data


def method_frame(channel: int, class_id: int, method_id: int, args: bytes) -> bytes:
    payload = struct.pack("!HH", class_id, method_id) + args
    return struct.pack("!BHI", FRAME_METHOD, channel, len(payload)) + payload + bytes([FRAME_END])


def _table(fields: dict) -> bytes:
    """A field table of strings, booleans and nested tables (all a client sends here)."""
    body = b""
    for key, value in fields.items():
        if isinstance(value, bool):
            encoded = b"t" + bytes([value])
        elif isinstance(value, dict):
            encoded = b"F" + _table(value)
        else:
            encoded = b"S" + _longstr(str(value).encode())
        body += _shortstr(key) + encoded
    return _longstr(body)


# What a client library sends (pika 1.3's properties, with a connection name).
LIBRARY_PROPERTIES = {
    "product": "Pika Python Client Library",
    "platform": "Python 3.11.2",
    "capabilities": {"authentication_failure_close": True, "basic.nack": True, "connection.blocked": True,
                     "consumer_cancel_notify": True, "publisher_confirms": True},
    "information": "See http://pika.rtfd.org",
    "version": "1.3.2",
    "connection_name": "bench-connrate",
}


def start_ok(user: str = "guest", password: str = "guest", properties: dict | None = None) -> bytes:
    """Connection.Start-Ok: `properties` as client properties (none by default), PLAIN login."""
    response = b"\x00" + user.encode() + b"\x00" + password.encode()
    table = _table(properties) if properties else struct.pack("!I", 0)
    args = table + _shortstr("PLAIN") + _longstr(response) + _shortstr("en_US")
    return method_frame(0, 10, 11, args)


def tune_ok_and_open(tune_args: bytes, vhost: str = "/") -> bytes:
    """Connection.Tune-Ok accepting the broker's channel-max and frame-max with
    heartbeats off (a dead broker is noticed through the proxy closing the
    connection), then Connection.Open."""
    channel_max, frame_max, _heartbeat = struct.unpack_from("!HIH", tune_args)
    tune_ok = method_frame(0, 10, 31, struct.pack("!HIH", channel_max, frame_max, 0))
    open_ = method_frame(0, 10, 40, _shortstr(vhost) + _shortstr("") + b"\x00")
    return tune_ok + open_


def channel_open(channel: int = 1) -> bytes:
    return method_frame(channel, 20, 10, _shortstr(""))


def connection_close() -> bytes:
    return method_frame(0, 10, 50, struct.pack("!H", 200) + _shortstr("bye") + struct.pack("!HH", 0, 0))


class FrameReader:
    """Splits received bytes into frames: feed(data), then frames()."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def frames(self) -> list[tuple[int, int, bytes]]:
        """Complete frames so far as (type, channel, payload); ProtocolError
        on a bad frame-end or on a protocol header sent back (a broker that
        refuses our version answers with its own header)."""
        out = []
        while len(self._buffer) >= 7:
            if self._buffer[:4] == b"AMQP":
                raise ProtocolError(f"broker answered with protocol header {bytes(self._buffer[:8])!r}")
            kind, channel, size = struct.unpack_from("!BHI", self._buffer)
            if len(self._buffer) < 8 + size:
                break
            if self._buffer[7 + size] != FRAME_END:
                raise ProtocolError("bad frame-end octet")
            out.append((kind, channel, bytes(self._buffer[7:7 + size])))
            del self._buffer[:8 + size]
        return out


def method_of(payload: bytes) -> tuple[tuple[int, int], bytes]:
    """((class id, method id), arguments) of a method frame's payload."""
    class_id, method_id = struct.unpack_from("!HH", payload)
    return (class_id, method_id), payload[4:]


class ClientHandshake:
    """The client side of opening a connection and channel 1, as a state machine.

    `start()` returns the bytes to send first; `received(data)` returns bytes
    to send in answer (possibly b""). `ready` turns True at Channel.Open-Ok;
    `greeting` holds the Connection.Start arguments (server properties name
    the node). A Connection.Close from the broker raises ProtocolError.

    With `then_close`, the connection is closed instead of opening a channel
    (Connection.Close at Open-Ok) and `ready` turns True at Close-Ok: a whole
    short-lived connection, as bench.tools.amqp_connrate makes them.
    `properties` are sent as client properties (none by default)."""

    def __init__(self, user: str = "guest", password: str = "guest", vhost: str = "/", *,
                 properties: dict | None = None, then_close: bool = False):
        self.user, self.password, self.vhost = user, password, vhost
        self.properties, self.then_close = properties, then_close
        self.reader = FrameReader()
        self.greeting = b""
        self.ready = False

    def start(self) -> bytes:
        return PROTOCOL_HEADER

    def received(self, data: bytes) -> bytes:
        self.reader.feed(data)
        reply = b""
        for kind, _channel, payload in self.reader.frames():
            if kind == FRAME_HEARTBEAT:
                continue
            if kind != FRAME_METHOD:
                raise ProtocolError(f"unexpected frame type {kind}")
            method, args = method_of(payload)
            if method == CONNECTION_START:
                self.greeting = args
                reply += start_ok(self.user, self.password, self.properties)
            elif method == CONNECTION_TUNE:
                reply += tune_ok_and_open(args, self.vhost)
            elif method == CONNECTION_OPEN_OK:
                reply += connection_close() if self.then_close else channel_open(1)
            elif method == (CONNECTION_CLOSE_OK if self.then_close else CHANNEL_OPEN_OK):
                self.ready = True
            elif method == CONNECTION_CLOSE:
                code = struct.unpack_from("!H", args)[0]
                raise ProtocolError(f"broker closed the connection: {code} {args[3:3 + args[2]]!r}")
            else:
                raise ProtocolError(f"unexpected method {method}")
        return reply


# The broker's side, for fake brokers (bench/callcount.py): what RabbitMQ
# 3.12 sends, with server properties of the same shape and size.
BROKER_PROPERTIES = {
    "capabilities": {"publisher_confirms": True, "exchange_exchange_bindings": True, "basic.nack": True,
                     "consumer_cancel_notify": True, "connection.blocked": True, "consumer_priorities": True,
                     "authentication_failure_close": True, "per_consumer_qos": True, "direct_reply_to": True},
    "cluster_name": "fake@localhost",
    "copyright": "Copyright (c) 2007-2023 VMware, Inc. or its affiliates.",
    "information": "Licensed under the MPL 2.0. Website: https://rabbitmq.com",
    "platform": "Erlang/OTP 25.3.2.8",
    "product": "RabbitMQ",
    "version": "3.12.1",
}


def connection_start(properties: dict = BROKER_PROPERTIES) -> bytes:
    return method_frame(0, 10, 10, b"\x00\x09" + _table(properties) + _longstr(b"AMQPLAIN PLAIN")
                        + _longstr(b"en_US"))


def connection_tune(channel_max: int = 2047, frame_max: int = 131072, heartbeat: int = 60) -> bytes:
    return method_frame(0, 10, 30, struct.pack("!HIH", channel_max, frame_max, heartbeat))


def connection_open_ok() -> bytes:
    return method_frame(0, 10, 41, _shortstr(""))


def connection_close_ok() -> bytes:
    return method_frame(0, 10, 51, b"")


def node_in(greeting: bytes, node_names: list[str]) -> str | None:
    """Which of `node_names` (RabbitMQ node names, "name@host") sent this
    Connection.Start: its server properties carry the cluster name, which
    for a node that is not clustered starts with the node's own name."""
    for name in node_names:
        if name.split("@")[0].encode() + b"@" in greeting:
            return name
    return None
