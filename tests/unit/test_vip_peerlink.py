"""The peer link's wire format and handshake (sans-I/O), with properties of its parsers."""

import hashlib
import hmac
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.vip.peerlink import (
    FEATURES, FLAG_AUTHENTICATED, FLAG_MESSAGES, FRAME_MAX, GREETING_SIZE, HELLO_SIZE, NO_PROOF, BackupHandshake, Greeting, Hello, LinkError, MasterHandshake,
    MessageReader, PriorityReport, Status, Successor, backup_proof, decode_greeting, decode_hello, designate, link_key,
)  # fmt: skip

KEY = link_key("0123456789abcdef-secret")
OTHER_KEY = link_key("another secret of 16+ bytes")


def handshake(backup_key, master_key, *, vrid=51, status=Status.OK):
    """Runs the four messages; returns (what the backup saw, whether the master accepted its proof)."""
    backup, master = BackupHandshake(vrid, backup_key), MasterHandshake(master_key)
    greeting = master.greet(decode_hello(backup.hello()), status)
    greeted = backup.greeted(greeting)
    return greeted, bool(greeted.reply) and master.check(greeted.reply)


def test_messages_have_fixed_sizes_and_round_trip():
    hello = Hello(51, True, bytes(range(16)))
    assert len(hello.encode()) == HELLO_SIZE == 22 and decode_hello(hello.encode()) == hello
    greeting = Greeting(51, Status.BUSY, bytes(16), bytes(range(32)))
    assert len(greeting.encode()) == GREETING_SIZE == 54 and decode_greeting(greeting.encode()) == greeting


def test_the_link_key_is_derived_never_the_secret_itself():
    secret = "0123456789abcdef-secret"
    assert KEY == hmac.new(secret.encode(), b"warren peer link v1", hashlib.sha256).digest()
    assert secret.encode() not in KEY and len(KEY) == 32


@pytest.mark.parametrize("key", [None, KEY])
def test_both_sides_agree_with_the_same_key_or_none(key):
    greeted, accepted = handshake(key, key)
    assert (greeted.status, greeted.proven, accepted) == (Status.OK, True, True)


def test_without_a_key_proofs_are_zeros():
    greeted, _ = handshake(None, None)
    assert greeted.reply == NO_PROOF


def test_a_master_with_another_key_is_not_believed():
    with pytest.raises(LinkError, match="bad_proof"):
        handshake(KEY, OTHER_KEY)


def test_a_backup_with_another_key_is_turned_down_by_the_master():
    master = MasterHandshake(KEY)
    hello = Hello(51, True)
    master.greet(hello, Status.OK)
    # Everything on the wire is known to an eavesdropper; the key is not.
    assert not master.check(backup_proof(OTHER_KEY, 51, hello.nonce, master.nonce))
    assert not master.check(NO_PROOF)
    assert master.check(backup_proof(KEY, 51, hello.nonce, master.nonce))


@pytest.mark.parametrize("backup_key, master_key", [(KEY, None), (None, KEY)])
def test_one_side_authenticated_the_other_not_is_a_mismatch(backup_key, master_key):
    greeted, accepted = handshake(backup_key, master_key)
    assert greeted.status is Status.AUTH_MISMATCH and not accepted
    # Only the side without a key can take it as proven (nothing is provable there).
    assert greeted.proven is (backup_key is None)


@pytest.mark.parametrize("status", [Status.BUSY, Status.NOT_A_PEER])
def test_a_refusal_from_a_keyed_master_is_proven(status):
    greeted, accepted = handshake(KEY, KEY, status=status)
    assert (greeted.status, greeted.proven, greeted.reply, accepted) == (status, True, b"", False)


def test_an_unknown_vrid_answer_cannot_be_proven_with_a_key():
    backup, master = BackupHandshake(51, KEY), MasterHandshake(None)  # the listener has no such instance
    greeted = backup.greeted(master.greet(decode_hello(backup.hello()), Status.UNKNOWN_VRID))
    assert (greeted.status, greeted.proven) == (Status.UNKNOWN_VRID, False)


