"""PROXY protocol encoder/parser: byte-exact vectors written from HAProxy's
doc/proxy-protocol.txt (sections 2.1 and 2.2), round trips and error cases."""

import pytest

from proxy.backends.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeader,
    encode,
    encode_v1,
    encode_v2,
    parse,
)

# Section 2.2: 12-byte signature, spelled out byte by byte.
SIGNATURE = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])

SRC4, DST4 = ("192.168.0.1", 56324), ("192.168.0.11", 443)
SRC6, DST6 = ("2001:db8::1", 40000), ("2001:db8::2:1", 5672)


def test_signature_matches_the_spec():
    assert V2_SIGNATURE == SIGNATURE


def test_v1_tcp4_is_the_spec_example_line():
    assert encode_v1(SRC4, DST4) == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_tcp6_line():
    assert encode_v1(SRC6, DST6) == b"PROXY TCP6 2001:db8::1 2001:db8::2:1 40000 5672\r\n"


def test_v2_ipv4_exact_bytes():
    expected = (
        SIGNATURE
        + b"\x21"  # version 2, command PROXY
        + b"\x11"  # AF_INET, STREAM
        + b"\x00\x0c"  # 12 bytes of addresses follow
        + bytes([192, 168, 0, 1])
        + bytes([192, 168, 0, 11])
        + b"\xdc\x04"  # 56324
        + b"\x01\xbb"  # 443
    )
    assert encode_v2(SRC4, DST4) == expected


def test_v2_ipv6_exact_bytes():
    expected = (
        SIGNATURE
        + b"\x21"
        + b"\x21"  # AF_INET6, STREAM
        + b"\x00\x24"  # 36 bytes
        + bytes.fromhex("20010db8000000000000000000000001")
        + bytes.fromhex("20010db8000000000000000000020001")
        + (40000).to_bytes(2, "big")
        + (5672).to_bytes(2, "big")
    )
    assert encode_v2(SRC6, DST6) == expected


def test_v2_never_uses_the_local_command():
    # RabbitMQ 3.10 crashes a connection carrying a v2 LOCAL command.
    for src, dst in [(SRC4, DST4), (SRC6, DST6), (("0.0.0.0", 0), ("0.0.0.0", 0))]:
        header = encode_v2(src, dst)
        assert header[12] == 0x21
        assert parse(header)[0].command == "PROXY"


def test_encode_dispatches_on_version():
    assert encode("v1", SRC4, DST4) == encode_v1(SRC4, DST4)
    assert encode("v2", SRC4, DST4) == encode_v2(SRC4, DST4)
    with pytest.raises(ValueError):
        encode("v3", SRC4, DST4)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("src,dst", [(SRC4, DST4), (SRC6, DST6), (("::1", 1), ("::", 65535))])
def test_round_trip(version, src, dst):
    header = encode(version, src, dst)
    assert parse(header) == (ProxyHeader(int(version[1]), "PROXY", src, dst), len(header))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_parse_reports_consumed_length_and_leaves_payload(version):
    header = encode(version, SRC4, DST4)
    parsed, consumed = parse(header + b"AMQP\x00\x00\x09\x01")
    assert consumed == len(header)
    assert parsed.src == SRC4


def test_mapped_addresses_are_written_as_ipv4_when_both_ends_are_v4():
    src, dst = ("::ffff:10.0.0.1", 1111), ("::ffff:10.0.0.2", 2222)
    assert encode_v1(src, dst) == b"PROXY TCP4 10.0.0.1 10.0.0.2 1111 2222\r\n"
    assert encode_v2(src, dst) == encode_v2(("10.0.0.1", 1111), ("10.0.0.2", 2222))


def test_mapped_and_plain_ipv4_mix_is_ipv4():
    assert encode_v1(("::ffff:10.0.0.1", 1), ("10.0.0.2", 2)) == b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"


def test_mixed_families_are_written_as_ipv6_with_the_v4_end_mapped():
    assert encode_v1(("10.0.0.1", 1), ("2001:db8::1", 2)) == (
        b"PROXY TCP6 ::ffff:a00:1 2001:db8::1 1 2\r\n"
    )
    parsed, _ = parse(encode_v2(("10.0.0.1", 1), ("2001:db8::1", 2)))
    assert parsed.src == ("::ffff:a00:1", 1)


def test_encode_rejects_bad_addresses_and_ports():
    with pytest.raises(ValueError):
        encode_v1(("not-an-ip", 1), DST4)
    with pytest.raises(ValueError):
        encode_v2(SRC4, ("192.168.0.11", 65536))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_every_truncation_needs_more_bytes(version):
    header = encode(version, SRC6, DST6)
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut


def test_v1_unknown_carries_no_addresses():
    assert parse(b"PROXY UNKNOWN\r\n") == (ProxyHeader(1, "PROXY", None, None), 15)
    # Section 2.1: anything after UNKNOWN up to CRLF is ignored.
    assert parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")[0].src is None


def test_v2_local_and_tlvs_are_accepted_when_parsing():
    local = SIGNATURE + b"\x20\x00\x00\x00"
    assert parse(local) == (ProxyHeader(2, "LOCAL", None, None), 16)
    tlv = b"\x04\x00\x01\x00"  # PP2_TYPE_NOOP, length 1
    body = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + b"\x00\x01\x00\x02" + tlv
    header = SIGNATURE + b"\x21\x11" + len(body).to_bytes(2, "big") + body
    expected = ProxyHeader(2, "PROXY", ("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=((0x04, b"\x00"),))
    assert parse(header) == (expected, len(header))


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n",
        b"AMQP\x00\x00\x09\x01",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",  # double space
        b"PROXY " + b"x" * 120,  # no CRLF within 107 bytes
        SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 nibble
        SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),  # family 4
        SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),  # transport 3
        SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # AF_INET6 with 12 bytes
    ],
)
def test_garbage_raises_value_error(garbage):
    with pytest.raises(ValueError):
        parse(garbage)
