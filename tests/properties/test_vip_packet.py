"""Properties of the VRRPv3 codec and its HMAC trailer on any input (RFC 5798 section 5).

Whatever arrives on the raw socket, decoding answers an Advert or raises
PacketError (AuthError for the trailer) with a stable reason; whatever we
encode decodes back to itself.
"""

from __future__ import annotations

import ipaddress

from hypothesis import assume, given
from hypothesis import strategies as st

from proxy.vip.auth import MIN_KEY_LEN, TRAILER_LEN, AuthError, ReplayGuard, sign, verify
from proxy.vip.packet import (
    HEADER_LEN,
    MAX_INTERVAL_CS,
    Advert,
    PacketError,
    decode_advert,
    encode_advert,
    internet_checksum,
    parse_ipv4_packet,
)

v4 = st.ip_addresses(v=4)
v6 = st.ip_addresses(v=6)
endpoints = st.one_of(st.tuples(v4, v4), st.tuples(v6, v6))
keys = st.binary(min_size=MIN_KEY_LEN, max_size=64)


@st.composite
def adverts(draw, version: int | None = None) -> tuple[Advert, object, object]:
    """(advert, source, destination) with one family throughout."""
    family = st.ip_addresses(v=version or draw(st.sampled_from([4, 6])))
    addresses = tuple(draw(st.lists(family, min_size=1, max_size=6)))
    src, dst = draw(family), draw(family)
    advert = Advert(
        vrid=draw(st.integers(1, 255)),
        priority=draw(st.integers(0, 255)),
        max_advert_int_cs=draw(st.integers(1, MAX_INTERVAL_CS)),
        addresses=addresses,
    )
    return advert, src, dst


REASONS = {"truncated", "bad_version", "bad_type", "no_addresses", "wrong_family", "count_mismatch",
           "bad_checksum", "bad_vrid", "zero_interval", "bad_endpoint", "bad_ip_header", "bad_ttl"}


@given(adverts())
def test_every_advert_decodes_back_to_itself(case):
    advert, src, dst = case
    payload = encode_advert(advert, src, dst)
    assert len(payload) == HEADER_LEN + len(advert.addresses) * (4 if advert.family_version == 4 else 16)
    assert decode_advert(payload, src, dst) == advert


@given(st.binary(max_size=600), endpoints)
def test_any_bytes_decode_to_an_advert_or_a_packet_error(payload, ends):
    try:
        advert = decode_advert(payload, *ends)
    except PacketError as error:
        assert error.reason in REASONS
        return
    assert advert.family_version == ends[0].version


@given(adverts(), st.data())
def test_a_damaged_advert_never_decodes_to_another_advert(case, data):
    """One flipped bit anywhere is caught: by the checksum, or by a field check first."""
    advert, src, dst = case
    payload = bytearray(encode_advert(advert, src, dst))
    bit = data.draw(st.integers(0, len(payload) * 8 - 1))
    payload[bit // 8] ^= 1 << (bit % 8)
    try:
        decoded = decode_advert(bytes(payload), src, dst)
    except PacketError as error:
        assert error.reason in REASONS
        return
    # Only the 4 reserved bits of the interval field are ignored on receipt (RFC 5798 5.2.7).
    assert decoded == advert and 32 <= bit < 36


@given(adverts(), st.data())
def test_every_truncation_is_refused(case, data):
    advert, src, dst = case
    payload = encode_advert(advert, src, dst)
    cut = data.draw(st.integers(0, len(payload) - 1))
    try:
        decode_advert(payload[:cut], src, dst)
    except PacketError as error:
        assert error.reason in {"truncated", "wrong_family", "count_mismatch", "bad_checksum"}
    else:
        raise AssertionError("a truncated advert decoded")


@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(0, 255)))
def test_any_datagram_parses_or_raises_packet_error(datagram, ttl):
    try:
        src, dst, got_ttl, protocol, payload = parse_ipv4_packet(datagram, required_ttl=ttl)
    except PacketError as error:
        assert error.reason in REASONS
        return
    assert isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address)
    assert ttl is None or got_ttl == ttl
    assert 0 <= protocol <= 255 and len(payload) <= len(datagram) - 20


@given(st.binary(max_size=300))
def test_the_checksum_of_data_with_its_checksum_appended_verifies(data):
    even = data + b"\x00" * (len(data) % 2)
    checksum = internet_checksum(even)
    assert internet_checksum(even + checksum.to_bytes(2, "big")) == 0


# --- the authentication trailer --------------------------------------------------------


@given(adverts(), keys, st.integers(0, 2**64 - 1))
def test_a_signed_advert_verifies_and_decodes(case, key, seq):
    advert, src, dst = case
    signed = sign(encode_advert(advert, src, dst), seq, key, src, dst)
    payload, got = verify(signed, key, src, dst)
    assert got == seq and decode_advert(payload, src, dst) == advert


@given(adverts(), keys, st.integers(0, 2**64 - 1), st.data())
def test_any_change_to_a_signed_advert_fails_authentication(case, key, seq, data):
    advert, src, dst = case
    signed = bytearray(sign(encode_advert(advert, src, dst), seq, key, src, dst))
    bit = data.draw(st.integers(0, len(signed) * 8 - 1))
    signed[bit // 8] ^= 1 << (bit % 8)
    try:
        verify(bytes(signed), key, src, dst)
    except AuthError as error:
        assert error.reason == "auth_bad_mac"
    else:
        raise AssertionError("a modified advert verified")


@given(st.binary(max_size=TRAILER_LEN + 300), keys, endpoints)
def test_any_bytes_fail_verification_with_auth_error(signed, key, ends):
    try:
        verify(signed, key, *ends)
    except AuthError as error:
        assert error.reason in {"auth_missing", "auth_bad_mac"}
    else:  # a 2**-128 chance, which hypothesis will not find
        raise AssertionError("random bytes verified")


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=30))
def test_the_replay_guard_accepts_exactly_the_strictly_increasing_sequences(sequence):
    guard, sender, accepted, last = ReplayGuard(), ipaddress.ip_address("192.0.2.1"), [], None
    for seq in sequence:
        try:
            guard.check(sender, seq)
        except AuthError as error:
            assert error.reason == "auth_replay" and last is not None and seq <= last
            continue
        assert last is None or seq > last
        accepted.append(seq)
        last = seq
    assert accepted == sorted(set(accepted))


@given(adverts(), st.data())
def test_a_message_from_the_other_family_is_refused(case, data):
    advert, src, dst = case
    payload = encode_advert(advert, src, dst)
    other = data.draw(st.tuples(v6, v6) if advert.family_version == 4 else st.tuples(v4, v4))
    assume(len(payload) > HEADER_LEN)
    try:
        decode_advert(payload, *other)
    except PacketError as error:
        assert error.reason in {"wrong_family", "truncated", "count_mismatch"}
    else:
        raise AssertionError("an IPv%d advert decoded as the other family" % advert.family_version)
