"""The host side of one VRRP instance, for trio: raw socket, plumbing, address keeper.

- :class:`VrrpChannel` wraps the raw IP protocol 112 socket of
  :func:`proxy.vip.netlink.open_vrrp_socket`: ``receive_nowait()`` reads what
  arrived with the addresses the checksum needs, ``send()`` transmits one advert.
- :class:`LinuxPlumbing` is everything else done to the host (address leases,
  link state, announcement frames), each blocking rtnetlink call moved off the
  trio thread. :class:`Plumbing` / :class:`Channel` are what
  :class:`proxy.vip.instance.VipInstance` needs of them, so unit tests
  substitute in-memory fakes.
- :class:`AddressKeeper` turns the machine's Take/Release/SendGratuitous into
  host state: leases renewed while held, removed when released, announced once
  really configured; a new master's first lease and announcement go out at
  once (:meth:`AddressKeeper.take_over`).
"""

from __future__ import annotations

import collections
import ipaddress
import math
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import trio

from proxy.config.model import Vip
from proxy.vip import netlink
from proxy.vip.garp import FrameSender, GarpPlan, announcement_frames, format_mac
from proxy.vip.netlink import InterfaceNotFound
from proxy.vip.packet import IPAddress, PacketError, check_hop_limit, parse_ipv4_packet

log = structlog.get_logger("warren.vip")

RETRY_DELAY = 0.5  # after a failed rtnetlink operation
_HOST_ERRORS = (OSError, InterfaceNotFound)

_MAX_DATAGRAM = 65535
_IPV6_PKTINFO = struct.Struct("=16si")


@dataclass(frozen=True, slots=True)
class Received:
    """One VRRP packet: the IP header's addresses and the VRRP message (plus any auth trailer)."""

    src: IPAddress
    dst: IPAddress
    payload: bytes


class VrrpChannel:
    """A raw VRRP socket on one interface (see ``open_vrrp_socket`` for what it joins).

    ``wait_readable()`` returns once a packet is queued (``trio.ClosedResourceError``
    if the channel is closed meanwhile); ``receive_nowait()`` reads the next one
    or raises ``trio.WouldBlock``. Reading never waits, so a packet is never held
    across a checkpoint: whoever reads it (the receive task, or the timer task
    draining the queue before a deadline takes effect) feeds it to the machine at
    once, in arrival order. ``receive_nowait()`` raises :class:`PacketError` for a
    packet that must be dropped before its VRRP content is even looked at (bad IP
    header, TTL / hop limit other than 255); the caller counts it and reads on.
    ``send()`` never blocks: ``OSError`` (ENETDOWN, ENOBUFS, EAGAIN) goes to the caller.
    """

    def __init__(self, ifname: str, version: int) -> None:
        raw = netlink.open_vrrp_socket(ifname, version)
        try:
            if version == 6:
                # The destination (ff02::12 or our unicast address) is part of the checksum.
                raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            self.ifindex = socket.if_nametoindex(ifname)
        except BaseException:
            raw.close()
            raise
        self.ifname = ifname
        self.version = version
        self._raw = raw

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self._raw)

    def receive_nowait(self) -> Received:
        try:
            if self.version == 4:
                src, dst, _, _, payload = parse_ipv4_packet(self._raw.recv(_MAX_DATAGRAM))
                return Received(src, dst, payload)
            return self._receive_v6()
        except BlockingIOError:
            raise trio.WouldBlock from None

    def _receive_v6(self) -> Received:
        space = socket.CMSG_SPACE(4) + socket.CMSG_SPACE(_IPV6_PKTINFO.size)
        payload, ancillary, _, address = self._raw.recvmsg(_MAX_DATAGRAM, space)
        check_hop_limit(netlink.hop_limit_from_ancillary(ancillary) or 0)
        dst = _destination_v6(ancillary)
        if dst is None:
            raise PacketError("bad_ip_header", "no IPV6_PKTINFO")
        src = ipaddress.IPv6Address(address[0].split("%")[0])
        return Received(src, dst, payload)

    def send(self, payload: bytes, src: IPAddress, dst: IPAddress) -> None:
        netlink.send_vrrp(self._raw, payload, src, dst, self.ifindex)

    def close(self) -> None:
        if self._raw.fileno() != -1:
            trio.lowlevel.notify_closing(self._raw)  # a task in wait_readable() gets ClosedResourceError
            self._raw.close()