def test_a_replayed_greeting_does_not_prove_a_new_hello():
    first, master = BackupHandshake(51, KEY), MasterHandshake(KEY)
    recorded = master.greet(decode_hello(first.hello()), Status.OK)
    with pytest.raises(LinkError, match="bad_proof"):
        BackupHandshake(51, KEY).greeted(recorded)  # another nonce
    refusal = MasterHandshake(KEY).greet(decode_hello(first.hello()), Status.BUSY)
    assert BackupHandshake(51, KEY).greeted(refusal).proven is False


def test_a_greeting_for_another_vrid_is_refused():
    backup = BackupHandshake(51, None)
    greeting = MasterHandshake(None).greet(Hello(52, False), Status.OK)
    with pytest.raises(LinkError, match="wrong_vrid"):
        backup.greeted(greeting)


def test_the_master_checks_nothing_before_it_greeted():
    master = MasterHandshake(KEY)
    assert master.check(bytes(32)) is False


@pytest.mark.parametrize("data, reason", [
    (b"WPL1\x33\x00" + bytes(15), "bad_length"),
    (b"XPL1\x33\x00" + bytes(16), "bad_magic"),
    (b"WPL1\x00\x00" + bytes(16), "bad_vrid"),
])
def test_malformed_hellos_name_their_fault(data, reason):
    with pytest.raises(LinkError) as caught:
        decode_hello(data)
    assert caught.value.reason == reason


def test_malformed_greetings_name_their_fault():
    good = Greeting(51, Status.OK, bytes(16), bytes(32)).encode()
    for data, reason in [(good[:-1], "bad_length"), (b"X" + good[1:], "bad_magic"),
                         (good[:4] + b"\x00" + good[5:], "bad_vrid"), (good[:5] + b"\x09" + good[6:], "bad_status")]:
        with pytest.raises(LinkError) as caught:
            decode_greeting(data)
        assert caught.value.reason == reason


@pytest.mark.parametrize("decode", [decode_hello, decode_greeting])
@given(data=st.binary(max_size=80))
def test_any_bytes_decode_to_a_message_or_a_link_error(decode, data):
    try:
        message = decode(data)
    except LinkError:
        return
    assert message.encode() == data


@given(st.binary(min_size=GREETING_SIZE, max_size=GREETING_SIZE), st.sampled_from([None, KEY]))
def test_a_random_greeting_never_passes_for_a_keyed_ok(data, key):
    try:
        greeted = BackupHandshake(51, key).greeted(data)
    except LinkError:
        return
    if key is not None:  # forging a proof by chance: 2**-256
        assert greeted.status is not Status.OK and not greeted.proven


@given(st.integers(1, 255), st.booleans(), st.binary(min_size=16, max_size=16), st.integers(0, 127))
def test_hellos_round_trip(vrid, authenticated, nonce, features):
    hello = Hello(vrid, authenticated, nonce, features << 1)
    assert decode_hello(hello.encode()) == hello


def test_a_hello_says_this_versions_features_beside_its_authentication():
    assert Hello(51, True, bytes(16)).encode()[5] == FLAG_AUTHENTICATED | FEATURES
    assert FEATURES == FLAG_MESSAGES  # the first peer link's hellos had 0: it sent no messages


@pytest.mark.parametrize("features", [0, FEATURES | 0x80])  # the first link's backup; a newer one
@pytest.mark.parametrize("key", [None, KEY])
def test_a_backup_of_another_version_gets_a_proven_version_mismatch_and_no_link(features, key):
    backup, master = BackupHandshake(51, key, features=features), MasterHandshake(key)
    greeted = backup.greeted(master.greet(decode_hello(backup.hello()), Status.OK))
    assert greeted.status is Status.VERSION_MISMATCH and greeted.proven and greeted.reply == b""
    assert master.check(backup_proof(key, 51, bytes(16), master.nonce)) is False


# -- messages on an established link ---------------------------------------------------------

V4, V6 = ipaddress.IPv4Address, ipaddress.IPv6Address


