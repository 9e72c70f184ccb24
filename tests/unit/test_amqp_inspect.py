"""The passive handshake inspector: what it learns, when it steps aside, what it never keeps."""

import gc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.amqp.inspect import (
    HANDSHAKE_BUDGET,
    HandshakeInspector,
    Identity,
    Phase,
    describe_foreign,
    describe_identity,
    reply_name,
)
from proxy.health.amqp_methods import (
    ConnectionClose,
    ConnectionOpen,
    ConnectionOpenOk,
    ConnectionStart,
    ConnectionStartOk,
    ConnectionTune,
    ConnectionTuneOk,
)
from proxy.health.amqp_wire import HEARTBEAT_FRAME, PROTOCOL_HEADER, encode_frame, encode_longstr, encode_shortstr

PASSWORD = "s3cret-Pa55"
CLIENT_PROPERTIES = {
    "connection_name": "orders-consumer",
    "product": "pika",
    "version": "1.3.2",
    "platform": "Python 3.11.2",
    "capabilities": {"authentication_failure_close": True},
}
SERVER_PROPERTIES = {"product": "RabbitMQ", "version": "3.10.8", "cluster_name": "rabbit@prod"}


def plain(user: str, password: str = PASSWORD) -> bytes:
    return b"\x00" + user.encode() + b"\x00" + password.encode()


def amqplain(user: str, password: str = PASSWORD) -> bytes:
    return (encode_shortstr("LOGIN") + b"S" + encode_longstr(user)
            + encode_shortstr("PASSWORD") + b"S" + encode_longstr(password))


def client_bytes(*, user="app", vhost="/orders", heartbeat=30, mechanism="PLAIN", response=None,
                 properties=CLIENT_PROPERTIES) -> bytes:
    response = plain(user) if response is None else response
    return (
        PROTOCOL_HEADER
        + ConnectionStartOk(properties, mechanism, response, "en_US").frame()
        + ConnectionTuneOk(2047, 131072, heartbeat).frame()
        + ConnectionOpen(vhost).frame()
    )


SERVER_BYTES = (
    ConnectionStart(server_properties=SERVER_PROPERTIES).frame()
    + ConnectionTune(2047, 131072, 60).frame()
    + ConnectionOpenOk().frame()
)


def inspect_all(client: bytes, server: bytes = SERVER_BYTES, **options) -> HandshakeInspector:
    inspector = HandshakeInspector(**options)
    assert inspector.from_client(client) == len(client)
    inspector.from_server(server)
    return inspector


def test_a_whole_handshake_tells_who_connects():
    inspector = inspect_all(client_bytes())
    assert inspector.phase is Phase.OPEN
    identity = inspector.identity
    assert (identity.connection_name, identity.product, identity.version, identity.platform) == (
        "orders-consumer", "pika", "1.3.2", "Python 3.11.2",
    )
    assert (identity.mechanism, identity.user, identity.vhost) == ("PLAIN", "app", "/orders")
    assert (identity.channel_max, identity.frame_max, identity.heartbeat) == (2047, 131072, 30)
    assert (identity.server_cluster, identity.server_version, identity.server_product) == (
        "rabbit@prod", "3.10.8", "RabbitMQ",
    )
    assert identity.name == "orders-consumer"
    assert describe_identity(identity) == {
        "amqp_name": "orders-consumer", "amqp_user": "app", "amqp_vhost": "/orders", "amqp_heartbeat": 30,
    }


@pytest.mark.parametrize("size", [1, 2, 3, 7, 13, 64])
def test_any_split_of_the_bytes_gives_the_same_identity(size):
    client, whole = client_bytes(), inspect_all(client_bytes())
    inspector = HandshakeInspector()
    for start in range(0, len(client), size):
        chunk = client[start : start + size]
        assert inspector.from_client(chunk) == len(chunk)
    for start in range(0, len(SERVER_BYTES), size):
        inspector.from_server(SERVER_BYTES[start : start + size])
    assert inspector.phase is Phase.OPEN
    assert inspector.identity == whole.identity


def test_amqplain_gives_the_login_and_heartbeats_in_between_are_skipped():
    client = client_bytes(mechanism="AMQPLAIN", response=amqplain("batch"))
    head, rest = client[:8], client[8:]
    inspector = inspect_all(head + HEARTBEAT_FRAME + rest, HEARTBEAT_FRAME + SERVER_BYTES)
    assert (inspector.identity.mechanism, inspector.identity.user) == ("AMQPLAIN", "batch")
    assert inspector.phase is Phase.OPEN


def test_external_and_other_mechanisms_have_no_user_from_the_frame():
    inspector = inspect_all(client_bytes(mechanism="EXTERNAL", response=b""))
    assert inspector.identity.mechanism == "EXTERNAL"
    assert inspector.identity.user is None
    assert inspector.phase is Phase.OPEN


def test_plain_with_an_authorisation_identity_names_the_authentication_identity():
    inspector = inspect_all(client_bytes(response=b"admin\x00app\x00" + PASSWORD.encode()))
    assert inspector.identity.user == "app"