def _destination_v6(ancillary: Iterable[tuple[int, int, bytes]]) -> ipaddress.IPv6Address | None:
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= _IPV6_PKTINFO.size:
            return ipaddress.IPv6Address(_IPV6_PKTINFO.unpack_from(data)[0])
    return None


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """An interface as the instance needs it; ``index`` is None when it does not exist."""

    up: bool
    index: int | None


class LinuxPlumbing:
    """The host operations of :class:`proxy.vip.instance.VipInstance`, for real.

    Raising contract: :class:`proxy.vip.netlink.InterfaceNotFound` when the
    interface is missing; other kernel refusals as ``OSError``. Netlink
    requests share one open socket (:class:`proxy.vip.netlink.RouteSocket`),
    except lease requests, which are non-blocking
    (:class:`proxy.vip.netlink.LeaseRequests`); announcement frames go out on
    packet sockets kept open per interface (:class:`proxy.vip.garp.FrameSender`).
    """

    def __init__(self) -> None:
        self._route = netlink.RouteSocket()
        self._leases = netlink.LeaseRequests()
        self._frames = FrameSender()

    def open_channel(self, ifname: str, version: int) -> VrrpChannel:
        return VrrpChannel(ifname, version)

    async def link(self, ifname: str) -> LinkInfo:
        return await self._route.run(_link_sync, ifname)

    async def interface_ips(self, ifname: str) -> list[IPAddress]:
        return [info.ip for info in await self._route.run(netlink.list_addresses_sync, ifname)]

    async def mac_address(self, ifname: str) -> bytes:
        return await self._route.run(netlink.mac_address_sync, ifname)

    async def add_leases(self, ifname: str, addresses: Iterable[str], lifetime: float | None) -> None:
        self.add_leases_now(ifname, addresses, lifetime)

    def add_leases_now(self, ifname: str, addresses: Iterable[str], lifetime: float | None) -> None:
        # Non-blocking: the kernel answers within the send (netlink.LeaseRequests).
        for address in addresses:
            self._leases.add(ifname, address, lifetime)

    def prepare_leases(self, ifname: str, addresses: Iterable[str], lifetime: float | None) -> None:
        for address in addresses:
            self._leases.prepare(ifname, address, lifetime)

    async def remove_addresses(self, ifname: str, addresses: Iterable[str]) -> None:
        await self._route.run(_remove_all_sync, ifname, list(addresses))

    async def remove_stale(self, ifname: str, addresses: Iterable[str]) -> list[IPAddress]:
        return await self._route.run(netlink.remove_stale_sync, ifname, list(addresses))

    def send_frames(self, ifname: str, frames: list[bytes]) -> int:
        return self._frames.send(ifname, frames)


def _link_sync(ifname: str, *, ipr: Any = None) -> LinkInfo:
    try:
        index = socket.if_nametoindex(ifname)
        up = netlink.link_state_sync(ifname, ipr=ipr) is netlink.LinkState.UP
    except (OSError, netlink.InterfaceNotFound):
        return LinkInfo(up=False, index=None)
    return LinkInfo(up=up, index=index)


def _remove_all_sync(ifname: str, addresses: list[str], *, ipr: Any = None) -> None:
    for address in addresses:
        netlink.remove_sync(ifname, address, ipr=ipr)


class Channel(Protocol):
    ifindex: int

    async def wait_readable(self) -> None: ...

    def receive_nowait(self) -> Received: ...

    def send(self, payload: bytes, src: IPAddress, dst: IPAddress) -> None: ...

    def close(self) -> None: ...


class Plumbing(Protocol):
    """What the instance does to the host; :class:`proxy.vip.rawsock.LinuxPlumbing` for real."""

    def open_channel(self, ifname: str, version: int) -> Channel: ...

    async def link(self, ifname: str) -> LinkInfo: ...

    async def interface_ips(self, ifname: str) -> list[IPAddress]: ...

    async def mac_address(self, ifname: str) -> bytes: ...

    async def add_leases(self, ifname: str, addresses: Iterable[str], lifetime: float | None) -> None: ...

    def add_leases_now(self, ifname: str, addresses: Iterable[str], lifetime: float | None) -> None:
        """``add_leases`` without waiting; ``BlockingIOError`` when that cannot be done
        (then ``add_leases``), ``OSError`` / ``InterfaceNotFound`` as ``add_leases``."""

    def prepare_leases(self, ifname: str, addresses: Iterable[str], lifetime: float | None) -> None:
        """Get ``add_leases_now`` ready for these addresses (best effort, same errors)."""

    async def remove_addresses(self, ifname: str, addresses: Iterable[str]) -> None: ...

    async def remove_stale(self, ifname: str, addresses: Iterable[str]) -> list[IPAddress]: ...

    def send_frames(self, ifname: str, frames: list[bytes]) -> int: ...


