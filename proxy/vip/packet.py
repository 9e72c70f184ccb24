"""VRRPv3 advertisement codec (RFC 5798 section 5), sans-I/O.

The wire format (RFC 5798 5.1/5.2)::

    0: version(4) | type(4)      version 3, type 1 = ADVERTISEMENT
    1: VRID                      1..255
    2: priority                  0 = master leaving, 255 = address owner
    3: count of IPvX addresses   at least 1
    4: reserved(4) | max advert interval(12), in centiseconds
    6: checksum                  over the VRRP message WITH the IP pseudo-header
    8: the IPv4 (4 bytes each) or IPv6 (16 bytes each) virtual addresses

Contracts: :func:`encode_advert` raises ``ValueError`` on bad arguments (a
programming error); :func:`decode_advert` and :func:`parse_ipv4_packet` see
bytes from the network and raise only :class:`PacketError` (with a stable
``reason``) whatever they are given.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

VRRP_PROTOCOL = 112  # IANA protocol number (RFC 5798 5.1.1.4)
VRRP_VERSION = 3
TYPE_ADVERTISEMENT = 1
REQUIRED_TTL = 255  # RFC 5798 5.1.1.3 / 7.1: anything else has crossed a router
MULTICAST_V4 = ipaddress.IPv4Address("224.0.0.18")
MULTICAST_V6 = ipaddress.IPv6Address("ff02::12")
HEADER_LEN = 8
MAX_INTERVAL_CS = 0x0FFF  # 12 bits (RFC 5798 5.2.7): 40.95 s

_HEADER = struct.Struct("!BBBBHH")
_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")


class PacketError(Exception):
    """A received packet is unusable; ``reason`` is a stable snake_case tag for logs/metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Advert:
    """One VRRPv3 ADVERTISEMENT. Construction validates every field (``ValueError``)."""

    vrid: int
    priority: int
    max_advert_int_cs: int
    addresses: tuple[IPAddress, ...]
    version: int = VRRP_VERSION

    def __post_init__(self) -> None:
        if self.version != VRRP_VERSION:
            raise ValueError(f"only VRRP version {VRRP_VERSION} is supported")
        if not 1 <= self.vrid <= 255:
            raise ValueError("vrid must be 1..255")
        if not 0 <= self.priority <= 255:
            raise ValueError("priority must be 0..255")
        if not 1 <= self.max_advert_int_cs <= MAX_INTERVAL_CS:
            raise ValueError("max_advert_int_cs must be 1..4095")
        if not 1 <= len(self.addresses) <= 255:
            raise ValueError("an advert carries 1..255 addresses")
        if len({address.version for address in self.addresses}) != 1:
            raise ValueError("an advert's addresses are all IPv4 or all IPv6")

    @property
    def interval(self) -> float:
        """The advertised interval in seconds."""
        return self.max_advert_int_cs / 100.0

    @property
    def family_version(self) -> int:
        """4 or 6: the IP version of the advertised addresses."""
        return self.addresses[0].version


def interval_to_cs(seconds: float) -> int:
    """Seconds -> the 12-bit centisecond field; ``ValueError`` if not representable."""
    centiseconds = round(seconds * 100)
    if not 1 <= centiseconds <= MAX_INTERVAL_CS:
        raise ValueError("advert interval must be 0.01 .. 40.95 s")
    return centiseconds


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement sum, as it goes in the header (0 when ``data`` verifies)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_header(src: IPAddress, dst: IPAddress, length: int, protocol: int = VRRP_PROTOCOL) -> bytes:
    """The IPv4 (RFC 768 style) or IPv6 (RFC 8200 8.1) pseudo-header for a checksum."""
    if src.version != dst.version:
        raise ValueError("source and destination families differ")
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, protocol, length)
    return src.packed + dst.packed + struct.pack("!I3xB", length, protocol)


def encode_advert(advert: Advert, src_ip: IPAddress | str, dst_ip: IPAddress | str) -> bytes:
    """The VRRP payload (no IP header) for ``advert`` sent from ``src_ip`` to ``dst_ip``.

    The checksum covers the pseudo-header (RFC 5798 5.2.8), so the addresses
    must be the ones the kernel will really put in the IP header.
    """
    src, dst = ipaddress.ip_address(src_ip), ipaddress.ip_address(dst_ip)
    if not src.version == dst.version == advert.family_version:
        raise ValueError("addresses, source and destination must share one family")
    body = _HEADER.pack(
        (VRRP_VERSION << 4) | TYPE_ADVERTISEMENT,
        advert.vrid,
        advert.priority,
        len(advert.addresses),
        advert.max_advert_int_cs,  # the 4 reserved bits stay zero
        0,
    ) + b"".join(address.packed for address in advert.addresses)
    checksum = internet_checksum(pseudo_header(src, dst, len(body)) + body)
    return body[:6] + struct.pack("!H", checksum) + body[8:]