def test_property_tables_seen_before_give_each_connection_its_own_identity():
    """Tables are decoded once per distinct table (a bounded cache): another
    application's properties, or another broker's, are never mixed up."""
    from proxy.amqp.inspect import _CLIENT_TABLES

    first = inspect_all(client_bytes())
    other = inspect_all(client_bytes(properties={**CLIENT_PROPERTIES, "connection_name": "billing"}),
                        ConnectionStart(server_properties={**SERVER_PROPERTIES, "cluster_name": "rabbit@dr"}).frame()
                        + SERVER_BYTES[len(ConnectionStart(server_properties=SERVER_PROPERTIES).frame()):])
    again = inspect_all(client_bytes())
    assert (first.identity.connection_name, other.identity.connection_name) == ("orders-consumer", "billing")
    assert (first.identity.server_cluster, other.identity.server_cluster) == ("rabbit@prod", "rabbit@dr")
    assert again.identity == first.identity
    for index in range(_CLIENT_TABLES.MAX_ENTRIES + 10):
        inspect_all(client_bytes(properties={"connection_name": f"app-{index}"}))
        assert len(_CLIENT_TABLES.tables) <= _CLIENT_TABLES.MAX_ENTRIES
    big = inspect_all(client_bytes(properties={"connection_name": "big", "information": "x" * 3000}))
    assert big.identity.connection_name == "big"
    assert all(len(raw) <= _CLIENT_TABLES.MAX_BYTES for raw in _CLIENT_TABLES.tables)


def _reachable(root, limit=10_000):
    seen, todo, found = set(), [root], []
    while todo and len(seen) < limit:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        found.append(obj)
        todo.extend(gc.get_referents(obj))
    return found


@pytest.mark.parametrize("size", [None, 1, 5, 40])
@pytest.mark.parametrize("mechanism", ["PLAIN", "AMQPLAIN"])
def test_the_password_is_never_kept(size, mechanism):
    response = plain("app") if mechanism == "PLAIN" else amqplain("app")
    client = bytearray(client_bytes(mechanism=mechanism, response=response))
    inspector = HandshakeInspector()
    size = size or len(client)
    for start in range(0, len(client), size):
        inspector.from_client(memoryview(client)[start : start + size])
    # The caller's buffer is reused for other bytes right after (the relay's pool).
    client[:] = bytes(len(client))
    assert inspector.identity.user == "app"
    secret = PASSWORD.encode()
    for obj in _reachable(inspector):
        if isinstance(obj, (bytes, bytearray)):
            assert secret not in obj
        elif isinstance(obj, str):
            assert PASSWORD not in obj
    assert PASSWORD not in repr(inspector.identity)


@pytest.mark.parametrize(
    "first, described",
    [
        (b"AMQP\x00\x01\x00\x00", "AMQP 1.0.0 header"),
        (b"AMQP\x03\x01\x00\x00", "AMQP SASL 1.0.0 header"),
        (b"AMQP\x00\x00\x08\x00", "AMQP 0.8.0 header"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "a TLS handshake"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "a PROXY protocol header"),
        (b"\x00\x01garbage", "unknown bytes"),
    ],
)
def test_a_client_that_does_not_speak_0_9_1_is_passed_untouched(first, described):
    inspector = HandshakeInspector()
    assert inspector.from_client(first) == len(first)
    assert inspector.phase is Phase.PASSED
    assert described in inspector.reason
    assert describe_foreign(first) == described
    # From then on it only counts as relayed bytes: nothing is read or refused.
    assert inspector.from_client(b"more") == 4
    inspector.from_server(b"AMQP\x00\x00\x09\x01")
    assert inspector.phase is Phase.PASSED


def test_a_half_header_waits_for_the_rest():
    inspector = HandshakeInspector()
    inspector.from_client(b"AMQ")
    assert inspector.phase is Phase.INSPECTING and not inspector.header_seen
    inspector.from_client(b"P\x00\x00\x09\x01")
    assert inspector.header_seen


def test_the_broker_answering_with_its_own_header_is_passed():
    inspector = HandshakeInspector()
    inspector.from_client(PROTOCOL_HEADER)
    inspector.from_server(b"AMQP\x00\x00\x09\x01")
    assert inspector.phase is Phase.PASSED


def test_a_handshake_over_the_budget_is_passed():
    big = {"product": "x" * 5000}
    client = client_bytes(properties=big)
    inspector = HandshakeInspector(budget=4096)
    assert inspector.from_client(client) == len(client)
    assert inspector.phase is Phase.PASSED
    assert "4096" in inspector.reason


def test_a_refusal_by_the_broker_is_recorded():
    refusal = ConnectionClose(403, "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN")
    server = ConnectionStart(server_properties=SERVER_PROPERTIES).frame() + refusal.frame()
    inspector = inspect_all(client_bytes()[:-20], server)
    assert inspector.phase is Phase.REFUSED
    assert inspector.identity.broker_close[0] == 403
    assert inspector.identity.broker_close[1].startswith("ACCESS_REFUSED")
    assert reply_name(403) == "ACCESS_REFUSED" and reply_name(999) == "999"


