"""The AMQP 0-9-1 handshake codec: frames, tables, methods and the client machine."""

import struct
import time
from decimal import Decimal

import pytest

from proxy.health.amqp_client import (
    NEED_DATA,
    ClientState,
    Closed,
    HandshakeClient,
    Opened,
    ServerClosed,
    describe_server,
)
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
    UnknownMethod,
    decode_method,
)
from proxy.health.amqp_wire import (
    DEFAULT_MAX_FRAME,
    HEARTBEAT_FRAME,
    PROTOCOL_HEADER,
    FrameBuffer,
    HandshakeError,
    decode_table,
    encode_frame,
    encode_table,
)
from proxy.health.results import CheckCode

RABBIT_PROPERTIES = {
    "product": "RabbitMQ",
    "version": "3.10.8",
    "platform": "Erlang/OTP 25.2.3",
    "cluster_name": "rabbit@test",
    "copyright": "Copyright (c) 2007-2022 VMware, Inc. or its affiliates.",
    "capabilities": {"publisher_confirms": True, "authentication_failure_close": True},
}
START = ConnectionStart(server_properties=RABBIT_PROPERTIES)


def methods_in(data: bytes) -> list:
    frames = FrameBuffer()
    frames.feed(data)
    found = []
    while (frame := frames.next_frame()) is not None:
        found.append(decode_method(frame.payload) if frame.type == 1 else frame)
    assert frames.pending == 0
    return found


def drain(client: HandshakeClient) -> list:
    """All events the client has now (stops at NEED_DATA)."""
    events = []
    while (event := client.next_event()) is not NEED_DATA:
        events.append(event)
        if client.state is ClientState.CLOSED:
            break
    return events


def client_at(state: ClientState, *, watch: bool = False, heartbeat: int = 0) -> HandshakeClient:
    """A client driven by a scripted broker up to `state`."""
    client = HandshakeClient("guest", "secret", "/prod", watch=watch, heartbeat=heartbeat)
    script = [START.frame(), ConnectionTune(2047, 131072, 60).frame(), ConnectionOpenOk().frame()]
    steps = [ClientState.AWAIT_START, ClientState.AWAIT_TUNE, ClientState.AWAIT_OPEN_OK]
    for frame in script[: steps.index(state) if state in steps else 3]:
        client.receive_data(frame)
        drain(client)
    client.bytes_to_send()
    return client


def fails_with(client: HandshakeClient, data: bytes, *, eof: bool = False) -> HandshakeError:
    client.receive_data(data)
    if eof:
        client.receive_data(b"")
    with pytest.raises(HandshakeError) as caught:
        drain(client)
    return caught.value


# --- frames -----------------------------------------------------------------


def test_heartbeat_frame_is_type_8_on_channel_0():
    assert HEARTBEAT_FRAME == b"\x08\x00\x00\x00\x00\x00\x00\xce"


def test_start_frame_has_the_shape_brokers_send():
    # REFERENCE: 01 00 00 <size:4> 00 0a 00 0a, then version 0-9
    frame = START.frame()
    size = struct.unpack("!I", frame[3:7])[0]
    assert frame[:3] == b"\x01\x00\x00" and frame[7:11] == b"\x00\x0a\x00\x0a"
    assert frame[11:13] == b"\x00\x09" and len(frame) == size + 8 and frame[-1] == 0xCE


def test_frames_are_cut_from_byte_by_byte_input():
    data = START.frame() + HEARTBEAT_FRAME + ConnectionTune().frame()
    frames = FrameBuffer()
    out = []
    for i in range(len(data)):
        frames.feed(data[i : i + 1])
        while (frame := frames.next_frame()) is not None:
            out.append(frame)
    assert [(f.type, f.channel) for f in out] == [(1, 0), (8, 0), (1, 0)]
    assert decode_method(out[2].payload) == ConnectionTune()


def test_oversized_frame_is_refused_from_its_header_alone():
    frames = FrameBuffer(max_frame=4096)
    frames.feed(struct.pack("!BHI", 1, 0, 1 << 30))
    with pytest.raises(HandshakeError) as caught:
        frames.next_frame()
    assert caught.value.code is CheckCode.L6RSP and "exceeds frame-max" in caught.value.description