class AddressKeeper:
    """Converges the interface to what the machine wants: addresses held (renewed leases) or not.

    ``hold``/``release``/``announce`` only record the wish and wake the task,
    so a quick hold-release-hold never races: the task always acts on the
    latest wish. Announcements start only after the addresses were added
    (a client redirected by gratuitous ARP must find the address configured)
    and stop when they are released. :meth:`take_over` (a new master) adds
    the addresses and sends the first announcement on the caller's stack
    when it can, the task doing the rest (logs, the rest of the plan).
    """

    def __init__(
        self,
        config: Vip,
        ips: tuple[IPAddress, ...],
        plumbing: Plumbing,
        counters: collections.Counter,
        *,
        before_renewing: Callable[[], None] = lambda: None,
    ) -> None:
        self._config = config
        self._before_renewing = before_renewing
        self._ips = ips
        self._plumbing = plumbing
        self._counters = counters
        self._plan = GarpPlan(
            config.garp.burst, config.garp.burst_delay, config.garp.repeat_after,
            config.garp.refresh, config.garp.refresh_burst,
        )  # fmt: skip
        # The kernel counts lifetimes in whole seconds: renew well within one.
        self._renew_every = min(1.0, config.lease / 3) if config.lease else math.inf
        self._want = False
        self._present = False  # the addresses may be on the interface
        self._configured = False  # the last add succeeded (and nothing removed them since)
        self._announce_pending = False
        self._failing = False
        self._wake = trio.Event()
        self._announce_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        # The interface's MAC and the announcement frames, made ahead: a new master announces at once.
        self._mac: bytes | None = None
        self._frames: list[bytes] | None = None
        self._added_now = False  # take_over() added the addresses; the task logs it
        self._retry_later = False  # take_over() failed to add them: the task retries after RETRY_DELAY
        self._announced_now = False  # take_over() sent the plan's first frames
        self.released = trio.Event()
        self.released.set()

    def hold(self) -> None:
        self._want = True
        if self.released.is_set():
            self.released = trio.Event()
        self._wake.set()

    def release(self) -> None:
        self._want = False
        self._announce_pending = self._announced_now = False
        self._announce_scope.cancel()
        if not self._present:
            self.released.set()
        self._wake.set()

    def announce(self) -> None:
        if self._want:
            self._announce_pending = True
            self._wake.set()

    def take_over(self) -> None:
        """``hold()`` and ``announce()``, for a host becoming master; clients follow its
        gratuitous ARP, so the lease and the first announcement go out before this returns
        (a non-blocking rtnetlink request and a packet-socket send, prepared ahead), and
        only then anything else (logs, the rest of the plan) from the task. When that
        cannot be done on the spot (no MAC yet, the plumbing would wait, an error), the
        task does it all as after ``hold()`` + ``announce()``, retrying and logging failures.
        """
        self.hold()
        self.announce()
        self._announced_now = False
        if self._present or self._mac is None or self._frames is None:
            return
        config = self._config
        self._present = True  # from here on the addresses may be there: a release removes them
        try:
            self._plumbing.add_leases_now(config.interface, config.addresses, config.lease)
        except BlockingIOError:
            return  # the task adds them
        except _HOST_ERRORS as error:
            self._lease_failed(error)
            self._retry_later = True
            return
        self._failing = False
        self._configured = self._added_now = True
        try:
            self._plumbing.send_frames(config.interface, self._frames)
        except OSError:
            return  # the plan sends them again
        self._counters["announcements"] += 1
        self._announced_now = True

    def forget_mac(self) -> None:
        """The interface was replaced: look its hardware address up again."""
        self._mac = self._frames = None
        if self._nursery is not None:
            self._nursery.start_soon(self._prefetch_mac)

    async def _fetch_mac(self) -> bytes:
        if self._mac is None:
            mac = await self._plumbing.mac_address(self._config.interface)
            self._mac, self._frames = mac, announcement_frames(mac, self._ips)
        return self._mac

    async def _prefetch_mac(self) -> None:
        """The MAC and frames, and the lease requests, made ready for a takeover."""
        config = self._config
        try:
            await self._fetch_mac()
            self._plumbing.prepare_leases(config.interface, config.addresses, config.lease)
        except _HOST_ERRORS:
            pass  # no interface yet: done when first needed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._prefetch_mac)
            task_status.started()
            while True:
                self._wake = trio.Event()
                delay = await self._converge()
                with trio.move_on_after(delay):
                    await self._wake.wait()

    async def _converge(self) -> float:
        """One step towards the wish; returns how long until the next step is due."""
        if self._added_now:  # by take_over(), a moment ago: only the log is left
            self._added_now = False
            self._log_added()
            if self._want:
                return self._announce_if_pending()
        if self._want and self._present:
            # After a freeze (SIGSTOP, VM pause) this may be the first task to run: the
            # machine decides first whether a master silent that long steps down.
            self._before_renewing()
        if self._want:
            if self._retry_later:
                self._retry_later = False
                return RETRY_DELAY
            if not await self._add():
                return RETRY_DELAY
            return self._announce_if_pending()
        if self._present and not await self._remove():
            return RETRY_DELAY
        return math.inf

    def _announce_if_pending(self) -> float:
        if self._announce_pending and self._want:
            self._start_announcing()
        return self._renew_every

    async def _add(self) -> bool:
        config, first = self._config, not self._configured
        self._present = True
        try:
            await self._plumbing.add_leases(config.interface, config.addresses, config.lease)
        except _HOST_ERRORS as error:
            self._lease_failed(error)
            return False
        self._failing = False
        self._configured = True
        if first:
            self._log_added()
        else:
            self._counters["lease_renewals"] += 1
        return True

    def _lease_failed(self, error: BaseException) -> None:
        self._counters["lease_errors"] += 1
        self._log_failure("vip.lease_failed", error)

    def _log_added(self) -> None:
        config = self._config
        log.info("vip.addresses_added", instance=config.name, addresses=list(config.addresses), lease=config.lease)

    async def _remove(self) -> bool:
        config = self._config
        try:
            await self._plumbing.remove_addresses(config.interface, config.addresses)
        except InterfaceNotFound:
            pass  # the addresses went with the interface
        except OSError as error:
            self._counters["remove_errors"] += 1
            self._log_failure("vip.remove_failed", error)
            return False
        self._failing = False
        self._present = self._configured = False
        if not self._want:
            self.released.set()
        log.info("vip.addresses_removed", instance=config.name, addresses=list(config.addresses))
        return True

    async def remove_now(self) -> None:
        """Last-resort removal when the instance ends without :meth:`release` being carried out."""
        self._want = self._added_now = self._retry_later = False
        if self._present:
            await self._remove()

    def _log_failure(self, event: str, error: BaseException) -> None:
        if not self._failing:  # once per failure streak, not every retry
            self._failing = True
            log.error(event, instance=self._config.name, interface=self._config.interface, error=str(error))

    def _start_announcing(self) -> None:
        assert self._nursery is not None
        self._announce_pending = False
        self._announce_scope.cancel()  # restart, not stack, a running plan
        self._announce_scope = trio.CancelScope()
        sent_first, self._announced_now = self._announced_now, False
        self._nursery.start_soon(self._announce, self._announce_scope, sent_first)

    async def _announce(self, scope: trio.CancelScope, sent_first: bool) -> None:
        """The announcement plan; its first frames already went out if ``sent_first`` (take_over)."""
        config = self._config
        with scope:
            try:
                mac = await self._fetch_mac()
            except _HOST_ERRORS as error:
                self._counters["announce_errors"] += 1
                log.warning("vip.announce_failed", instance=config.name, error=str(error))
                return
            frames = self._frames or announcement_frames(mac, self._ips)
            addresses = [str(ip) for ip in self._ips]
            log.info("vip.announcing", instance=config.name, mac=format_mac(mac), addresses=addresses)
            times = self._plan.send_times(trio.current_time())
            if sent_first:
                next(times, None)
            for at in times:
                await trio.sleep_until(at)
                try:
                    self._plumbing.send_frames(config.interface, frames)
                except OSError as error:
                    self._counters["announce_errors"] += 1
                    log.debug("vip.announce_failed", instance=config.name, error=str(error))
                    continue
                self._counters["announcements"] += 1