def decode_advert(payload: bytes, src_ip: IPAddress | str, dst_ip: IPAddress | str) -> Advert:
    """Parse and verify a received VRRP payload; ``PacketError`` if it must be dropped.

    Checks, in order (RFC 5798 7.1): length, version, type, address family,
    exact length for the address count, checksum, VRID, interval.
    """
    src, dst = _checked_endpoints(src_ip, dst_ip)
    payload = bytes(payload)
    if len(payload) < HEADER_LEN:
        raise PacketError("truncated", f"{len(payload)} bytes")
    version_type, vrid, priority, count, interval_field, _ = _HEADER.unpack_from(payload)
    if version_type >> 4 != VRRP_VERSION:
        raise PacketError("bad_version", str(version_type >> 4))
    if version_type & 0x0F != TYPE_ADVERTISEMENT:
        raise PacketError("bad_type", str(version_type & 0x0F))
    address_len = 4 if src.version == 4 else 16
    _check_length(len(payload), count, address_len)
    if internet_checksum(pseudo_header(src, dst, len(payload)) + payload) != 0:
        raise PacketError("bad_checksum")
    if vrid == 0:
        raise PacketError("bad_vrid", "0")
    interval_cs = interval_field & MAX_INTERVAL_CS  # reserved bits are ignored on receipt
    if interval_cs == 0:
        raise PacketError("zero_interval")
    return Advert(vrid, priority, interval_cs, _addresses(payload, count, address_len))


def _checked_endpoints(src_ip: object, dst_ip: object) -> tuple[IPAddress, IPAddress]:
    try:
        src, dst = ipaddress.ip_address(src_ip), ipaddress.ip_address(dst_ip)  # type: ignore[arg-type]
    except ValueError as exc:
        raise PacketError("bad_endpoint", str(exc)) from None
    if src.version != dst.version:
        raise PacketError("wrong_family", "source and destination families differ")
    return src, dst


def _check_length(length: int, count: int, address_len: int) -> None:
    if count == 0:
        raise PacketError("no_addresses")
    if length == HEADER_LEN + count * address_len:
        return
    other_len = 20 - address_len  # 16 for IPv4, 4 for IPv6
    if length == HEADER_LEN + count * other_len:
        raise PacketError("wrong_family", f"addresses are {other_len} bytes")
    if length < HEADER_LEN + count * address_len:
        raise PacketError("truncated", f"{count} addresses announced, {length} bytes")
    raise PacketError("count_mismatch", f"{count} addresses announced, {length} bytes")


def _addresses(payload: bytes, count: int, address_len: int) -> tuple[IPAddress, ...]:
    factory = ipaddress.IPv4Address if address_len == 4 else ipaddress.IPv6Address
    return tuple(
        factory(payload[offset : offset + address_len])
        for offset in range(HEADER_LEN, HEADER_LEN + count * address_len, address_len)
    )


def parse_ipv4_packet(
    datagram: bytes, *, required_ttl: int | None = REQUIRED_TTL
) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, int, int, bytes]:
    """Split what a Linux raw IPv4 socket delivers into ``(src, dst, ttl, protocol, payload)``.

    Linux raw sockets hand over the IP header as received (total length in
    network order). ``PacketError`` on a malformed header or bad header
    checksum, and on a TTL other than ``required_ttl`` (RFC 5798 7.1: a VRRP
    packet with TTL != 255 came through a router and MUST be discarded);
    pass ``required_ttl=None`` to skip that check. Link-layer padding after
    the IP total length is dropped.
    """
    datagram = bytes(datagram)
    if len(datagram) < _IPV4_HEADER.size:
        raise PacketError("truncated", "shorter than an IPv4 header")
    fields = _IPV4_HEADER.unpack_from(datagram)
    version_ihl, _, total_length, _, _, ttl, protocol, _, src, dst = fields
    header_len = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4:
        raise PacketError("bad_ip_header", "not IPv4")
    if header_len < _IPV4_HEADER.size or header_len > len(datagram):
        raise PacketError("bad_ip_header", "bad header length")
    if not header_len <= total_length <= len(datagram):
        raise PacketError("bad_ip_header", "bad total length")
    if internet_checksum(datagram[:header_len]) != 0:
        raise PacketError("bad_ip_header", "bad header checksum")
    if required_ttl is not None and ttl != required_ttl:
        raise PacketError("bad_ttl", str(ttl))
    payload = datagram[header_len:total_length]
    return ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst), ttl, protocol, payload


def check_hop_limit(hop_limit: int, *, required: int = REQUIRED_TTL) -> None:
    """IPv6 counterpart of the TTL check (the hop limit comes from IPV6_RECVHOPLIMIT)."""
    if hop_limit != required:
        raise PacketError("bad_ttl", str(hop_limit))


def virtual_mac(vrid: int, version: int = 4) -> bytes:
    """The VRRP virtual MAC 00:00:5e:00:01:VRID (IPv4) or 00:00:5e:00:02:VRID (IPv6), RFC 5798 7.3."""
    if not 1 <= vrid <= 255:
        raise ValueError("vrid must be 1..255")
    return bytes((0x00, 0x00, 0x5E, 0x00, 0x01 if version == 4 else 0x02, vrid))