@pytest.mark.parametrize("message, wire", [
    (PriorityReport(100), b"\x01\x01\x64"),
    (Successor(V4("10.0.0.2")), b"\x02\x04\x0a\x00\x00\x02"),
    (Successor(V6("fe80::2")), b"\x02\x10" + V6("fe80::2").packed),
    (Successor(None), b"\x02\x00"),
])
def test_link_messages_have_a_small_fixed_wire_form(message, wire):
    assert message.encode() == wire
    assert MessageReader(type(message)).feed(wire) == [message]


def test_messages_split_anywhere_or_glued_together_are_read_in_order():
    wire = Successor(V4("10.0.0.2")).encode() + Successor(None).encode() + Successor(V6("::1")).encode()
    reader = MessageReader(Successor)
    read = [message for byte in wire for message in reader.feed(bytes([byte]))]
    assert read == [Successor(V4("10.0.0.2")), Successor(None), Successor(V6("::1"))]


@pytest.mark.parametrize("expect, data, reason", [
    (PriorityReport, Successor(None).encode(), "unexpected_kind"),  # a master never reports a priority...
    (Successor, PriorityReport(7).encode(), "unexpected_kind"),  # ...nor a backup names a successor
    (Successor, b"\x09\x00", "unexpected_kind"),
    (PriorityReport, b"\x01\x02\x64\x64", "bad_length"),
    (PriorityReport, b"\x01\x01\x00", "bad_priority"),
    (Successor, b"\x02\x05" + bytes(5), "bad_length"),
])
def test_a_broken_message_names_its_fault(expect, data, reason):
    with pytest.raises(LinkError) as caught:
        MessageReader(expect).feed(data)
    assert caught.value.reason == reason


def test_a_bad_frame_is_refused_from_its_header_before_its_payload_arrives():
    with pytest.raises(LinkError, match="bad_length"):
        MessageReader(Successor).feed(b"\x02\xff")


def test_the_successor_is_the_highest_priority_then_the_highest_address():
    a, b, c = V4("10.0.0.1"), V4("10.0.0.2"), V4("10.0.0.3")
    assert designate([(a, 100), (b, 200), (c, 150)]) == b
    assert designate([(a, 100), (c, 100), (b, 100)]) == c  # RFC 5798 6.4.3: the higher address
    assert designate([(V6("fe80::1"), 90), (V6("fe80::9"), 90)]) == V6("fe80::9")
    assert designate([]) is None


@st.composite
def link_messages(draw):
    if draw(st.booleans()):
        return PriorityReport(draw(st.integers(1, 255)))
    return Successor(draw(st.one_of(st.none(), st.ip_addresses())))


@given(st.lists(link_messages(), max_size=8), st.data())
def test_any_messages_in_any_chunks_are_read_back(messages, data):
    for kind in (PriorityReport, Successor):
        sent = [message for message in messages if isinstance(message, kind)]
        wire = b"".join(message.encode() for message in sent)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
        reader = MessageReader(kind)
        chunks = [wire[i:j] for i, j in zip([0, *cuts], [*cuts, len(wire)])]
        assert [message for chunk in chunks for message in reader.feed(chunk)] == sent


@given(st.sampled_from([PriorityReport, Successor]), st.lists(st.binary(max_size=24), max_size=6))
def test_any_bytes_read_as_messages_or_a_link_error_never_more_than_a_frame_held(expect, chunks):
    reader = MessageReader(expect)
    read = []
    try:
        for chunk in chunks:
            read += reader.feed(chunk)
            assert len(reader._buffer) < FRAME_MAX
    except LinkError:
        return
    assert all(isinstance(message, expect) for message in read)
    # what was read is exactly what was sent, up to the unfinished frame
    wire = b"".join(message.encode() for message in read)
    assert b"".join(chunks).startswith(wire)


@given(st.lists(st.tuples(st.ip_addresses(v=4), st.integers(1, 255)), max_size=8))
def test_the_successor_is_one_of_the_backups_and_none_ranks_above_it(backups):
    chosen = designate(backups)
    if not backups:
        assert chosen is None
        return
    best = max(priority for address, priority in backups if address == chosen)
    assert all((priority, int(address)) <= (best, int(chosen)) for address, priority in backups)
