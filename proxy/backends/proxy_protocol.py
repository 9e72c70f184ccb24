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
* ``parse`` decodes one header from the start of a byte buffer.  It returns
  ``None`` while the buffer is a valid but incomplete prefix, and raises
  ``ValueError`` as soon as the bytes cannot be a PROXY header.

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


@dataclass(frozen=True)
class ProxyHeader:
    """One decoded header.

    ``version`` is 1 or 2; ``command`` is ``"PROXY"`` or ``"LOCAL"`` (v2 only).
    ``src``/``dst`` are ``(ip, port)``, or ``None`` when the header carries no
    usable address (v1 ``UNKNOWN``, v2 ``LOCAL``, ``AF_UNSPEC`` or ``AF_UNIX``).
    """

    version: int
    command: str
    src: Address | None
    dst: Address | None


# --------------------------------------------------------------------------
# Encoding


def encode(version: str, src: Address, dst: Address) -> bytes:
    """Encode a PROXY header; ``version`` is ``"v1"`` or ``"v2"``."""
    if version == "v1":
        return encode_v1(src, dst)
    if version == "v2":
        return encode_v2(src, dst)
    raise ValueError(f"unknown PROXY protocol version {version!r}")


def encode_v1(src: Address, dst: Address) -> bytes:
    """Encode a version 1 line: ``PROXY TCP4|TCP6 src dst sport dport\\r\\n``."""
    src_ip, dst_ip = _common_family(_ip_of(src), _ip_of(dst))
    family = "TCP4" if src_ip.version == 4 else "TCP6"
    line = f"PROXY {family} {src_ip} {dst_ip} {_port_of(src)} {_port_of(dst)}\r\n"
    return line.encode("ascii")


def encode_v2(src: Address, dst: Address) -> bytes:
    """Encode a version 2 binary header with the PROXY command over STREAM."""
    src_ip, dst_ip = _common_family(_ip_of(src), _ip_of(dst))
    family = _V2_AF_INET if src_ip.version == 4 else _V2_AF_INET6
    addresses = src_ip.packed + dst_ip.packed + struct.pack("!HH", _port_of(src), _port_of(dst))
    return (
        V2_SIGNATURE
        + bytes([_V2_VERSION << 4 | _V2_COMMAND_PROXY, family << 4 | _V2_TRANSPORT_STREAM])
        + struct.pack("!H", len(addresses))
        + addresses
    )


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
    # LOCAL: "the receiver must ignore the address information" (section 2.2).
    if command == "LOCAL" or family not in (_V2_AF_INET, _V2_AF_INET6):
        return ProxyHeader(2, command, None, None), consumed
    src, dst = _v2_addresses(family, data[V2_FIXED_LENGTH:consumed])
    return ProxyHeader(2, command, src, dst), consumed


def _v2_addresses(family: int, block: bytes) -> tuple[Address, Address]:
    size = 4 if family == _V2_AF_INET else 16
    src_ip = ipaddress.ip_address(block[:size])
    dst_ip = ipaddress.ip_address(block[size : 2 * size])
    src_port, dst_port = struct.unpack_from("!HH", block, 2 * size)
    # Any TLVs after the address block are skipped: Warren never sends them.
    return (str(src_ip), src_port), (str(dst_ip), dst_port)
