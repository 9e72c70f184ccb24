"""Properties of the AMQP 0-9-1 codec (frames, field tables, methods, the handshake client).

What a broker, or anything answering on its port, sends is outside input:
whatever the bytes and however they are cut, the codec yields frames,
methods and events, or raises its own error (HandshakeError; ValueError for
a lone field table, as `decode_table` documents), within memory bounded by
the frame limit. What we encode decodes back to itself.
"""

from __future__ import annotations

import math
import struct
from dataclasses import fields

from hypothesis import given
from hypothesis import strategies as st

from proxy.health.amqp_client import NEED_DATA, ClientState, HandshakeClient
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
    UnknownMethod,
    decode_method,
)
from proxy.health.amqp_wire import (
    FRAME_METHOD,
    HEARTBEAT_FRAME,
    MAX_TABLE_DEPTH,
    FrameBuffer,
    HandshakeError,
    decode_table,
    encode_frame,
    encode_table,
)
from proxy.health.results import CheckCode

CODES = {CheckCode.L4CON, CheckCode.L6RSP, CheckCode.L7RSP, CheckCode.L7STS}

# --- field tables -----------------------------------------------------------------------

shortstr_text = st.text(max_size=40)  # at most 160 bytes in UTF-8: always a valid shortstr
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False), st.text(max_size=60), st.binary(max_size=60),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(shortstr_text, inner, max_size=4)),
    max_leaves=8,
)
tables = st.dictionaries(shortstr_text, values, max_size=6)


def depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def same(a, b) -> bool:
    """Equality, with -0.0 and 0.0 told apart as the wire does."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@given(tables)
def test_every_encodable_table_decodes_back_to_itself(table):
    encoded = encode_table(table)
    if depth(table) > MAX_TABLE_DEPTH:  # deeper than we accept: refused, never a recursion error
        try:
            decode_table(encoded)
        except ValueError:
            return
        raise AssertionError("a table nested too deep decoded")
    assert same(decode_table(encoded), table)


@given(st.binary(max_size=400))
def test_any_bytes_decode_to_a_table_or_value_error(data):
    try:
        table = decode_table(data)
    except ValueError:
        return
    assert isinstance(table, dict)


@given(tables, st.data())
def test_a_cut_table_is_refused(table, data):
    encoded = encode_table(table)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    try:
        decode_table(encoded[:cut])
    except ValueError:
        return
    raise AssertionError("a truncated table decoded")


# --- methods ----------------------------------------------------------------------------

octets, shorts, longs = st.integers(0, 255), st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1)
longstr = st.text(max_size=80)
METHODS = {
    ConnectionStart: (octets, octets, tables, longstr, longstr),
    ConnectionStartOk: (tables, shortstr_text, st.binary(max_size=80), shortstr_text),
    ConnectionTune: (shorts, longs, shorts),
    ConnectionTuneOk: (shorts, longs, shorts),
    ConnectionOpen: (shortstr_text, shortstr_text, octets),
    ConnectionOpenOk: (shortstr_text,),
    ConnectionClose: (shorts, shortstr_text, shorts, shorts),
    ConnectionCloseOk: (),
    ConnectionBlocked: (shortstr_text,),
    ConnectionUnblocked: (),
}
methods = st.one_of([st.builds(cls, *args) for cls, args in METHODS.items()])


def method_payload(method: Method) -> bytes:
    frame = method.frame()
    return frame[7:-1]


@given(methods.filter(lambda m: depth(getattr(m, "server_properties", getattr(m, "client_properties", {})))
                      <= MAX_TABLE_DEPTH))
def test_every_method_decodes_back_to_itself(method):
    decoded = decode_method(method_payload(method))
    assert type(decoded) is type(method)
    assert all(same(getattr(decoded, f.name), getattr(method, f.name)) for f in fields(method))


@given(st.binary(max_size=300))
def test_any_payload_decodes_to_a_method_or_l7rsp(payload):
    try:
        method = decode_method(payload)
    except HandshakeError as error:
        assert error.code is CheckCode.L7RSP
        return
    assert isinstance(method, Method)
    if isinstance(method, UnknownMethod):
        assert (method.class_id, method.method_id) == struct.unpack("!HH", payload[:4])


@given(methods, st.data())
def test_damaged_method_payloads_decode_or_raise_l7rsp(method, data):
    payload = bytearray(method_payload(method))
    for _ in range(data.draw(st.integers(1, 4))):
        if payload:
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(octets)
    cut = data.draw(st.integers(0, len(payload)))
    try:
        decode_method(bytes(payload[:cut]))
    except HandshakeError as error:
        assert error.code is CheckCode.L7RSP


# --- frames -----------------------------------------------------------------------------

frames = st.tuples(st.sampled_from([1, 2, 3, 8]), shorts, st.binary(max_size=300))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 10_000), max_size=10))
def test_frames_come_out_whole_however_the_stream_is_cut(sent, cuts):
    stream = b"".join(encode_frame(*frame) for frame in sent)
    buffer, received = FrameBuffer(), []
    for chunk in split(stream, cuts):
        buffer.feed(chunk)
        while (frame := buffer.next_frame()) is not None:
            received.append((frame.type, frame.channel, frame.payload))
    assert received == list(sent) and buffer.pending == 0


@given(st.lists(st.binary(min_size=1, max_size=200), max_size=12), st.integers(4096, 2**17))
def test_any_stream_yields_frames_or_l6rsp_with_bounded_buffering(chunks, max_frame):
    buffer = FrameBuffer(max_frame)
    try:
        for chunk in chunks:
            buffer.feed(chunk)
            while (frame := buffer.next_frame()) is not None:
                assert len(frame.payload) + 8 <= max_frame
            # Nothing is held beyond one frame's worth, plus what just arrived.
            assert buffer.pending <= max_frame + len(chunk)
    except HandshakeError as error:
        assert error.code is CheckCode.L6RSP


# --- the handshake client -----------------------------------------------------------------


def conversation(watch: bool) -> bytes:
    start = ConnectionStart(server_properties={"product": "RabbitMQ", "capabilities": {"a": True}})
    tail = HEARTBEAT_FRAME + ConnectionClose(320, "bye").frame() if watch else ConnectionCloseOk().frame()
    return start.frame() + ConnectionTune().frame() + ConnectionOpenOk().frame() + tail


def feed(client: HandshakeClient, chunks: list[bytes]) -> list:
    """Feeds `chunks`, then EOF; returns the events. Only HandshakeError may escape."""
    events = []
    for chunk in [*chunks, b""]:
        client.receive_data(chunk)
        while client.state is not ClientState.CLOSED and (event := client.next_event()) is not NEED_DATA:
            events.append(event)
        client.bytes_to_send()
        assert client._frames.pending <= client._frames.max_frame + len(chunk)
        if client.state is ClientState.CLOSED:
            break
    return events


def hostile(draw_bytes, watch: bool) -> st.SearchStrategy[bytes]:
    valid = conversation(watch)
    return st.one_of(
        draw_bytes,
        st.integers(0, len(valid) - 1).map(lambda cut: valid[:cut]),
        st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=40)).map(
            lambda t: valid[: t[0]] + t[1] + valid[t[0]:]),
        st.lists(st.tuples(st.integers(0, len(valid) - 1), octets), min_size=1, max_size=5).map(
            lambda changes: _damaged(valid, changes)),
        st.binary(max_size=200).map(lambda tail: bytes([FRAME_METHOD]) + tail),
    )


def _damaged(data: bytes, changes) -> bytes:
    damaged = bytearray(data)
    for position, value in changes:
        damaged[position] = value
    return bytes(damaged)


@given(st.booleans(), st.data())
def test_any_answer_gives_events_or_handshake_error(watch, data):
    answer = data.draw(hostile(st.binary(max_size=300), watch))
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=12))
    client = HandshakeClient("guest", "guest", watch=watch, heartbeat=5)
    try:
        feed(client, split(answer, cuts))
    except HandshakeError as error:
        assert error.code in CODES
        assert isinstance(error.description, str) and len(error.description) < 400
        try:  # and again, the same way, on every later call
            client.next_event()
        except HandshakeError as again:
            assert again is error
        else:
            raise AssertionError("a failed client answered an event")


@given(st.booleans(), st.data())
def test_every_cut_conversation_fails_at_eof(watch, data):
    """A broker that stops half-way is a failure of the check, never a success."""
    valid = conversation(watch)
    cut = data.draw(st.integers(0, len(valid) - 1))
    client = HandshakeClient("guest", "guest", watch=watch, heartbeat=5)
    try:
        feed(client, [valid[:cut]])
    except HandshakeError as error:
        assert error.code in CODES - {CheckCode.L7STS}  # nobody refused us: the answer just stopped
    else:
        raise AssertionError("a cut conversation ended without an error")
