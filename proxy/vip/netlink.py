"""Linux plumbing for the VIP: address leases (rtnetlink via pyroute2) and VRRP raw sockets.

Everything works in the current network namespace (plain ``IPRoute()``), so a
Warren process started with ``ip netns exec`` manages that namespace.

pyroute2 calls block: each ``*_sync`` function opens its own short-lived
IPRoute unless given one (``ipr=``), and has an ``async`` twin that runs it in
``trio.to_thread.run_sync``. :class:`RouteSocket` keeps one IPRoute open for
a process and lends it to one worker thread at a time: opening an IPRoute
costs more than the request itself (about 2 ms against 0.3 ms here). The one
request on a failover's critical path, adding the leases, has a non-blocking
form that needs no thread (:class:`LeaseRequests`). Raising contract: a
missing interface raises :class:`InterfaceNotFound`; other kernel refusals surface as
``pyroute2.NetlinkError`` from the ``*_sync`` functions (not an ``OSError``
subclass: it has ``.code``), and as ``OSError`` from :class:`RouteSocket`
and :class:`LeaseRequests`, which the VIP instance uses.

Leases. The VIP is configured with a finite ``valid_lft`` and renewed while
Warren is master: if Warren is SIGKILLed (or hangs) the kernel deletes the
address by itself once the lifetime runs out, instead of leaving two hosts
holding it (keepalived's failure mode); a SIGSTOPped master loses it the same
way. Lifetimes are whole seconds. Measured on this kernel (6.18): an IPv4
address added with valid_lft 2 is gone 1.96-1.98 s later, i.e. the kernel
honours IFA_CACHEINFO for IPv4 to within tens of milliseconds (see
tests/integration/test_vip_netlink.py). Renewing uses NLM_F_REPLACE, which
updates the lifetime in place (no delete and re-add, so sockets bound to the
VIP are undisturbed). Suggested: renew at least every second with
``valid_lft = max(2, ceil(Master_Down_Interval))``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import ipaddress
import math
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWADDR
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from proxy.vip.packet import MULTICAST_V4, MULTICAST_V6, REQUIRED_TTL, VRRP_PROTOCOL, IPAddress

IFA_F_NODAD = 0x02  # IPv6: the VIP moves between hosts, DAD would only delay it or fail it
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
FOREVER = 0xFFFFFFFF  # the kernel's "infinite lifetime"
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)

_T = TypeVar("_T")


class InterfaceNotFound(LookupError):
    """No interface of that name in this network namespace."""


class LinkState(enum.StrEnum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class AddressInfo:
    """An address on an interface; lifetimes are the kernel's remaining seconds (None: forever)."""

    interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    valid_lft: int | None
    preferred_lft: int | None

    @property
    def ip(self) -> IPAddress:
        return self.interface.ip


# -- rtnetlink (blocking) -----------------------------------------------------------


def _index(ipr: IPRoute, ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)  # an ioctl, not a netlink dump
    except OSError:
        raise InterfaceNotFound(ifname) from None


@contextlib.contextmanager
def _route(ipr: IPRoute | None) -> Iterator[IPRoute]:
    """The IPRoute given (left open), else a fresh one closed after use."""
    if ipr is not None:
        yield ipr
        return
    with IPRoute() as fresh:
        yield fresh


class RouteSocket:
    """One IPRoute kept open, used by one worker thread at a time.

    Kernel refusals come out as ``OSError`` (errno = the netlink error code).

    ``await route.run(add_lease_sync, ifname, address, lifetime)`` calls the
    function with ``ipr=`` this socket in a worker thread. A socket-level
    failure (not a kernel refusal) drops the socket; the next call opens a
    new one.
    """

    def __init__(self) -> None:
        self._ipr: IPRoute | None = None
        self._limiter: trio.CapacityLimiter | None = None

    async def run(self, function: Callable[..., _T], *args: Any) -> _T:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(1)
        return await trio.to_thread.run_sync(self._call, function, args, limiter=self._limiter)

    def _call(self, function: Callable[..., _T], args: tuple) -> _T:
        if self._ipr is None:
            self._ipr = IPRoute()
        try:
            return function(*args, ipr=self._ipr)
        except NetlinkError as refusal:
            # A kernel refusal; the socket is fine. pyroute2's NetlinkError is
            # not an OSError: callers catch OSError for every host failure.
            raise OSError(refusal.code, os.strerror(refusal.code)) from refusal
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


