"""VRRPv3 codec: RFC 5798 section 5 wire format, checksum with the pseudo-header, strict decoding."""

import ipaddress
import random
import struct

import pytest

from proxy.vip.packet import (
    Advert,
    PacketError,
    check_hop_limit,
    decode_advert,
    encode_advert,
    internet_checksum,
    interval_to_cs,
    parse_ipv4_packet,
    virtual_mac,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address

# Captured from keepalived 2.2.7 (vrrp_version 3, VRID 51, priority 100,
# advert_int 0.5, VIPs 10.77.0.100 and .101) on a veth between two namespaces.
KEEPALIVED_DATAGRAM = bytes.fromhex(
    "45c0002400010000ff70d0480a4d0001e0000012" "3133640200326a540a4d00640a4d0065"
)
KEEPALIVED_PAYLOAD = KEEPALIVED_DATAGRAM[20:]
KEEPALIVED_SRC, MCAST = V4("10.77.0.1"), V4("224.0.0.18")
KEEPALIVED_ADVERT = Advert(51, 100, 50, (V4("10.77.0.100"), V4("10.77.0.101")))

SRC6, MCAST6 = V6("fe80::1"), V6("ff02::12")


def v4_advert(**changes):
    fields = dict(vrid=7, priority=150, max_advert_int_cs=100, addresses=(V4("192.0.2.10"),))
    fields.update(changes)
    return Advert(**fields)


def reference_checksum_ok(data: bytes) -> bool:
    """Independent RFC 1071 check: the one's-complement sum of all words is 0xFFFF."""
    data = data + b"\x00" * (len(data) % 2)
    total = 0
    for index in range(0, len(data), 2):
        total += (data[index] << 8) | data[index + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


class TestKeepalivedInterop:
    def test_decodes_a_real_keepalived_advert(self):
        assert decode_advert(KEEPALIVED_PAYLOAD, KEEPALIVED_SRC, MCAST) == KEEPALIVED_ADVERT

    def test_encodes_byte_for_byte_what_keepalived_sends(self):
        assert encode_advert(KEEPALIVED_ADVERT, KEEPALIVED_SRC, MCAST) == KEEPALIVED_PAYLOAD

    def test_parses_the_real_ip_datagram(self):
        src, dst, ttl, protocol, payload = parse_ipv4_packet(KEEPALIVED_DATAGRAM)
        assert (src, dst, ttl, protocol, payload) == (KEEPALIVED_SRC, MCAST, 255, 112, KEEPALIVED_PAYLOAD)


class TestEncode:
    def test_header_layout(self):
        payload = encode_advert(v4_advert(max_advert_int_cs=0xABC), "192.0.2.1", MCAST)
        version_type, vrid, priority, count, interval, _ = struct.unpack("!BBBBHH", payload[:8])
        assert (version_type, vrid, priority, count, interval) == (0x31, 7, 150, 1, 0xABC)
        assert payload[8:] == V4("192.0.2.10").packed

    def test_checksum_covers_the_ipv4_pseudo_header(self):
        src = V4("192.0.2.1")
        payload = encode_advert(v4_advert(), src, MCAST)
        pseudo = src.packed + MCAST.packed + bytes((0, 112)) + struct.pack("!H", len(payload))
        assert reference_checksum_ok(pseudo + payload)
        assert not reference_checksum_ok(payload)  # not the VRRPv2 (header-only) checksum

    def test_checksum_covers_the_ipv6_pseudo_header(self):
        advert = Advert(9, 200, 10, (V6("fe80::99"), V6("2001:db8::99")))
        payload = encode_advert(advert, SRC6, MCAST6)
        pseudo = SRC6.packed + MCAST6.packed + struct.pack("!I", len(payload)) + bytes((0, 0, 0, 112))
        assert reference_checksum_ok(pseudo + payload)
        assert len(payload) == 8 + 2 * 16

    def test_the_source_address_changes_the_checksum(self):
        one = encode_advert(v4_advert(), "192.0.2.1", MCAST)
        other = encode_advert(v4_advert(), "192.0.2.2", MCAST)
        assert one[:6] == other[:6] and one[6:8] != other[6:8]

    def test_refuses_mixed_families(self):
        with pytest.raises(ValueError):
            encode_advert(v4_advert(), SRC6, MCAST6)
        with pytest.raises(ValueError):
            encode_advert(v4_advert(), "192.0.2.1", MCAST6)


class TestAdvertValidation:
    @pytest.mark.parametrize(
        "changes",
        [
            {"vrid": 0},
            {"vrid": 256},
            {"priority": -1},
            {"priority": 256},
            {"max_advert_int_cs": 0},
            {"max_advert_int_cs": 4096},
            {"addresses": ()},
            {"addresses": (V4("192.0.2.1"), V6("::1"))},
            {"addresses": tuple(V4(f"10.0.{i // 256}.{i % 256}") for i in range(256))},
            {"version": 2},
        ],
    )
    def test_rejects_invalid_fields(self, changes):
        with pytest.raises(ValueError):
            v4_advert(**changes)

    def test_interval_in_seconds(self):
        assert v4_advert(max_advert_int_cs=5).interval == 0.05

    @pytest.mark.parametrize("seconds,cs", [(1.0, 100), (0.1, 10), (0.01, 1), (40.95, 4095), (0.014, 1)])
    def test_interval_to_cs(self, seconds, cs):
        assert interval_to_cs(seconds) == cs

    @pytest.mark.parametrize("seconds", [0, 0.004, 41.0, -1])
    def test_interval_out_of_range(self, seconds):
        with pytest.raises(ValueError):
            interval_to_cs(seconds)


class TestDecode:
    src = V4("192.0.2.1")

    def encoded(self, advert=None):
        return encode_advert(advert or v4_advert(), self.src, MCAST)

    def reason(self, payload, src=None, dst=MCAST):
        with pytest.raises(PacketError) as caught:
            decode_advert(payload, src or self.src, dst)
        return caught.value.reason

    def test_round_trip_ipv4(self):
        advert = v4_advert(addresses=tuple(V4(f"198.51.100.{i}") for i in range(1, 21)), priority=0)
        assert decode_advert(self.encoded(advert), self.src, MCAST) == advert

    def test_round_trip_ipv6(self):
        advert = Advert(255, 255, 4095, (V6("fe80::1:2"), V6("2001:db8::5")))
        assert decode_advert(encode_advert(advert, SRC6, MCAST6), SRC6, MCAST6) == advert

    def test_accepts_string_addresses(self):
        assert decode_advert(self.encoded(), "192.0.2.1", "224.0.0.18") == v4_advert()

    def test_reserved_bits_are_ignored_on_receipt(self):
        payload = bytearray(self.encoded())
        payload[4] |= 0xF0
        fix_checksum(payload, self.src, MCAST)
        assert decode_advert(bytes(payload), self.src, MCAST).max_advert_int_cs == 100

    @pytest.mark.parametrize("length", range(0, 8))
    def test_truncated_header(self, length):
        assert self.reason(self.encoded()[:length]) == "truncated"

    def test_truncated_addresses(self):
        assert self.reason(self.encoded()[:10]) == "truncated"

    def test_wrong_version(self):
        payload = bytearray(self.encoded())
        payload[0] = 0x21
        fix_checksum(payload, self.src, MCAST)
        assert self.reason(bytes(payload)) == "bad_version"

    def test_wrong_type(self):
        payload = bytearray(self.encoded())
        payload[0] = 0x32
        fix_checksum(payload, self.src, MCAST)
        assert self.reason(bytes(payload)) == "bad_type"

    def test_bad_checksum(self):
        payload = bytearray(self.encoded())
        payload[2] ^= 0x01  # priority changed in flight
        assert self.reason(bytes(payload)) == "bad_checksum"

    def test_checksum_from_another_source_is_bad(self):
        assert self.reason(self.encoded(), src=V4("192.0.2.99")) == "bad_checksum"

    def test_more_bytes_than_the_count_announces(self):
        payload = bytearray(self.encoded() + V4("192.0.2.11").packed)
        fix_checksum(payload, self.src, MCAST)
        assert self.reason(bytes(payload)) == "count_mismatch"

    def test_count_zero(self):
        payload = bytearray(self.encoded()[:8])
        payload[3] = 0
        fix_checksum(payload, self.src, MCAST)
        assert self.reason(bytes(payload)) == "no_addresses"

    def test_zero_interval(self):
        payload = bytearray(self.encoded())
        payload[4:6] = b"\xf0\x00"  # reserved bits set, interval zero
        fix_checksum(payload, self.src, MCAST)
        assert self.reason(bytes(payload)) == "zero_interval"

    def test_vrid_zero(self):
        payload = bytearray(self.encoded())
        payload[1] = 0
        fix_checksum(payload, self.src, MCAST)
        assert self.reason(bytes(payload)) == "bad_vrid"

    def test_ipv6_addresses_over_ipv4(self):
        v6_payload = encode_advert(Advert(7, 100, 100, (V6("2001:db8::1"),)), SRC6, MCAST6)
        assert self.reason(v6_payload) == "wrong_family"

    def test_ipv4_addresses_over_ipv6(self):
        assert self.reason(self.encoded(), src=SRC6, dst=MCAST6) == "wrong_family"

    def test_mixed_endpoint_families(self):
        assert self.reason(self.encoded(), src=self.src, dst=MCAST6) == "wrong_family"

    def test_garbage_endpoint(self):
        assert self.reason(self.encoded(), src="not-an-ip") == "bad_endpoint"

    def test_fuzz_never_raises_anything_but_packet_error(self):
        rng = random.Random(5798)
        valid = self.encoded(v4_advert(addresses=(V4("192.0.2.10"), V4("192.0.2.11"))))
        samples = [valid[:cut] for cut in range(len(valid))]
        samples += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80))) for _ in range(3000)]
        samples += [mutate(valid, rng) for _ in range(3000)]
        for sample in samples:
            for src, dst in ((self.src, MCAST), (SRC6, MCAST6)):
                try:
                    decode_advert(sample, src, dst)
                except PacketError:
                    pass

    def test_fuzz_with_a_matching_checksum_still_validates_every_field(self):
        """Random headers with a correct checksum: decoding gives a valid Advert or PacketError."""
        rng = random.Random(112)
        for _ in range(3000):
            payload = bytearray(rng.getrandbits(8) for _ in range(8 + 4 * rng.randrange(0, 4)))
            payload[0] = rng.choice((0x31, 0x31, 0x21, 0x30))
            payload[3] = rng.randrange(0, 5)
            fix_checksum(payload, self.src, MCAST)
            try:
                advert = decode_advert(bytes(payload), self.src, MCAST)
            except PacketError:
                continue
            assert encode_advert(advert, self.src, MCAST)[8:] == bytes(payload[8:])


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] = rng.getrandbits(8)
    return bytes(data)


