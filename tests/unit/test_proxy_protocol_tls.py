"""PROXY v2 SSL TLVs (HAProxy's send-proxy-v2-ssl-cn) and properties of the parser on any input."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.backends.proxy_protocol import (
    PP2_TYPE_SSL,
    V2_SIGNATURE,
    SslInfo,
    encode,
    parse,
)

SRC, DST = ("192.0.2.7", 40001), ("10.0.0.5", 5671)


def test_the_ssl_tlv_is_laid_out_as_section_2_2_5_says():
    info = SslInfo("TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", cn="app-publisher", cert_in_connection=True)
    header = encode("v2", SRC, DST, info)
    fixed = 16 + 12
    tlv = header[fixed:]
    assert tlv[0] == PP2_TYPE_SSL
    assert int.from_bytes(tlv[1:3], "big") == len(tlv) - 3
    assert tlv[3] == 0x01 | 0x02  # PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN
    assert tlv[4:8] == b"\x00\x00\x00\x00"  # verified
    assert tlv[8:] == (
        b"\x21\x00\x07TLSv1.3" + b"\x22\x00\x0dapp-publisher" + b"\x23\x00\x16TLS_AES_128_GCM_SHA256"
    )
    assert int.from_bytes(header[14:16], "big") == 12 + len(tlv)


def test_a_client_without_certificate_gets_only_the_ssl_flag_and_version():
    header = encode("v2", SRC, DST, SslInfo("TLSv1.2"))
    assert header[28:] == b"\x20\x00\x0f" + b"\x01" + b"\x00\x00\x00\x00" + b"\x21\x00\x07TLSv1.2"


def test_the_ssl_tlv_decodes_back():
    info = SslInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", "é-client", True, False, 0)
    header, consumed = parse(encode("v2", SRC, DST, info))
    assert header.ssl == info and header.src == SRC and header.dst == DST
    assert consumed == len(encode("v2", SRC, DST, info))


def test_v1_has_no_room_for_tls_facts():
    assert encode("v1", SRC, DST, SslInfo("TLSv1.3", cn="x")) == encode("v1", SRC, DST)


addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535)),
)
infos = st.builds(
    SslInfo,
    version=st.sampled_from(["TLSv1.2", "TLSv1.3"]),
    cipher=st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
    cn=st.none() | st.text(max_size=64),
    cert_in_connection=st.booleans(),
    cert_in_session=st.booleans(),
    verify=st.integers(0, 2**32 - 1),
)


@settings(max_examples=300, deadline=None)
@given(addresses, addresses, st.none() | infos)
def test_every_encoded_header_parses_back_to_what_was_encoded(src, dst, info):
    data = encode("v2", src, dst, info) + b"AMQP"
    header, consumed = parse(data)
    assert data[consumed:] == b"AMQP"
    assert header.ssl == info
    both_v4 = ipaddress.ip_address(src[0]).version == ipaddress.ip_address(dst[0]).version == 4
    if both_v4:
        assert (header.src, header.dst) == (src, dst)


@settings(max_examples=300, deadline=None)
@given(addresses, addresses, infos, st.data())
def test_every_prefix_of_a_header_asks_for_more(src, dst, info, data):
    encoded = encode("v2", src, dst, info)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    assert parse(encoded[:cut]) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(0, 0x3F))
def test_any_tlv_block_after_a_valid_prefix_is_decoded_or_refused(tlvs, family_byte):
    body = bytes(12) + tlvs
    data = V2_SIGNATURE + b"\x21\x11" + len(body).to_bytes(2, "big") + body
    try:
        header, consumed = parse(data)
    except ValueError:
        return
    assert consumed == len(data)
    assert sum(3 + len(value) for _, value in header.tlvs) == len(tlvs)