def _as_interface(address: object) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    # A bare address means a host route: /32 or /128 (keepalived's default too).
    return ipaddress.ip_interface(address)  # type: ignore[arg-type]


def _lifetime(seconds: float | None) -> int:
    if seconds is None:
        return FOREVER
    if seconds <= 0:
        raise ValueError("a lifetime must be positive")
    return min(math.ceil(seconds), FOREVER)


def add_lease_sync(
    ifname: str, address: object, valid_lft: float | None, preferred_lft: float | None = None,
    *, ipr: IPRoute | None = None,
) -> None:
    """Add ``address`` (``"10.0.0.5/24"``, bare = /32) or refresh its lifetimes in place.

    ``valid_lft``: seconds until the kernel deletes the address unless renewed
    (None: permanent). ``preferred_lft`` defaults to ``valid_lft`` and cannot
    exceed it. IPv6 addresses are added without duplicate address detection.
    """
    interface = _as_interface(address)
    valid = _lifetime(valid_lft)
    preferred = valid if preferred_lft is None else _lifetime(preferred_lft)
    if preferred > valid:
        raise ValueError("preferred_lft cannot exceed valid_lft")
    flags = IFA_F_NODAD if interface.version == 6 else 0
    with _route(ipr) as ipr:
        ipr.addr(
            "replace",
            index=_index(ipr, ifname),
            address=str(interface.ip),
            prefixlen=interface.network.prefixlen,
            valid_lft=valid,
            preferred_lft=preferred,
            flags=flags,
        )


renew_lease_sync = add_lease_sync  # NLM_F_REPLACE: same call, the lifetime restarts