def test_frame_at_the_limit_is_accepted():
    frames = FrameBuffer(max_frame=4096)
    frames.feed(encode_frame(3, 1, b"x" * (4096 - 8)))
    assert len(frames.next_frame().payload) == 4088


@pytest.mark.parametrize(
    "data, words",
    [
        (encode_frame(1, 0, b"\x00\x0a\x00\x33")[:-1] + b"\x00", "frame-end"),
        (b"\x05\x00\x00\x00\x00\x00\x00\xce", "unknown frame type"),
    ],
)
def test_broken_frames_are_l6rsp(data, words):
    frames = FrameBuffer()
    frames.feed(data)
    with pytest.raises(HandshakeError) as caught:
        frames.next_frame()
    assert caught.value.code is CheckCode.L6RSP and words in caught.value.description


# --- field tables -------------------------------------------------------------


def test_table_round_trip_of_every_encodable_type():
    table = {
        "text": "RabbitMQ ünïcode",
        "yes": True,
        "no": False,
        "small": -5,
        "big": 2**40,
        "float": 1.5,
        "raw": b"\x00\xff",
        "nothing": None,
        "nested": {"deeper": {"list": [1, "two", [3.0], {"four": 4}]}},
        "empty": {},
    }
    assert decode_table(encode_table(table)) == table


def test_table_decodes_the_other_wire_types():
    def entry(key: str, kind: bytes, value: bytes) -> bytes:
        return bytes([len(key)]) + key.encode() + kind + value

    body = b"".join(
        [
            entry("b", b"b", b"\xff"),
            entry("B", b"B", b"\xff"),
            entry("s", b"s", b"\xff\xfe"),
            entry("u", b"u", b"\xff\xfe"),
            entry("i", b"i", b"\xff\xff\xff\xff"),
            entry("L", b"L", b"\x00" * 7 + b"\x09"),
            entry("f", b"f", struct.pack("!f", 0.5)),
            entry("T", b"T", struct.pack("!Q", 1700000000)),
            entry("D", b"D", b"\x02" + struct.pack("!i", 12345)),
        ]
    )
    table = decode_table(struct.pack("!I", len(body)) + body)
    assert table == {
        "b": -1,
        "B": 255,
        "s": -2,
        "u": 65534,
        "i": 2**32 - 1,
        "L": 9,
        "f": 0.5,
        "T": 1700000000,
        "D": Decimal("123.45"),
    }


def nest(depth: int) -> bytes:
    table = encode_table({})
    for _ in range(depth):
        body = b"\x01kF" + table
        table = struct.pack("!I", len(body)) + body
    return table


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x10abc",  # announces 16 bytes, has 3
        b"\xff\xff\xff\xff",  # announces 4 GiB: refused without allocating
        b"\x00\x00\x00\x03\x01kZ",  # unknown type letter
        b"\x00\x00\x00\x04\x05abcd",  # key longer than the table
        b"\x00\x00\x00\x03\x01kS",  # value cut off
        nest(40),
    ],
)
def test_malformed_tables_raise_value_error(data):
    with pytest.raises(ValueError):
        decode_table(data)


def test_moderate_nesting_is_fine():
    assert decode_table(nest(5))["k"]["k"]["k"]["k"]["k"] == {}


# --- methods ------------------------------------------------------------------

