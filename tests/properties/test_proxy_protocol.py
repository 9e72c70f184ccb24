"""Properties of the PROXY protocol codec (HAProxy's doc/proxy-protocol.txt, versions 1 and 2).

Every header we encode parses back to the addresses it carries (mapped to
one family as section 2.1/2.2 require), every strict prefix of one asks for
more bytes, and whatever bytes a peer sends parse to a header, "more
please" (within the bounds the spec sets) or ValueError.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from proxy.backends.proxy_protocol import V1_MAX_LENGTH, V1_PREFIX, V2_FIXED_LENGTH, V2_SIGNATURE, encode, parse

ports = st.integers(0, 65535)
addresses = st.tuples(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), ports)
versions = st.sampled_from(["v1", "v2"])


def carried(address: tuple[str, int], other: tuple[str, int]) -> tuple[str, int]:
    """How `address` reads in a header shared with `other`: IPv4 only if both are IPv4."""
    ip = ipaddress.ip_address(address[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    other_ip = ipaddress.ip_address(other[0])
    other_v4 = other_ip.version == 4 or other_ip.ipv4_mapped is not None
    if ip.version == 4 and not other_v4:
        ip = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
    return str(ip), address[1]


@given(versions, addresses, addresses, st.binary(max_size=20))
def test_every_header_parses_back_to_its_addresses(version, src, dst, payload):
    header_bytes = encode(version, src, dst)
    header, consumed = parse(header_bytes + payload)
    assert consumed == len(header_bytes)
    assert header.version == int(version[1]) and header.command == "PROXY"
    assert header.src == carried(src, dst) and header.dst == carried(dst, src)
    if version == "v1":
        assert len(header_bytes) <= V1_MAX_LENGTH


@given(versions, addresses, addresses, st.data())
def test_every_prefix_of_a_header_asks_for_more(version, src, dst, data):
    header_bytes = encode(version, src, dst)
    cut = data.draw(st.integers(0, len(header_bytes) - 1))
    assert parse(header_bytes[:cut]) is None


def _bounded(data: bytes, result) -> None:
    """A parse result is consistent with the bytes it came from."""
    if result is None:
        # Waiting for more is only allowed within the spec's bounds.
        if data.startswith(V2_SIGNATURE) and len(data) >= V2_FIXED_LENGTH:
            assert len(data) < V2_FIXED_LENGTH + int.from_bytes(data[14:16], "big")
        else:
            assert len(data) < V1_MAX_LENGTH
        return
    header, consumed = result
    assert 0 < consumed <= len(data)
    for address in (header.src, header.dst):
        if address is not None:
            ipaddress.ip_address(address[0])
            assert 0 <= address[1] <= 65535


@given(st.binary(max_size=300))
def test_any_bytes_parse_to_a_header_more_please_or_value_error(data):
    try:
        result = parse(data)
    except ValueError:
        return
    _bounded(data, result)


tokens = st.one_of(
    st.sampled_from(["TCP4", "TCP6", "UNKNOWN", "UDP4", "", "0", "00", "65535", "65536", "1.2.3.4", "::1",
                     "::ffff:1.2.3.4", "fe80::1%eth0", "256.1.1.1", "\u0661"]),
    st.ip_addresses().map(str), st.integers(-5, 70000).map(str), st.text(max_size=8),
)


@given(st.lists(tokens, max_size=8), st.sampled_from([b"\r\n", b"\n", b"", b"\r\nAMQP"]))
def test_any_v1_line_parses_or_raises_value_error(words, end):
    data = V1_PREFIX + " ".join(words).encode("utf-8", "surrogatepass") + end
    try:
        result = parse(data)
    except ValueError:
        return
    _bounded(data, result)
    if result is not None and result[0].src is not None:
        header, _ = result
        family = ipaddress.ip_address(header.src[0]).version
        assert ipaddress.ip_address(header.dst[0]).version == family
        assert words[0] == f"TCP{family}"


@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=260))
def test_any_v2_header_parses_or_raises_value_error(version_command, family_transport, body):
    data = V2_SIGNATURE + bytes([version_command, family_transport]) + len(body).to_bytes(2, "big") + body
    try:
        result = parse(data)
    except ValueError:
        return
    assert result is not None and result[1] == len(data)
    _bounded(data, result)