@pytest.mark.parametrize("size", [None, 1, 6, 11])
def test_admission_holds_the_open_and_forwards_what_came_before(size):
    decisions = []

    def admit(identity: Identity):
        decisions.append((identity.user, identity.vhost))
        return "connection limit for vhost /orders reached"

    client = client_bytes()
    open_frame = ConnectionOpen("/orders").frame()
    inspector = HandshakeInspector(admit=admit)
    size = size or len(client)
    forwarded = b""
    for start in range(0, len(client), size):
        chunk = client[start : start + size]
        count = inspector.from_client(chunk)
        forwarded += chunk[:count]
        if inspector.phase is Phase.HELD:
            break
    assert decisions == [("app", "/orders")]
    assert inspector.phase is Phase.HELD
    assert inspector.refusal == "connection limit for vhost /orders reached"
    # Exactly the bytes before the Open went out; the rest of the Open is held.
    assert forwarded + inspector.held == client
    assert inspector.held == open_frame[len(open_frame) - len(inspector.held):]


def test_admission_lets_in_and_the_client_may_pipeline_after_its_open():
    inspector = HandshakeInspector(admit=lambda identity: None)
    pipelined = client_bytes() + encode_frame(1, 1, b"\x00\x14\x00\x0a\x00")  # Channel.Open
    assert inspector.from_client(pipelined) == len(pipelined)
    inspector.from_server(SERVER_BYTES)
    assert inspector.phase is Phase.OPEN


def test_unexpected_methods_pass_the_connection():
    inspector = HandshakeInspector()
    inspector.from_client(PROTOCOL_HEADER + ConnectionOpen("/").frame())
    assert inspector.phase is Phase.PASSED
    assert "expected" in inspector.reason


# -- properties: hostile and truncated input ------------------------------------------


def _check_bounded(inspector: HandshakeInspector, budget: int) -> None:
    for stream in (inspector._client, inspector._server):
        if stream is None:  # made only when a frame spans reads
            continue
        assert stream.size <= budget
        assert len(stream.data) <= 2 * budget + 256


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.binary(max_size=300), max_size=8))
def test_arbitrary_bytes_never_raise_and_stay_bounded(client_chunks, server_chunks):
    inspector = HandshakeInspector(budget=1024)
    for chunk in client_chunks:
        assert 0 <= inspector.from_client(chunk) <= len(chunk)
    for chunk in server_chunks:
        inspector.from_server(chunk)
    _check_bounded(inspector, 1024)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_truncated_or_corrupted_handshakes_never_raise(data):
    client = bytearray(client_bytes())
    server = bytearray(SERVER_BYTES)
    for buffer in (client, server):
        for _ in range(data.draw(st.integers(0, 3))):
            index = data.draw(st.integers(0, len(buffer) - 1))
            buffer[index] = data.draw(st.integers(0, 255))
    client = client[: data.draw(st.integers(0, len(client)))]
    server = server[: data.draw(st.integers(0, len(server)))]
    inspector = HandshakeInspector(admit=lambda identity: None)
    cut = data.draw(st.integers(0, len(client)))
    for chunk in (client[:cut], client[cut:]):
        assert 0 <= inspector.from_client(bytes(chunk)) <= len(chunk)
    inspector.from_server(bytes(server))
    _check_bounded(inspector, HANDSHAKE_BUDGET)
    assert inspector.phase in (Phase.INSPECTING, Phase.OPEN, Phase.PASSED, Phase.REFUSED)


# -- the codec's cheap property reader -----------------------------------------------------

_values = st.recursive(
    st.one_of(st.text(max_size=40), st.booleans(), st.integers(-(2**40), 2**40), st.binary(max_size=20), st.none(),
              st.floats(allow_nan=False)),
    lambda inner: st.one_of(st.dictionaries(st.text(max_size=8), inner, max_size=4), st.lists(inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=20), _values, max_size=8), st.lists(st.text(max_size=20), max_size=4))
def test_pick_strings_agrees_with_the_full_decoder(table, extra_wanted):
    from proxy.health.amqp_wire import Cursor, decode_table, encode_table, pick_strings

    encoded = encode_table(table)
    wanted = frozenset(key.encode() for key in [*table, *extra_wanted])
    cur = Cursor(memoryview(encoded + b"tail"))
    picked = pick_strings(cur, wanted, limit=1000)
    assert cur.pos == len(encoded)
    full = decode_table(encoded)
    assert picked == {key.encode(): value for key, value in full.items() if isinstance(value, str)}


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_pick_strings_on_garbage_raises_only_its_own_errors(data):
    from proxy.health.amqp_wire import Cursor, Truncated, pick_strings

    try:
        pick_strings(Cursor(data), frozenset({b"product"}))
    except (Truncated, ValueError):
        pass
