"""Announcing a VIP on the wire: gratuitous ARP / unsolicited neighbour advertisement.

Frame building and the :class:`GarpPlan` schedule are sans-I/O; only
:class:`FrameSender` touches sockets (AF_PACKET, so it needs CAP_NET_RAW).

Linux hosts (arp_accept=0, the default) ignore a gratuitous ARP for an address
they have no entry for, but update an existing entry: exactly what moving a VIP
needs. Likewise an unsolicited NA with the override flag updates an existing
neighbour entry (RFC 4861 7.2.5/7.2.6).
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import itertools
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from proxy.vip.packet import IPAddress, internet_checksum, pseudo_header

BROADCAST_MAC = b"\xff" * 6
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ARP_REQUEST = 1
ICMPV6_PROTOCOL = 58
ICMPV6_NEIGHBOR_ADVERT = 136
NA_FLAG_OVERRIDE = 0x20000000  # R=0 (not a router), S=0 (unsolicited), O=1
OPTION_TARGET_LINK_LAYER = 2
ALL_NODES_V6 = ipaddress.IPv6Address("ff02::1")
MIN_FRAME_LEN = 60  # Ethernet minimum without FCS; short frames are zero-padded

_ETHERNET = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV6 = struct.Struct("!IHBB16s16s")


def parse_mac(text: str) -> bytes:
    """``"aa:bb:cc:dd:ee:ff"`` -> 6 bytes (``ValueError`` otherwise)."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(part) == 2 for part in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(part, 16) for part in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in mac)


def _check_mac(mac: bytes) -> None:
    if len(mac) != 6:
        raise ValueError("a MAC address is 6 bytes")


def _pad(frame: bytes) -> bytes:
    return frame.ljust(MIN_FRAME_LEN, b"\x00")


def gratuitous_arp(mac: bytes, address: ipaddress.IPv4Address) -> bytes:
    """Broadcast ARP request with sender = (mac, address) and target IP = address.

    The target hardware address is zero, as in an RFC 5227 ARP announcement.
    """
    _check_mac(mac)
    ethernet = _ETHERNET.pack(BROADCAST_MAC, mac, ETH_P_ARP)
    arp = _ARP.pack(1, 0x0800, 6, 4, ARP_REQUEST, mac, address.packed, b"\x00" * 6, address.packed)
    return _pad(ethernet + arp)


def unsolicited_na(
    mac: bytes, target: ipaddress.IPv6Address, source: ipaddress.IPv6Address | None = None
) -> bytes:
    """Unsolicited neighbour advertisement for ``target`` to ff02::1 (RFC 4861 4.4, 7.2.6).

    Override flag set, target link-layer address option, hop limit 255,
    ICMPv6 checksum over the IPv6 pseudo-header. ``source`` (an address on
    the interface) defaults to ``target`` itself.
    """
    _check_mac(mac)
    source = source or target
    option = struct.pack("!BB6s", OPTION_TARGET_LINK_LAYER, 1, mac)
    icmp = struct.pack("!BBHI16s", ICMPV6_NEIGHBOR_ADVERT, 0, 0, NA_FLAG_OVERRIDE, target.packed) + option
    checksum = internet_checksum(pseudo_header(source, ALL_NODES_V6, len(icmp), ICMPV6_PROTOCOL) + icmp)
    icmp = icmp[:2] + struct.pack("!H", checksum) + icmp[4:]
    ipv6 = _IPV6.pack(6 << 28, len(icmp), ICMPV6_PROTOCOL, 255, source.packed, ALL_NODES_V6.packed)
    # RFC 2464 7: IPv6 multicast maps to 33:33 + the low 32 bits of the group.
    ethernet = _ETHERNET.pack(b"\x33\x33" + ALL_NODES_V6.packed[-4:], mac, ETH_P_IPV6)
    return _pad(ethernet + ipv6 + icmp)


def announcement_frames(mac: bytes, addresses: Iterable[IPAddress]) -> list[bytes]:
    """One announcement frame per address: gratuitous ARP for IPv4, unsolicited NA for IPv6."""
    return [
        gratuitous_arp(mac, address) if address.version == 4 else unsolicited_na(mac, address)
        for address in addresses
    ]


