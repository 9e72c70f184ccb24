"""Properties of the AMQP tap on a relayed connection (proxy/amqp/tap.py): what
the relay shows it of each direction's reads during the handshake, whatever
the client and the broker send and however the reads are cut.

The inspector's own properties (tests/unit/test_amqp_inspect.py) cover its
parsing; here the tap around it is held to its contract with the relay and
the session: it never changes a byte it is shown, raises nothing but Hold
(and that only when admission withheld the client's Open), takes itself off
both directions once the handshake is over, and leaves the vhost and user
counts of admission as it found them once the connection is finished.
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.amqp.admission import ConnectionCounts
from proxy.amqp.inspect import Phase
from proxy.amqp.tap import AmqpConnection, AmqpPolicy
from proxy.config import parse_config
from proxy.config.model import ConnectionLimits, LimitAction
from proxy.health import amqp_methods as methods
from proxy.health.amqp_wire import HEARTBEAT_FRAME, PROTOCOL_HEADER
from proxy.io.directions import Hold
from proxy.io.relay import Ending, Timeouts

CONFIG = """
[frontends.fe]
bind = "127.0.0.1:5670"
backend = "be"
mode = "amqp"
{timeout}

[backends.be]
servers = [{{ name = "a", address = "127.0.0.1", port = 5672 }}]
"""
POLICIES = [
    AmqpPolicy(config.frontends[0], config.backends[0])
    for config in (parse_config(CONFIG.format(timeout=timeout), "t.toml")
                   for timeout in ("", 'timeout = { client = "heartbeat", client_fallback = "1m" }',
                                   'timeout = { client = "30s", handshake = "0s" }'))
]
USERS, VHOSTS = ["app", "ops", "é"], ["/", "/orders", "x" * 200]


def client_stream(user: str, vhost: str, heartbeat: int, pipelined: bytes) -> bytes:
    response = b"\x00" + user.encode() + b"\x00secret"
    return (PROTOCOL_HEADER + methods.ConnectionStartOk({"product": "pika"}, "PLAIN", response, "en_US").frame()
            + HEARTBEAT_FRAME + methods.ConnectionTuneOk(2047, 131072, heartbeat).frame()
            + methods.ConnectionOpen(vhost).frame() + pipelined)


SERVER_HEAD = (methods.ConnectionStart(server_properties={"product": "RabbitMQ"}).frame()
               + methods.ConnectionTune(2047, 131072, 60).frame())


def server_end(refuse: bool) -> bytes:
    if refuse:
        return methods.ConnectionClose(403, "ACCESS_REFUSED", 10, 40).frame()
    return methods.ConnectionOpenOk().frame()


@st.composite
def damaged(draw, data: bytes) -> bytes:
    if not draw(st.integers(0, 3)):  # a quarter of the streams are damaged
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(data) - 1))
            how = draw(st.sampled_from(["set", "cut", "insert"]))
            if how == "set":
                data[at] = draw(st.integers(0, 255))
            elif how == "cut":
                del data[at:]
                if not data:
                    break
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
        data = bytes(data)
    return data


@st.composite
def conversations(draw):
    """(client bytes, broker bytes, the reads: [(direction, size)]).

    The reads come in a random order, but the broker's last frame (its Open-Ok
    or Close) only once the client has sent everything, as a broker answers
    the client's Open; then what is left is read, the client's first.
    """
    client = draw(st.one_of(
        st.builds(client_stream, st.sampled_from(USERS), st.sampled_from(VHOSTS), st.integers(0, 0xFFFF),
                  st.binary(max_size=20)).flatmap(damaged),
        st.binary(max_size=200),
    ))
    refuse = draw(st.booleans())
    server = draw(st.one_of(damaged(SERVER_HEAD + server_end(refuse)), st.binary(max_size=100)))
    last = len(server_end(refuse)) if server.startswith(SERVER_HEAD[:7]) else 0
    reads = draw(st.lists(st.tuples(st.sampled_from([0, 1]), st.integers(1, 300)), max_size=40))
    return client, server, _in_order(reads, len(client), len(server), len(server) - last)


def _in_order(reads, client_size: int, server_size: int, server_cut: int) -> list[tuple[int, int]]:
    ordered, done = [], [0, 0]
    for direction, size in reads:
        limit = server_cut if direction == 1 and done[0] < client_size else (client_size, server_size)[direction]
        size = min(size, limit - done[direction])
        if size > 0:
            ordered.append((direction, size))
            done[direction] += size
    return ordered + [(0, client_size - done[0]), (1, server_size - done[1])]


class FakeLink:
    """What the tap uses of a relay link: its two ways (tap, tail) and retime."""

    def __init__(self) -> None:
        self.ways = [SimpleNamespace(tap=None, tail=None), SimpleNamespace(tap=None, tail=None)]
        self.timeouts: list[Timeouts] = []

    def retime(self, timeouts: Timeouts) -> None:
        assert isinstance(timeouts, Timeouts)
        self.timeouts.append(timeouts)


def backend_with(counts: ConnectionCounts, per_vhost: int | None, action: LimitAction):
    return SimpleNamespace(name="be", amqp_counts=counts,
                           config=SimpleNamespace(limits=ConnectionLimits(per_vhost=per_vhost, action=action)))


@given(conversations(), st.sampled_from(POLICIES), st.sampled_from([None, 1, 2]),
       st.sampled_from(list(LimitAction)), st.integers(0, 2))
def test_the_tap_never_changes_a_byte_raises_only_hold_and_leaves_the_counts_as_it_found_them(
        conversation, policy, per_vhost, action, already):
    client, server, reads = conversation
    counts = ConnectionCounts()
    for vhost in VHOSTS:
        for _ in range(already):
            counts.add(vhost, "someone")
    before = (dict(counts.vhosts), dict(counts.users))
    connection = AmqpConnection(policy, backend_with(counts, per_vhost, action))
    link = FakeLink()
    connection.attach(link)
    streams, offsets, held = (client, server), [0, 0], False
    for direction, size in reads:
        way = link.ways[direction]
        chunk = streams[direction][offsets[direction]:offsets[direction] + size]
        if way.tap is None or not chunk:
            continue
        buffer = bytearray(chunk + b"\xaa" * 16)  # the relay's buffer: the read, then stale bytes
        try:
            way.tap(memoryview(buffer), len(chunk))
        except Hold:
            assert direction == 0 and connection.inspector.phase is Phase.HELD
            assert client.startswith(client[:offsets[0]] + connection.to_server)
            held = True
            break
        finally:
            assert bytes(buffer) == chunk + b"\xaa" * 16  # what the relay writes is what it read
        offsets[direction] += len(chunk)
    if not held and not connection.inspector.watching:
        assert link.ways[0].tap is None and link.ways[1].tap is None
    for ending in [None, *Ending]:
        for termination in ("--", "SD", "CD", "cD", "sD", "sC"):
            code, reason = connection.ending(ending, termination)
            assert isinstance(code, str) and len(code) == 2 and (reason is None or isinstance(reason, str))
    connection.finish(link)
    connection.finish(link)  # once only: a second call uncounts nothing
    assert (dict(counts.vhosts), dict(counts.users)) == before


@pytest.mark.parametrize("cut", ["open", "in the handshake"])
def test_a_finished_connection_is_freed_by_reference_counting_alone(cut):
    # The session holds its AmqpConnection, which held the session (its link)
    # and itself (the inspector's admit): every ended connection was left to
    # the cyclic collector, whose collections then walked each of them.
    client = client_stream("app", "/", 60, b"")
    server = SERVER_HEAD + server_end(refuse=False)
    if cut != "open":
        client = client[:len(PROTOCOL_HEADER)]
        server = server[:len(SERVER_HEAD)]
    gc.collect()
    gc.disable()
    try:
        connection = AmqpConnection(POLICIES[0], backend_with(ConnectionCounts(), None, LimitAction.REFUSE))
        link = FakeLink()
        connection.attach(link)
        for way, data in ((0, client), (1, server)):
            if link.ways[way].tap is not None:
                link.ways[way].tap(memoryview(bytearray(data)), len(data))
        assert (connection.inspector.phase is Phase.OPEN) == (cut == "open")
        connection.finish(link)
        del connection, link
        assert gc.collect() == 0
    finally:
        gc.enable()