def fix_checksum(payload: bytearray, src, dst) -> None:
    from proxy.vip.packet import pseudo_header

    payload[6:8] = b"\x00\x00"
    checksum = internet_checksum(pseudo_header(src, dst, len(payload)) + bytes(payload))
    payload[6:8] = struct.pack("!H", checksum)


def ipv4_datagram(payload: bytes, *, ttl=255, protocol=112, src="192.0.2.1", dst="224.0.0.18", options=b""):
    ihl = 5 + len(options) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0xC0, ihl * 4 + len(payload), 1, 0, ttl, protocol, 0,
        V4(src).packed, V4(dst).packed,
    ) + options
    checksum = internet_checksum(header)
    return header[:10] + struct.pack("!H", checksum) + header[12:] + payload


class TestParseIpv4:
    payload = b"vrrp-payload"

    def reason(self, datagram, **kwargs):
        with pytest.raises(PacketError) as caught:
            parse_ipv4_packet(datagram, **kwargs)
        return caught.value.reason

    def test_splits_header_and_payload(self):
        src, dst, ttl, protocol, payload = parse_ipv4_packet(ipv4_datagram(self.payload))
        assert (src, dst, ttl, protocol, payload) == (V4("192.0.2.1"), MCAST, 255, 112, self.payload)

    def test_header_options_are_skipped(self):
        datagram = ipv4_datagram(self.payload, options=b"\x94\x04\x00\x00")  # router alert
        assert parse_ipv4_packet(datagram)[4] == self.payload

    def test_link_layer_padding_is_dropped(self):
        assert parse_ipv4_packet(ipv4_datagram(self.payload) + b"\x00" * 6)[4] == self.payload

    @pytest.mark.parametrize("ttl", [0, 1, 64, 254])
    def test_ttl_other_than_255_is_rejected(self, ttl):
        """RFC 5798 7.1: a packet that crossed a router (TTL decremented) is discarded."""
        assert self.reason(ipv4_datagram(self.payload, ttl=ttl)) == "bad_ttl"

    def test_ttl_check_can_be_disabled(self):
        assert parse_ipv4_packet(ipv4_datagram(self.payload, ttl=3), required_ttl=None)[2] == 3

    def test_bad_header_checksum(self):
        datagram = bytearray(ipv4_datagram(self.payload))
        datagram[12] ^= 1  # source address changed, checksum not
        assert self.reason(bytes(datagram)) == "bad_ip_header"

    def test_not_ipv4(self):
        datagram = bytearray(ipv4_datagram(self.payload))
        datagram[0] = 0x65
        assert self.reason(bytes(datagram)) == "bad_ip_header"

    def test_ihl_below_five(self):
        datagram = bytearray(ipv4_datagram(self.payload))
        datagram[0] = 0x44
        assert self.reason(bytes(datagram)) == "bad_ip_header"

    def test_total_length_beyond_the_data(self):
        assert self.reason(ipv4_datagram(self.payload)[:-1]) == "bad_ip_header"

    @pytest.mark.parametrize("length", [0, 1, 19])
    def test_truncated(self, length):
        assert self.reason(ipv4_datagram(self.payload)[:length]) == "truncated"

    def test_fuzz_never_raises_anything_but_packet_error(self):
        rng = random.Random(791)
        valid = ipv4_datagram(self.payload)
        samples = [valid[:cut] for cut in range(len(valid))]
        samples += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 60))) for _ in range(3000)]
        samples += [mutate(valid, rng) for _ in range(3000)]
        for sample in samples:
            try:
                parse_ipv4_packet(sample)
            except PacketError:
                pass


def test_hop_limit_check():
    check_hop_limit(255)
    with pytest.raises(PacketError):
        check_hop_limit(254)


def test_virtual_mac():
    assert virtual_mac(51) == bytes.fromhex("00005e000133")
    assert virtual_mac(1, version=6) == bytes.fromhex("00005e000201")