@dataclass(frozen=True, slots=True)
class GarpPlan:
    """When to (re)send the announcement frames after becoming master.

    A *round* sends the frames ``burst`` times, ``burst_delay`` seconds apart.
    Rounds: one at once; one more ``repeat_after`` seconds later (keepalived's
    garp_master_delay, because switches and hosts that missed the first round
    otherwise keep the old MAC); then, if ``refresh`` is set, a round of
    ``refresh_burst`` sends every ``refresh`` seconds while master.
    Defaults mirror keepalived's 5 + 5 after 5 s.
    """

    burst: int = 5
    burst_delay: float = 0.01
    repeat_after: float | None = 5.0
    refresh: float | None = None
    refresh_burst: int = 1

    def __post_init__(self) -> None:
        if self.burst < 1 or self.refresh_burst < 1:
            raise ValueError("a round sends at least once")
        if self.burst_delay < 0:
            raise ValueError("burst_delay must be >= 0")
        if self.repeat_after is not None and self.repeat_after <= (self.burst - 1) * self.burst_delay:
            raise ValueError("repeat_after must leave room for the first round")
        if self.refresh is not None and self.refresh <= 0:
            raise ValueError("refresh must be > 0")

    def send_times(self, start: float) -> Iterator[float]:
        """Absolute times to send the frames at, in order; endless when ``refresh`` is set."""
        return heapq.merge(self._first_rounds(start), self._refresh_rounds(start))

    def _first_rounds(self, start: float) -> Iterator[float]:
        yield from self._round(start, self.burst)
        if self.repeat_after is not None:
            yield from self._round(start + self.repeat_after, self.burst)

    def _refresh_rounds(self, start: float) -> Iterator[float]:
        if self.refresh is None:
            return
        for rounds in itertools.count(1):
            yield from self._round(start + rounds * self.refresh, self.refresh_burst)

    def _round(self, at: float, count: int) -> Iterator[float]:
        for index in range(count):
            yield at + index * self.burst_delay


class FrameSender:
    """Sends raw Ethernet frames, with one packet socket kept open per interface.

    Opening a packet socket is cheap, but closing one waits for an RCU grace
    period (``synchronize_net()`` in the kernel's ``packet_release``: 5-16 ms
    measured on this kind of machine), and the close would block the event
    loop on every burst of a failover. So sockets stay open for the life of
    the process. A socket bound to an interface that was deleted (and perhaps
    recreated under the same name) fails with ENXIO/ENODEV: it is replaced
    and the frames sent once more. The sockets are non-blocking: a full queue
    raises ``BlockingIOError`` instead of stalling the loop. Other failures
    (ENETDOWN, no such interface) raise ``OSError``.
    """

    def __init__(self) -> None:
        self._sockets: dict[str, socket.socket] = {}

    def send(self, ifname: str, frames: Iterable[bytes]) -> int:
        """Send `frames` on `ifname` in order; returns how many were sent."""
        frames = list(frames)
        try:
            return _send_all(self._socket(ifname), frames)
        except OSError as error:
            if error.errno not in _INTERFACE_GONE:
                raise
            self._forget(ifname)
            return _send_all(self._socket(ifname), frames)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def _socket(self, ifname: str) -> socket.socket:
        sock = self._sockets.get(ifname)
        if sock is None:
            # Protocol 0: a send-only socket, the kernel queues nothing for us to read.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                sock.setblocking(False)
                sock.bind((ifname, 0))
            except BaseException:
                sock.close()
                raise
            self._sockets[ifname] = sock
        return sock

    def _forget(self, ifname: str) -> None:
        sock = self._sockets.pop(ifname, None)
        if sock is not None:
            sock.close()


_INTERFACE_GONE = frozenset({errno.ENXIO, errno.ENODEV})


def _send_all(sock: socket.socket, frames: list[bytes]) -> int:
    for frame in frames:
        sock.send(frame)
    return len(frames)


def send_frames(ifname: str, frames: Iterable[bytes]) -> int:
    """Send raw Ethernet frames on ``ifname`` once, with a socket of their own
    (closing it blocks for a few ms: :class:`FrameSender` for repeated sends)."""
    sender = FrameSender()
    try:
        return sender.send(ifname, frames)
    finally:
        sender.close()