class LeaseRequests:
    """Adds or renews address leases from the event loop itself, without a thread.

    The kernel handles an rtnetlink request inside the ``send()`` that
    carries it (``rtnetlink_rcv`` runs in the sender's context) and queues
    the acknowledgement before ``send()`` returns, so a non-blocking netlink
    socket never waits: the request costs tens of microseconds where a trip
    through a worker thread and pyroute2's blocking request costs 1-2 ms,
    which a host becoming master would pay before its gratuitous ARP. The
    messages are pyroute2's ``ifaddrmsg``, encoded once per address and
    lifetime (only the sequence number changes). Same request and contract
    as :func:`add_lease_sync` (NLM_F_REPLACE: add, or restart the lifetimes
    in place): :class:`InterfaceNotFound`, or ``OSError`` (errno = the
    netlink error code) for a kernel refusal. A missing acknowledgement
    raises ``OSError`` and drops the socket (the next request opens a new one).
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._encoded: dict[tuple[int, str, int], bytearray] = {}
        self._seq = 0

    def add(self, ifname: str, address: object, valid_lft: float | None) -> None:
        message = self.prepare(ifname, address, valid_lft)
        self._seq = self._seq % 0x7FFFFFFF + 1
        struct.pack_into("=I", message, 8, self._seq)  # nlmsghdr.nlmsg_seq
        self._request(bytes(message), self._seq)

    def prepare(self, ifname: str, address: object, valid_lft: float | None) -> bytearray:
        """The request for :meth:`add`, encoded now if it was not yet (pyroute2 takes
        0.1-0.3 ms, which a backup pays ahead rather than when it takes over), and the
        socket it goes out on."""
        self._open()
        index = _index(None, ifname)
        valid = _lifetime(valid_lft)
        key = (index, str(address), valid)
        message = self._encoded.get(key)
        if message is None:
            message = self._encoded[key] = _encode_newaddr(index, _as_interface(address), valid)
        return message

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _open(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.setblocking(False)
            self._sock = sock
        return self._sock

    def _request(self, message: bytes, seq: int) -> None:
        sock = self._open()
        try:
            sock.send(message)
            while True:
                reply = sock.recv(65536)
                length, kind, _flags, reply_seq, _pid = struct.unpack_from("=IHHII", reply)
                if kind == _NLMSG_ERROR and reply_seq == seq and length >= 20:
                    break  # older replies (from a request that failed half-way) are skipped
        except OSError as error:
            self.close()
            if isinstance(error, BlockingIOError):
                raise OSError(errno.EIO, "rtnetlink sent no acknowledgement") from None
            raise
        (code,) = struct.unpack_from("=i", reply, 16)
        if code:
            raise OSError(-code, os.strerror(-code))


_NLMSG_ERROR = 2


def _encode_newaddr(
    index: int, interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface, valid: int
) -> bytearray:
    """RTM_NEWADDR with NLM_F_REPLACE, as ``IPRoute.addr("replace", ...)`` sends it."""
    message = ifaddrmsg()
    message["family"] = socket.AF_INET if interface.version == 4 else socket.AF_INET6
    message["prefixlen"] = interface.network.prefixlen
    message["flags"] = IFA_F_NODAD if interface.version == 6 else 0
    message["index"] = index
    address = str(interface.ip)
    attrs = [("IFA_ADDRESS", address)]
    if interface.version == 4:
        attrs.insert(0, ("IFA_LOCAL", address))
    lifetimes = {"ifa_preferred": valid, "ifa_valid": valid, "cstamp": 0, "tstamp": 0}
    message["attrs"] = attrs + [("IFA_CACHEINFO", lifetimes)]
    message["header"]["type"] = RTM_NEWADDR
    message["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    message.encode()
    return bytearray(message.data)


def list_addresses_sync(ifname: str, *, ipr: IPRoute | None = None) -> list[AddressInfo]:
    """Every IPv4/IPv6 address on ``ifname`` with its remaining lifetimes."""
    with _route(ipr) as ipr:
        messages = ipr.get_addr(index=_index(ipr, ifname))
    return [_address_info(message) for message in messages]


def _address_info(message: Any) -> AddressInfo:
    cache = message.get("IFA_CACHEINFO") or {}
    valid, preferred = cache.get("ifa_valid", FOREVER), cache.get("ifa_preferred", FOREVER)
    interface = ipaddress.ip_interface(f"{message.get('IFA_ADDRESS')}/{message['prefixlen']}")
    return AddressInfo(
        interface, None if valid == FOREVER else valid, None if preferred == FOREVER else preferred
    )


def remove_sync(ifname: str, address: object, *, ipr: IPRoute | None = None) -> bool:
    """Delete every entry of this IP on ``ifname`` whatever its prefix; False if there was none."""
    ip = _as_interface(address).ip
    with _route(ipr) as ipr:
        index = _index(ipr, ifname)
        removed = False
        for message in ipr.get_addr(index=index):
            info = _address_info(message)
            if info.ip == ip:
                removed |= _delete(ipr, index, info.interface)
        return removed


def _delete(ipr: IPRoute, index: int, interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> bool:
    try:
        ipr.addr("del", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen)
    except NetlinkError as exc:
        if exc.code in (errno.EADDRNOTAVAIL, errno.ENOENT):  # it expired or went meanwhile
            return False
        raise
    return True


def remove_stale_sync(
    ifname: str, addresses: Iterable[object], *, ipr: IPRoute | None = None
) -> list[IPAddress]:
    """Start-up cleanup: remove any of ``addresses`` left on ``ifname`` (e.g. by a killed run).

    Returns the IPs that were found and removed.
    """
    wanted = {_as_interface(address).ip for address in addresses}
    with _route(ipr) as ipr:
        present = {info.ip for info in list_addresses_sync(ifname, ipr=ipr)} & wanted
        ordered = sorted(present, key=lambda ip: (ip.version, ip))
        return [ip for ip in ordered if remove_sync(ifname, ip, ipr=ipr)]


def link_state_sync(ifname: str, *, ipr: IPRoute | None = None) -> LinkState:
    """:attr:`LinkState.UP` if the interface is administratively up and has carrier."""
    with _route(ipr) as ipr:
        link = ipr.get_links(_index(ipr, ifname))[0]
    up = link["flags"] & IFF_UP and link["flags"] & IFF_LOWER_UP
    return LinkState.UP if up else LinkState.DOWN


def mac_address_sync(ifname: str, *, ipr: IPRoute | None = None) -> bytes:
    """The interface's hardware address (6 bytes for Ethernet)."""
    with _route(ipr) as ipr:
        link = ipr.get_links(_index(ipr, ifname))[0]
    text = link.get("IFLA_ADDRESS")
    if not text:
        raise InterfaceNotFound(f"{ifname} has no hardware address")
    return bytes.fromhex(text.replace(":", ""))


async def _in_thread(function: Callable[..., _T], *args: Any) -> _T:
    return await trio.to_thread.run_sync(functools.partial(function, *args))


