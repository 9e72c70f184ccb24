"""Optional HMAC trailer on adverts: forgery, tampering, re-addressing and replay are rejected."""

import ipaddress
import random

import pytest

from proxy.vip.auth import (
    MAC_LEN,
    TRAILER_LEN,
    AuthError,
    ReplayGuard,
    SequenceSource,
    sign,
    verify,
)
from proxy.vip.packet import Advert, PacketError, decode_advert, encode_advert

V4 = ipaddress.IPv4Address
KEY = b"k" * 32
SRC, DST = V4("10.0.0.1"), V4("224.0.0.18")
ADVERT = Advert(51, 150, 100, (V4("10.0.0.100"),))
PAYLOAD = encode_advert(ADVERT, SRC, DST)


def reason(function, *args):
    with pytest.raises(AuthError) as caught:
        function(*args)
    return caught.value.reason


class TestSignVerify:
    def test_round_trip_returns_the_vrrp_payload_and_sequence(self):
        signed = sign(PAYLOAD, 42, KEY, SRC, DST)
        assert len(signed) == len(PAYLOAD) + TRAILER_LEN
        payload, seq = verify(signed, KEY, SRC, DST)
        assert (payload, seq) == (PAYLOAD, 42)
        assert decode_advert(payload, SRC, DST) == ADVERT

    def test_ipv6(self):
        src, dst = ipaddress.IPv6Address("fe80::1"), ipaddress.IPv6Address("ff02::12")
        payload = encode_advert(Advert(1, 100, 100, (ipaddress.IPv6Address("2001:db8::1"),)), src, dst)
        assert verify(sign(payload, 1, KEY, src, dst), KEY, src, dst) == (payload, 1)

    def test_wrong_key(self):
        signed = sign(PAYLOAD, 1, KEY, SRC, DST)
        assert reason(verify, signed, b"x" * 32, SRC, DST) == "auth_bad_mac"

    @pytest.mark.parametrize("offset", [0, 2, 7, 8, 12, 15, 22, -1])
    def test_any_flipped_bit_is_detected(self, offset):
        signed = bytearray(sign(PAYLOAD, 1, KEY, SRC, DST))
        signed[offset] ^= 0x01
        assert reason(verify, bytes(signed), KEY, SRC, DST) == "auth_bad_mac"

    def test_re_sent_from_another_address_is_rejected(self):
        signed = sign(PAYLOAD, 1, KEY, SRC, DST)
        assert reason(verify, signed, KEY, V4("10.0.0.66"), DST) == "auth_bad_mac"

    def test_re_sent_to_another_destination_is_rejected(self):
        signed = sign(PAYLOAD, 1, KEY, SRC, DST)
        assert reason(verify, signed, KEY, SRC, V4("10.0.0.2")) == "auth_bad_mac"

    def test_an_unsigned_advert_is_rejected(self):
        assert reason(verify, PAYLOAD, KEY, SRC, DST) == "auth_missing"  # shorter than a trailer
        many = Advert(51, 150, 100, tuple(V4(f"10.0.0.{i}") for i in range(100, 110)))
        assert reason(verify, encode_advert(many, SRC, DST), KEY, SRC, DST) == "auth_bad_mac"

    def test_auth_errors_are_packet_errors(self):
        assert issubclass(AuthError, PacketError)

    def test_a_signed_advert_is_not_valid_plain_vrrp(self):
        """All nodes of a group need the same setting: a plain decoder refuses the trailer."""
        with pytest.raises(PacketError):
            decode_advert(sign(PAYLOAD, 1, KEY, SRC, DST), SRC, DST)

    def test_mac_is_truncated_sha256(self):
        assert MAC_LEN == 16

    @pytest.mark.parametrize("key", [b"", b"short", "a-str-key-of-sixteen+"])
    def test_weak_or_mistyped_keys_are_refused(self, key):
        with pytest.raises(ValueError):
            sign(PAYLOAD, 1, key, SRC, DST)

    def test_sequence_must_fit_64_bits(self):
        with pytest.raises(ValueError):
            sign(PAYLOAD, 2**64, KEY, SRC, DST)

    def test_fuzz_verify_raises_only_auth_errors(self):
        rng = random.Random(7)
        signed = sign(PAYLOAD, 1, KEY, SRC, DST)
        for _ in range(2000):
            sample = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 60)))
            if rng.random() < 0.5:
                sample = signed[: rng.randrange(len(signed))]
            with pytest.raises(AuthError):
                verify(sample, KEY, SRC, DST)


class TestSequenceSource:
    def test_follows_the_clock_in_microseconds(self):
        assert SequenceSource().next(1_700_000_000.25) == 1_700_000_000_250_000

    def test_strictly_increasing_even_when_the_clock_stalls_or_steps_back(self):
        source = SequenceSource()
        values = [source.next(t) for t in (100.0, 100.0, 99.0, 100.0000001, 101.0)]
        assert values == sorted(set(values))

    def test_a_restarted_sender_continues_above_its_previous_run(self):
        before = SequenceSource()
        last = [before.next(1000.0 + i * 0.1) for i in range(100)][-1]
        assert SequenceSource().next(1000.0 + 100 * 0.1 + 1.0) > last


class TestReplayGuard:
    def test_rejects_repeated_and_older_sequences(self):
        guard = ReplayGuard()
        guard.check(SRC, 10)
        assert reason(guard.check, SRC, 10) == "auth_replay"
        assert reason(guard.check, SRC, 9) == "auth_replay"
        guard.check(SRC, 11)

    def test_senders_are_independent(self):
        guard = ReplayGuard()
        guard.check(SRC, 10)
        guard.check(V4("10.0.0.2"), 5)

    def test_a_rejected_sequence_does_not_move_the_window(self):
        guard = ReplayGuard()
        guard.check(SRC, 10)
        with pytest.raises(AuthError):
            guard.check(SRC, 3)
        guard.check(SRC, 11)

    def test_max_age_rejects_old_recordings_after_a_restart(self):
        guard = ReplayGuard(max_age=30.0)
        recorded = SequenceSource().next(1000.0)
        assert reason(guard.check, SRC, recorded, 1100.0) == "auth_stale"
        guard.check(SRC, recorded, 1010.0)

    def test_forget(self):
        guard = ReplayGuard()
        guard.check(SRC, 10)
        guard.forget(SRC)
        guard.check(SRC, 1)