METHODS = [
    START,
    ConnectionStartOk({"product": "x"}, "PLAIN", b"\x00u\x00p", "en_US"),
    ConnectionTune(2047, 131072, 60),
    ConnectionTuneOk(1, 4096, 5),
    ConnectionOpen("/prod"),
    ConnectionOpenOk(),
    ConnectionClose(320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'", 0, 0),
    ConnectionCloseOk(),
    ConnectionBlocked("low on memory"),
    ConnectionUnblocked(),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.NAME)
def test_method_round_trip(method):
    [decoded] = methods_in(method.frame())
    assert decoded == method


def test_unknown_method_is_reported_not_raised():
    payload = struct.pack("!HH", 60, 40) + b"whatever"
    assert decode_method(payload) == UnknownMethod(60, 40)


@pytest.mark.parametrize("method", METHODS[:7], ids=lambda m: m.NAME)
def test_truncated_method_arguments_are_l7rsp(method):
    payload = method.frame()[7:-1]
    for cut in range(len(payload) - 1, 3, -max(1, len(payload) // 20)):
        with pytest.raises(HandshakeError) as caught:
            decode_method(payload[:cut])
        assert caught.value.code is CheckCode.L7RSP


# --- the client, check mode ---------------------------------------------------


def test_check_mode_handshake_and_polite_close():
    client = HandshakeClient("guest", "secret", "/prod")
    assert client.bytes_to_send() == PROTOCOL_HEADER
    client.receive_data(START.frame())
    assert drain(client) == []
    start_ok = methods_in(client.bytes_to_send())
    assert start_ok[0].mechanism == "PLAIN" and start_ok[0].response == b"\x00guest\x00secret"
    assert start_ok[0].client_properties["product"] == "Warren health check"
    assert start_ok[0].client_properties["capabilities"]["authentication_failure_close"] is True

    client.receive_data(ConnectionTune(2047, 131072, 60).frame())
    assert drain(client) == []
    assert methods_in(client.bytes_to_send()) == [ConnectionTuneOk(1, 131072, 0), ConnectionOpen("/prod")]

    client.receive_data(ConnectionOpenOk().frame())
    [opened] = drain(client)
    assert isinstance(opened, Opened) and opened.server_properties["cluster_name"] == "rabbit@test"
    [close] = methods_in(client.bytes_to_send())
    assert isinstance(close, ConnectionClose) and close.reply_code == 200

    client.receive_data(ConnectionCloseOk().frame())
    assert drain(client) == [Closed()]
    assert client.state is ClientState.CLOSED and client.bytes_to_send() == b""


def test_whole_conversation_in_one_chunk():
    client = HandshakeClient("guest", "guest")
    data = START.frame() + ConnectionTune().frame() + ConnectionOpenOk().frame() + ConnectionCloseOk().frame()
    client.receive_data(data)
    events = drain(client)
    assert [type(e) for e in events] == [Opened, Closed]


def test_heartbeats_during_the_handshake_are_ignored():
    client = HandshakeClient("guest", "guest")
    client.receive_data(START.frame() + HEARTBEAT_FRAME + ConnectionTune().frame() + HEARTBEAT_FRAME)
    assert drain(client) == [] and client.state is ClientState.AWAIT_OPEN_OK


@pytest.mark.parametrize(
    "server_frame_max, offered, limit",
    [(131072, 131072, 131072), (0, DEFAULT_MAX_FRAME, DEFAULT_MAX_FRAME), (4096, 4096, 4096), (1 << 20, 131072, 131072)],
)
def test_frame_max_is_negotiated_down_and_enforced(server_frame_max, offered, limit):
    client = HandshakeClient("guest", "guest")
    client.bytes_to_send()
    client.receive_data(START.frame() + ConnectionTune(0, server_frame_max, 0).frame())
    drain(client)
    tune_ok = methods_in(client.bytes_to_send())[1]
    assert tune_ok.frame_max == offered
    error = fails_with(client, encode_frame(3, 1, b"x" * (limit - 7)))
    assert error.code is CheckCode.L6RSP


def test_header_reply_means_version_mismatch():
    error = fails_with(HandshakeClient("guest", "guest"), b"AMQP\x00\x00\x09\x01")
    assert error.code is CheckCode.L6RSP and "protocol version mismatch" in error.description


def test_header_reply_arriving_in_pieces_waits_for_all_of_it():
    client = HandshakeClient("guest", "guest")
    client.receive_data(b"AMQ")
    assert client.next_event() is NEED_DATA
    error = fails_with(client, b"P\x01\x01\x00\x0a")
    assert error.code is CheckCode.L6RSP and "AMQP 1.1.0.10" in error.description


def test_partial_header_then_eof_is_still_a_mismatch():
    error = fails_with(HandshakeClient("guest", "guest"), b"AMQ", eof=True)
    assert error.code is CheckCode.L6RSP and "mismatch" in error.description


@pytest.mark.parametrize("data", [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"SSH-2.0-OpenSSH_9.2\r\n", b"\x16\x03\x01"])
def test_foreign_protocols_are_l6rsp(data):
    error = fails_with(HandshakeClient("guest", "guest"), data)
    assert error.code is CheckCode.L6RSP and "not an AMQP 0-9-1 answer" in error.description


@pytest.mark.parametrize("cut", [1, 7, 20, -1])
def test_truncated_start_then_eof_is_l6rsp(cut):
    error = fails_with(HandshakeClient("guest", "guest"), START.frame()[:cut], eof=True)
    assert error.code is CheckCode.L6RSP and "middle of a frame" in error.description


def test_eof_before_anything_is_l6rsp():
    error = fails_with(HandshakeClient("guest", "guest"), b"", eof=True)
    assert error.code is CheckCode.L6RSP


def test_eof_after_start_ok_is_l7rsp():
    error = fails_with(client_at(ClientState.AWAIT_TUNE), b"", eof=True)
    assert error.code is CheckCode.L7RSP


def test_oversized_first_frame_is_l6rsp():
    error = fails_with(HandshakeClient("guest", "guest"), struct.pack("!BHI", 1, 0, 10 * DEFAULT_MAX_FRAME))
    assert error.code is CheckCode.L6RSP and "exceeds" in error.description


@pytest.mark.parametrize(
    "state, wrong",
    [
        (ClientState.AWAIT_START, ConnectionTune()),
        (ClientState.AWAIT_TUNE, UnknownMethod(10, 20)),  # Connection.Secure: we only speak PLAIN
        (ClientState.AWAIT_TUNE, ConnectionOpenOk()),
        (ClientState.AWAIT_OPEN_OK, ConnectionTune()),
    ],
)
def test_wrong_method_at_a_step_is_l7rsp(state, wrong):
    payload = struct.pack("!HH", 10, 20) if isinstance(wrong, UnknownMethod) else None
    frame = encode_frame(1, 0, payload) if payload else wrong.frame()
    error = fails_with(client_at(state), frame)
    assert error.code is CheckCode.L7RSP and "expected" in error.description


def test_methods_on_other_channels_are_l7rsp():
    error = fails_with(HandshakeClient("guest", "guest"), START.frame(channel=1))
    assert error.code is CheckCode.L7RSP


@pytest.mark.parametrize(
    "start, words",
    [(ConnectionStart(0, 8, RABBIT_PROPERTIES), "not 0-9"), (ConnectionStart(mechanisms="EXTERNAL"), "PLAIN")],
)
def test_unusable_start_is_l7rsp(start, words):
    error = fails_with(HandshakeClient("guest", "guest"), start.frame())
    assert error.code is CheckCode.L7RSP and words in error.description


@pytest.mark.parametrize(
    "state, code, text",
    [
        (ClientState.AWAIT_TUNE, 403, "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN"),
        (ClientState.AWAIT_OPEN_OK, 530, "NOT_ALLOWED - vhost /prod not found"),
        (ClientState.AWAIT_OPEN_OK, 320, "CONNECTION_FORCED - broker forced connection closure"),
    ],
)
def test_broker_refusal_is_l7sts_with_reply_and_close_ok_is_owed(state, code, text):
    client = client_at(state)
    error = fails_with(client, ConnectionClose(code, text).frame())
    assert error.code is CheckCode.L7STS and error.reply_code == code and text in error.description
    assert error.details == {"status": str(code)}
    assert methods_in(client.bytes_to_send()) == [ConnectionCloseOk()]


def test_after_an_error_the_client_keeps_failing_the_same_way():
    client = HandshakeClient("guest", "guest")
    first = fails_with(client, b"HTTP/1.1 400 Bad Request\r\n")
    client.receive_data(START.frame())  # ignored
    with pytest.raises(HandshakeError) as again:
        client.next_event()
    assert again.value is first and client.state is ClientState.FAILED


def test_close_ok_wait_ignores_other_methods():
    client = client_at(ClientState.AWAIT_CLOSE_OK)
    client.receive_data(ConnectionBlocked("x").frame() + ConnectionCloseOk().frame())
    assert drain(client) == [Closed()]


def test_simultaneous_close_ends_the_conversation():
    client = client_at(ClientState.AWAIT_CLOSE_OK)
    client.receive_data(ConnectionClose(320, "shutdown").frame())
    assert drain(client) == [Closed()]
    assert methods_in(client.bytes_to_send()) == [ConnectionCloseOk()]


# --- the client, watch mode ---------------------------------------------------


def test_watch_mode_asks_for_heartbeats_and_stays_open():
    client = client_at(ClientState.AWAIT_OPEN_OK, watch=True, heartbeat=5)
    client.receive_data(ConnectionOpenOk().frame())
    [opened] = drain(client)
    assert opened.heartbeat == 5 and client.state is ClientState.OPEN
    assert client.bytes_to_send() == b""  # no Close in watch mode


def test_watch_mode_tune_ok_carries_the_heartbeat():
    client = HandshakeClient("guest", "guest", watch=True, heartbeat=7)
    client.bytes_to_send()
    client.receive_data(START.frame() + ConnectionTune(2047, 131072, 60).frame())
    drain(client)
    assert methods_in(client.bytes_to_send())[1] == ConnectionTuneOk(1, 131072, 7)


def open_watch() -> HandshakeClient:
    client = client_at(ClientState.AWAIT_OPEN_OK, watch=True, heartbeat=5)
    client.receive_data(ConnectionOpenOk().frame())
    drain(client)
    return client


def test_watch_reports_a_server_close_and_answers_it():
    client = open_watch()
    client.receive_data(HEARTBEAT_FRAME + ConnectionClose(320, "CONNECTION_FORCED - shutdown").frame())
    assert drain(client) == [ServerClosed(320, "CONNECTION_FORCED - shutdown")]
    assert methods_in(client.bytes_to_send()) == [ConnectionCloseOk()]


def test_watch_sends_heartbeats_on_request_and_ignores_the_brokers():
    client = open_watch()
    client.receive_data(HEARTBEAT_FRAME * 3 + ConnectionBlocked("memory").frame() + ConnectionUnblocked().frame())
    assert drain(client) == []
    client.send_heartbeat()
    assert client.bytes_to_send() == HEARTBEAT_FRAME


def test_heartbeats_are_only_sent_on_an_open_connection():
    client = HandshakeClient("guest", "guest", watch=True, heartbeat=5)
    client.bytes_to_send()
    client.send_heartbeat()
    assert client.bytes_to_send() == b""


def test_watch_eof_is_l4con():
    error = fails_with(open_watch(), b"", eof=True)
    assert error.code is CheckCode.L4CON


def test_watch_rejects_unexpected_methods():
    error = fails_with(open_watch(), ConnectionTune().frame())
    assert error.code is CheckCode.L7RSP


def test_watch_close_on_request():
    client = open_watch()
    assert client.close()
    [close] = methods_in(client.bytes_to_send())
    assert isinstance(close, ConnectionClose) and close.reply_code == 200
    client.receive_data(HEARTBEAT_FRAME + ConnectionCloseOk().frame())
    assert drain(client) == [Closed()]


def test_close_before_open_is_not_possible():
    client = HandshakeClient("guest", "guest", watch=True)
    assert not client.close()


def test_describe_server_keeps_the_useful_strings():
    details = describe_server({**RABBIT_PROPERTIES, "version": "3.10.8" + "x" * 500, "cluster_name": 7})
    assert details["product"] == "RabbitMQ" and len(details["version"]) == 128
    assert "cluster_name" not in details and "copyright" not in details


# --- hostile input ------------------------------------------------------------
# Arbitrary, cut and damaged answers: tests/properties/test_amqp_codec.py.


def test_huge_announced_lengths_cost_nothing():
    # A Start whose server-properties table claims 4 GiB inside a small frame.
    payload = b"\x00\x0a\x00\x0a\x00\x09" + b"\xff\xff\xff\xff" + b"x" * 100
    began = time.monotonic()
    error = fails_with(HandshakeClient("guest", "guest"), encode_frame(1, 0, payload))
    assert error.code is CheckCode.L7RSP and time.monotonic() - began < 1