async def add_lease(
    ifname: str, address: object, valid_lft: float | None, preferred_lft: float | None = None
) -> None:
    """Async :func:`add_lease_sync`."""
    await _in_thread(add_lease_sync, ifname, address, valid_lft, preferred_lft)


async def renew_lease(
    ifname: str, address: object, valid_lft: float | None, preferred_lft: float | None = None
) -> None:
    """Async :func:`renew_lease_sync` (restart the lifetimes; re-adds the address if it vanished)."""
    await _in_thread(renew_lease_sync, ifname, address, valid_lft, preferred_lft)


async def remove(ifname: str, address: object) -> bool:
    """Async :func:`remove_sync`."""
    return await _in_thread(remove_sync, ifname, address)


async def remove_stale(ifname: str, addresses: Iterable[object]) -> list[IPAddress]:
    """Async :func:`remove_stale_sync`."""
    return await _in_thread(remove_stale_sync, ifname, list(addresses))


async def list_addresses(ifname: str) -> list[AddressInfo]:
    """Async :func:`list_addresses_sync`."""
    return await _in_thread(list_addresses_sync, ifname)


async def link_state(ifname: str) -> LinkState:
    """Async :func:`link_state_sync`."""
    return await _in_thread(link_state_sync, ifname)


async def mac_address(ifname: str) -> bytes:
    """Async :func:`mac_address_sync`."""
    return await _in_thread(mac_address_sync, ifname)


# -- VRRP raw sockets ---------------------------------------------------------------


def open_vrrp_socket(ifname: str, version: int = 4) -> socket.socket:
    """A non-blocking raw IP protocol 112 socket on ``ifname``, for both directions.

    Receiving: joined to 224.0.0.18 / ff02::12 on that interface and bound to
    the device; it also gets unicast adverts (unicast peers). IPv4 ``recv``
    returns the whole IP datagram (:func:`proxy.vip.packet.parse_ipv4_packet`);
    IPv6 ``recvmsg`` returns the payload and the hop limit as ancillary data
    (:func:`hop_limit_from_ancillary`). Sending: TTL / hop limit 255 for
    multicast and unicast (RFC 5798 5.1.1.3), our own multicast not looped
    back; send with :func:`source_cmsg` so the kernel uses exactly the source
    address the checksum was computed for. Needs CAP_NET_RAW.
    """
    ifindex = socket.if_nametoindex(ifname)
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_RAW, VRRP_PROTOCOL)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        if version == 4:
            _configure_ipv4(sock, ifindex)
        else:
            _configure_ipv6(sock, ifindex)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _configure_ipv4(sock: socket.socket, ifindex: int) -> None:
    mreqn = struct.pack("=4s4si", MULTICAST_V4.packed, b"\x00" * 4, ifindex)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, REQUIRED_TTL)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, REQUIRED_TTL)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)


def _configure_ipv6(sock: socket.socket, ifindex: int) -> None:
    mreq = struct.pack("=16si", MULTICAST_V6.packed, ifindex)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, REQUIRED_TTL)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, REQUIRED_TTL)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)


def source_cmsg(ifindex: int, src_ip: IPAddress) -> tuple[int, int, bytes]:
    """Ancillary data for ``sendmsg`` fixing the outgoing interface and source address.

    IP_PKTINFO / IPV6_PKTINFO: without it the kernel picks the source itself
    and may pick the VIP, which would break the pseudo-header checksum.
    """
    if src_ip.version == 4:
        return socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", ifindex, src_ip.packed, b"\x00" * 4)
    return socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("=16si", src_ip.packed, ifindex)


def send_vrrp(
    sock: socket.socket, payload: bytes, src_ip: IPAddress, dst_ip: IPAddress, ifindex: int
) -> None:
    """Blocking-free send of one VRRP payload (the trio shell may call ``sendmsg`` itself the same way)."""
    sock.sendmsg([payload], [source_cmsg(ifindex, src_ip)], 0, (str(dst_ip), 0))


def hop_limit_from_ancillary(ancdata: Iterable[tuple[int, int, bytes]]) -> int | None:
    """The IPV6_HOPLIMIT value from ``recvmsg`` ancillary data, if present."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_HOPLIMIT and len(data) >= 4:
            return struct.unpack("=i", data[:4])[0]
    return None
