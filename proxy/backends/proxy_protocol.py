"""PROXY protocol header encoding and parsing (sans-I/O).

Warren can prepend a PROXY protocol header to each backend connection so the
broker sees the real client address instead of the proxy's.  The format is
HAProxy's "PROXY protocol" specification (doc/proxy-protocol.txt), versions 1
(human-readable line, section 2.1) and 2 (binary, section 2.2).

Contracts:

* ``encode_v1`` / ``encode_v2`` / ``encode`` produce a complete header for a
  proxied TCP connection from ``src`` (the client) to ``dst`` (the address the
  client connected to).  They always emit the PROXY command: version 2's LOCAL
  command is never produced, because RabbitMQ 3.10 crashes the connection when
  it receives one.
* IPv4-mapped IPv6 addresses (``::ffff:1.2.3.4``, what a dual-stack listening
  socket reports for IPv4 clients) are written as IPv4 when both ends are
  IPv4; when only one end is IPv4, both are written as IPv6 (the IPv4 end
  mapped), since a header carries a single address family.
* With a :class:`SslInfo` (the client came over TLS), version 2 headers
  carry the PP2_TYPE_SSL TLV of section 2.2.5, as HAProxy's
  ``send-proxy-v2-ssl-cn`` does: the client flags, the verify result and the
  sub-TLVs PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN (when the client sent
  a certificate) and PP2_SUBTYPE_SSL_CIPHER. Version 1 has no room for them.
* ``parse`` decodes one header from the start of a byte buffer.  It returns
  ``None`` while the buffer is a valid but incomplete prefix, and raises
  ``ValueError`` as soon as the bytes cannot be a PROXY header; the TLVs of
  a version 2 header are checked and returned (``ProxyHeader.tlvs``,
  ``ProxyHeader.ssl``).

No sockets here: callers write the encoded bytes before relaying any payload.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

Address = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Section 2.2: the 12-byte signature opening every version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
# Section 2.1: "a receiver must wait for up to 107 bytes" (worst case TCP6 line).
V1_MAX_LENGTH = 107
V2_FIXED_LENGTH = 16  # signature + ver/cmd + family/transport + 2-byte length

_V2_VERSION = 0x2
_V2_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_COMMAND_PROXY = 0x1
_V2_AF_UNSPEC, _V2_AF_INET, _V2_AF_INET6, _V2_AF_UNIX = 0x0, 0x1, 0x2, 0x3
_V2_TRANSPORT_UNSPEC, _V2_TRANSPORT_STREAM, _V2_TRANSPORT_DGRAM = 0x0, 0x1, 0x2
# Section 2.2: address block sizes per family (AF_UNIX: two 108-byte paths).
_V2_ADDRESS_LENGTH = {_V2_AF_UNSPEC: 0, _V2_AF_INET: 12, _V2_AF_INET6: 36, _V2_AF_UNIX: 216}

# Section 2.2.5: the SSL TLV and its sub-types; the client flags.
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
_TLV_HEAD = 3  # type (1) + length (2)
_SSL_FIXED = 5  # client flags (1) + verify (4)


@dataclass(frozen=True)
class SslInfo:
    """What a PP2_TYPE_SSL TLV says of the client's TLS connection.

    ``verify`` is 0 when the client's certificate was verified (or none was
    asked for), as in HAProxy; ``cert_in_connection`` / ``cert_in_session``:
    the client presented a certificate on this connection / on the session
    it resumed. ``cn``: the certificate's subject common name.
    """

    version: str
    cipher: str | None = None
    cn: str | None = None
    cert_in_connection: bool = False
    cert_in_session: bool = False
    verify: int = 0

    @property
    def client_flags(self) -> int:
        flags = PP2_CLIENT_SSL
        if self.cert_in_connection:
            flags |= PP2_CLIENT_CERT_CONN
        if self.cert_in_session:
            flags |= PP2_CLIENT_CERT_SESS
        return flags


@dataclass(frozen=True)
class ProxyHeader:
    """One decoded header.

    ``version`` is 1 or 2; ``command`` is ``"PROXY"`` or ``"LOCAL"`` (v2 only).
    ``src``/``dst`` are ``(ip, port)``, or ``None`` when the header carries no
    usable address (v1 ``UNKNOWN``, v2 ``LOCAL``, ``AF_UNSPEC`` or ``AF_UNIX``).
    ``tlvs``: the v2 TLVs after the addresses, ``(type, value)`` in order;
    ``ssl``: their PP2_TYPE_SSL decoded, if present.
    """

    version: int
    command: str
    src: Address | None
    dst: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    ssl: SslInfo | None = None


# --------------------------------------------------------------------------
# Encoding


def encode(version: str, src: Address, dst: Address, ssl: SslInfo | None = None) -> bytes:
    """Encode a PROXY header; ``version`` is ``"v1"`` or ``"v2"`` (only v2 carries `ssl`)."""
    if version == "v1":
        return encode_v1(src, dst)
    if version == "v2":
        return encode_v2(src, dst, encode_ssl_tlv(ssl) if ssl is not None else b"")
    raise ValueError(f"unknown PROXY protocol version {version!r}")


def encode_v1(src: Address, dst: Address) -> bytes:
    """Encode a version 1 line: ``PROXY TCP4|TCP6 src dst sport dport\\r\\n``."""
    src_ip, dst_ip = _common_family(_ip_of(src), _ip_of(dst))
    family = "TCP4" if src_ip.version == 4 else "TCP6"
    line = f"PROXY {family} {src_ip} {dst_ip} {_port_of(src)} {_port_of(dst)}\r\n"
    return line.encode("ascii")


def encode_v2(src: Address, dst: Address, tlvs: bytes = b"") -> bytes:
    """Encode a version 2 binary header with the PROXY command over STREAM,
    followed by the already encoded `tlvs`."""
    src_ip, dst_ip = _common_family(_ip_of(src), _ip_of(dst))
    family = _V2_AF_INET if src_ip.version == 4 else _V2_AF_INET6
    addresses = src_ip.packed + dst_ip.packed + struct.pack("!HH", _port_of(src), _port_of(dst))
    if len(addresses) + len(tlvs) > 0xFFFF:
        raise ValueError("PROXY v2 header longer than 65535 bytes")
    return (
        V2_SIGNATURE
        + bytes([_V2_VERSION << 4 | _V2_COMMAND_PROXY, family << 4 | _V2_TRANSPORT_STREAM])
        + struct.pack("!H", len(addresses) + len(tlvs))
        + addresses
        + tlvs
    )


def encode_tlv(kind: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("a TLV value is at most 65535 bytes")
    return struct.pack("!BH", kind, len(value)) + value


def encode_ssl_tlv(ssl: SslInfo) -> bytes:
    """PP2_TYPE_SSL: client flags, verify result, then version, CN and cipher sub-TLVs."""
    subs = encode_tlv(PP2_SUBTYPE_SSL_VERSION, ssl.version.encode("ascii"))
    if ssl.cn is not None:
        # A CN is at most 64 characters (RFC 5280 ub-common-name); cap it anyway.
        subs += encode_tlv(PP2_SUBTYPE_SSL_CN, ssl.cn.encode("utf-8")[:1024])
    if ssl.cipher is not None:
        subs += encode_tlv(PP2_SUBTYPE_SSL_CIPHER, ssl.cipher.encode("ascii"))
    return encode_tlv(PP2_TYPE_SSL, struct.pack("!BI", ssl.client_flags, ssl.verify) + subs)


def _ip_of(address: Address) -> IPAddress:
    ip = ipaddress.ip_address(address[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _port_of(address: Address) -> int:
    port = address[1]
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return port


def _common_family(src: IPAddress, dst: IPAddress) -> tuple[IPAddress, IPAddress]:
    """Bring both addresses to one family: IPv4 only if both are IPv4."""
    if src.version == dst.version:
        return src, dst
    return _as_ipv6(src), _as_ipv6(dst)


def _as_ipv6(ip: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)


# --------------------------------------------------------------------------
# Parsing


def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Decode the header at the start of ``data``.

    Returns ``(header, consumed_bytes)``, or ``None`` if more bytes are needed.
    Raises ``ValueError`` if ``data`` does not start with a valid header.
    """
    data = bytes(data)
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    if V2_SIGNATURE.startswith(data) or V1_PREFIX.startswith(data):
        return None
    raise ValueError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ValueError("PROXY v1 line longer than 107 bytes")
        return None
    fields = data[:end].decode("ascii", errors="strict").split(" ")
    consumed = end + 2
    # Section 2.1: with UNKNOWN, "the receiver must ignore anything presented
    # before the CRLF".
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, "PROXY", None, None), consumed
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ValueError("malformed PROXY v1 line")
    version = 4 if fields[1] == "TCP4" else 6
    src = (_v1_ip(fields[2], version), _v1_port(fields[4]))
    dst = (_v1_ip(fields[3], version), _v1_port(fields[5]))
    return ProxyHeader(1, "PROXY", src, dst), consumed


def _v1_ip(text: str, version: int) -> str:
    ip = ipaddress.ip_address(text)
    if ip.version != version:
        raise ValueError(f"address {text!r} does not match TCP{version}")
    return str(ip)


def _v1_port(text: str) -> int:
    # Section 2.1: ports are decimal without leading zeroes.
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ValueError(f"malformed port {text!r}")
    port = int(text)
    if port > 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return port


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < V2_FIXED_LENGTH:
        return None
    version_command, family_transport, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != _V2_VERSION:
        raise ValueError("unsupported PROXY v2 version nibble")
    command = _V2_COMMANDS.get(version_command & 0x0F)
    if command is None:
        raise ValueError("unknown PROXY v2 command")
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family not in _V2_ADDRESS_LENGTH or transport > _V2_TRANSPORT_DGRAM:
        raise ValueError("unknown PROXY v2 address family or transport")
    if length < _V2_ADDRESS_LENGTH[family]:
        raise ValueError("PROXY v2 length too short for its address family")
    consumed = V2_FIXED_LENGTH + length
    if len(data) < consumed:
        return None
    tlvs = parse_tlvs(data[V2_FIXED_LENGTH + _V2_ADDRESS_LENGTH[family] : consumed])
    ssl = next((_parse_ssl(value) for kind, value in tlvs if kind == PP2_TYPE_SSL), None)
    # LOCAL: "the receiver must ignore the address information" (section 2.2).
    if command == "LOCAL" or family not in (_V2_AF_INET, _V2_AF_INET6):
        return ProxyHeader(2, command, None, None, tlvs, ssl), consumed
    src, dst = _v2_addresses(family, data[V2_FIXED_LENGTH:consumed])
    return ProxyHeader(2, command, src, dst, tlvs, ssl), consumed


def _v2_addresses(family: int, block: bytes) -> tuple[Address, Address]:
    size = 4 if family == _V2_AF_INET else 16
    src_ip = ipaddress.ip_address(block[:size])
    dst_ip = ipaddress.ip_address(block[size : 2 * size])
    src_port, dst_port = struct.unpack_from("!HH", block, 2 * size)
    return (str(src_ip), src_port), (str(dst_ip), dst_port)


def parse_tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    """``(type, value)`` of every TLV in `block`; ValueError if one overruns it."""
    tlvs, offset = [], 0
    while offset < len(block):
        if len(block) - offset < _TLV_HEAD:
            raise ValueError("truncated PROXY v2 TLV header")
        kind, length = struct.unpack_from("!BH", block, offset)
        offset += _TLV_HEAD
        if offset + length > len(block):
            raise ValueError("PROXY v2 TLV longer than the header")
        tlvs.append((kind, bytes(block[offset : offset + length])))
        offset += length
    return tuple(tlvs)


def _parse_ssl(value: bytes) -> SslInfo:
    if len(value) < _SSL_FIXED:
        raise ValueError("PP2_TYPE_SSL shorter than its client and verify fields")
    client, verify = struct.unpack_from("!BI", value)
    subs = dict(parse_tlvs(value[_SSL_FIXED:]))
    try:
        version = subs.get(PP2_SUBTYPE_SSL_VERSION, b"").decode("ascii")
        cn = subs[PP2_SUBTYPE_SSL_CN].decode("utf-8") if PP2_SUBTYPE_SSL_CN in subs else None
        cipher = subs[PP2_SUBTYPE_SSL_CIPHER].decode("ascii") if PP2_SUBTYPE_SSL_CIPHER in subs else None
    except UnicodeDecodeError:
        raise ValueError("PP2_TYPE_SSL sub-TLV is not text") from None
    return SslInfo(
        version, cipher, cn, bool(client & PP2_CLIENT_CERT_CONN), bool(client & PP2_CLIENT_CERT_SESS), verify
    )
