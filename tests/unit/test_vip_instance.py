"""The VRRP instance shell on trio's MockClock, against an in-memory host.

What the shell adds to the (separately specified) state machine: the timer,
the receive path (VRID filter, peers, authentication), address leases and
their renewal, announcements after the address is in place, tracking the
proxy's own health, link faults, graceful stop, notify hooks, statistics.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress

import pytest
import trio
from structlog.testing import capture_logs

from lab import wait_until

from proxy.config.model import Backend, Config, Server, Vip, VipAuth, VipGarp, VipNotify
from proxy.runtime import Runtime
from proxy.supervisor import RestartPolicy
from proxy.vip.auth import sign
from proxy.vip.garp import gratuitous_arp, unsolicited_na
from proxy.vip.instance import VipInstance
from proxy.vip.links import Registration
from proxy.vip.machine import State
from proxy.vip.notify import HookOutcome, Notifier, run_command
from proxy.vip.packet import MULTICAST_V4, MULTICAST_V6, Advert, PacketError, decode_advert, encode_advert
from proxy.vip.rawsock import AddressKeeper, LinkInfo, Received
from proxy.vip.service import VipService, VipStats

V4 = ipaddress.IPv4Address
OWN, PEER, STRANGER = V4("10.0.0.2"), V4("10.0.0.3"), V4("10.0.0.9")
VIP = V4("10.0.0.100")
MAC = bytes.fromhex("02000000aa02")
SECRET = "0123456789abcdef-secret"
# priority 100, interval 1 s: Master_Down_Interval = 3 + 156/256 s
MASTER_DOWN = 3 + 156 / 256


def vip_config(**changes) -> Vip:
    fields = dict(name="vip1", interface="eth0", vrid=51, addresses=("10.0.0.100/24",), lease=4.0)
    fields.update(changes)
    return Vip(**fields)


class FakeChannel:
    """A raw socket: what is delivered waits in its receive queue until read."""

    def __init__(self, ifindex: int) -> None:
        self.ifindex = ifindex
        self.sent: list[tuple[float, bytes, V4, V4]] = []
        self.closed = False
        self._queue: collections.deque[Received | Exception] = collections.deque()
        self._readable = trio.Event()

    async def wait_readable(self) -> None:
        if self._queue:
            await trio.lowlevel.checkpoint()
            return
        self._readable = trio.Event()
        await self._readable.wait()

    def receive_nowait(self) -> Received:
        if not self._queue:
            raise trio.WouldBlock
        item = self._queue.popleft()
        if isinstance(item, Exception):
            raise item
        return item

    def send(self, payload: bytes, src, dst) -> None:
        self.sent.append((trio.current_time(), payload, src, dst))

    def close(self) -> None:
        self.closed = True

    def deliver(self, item: Received | Exception) -> None:
        self._queue.append(item)
        self._readable.set()


class FakeHost:
    """The host as the instance sees it: one interface, its addresses, the wire."""

    def __init__(self) -> None:
        self.link_info = LinkInfo(up=True, index=2)
        self.ips = [OWN]
        self.configured: dict[str, float | None] = {}
        self.log: list[tuple[float, str]] = []  # (time, "add"/"remove"/"stale"/"open")
        self.lifetimes: list[float | None] = []
        self.frames: list[tuple[float, list[bytes]]] = []
        self.channels: list[FakeChannel] = []
        self.stale: list[str] = []
        self.add_failures = 0
        self.add_gate: trio.Event | None = None
        self.prepared: list[float | None] = []
        self.on_frames = lambda: None

    @property
    def channel(self) -> FakeChannel:
        return self.channels[-1]

    def open_channel(self, ifname: str, version: int) -> FakeChannel:
        self.log.append((trio.current_time(), "open"))
        self.channels.append(FakeChannel(self.link_info.index))
        return self.channels[-1]

    async def link(self, ifname: str) -> LinkInfo:
        await trio.lowlevel.checkpoint()
        return self.link_info

    async def interface_ips(self, ifname: str):
        await trio.lowlevel.checkpoint()
        return list(self.ips) + [ipaddress.ip_interface(a).ip for a in self.configured]

    async def mac_address(self, ifname: str) -> bytes:
        await trio.lowlevel.checkpoint()
        return MAC

    async def add_leases(self, ifname, addresses, lifetime) -> None:
        if self.add_gate is not None:
            await self.add_gate.wait()
        await trio.lowlevel.checkpoint()
        self._add(addresses, lifetime)

    def add_leases_now(self, ifname, addresses, lifetime) -> None:
        if self.add_gate is not None and not self.add_gate.is_set():
            raise BlockingIOError  # the gated request must wait: add_leases
        self._add(addresses, lifetime)

    def prepare_leases(self, ifname, addresses, lifetime) -> None:
        self.prepared.append(lifetime)

    def _add(self, addresses, lifetime) -> None:
        if self.add_failures:
            self.add_failures -= 1
            raise OSError(19, "No such device")
        self.log.append((trio.current_time(), "add"))
        self.lifetimes.append(lifetime)
        self.configured.update({address: lifetime for address in addresses})

    async def remove_addresses(self, ifname, addresses) -> None:
        await trio.lowlevel.checkpoint()
        self.log.append((trio.current_time(), "remove"))
        for address in addresses:
            self.configured.pop(address, None)

    async def remove_stale(self, ifname, addresses):
        await trio.lowlevel.checkpoint()
        self.log.append((trio.current_time(), "stale"))
        return [ipaddress.ip_interface(a).ip for a in addresses if a in self.stale]

    def send_frames(self, ifname, frames) -> int:
        self.on_frames()
        self.frames.append((trio.current_time(), frames))
        return len(frames)

    # -- what went out on the wire ----------------------------------------------------

    def adverts(self, since: float = -1.0) -> list[tuple[float, int, V4]]:
        """(time, priority, destination) of every advert sent on any socket."""
        out = []
        for channel in self.channels:
            for at, payload, src, dst in channel.sent:
                if at >= since:
                    out.append((at, decode_advert(payload[: 8 + 4], src, dst).priority, dst))
        return sorted(out, key=lambda item: item[0])


def advert_from(src: V4, priority: int, *, vrid: int = 51, dst: V4 = MULTICAST_V4, key: str | None = None,
                seq: int = 1) -> Received:
    payload = encode_advert(Advert(vrid, priority, 100, (VIP,)), src, dst)
    if key is not None:
        payload = sign(payload, seq, key.encode(), src, dst)
    return Received(src, dst, payload)


async def start(nursery, host: FakeHost, config: Vip | None = None, **kwargs) -> VipInstance:
    instance = VipInstance(config or vip_config(), plumbing=host, **kwargs)
    await nursery.start(instance.run)
    return instance


def state(instance: VipInstance) -> State:
    assert instance.machine is not None
    return instance.machine.state


async def heard_as_master_for(host: FakeHost, seconds: float, src: V4 = PEER, priority: int = 200, **kw) -> None:
    """Deliver a peer's adverts every second for ``seconds``."""
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        host.channel.deliver(advert_from(src, priority, **kw))
        await trio.sleep(1)


# -- becoming master ---------------------------------------------------------------------


async def test_a_lone_instance_becomes_master_after_the_master_down_interval(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        await trio.sleep_until(MASTER_DOWN - 0.05)
        assert state(instance) is State.BACKUP
        assert host.configured == {} and host.adverts() == []
        await trio.sleep_until(MASTER_DOWN + 0.05)
        assert state(instance) is State.MASTER
        assert host.configured == {"10.0.0.100/24": 4.0}
        [(at, priority, destination)] = host.adverts()
        assert (priority, destination) == (100, MULTICAST_V4)
        assert at == pytest.approx(MASTER_DOWN)
        nursery.cancel_scope.cancel()


class SlowLinkServer:
    """A peer-link server whose listening socket takes ``stall`` seconds to set up (the real
    one moves it to the top of the descriptor table, which grows the table: an RCU grace
    period once the process has threads)."""

    def __init__(self, clock, stall: float) -> None:
        self.clock, self.stall = clock, stall

    def register(self, address, port, vrid, key, *, ifindex=0, peers=frozenset(), counters=None) -> Registration:
        self.clock.jump(self.stall)  # a blocking call: the event loop's time moves on
        return Registration(address, port, vrid, key, peers, collections.Counter() if counters is None else counters)

    def unregister(self, registration: Registration) -> None:
        pass


async def test_the_master_down_interval_counts_from_the_start_of_the_election_not_from_its_set_up(autojump_clock):
    # Under load a joining backup's set-up took 360 ms, all of its Master_Down_Interval at
    # 100 ms adverts: it took over from a live master 2 ms after it logged vip.started.
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host, links=SlowLinkServer(autojump_clock, stall=2.0))
        started = trio.current_time()
        await trio.sleep_until(started + MASTER_DOWN - 0.05)
        assert state(instance) is State.BACKUP
        await trio.sleep_until(started + MASTER_DOWN + 0.05)
        assert state(instance) is State.MASTER
        nursery.cancel_scope.cancel()


async def test_the_master_advertises_every_interval_and_renews_its_lease(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        await start(nursery, host)
        await trio.sleep_until(MASTER_DOWN + 10.5)
        times = [at for at, _, _ in host.adverts()]
        assert len(times) == 11
        assert all(later - earlier == pytest.approx(1.0) for earlier, later in zip(times, times[1:]))
        adds = [at for at, what in host.log if what == "add"]
        assert len(adds) >= 10  # renewed at least every second: well within the 4 s lifetime
        assert all(later - earlier <= 1.0 + 1e-9 for earlier, later in zip(adds, adds[1:]))
        assert set(host.lifetimes) == {4.0}
        nursery.cancel_scope.cancel()


async def test_a_permanent_address_is_added_once_without_renewals(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        await start(nursery, host, vip_config(lease=None))
        await trio.sleep_until(MASTER_DOWN + 10)
        assert [what for _, what in host.log].count("add") == 1
        assert host.lifetimes == [None]
        nursery.cancel_scope.cancel()


async def test_stale_addresses_are_removed_before_the_instance_reports_started(autojump_clock):
    host = FakeHost()
    host.stale = ["10.0.0.100/24"]
    async with trio.open_nursery() as nursery:
        await start(nursery, host)
        assert [what for _, what in host.log] == ["stale", "open"]
        nursery.cancel_scope.cancel()


async def test_a_frozen_master_steps_down_before_it_renews_its_lease(autojump_clock):
    """SIGSTOP, then SIGCONT after a backup took over: every overdue task wakes at once, in
    any order; the address must not come back before the machine has judged the silence."""
    for _ in range(10):  # trio runs a batch of woken tasks in random order
        host = FakeHost()
        async with trio.open_nursery() as nursery:
            instance = await start(nursery, host)
            await trio.sleep_until(MASTER_DOWN + 0.5)
            host.configured.clear()  # the lease ran out while the process was frozen
            resumed_at = trio.current_time() + 10
            autojump_clock.jump(10)
            await trio.sleep(0.01)
            after = [what for at, what in host.log if at >= resumed_at]
            assert "add" not in after
            assert state(instance) is State.BACKUP
            assert instance.statistics().counters["stalls"] == 1
            nursery.cancel_scope.cancel()


# -- announcements ---------------------------------------------------------------------------


async def test_a_new_master_announces_the_vip_in_a_burst_and_again_later(autojump_clock):
    host = FakeHost()
    garp = VipGarp(burst=3, burst_delay=0.02, repeat_after=5.0)
    async with trio.open_nursery() as nursery:
        await start(nursery, host, vip_config(garp=garp))
        await trio.sleep_until(MASTER_DOWN + 20)
        offsets = [round(at - MASTER_DOWN, 6) for at, _ in host.frames]
        assert offsets == [0.0, 0.02, 0.04, 5.0, 5.02, 5.04]
        assert all(frames == [gratuitous_arp(MAC, VIP)] for _, frames in host.frames)
        nursery.cancel_scope.cancel()


async def test_a_new_master_adds_and_announces_its_address_before_it_does_anything_else():
    """Clients follow the gratuitous ARP: the lease and the first announcement go out on the
    deciding task's own stack, before the advert, the state change's log line and its hooks."""
    host = FakeHost()
    seen: list[tuple[str, object]] = []
    host.on_frames = lambda: seen.append(("frames", list(host.configured)))
    with trio.fail_after(10), capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            instance = await start(nursery, host, vip_config(advert_interval=0.01))
            host.on_frames = lambda: seen.append(("frames", (list(host.configured), len(host.adverts()),
                                                             [e["event"] for e in logs])))
            await wait_until(lambda: host.frames, what="announced", interval=0.01)
            assert state(instance) is State.MASTER
            nursery.cancel_scope.cancel()
    [(_, (configured, adverts, logged))] = seen[:1]
    assert configured == ["10.0.0.100/24"]  # added before it was announced
    assert adverts == 0 and "vip.master" not in logged and "vip.addresses_added" not in logged
    assert host.prepared == [4.0]  # the lease request was made ready while a backup


async def test_the_takeovers_lease_is_renewed_on_the_usual_schedule_not_at_once(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        await start(nursery, host)
        await trio.sleep_until(MASTER_DOWN + 1.5)
        adds = [at for at, what in host.log if what == "add"]
        assert adds == [pytest.approx(MASTER_DOWN), pytest.approx(MASTER_DOWN + 1.0)]
        nursery.cancel_scope.cancel()


async def test_an_address_taken_over_and_released_at_once_is_logged_removed_and_not_announced_again(autojump_clock):
    host = FakeHost()
    counters = collections.Counter()
    keeper = AddressKeeper(vip_config(), (VIP,), host, counters)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
            await trio.sleep(0.1)  # the MAC and the lease request made ready
            keeper.take_over()
            assert host.configured and len(host.frames) == 1  # on the spot
            keeper.release()  # before the keeper's task ran
            await keeper.released.wait()
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    assert host.configured == {} and len(host.frames) == 1
    assert [e["event"] for e in logs] == ["vip.addresses_added", "vip.addresses_removed"]


async def test_a_periodic_refresh_keeps_announcing_while_master(autojump_clock):
    host = FakeHost()
    garp = VipGarp(burst=1, burst_delay=0.0, repeat_after=None, refresh=2.0)
    async with trio.open_nursery() as nursery:
        await start(nursery, host, vip_config(garp=garp))
        await trio.sleep_until(MASTER_DOWN + 7)
        assert [round(at - MASTER_DOWN, 6) for at, _ in host.frames] == [0.0, 2.0, 4.0, 6.0]
        nursery.cancel_scope.cancel()


async def test_announcements_wait_until_the_address_is_configured(autojump_clock):
    host = FakeHost()
    host.add_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        await trio.sleep_until(MASTER_DOWN + 2)
        assert state(instance) is State.MASTER
        assert host.frames == []  # a client sent here now would find no address
        host.add_gate.set()
        await trio.sleep(0.1)
        assert host.frames and host.frames[0][0] == pytest.approx(MASTER_DOWN + 2)
        nursery.cancel_scope.cancel()


async def test_a_failed_lease_is_retried_and_announced_only_once_in_place(autojump_clock):
    host = FakeHost()
    host.add_failures = 2
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        await trio.sleep_until(MASTER_DOWN + 2)
        assert host.configured == {"10.0.0.100/24": 4.0}
        assert instance.statistics().counters["lease_errors"] == 2
        assert host.frames[0][0] == pytest.approx(MASTER_DOWN + 1.0)  # two retries, 0.5 s apart
        nursery.cancel_scope.cancel()


async def test_an_ipv6_instance_speaks_from_its_link_local_address_and_announces_with_na(autojump_clock):
    host = FakeHost()
    host.ips = [OWN, ipaddress.IPv6Address("fd00::2"), ipaddress.IPv6Address("fe80::2")]
    vip6 = ipaddress.IPv6Address("fd00::100")
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host, vip_config(addresses=("fd00::100/64",)))
        await trio.sleep_until(MASTER_DOWN + 0.5)
        assert state(instance) is State.MASTER
        nursery.cancel_scope.cancel()
    _, payload, src, dst = host.channel.sent[0]
    # RFC 5798 5.1.2.1: the source of an IPv6 advert is the interface's link-local address.
    assert (src, dst) == (ipaddress.IPv6Address("fe80::2"), MULTICAST_V6)
    assert decode_advert(payload, src, dst).addresses == (vip6,)
    assert host.frames[0][1] == [unsolicited_na(MAC, vip6)]


# -- the receive path -----------------------------------------------------------------


async def test_a_higher_priority_master_keeps_it_backup_until_it_goes_silent(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        await heard_as_master_for(host, 10)
        assert state(instance) is State.BACKUP
        assert instance.machine.master_ip == PEER
        assert host.configured == {} and host.adverts() == []
        silent_since = trio.current_time() - 1  # the last advert
        await trio.sleep(4)
        assert state(instance) is State.MASTER
        # RFC 5798: 3 x the master's interval + skew after its last advert
        assert host.adverts()[0][0] == pytest.approx(silent_since + MASTER_DOWN)
        nursery.cancel_scope.cancel()


async def test_a_backup_woken_past_its_deadline_hears_the_adverts_queued_meanwhile_before_taking_over(autojump_clock):
    """Descheduled across its master-down deadline (CPU starvation, a GC pause, SIGSTOP), a
    backup wakes with the timer expired and its master's advert unread in the socket. Late
    by less than one interval, the machine's own stall rule does not defer the takeover:
    the shell must feed it what is queued first, whichever task trio runs first."""
    for _ in range(10):  # trio runs a batch of woken tasks in random order
        host = FakeHost()
        async with trio.open_nursery() as nursery:
            instance = await start(nursery, host)
            await heard_as_master_for(host, 3)
            last_heard = trio.current_time() - 1
            await trio.sleep_until(last_heard + 3.0)  # two adverts lost on the wire
            # While the backup gets no CPU, another virtual router's advert and then its
            # master's arrive; it runs again 0.2 s past its deadline.
            host.channel.deliver(advert_from(STRANGER, 100, vrid=52))
            host.channel.deliver(advert_from(PEER, 200))
            autojump_clock.jump(0.8)
            assert trio.current_time() > last_heard + MASTER_DOWN
            await trio.sleep(0.5)
            assert state(instance) is State.BACKUP and instance.machine.master_ip == PEER
            assert host.adverts() == [] and host.configured == {}
            assert instance.statistics().counters["became_master"] == 0
            nursery.cancel_scope.cancel()


async def test_adverts_of_other_virtual_routers_are_ignored_without_counting_errors(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        await heard_as_master_for(host, 6, vrid=52)
        assert state(instance) is State.MASTER  # vrid 52 is not our master
        counters = instance.statistics().counters
        assert counters["errors"] == 0 and counters["adverts_received"] == 0
        nursery.cancel_scope.cancel()


async def test_malformed_packets_are_counted_by_reason_and_reading_goes_on(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        host.channel.deliver(PacketError("bad_ttl", "64"))
        good = advert_from(PEER, 200)
        host.channel.deliver(Received(good.src, good.dst, good.payload[:-1] + b"\x00"))  # bad checksum
        await heard_as_master_for(host, 5)
        assert state(instance) is State.BACKUP
        counters = instance.statistics().counters
        assert counters["dropped_bad_ttl"] == 1 and counters["dropped_bad_checksum"] == 1
        assert counters["errors"] == 2 and counters["adverts_received"] == 5
        nursery.cancel_scope.cancel()


async def test_unicast_mode_sends_to_every_peer_and_ignores_strangers(autojump_clock):
    host = FakeHost()
    peers = ("10.0.0.3", "10.0.0.4")
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host, vip_config(peers=peers))
        await heard_as_master_for(host, 6, src=STRANGER, dst=OWN)
        assert state(instance) is State.MASTER
        assert instance.statistics().counters["dropped_unknown_peer"] == 6
        first = host.adverts()[:2]
        assert {destination for _, _, destination in first} == {V4("10.0.0.3"), V4("10.0.0.4")}
        nursery.cancel_scope.cancel()


async def test_with_auth_only_signed_fresh_adverts_count(autojump_clock):
    host = FakeHost()
    config = vip_config(auth=VipAuth(secret=SECRET))
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host, config)
        await heard_as_master_for(host, 6)  # unsigned: a forger claiming priority 200
        assert state(instance) is State.MASTER
        for seq in range(10, 16):  # signed: a real master
            host.channel.deliver(advert_from(PEER, 255, key=SECRET, seq=seq))
            await trio.sleep(1)
        assert state(instance) is State.BACKUP
        for _ in range(6):  # a recorded advert played again
            host.channel.deliver(advert_from(PEER, 255, key=SECRET, seq=12))
            await trio.sleep(1)
        assert state(instance) is State.MASTER
        counters = instance.statistics().counters
        assert counters["dropped_auth_missing"] == 6 and counters["dropped_auth_replay"] == 6
        _, payload, src, dst = host.channel.sent[-1]
        assert len(payload) == 12 + 24  # our adverts carry the trailer
        nursery.cancel_scope.cancel()


# -- tracking, link, stop --------------------------------------------------------------


async def test_a_master_whose_backend_has_no_server_resigns_at_once(autojump_clock):
    host, healthy = FakeHost(), [True]
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host, vip_config(track="rabbit", weight=50), health=lambda: healthy[0])
        await trio.sleep_until(MASTER_DOWN + 2.5)
        lost_at = trio.current_time()
        healthy[0] = False
        await trio.sleep(0.15)
        assert state(instance) is State.BACKUP
        assert instance.machine.priority == 50
        assert [priority for _, priority, _ in host.adverts(since=lost_at)] == [50, 0]
        assert host.configured == {}
        assert instance.statistics().counters["track_failures"] == 1
        nursery.cancel_scope.cancel()


async def test_a_resigned_instance_does_not_take_the_vip_back_from_a_live_master(autojump_clock):
    host, healthy = FakeHost(), [False]
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host, vip_config(track="rabbit"), health=lambda: healthy[0])
        await heard_as_master_for(host, 6, priority=20)  # lower than even our lowered 50
        assert state(instance) is State.BACKUP
        healthy[0] = True
        await heard_as_master_for(host, 6, priority=20)
        assert state(instance) is State.MASTER  # healthy again: preempts the weaker master
        assert instance.machine.priority == 100
        nursery.cancel_scope.cancel()


async def test_without_resigning_tracking_only_lowers_the_advertised_priority(autojump_clock):
    host, healthy = FakeHost(), [True]
    config = vip_config(track="rabbit", weight=30, resign_on_track_failure=False)
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host, config, health=lambda: healthy[0])
        await trio.sleep_until(MASTER_DOWN + 0.5)
        healthy[0] = False
        await trio.sleep(3)
        assert state(instance) is State.MASTER
        assert {priority for _, priority, _ in host.adverts(since=MASTER_DOWN + 0.5)} == {70}
        nursery.cancel_scope.cancel()


async def test_link_down_is_a_fault_that_releases_the_vip_until_the_link_returns(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        await trio.sleep_until(MASTER_DOWN + 1)
        host.link_info = LinkInfo(up=False, index=2)
        await trio.sleep(1.1)
        assert state(instance) is State.FAULT
        assert host.configured == {}
        down_since = trio.current_time()
        await trio.sleep(10)
        assert host.adverts(since=down_since) == []
        host.link_info = LinkInfo(up=True, index=2)
        await trio.sleep(1.1)
        assert state(instance) is State.BACKUP
        await trio.sleep(MASTER_DOWN)
        assert state(instance) is State.MASTER
        nursery.cancel_scope.cancel()


async def test_a_recreated_interface_gets_a_new_socket(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        first = host.channel
        host.link_info = LinkInfo(up=True, index=7)
        await trio.sleep(1.1)
        assert first.closed and host.channel is not first and host.channel.ifindex == 7
        await heard_as_master_for(host, 6)  # adverts on the new socket count
        assert state(instance) is State.BACKUP
        nursery.cancel_scope.cancel()


async def test_a_missing_interface_waits_in_fault_then_joins_the_election(autojump_clock):
    host, runs = FakeHost(), []
    host.link_info = LinkInfo(up=False, index=None)

    async def runner(argv, env, timeout):
        runs.append(argv[-2])
        return HookOutcome(0)

    notify = VipNotify(master=("m",), backup=("b",), fault=("f",))
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host, vip_config(notify=notify), hook_runner=runner)
        await trio.sleep(5)
        assert instance.machine is None and instance.statistics().state == "FAULT"
        host.link_info = LinkInfo(up=True, index=2)
        await trio.sleep(1 + MASTER_DOWN + 0.1)
        assert state(instance) is State.MASTER
        assert runs == ["fault", "backup", "master"]
        nursery.cancel_scope.cancel()


async def test_an_instance_stopped_while_waiting_for_its_interface_never_joins(autojump_clock):
    host = FakeHost()
    host.link_info = LinkInfo(up=False, index=None)
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        await trio.sleep(2)
        await instance.stop()
        host.link_info = LinkInfo(up=True, index=2)
        await trio.sleep(10)
        assert instance.machine is None and host.channels == [] and host.configured == {}
        nursery.cancel_scope.cancel()


async def test_stopping_a_master_sends_priority_zero_then_removes_the_vip(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        await trio.sleep_until(MASTER_DOWN + 1.5)
        await instance.stop()
        assert host.configured == {}  # stop() returns once the address is gone
        stopped_at = trio.current_time()
        last_advert_at, priority, _ = host.adverts()[-1]
        removed_at = [at for at, what in host.log if what == "remove"][-1]
        assert priority == 0 and last_advert_at <= removed_at <= stopped_at
        sent = len(host.adverts())
        await trio.sleep(5)
        assert len(host.adverts()) == sent and host.configured == {}  # inert from now on
        nursery.cancel_scope.cancel()


async def test_stopping_a_backup_sends_nothing(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        await trio.sleep(1)
        await instance.stop()
        assert host.adverts() == [] and "remove" not in [what for _, what in host.log]
        nursery.cancel_scope.cancel()


async def test_a_cancelled_master_still_says_goodbye_and_removes_its_vip(autojump_clock):
    host = FakeHost()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await start(nursery, host)
            await trio.sleep_until(MASTER_DOWN + 1.5)
            scope.cancel()
    assert host.adverts()[-1][1] == 0
    assert host.configured == {}


# -- hooks and statistics ----------------------------------------------------------------


async def test_transitions_run_the_hooks_with_instance_state_and_priority(autojump_clock):
    host, runs = FakeHost(), []

    async def runner(argv, env, timeout):
        runs.append((list(argv), env["WARREN_VIP_STATE"], env["WARREN_VIP_ADDRESSES"], timeout))
        return HookOutcome(0)

    notify = VipNotify(master=("/usr/local/bin/vip", "--up"), backup=("/usr/local/bin/vip",), timeout=2.0)
    async with trio.open_nursery() as nursery:
        await start(nursery, host, vip_config(notify=notify), hook_runner=runner)
        await trio.sleep_until(MASTER_DOWN + 0.5)
        nursery.cancel_scope.cancel()
    assert runs == [
        (["/usr/local/bin/vip", "vip1", "backup", "100"], "backup", "10.0.0.100/24", 2.0),
        (["/usr/local/bin/vip", "--up", "vip1", "master", "100"], "master", "10.0.0.100/24", 2.0),
    ]


async def test_statistics_describe_the_instance(autojump_clock):
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        instance = await start(nursery, host)
        await trio.sleep_until(MASTER_DOWN + 2.5)
        stats = instance.statistics()
        nursery.cancel_scope.cancel()
    assert isinstance(stats, VipStats)
    assert (stats.name, stats.state, stats.vrid) == ("vip1", "MASTER", 51)
    assert (stats.priority, stats.base_priority) == (100, 100)
    assert (stats.interface, stats.addresses, stats.master) == ("eth0", ("10.0.0.100/24",), "10.0.0.2")
    assert stats.last_transition == pytest.approx(2.5)
    assert stats.counters["became_master"] == 1 and stats.counters["adverts_sent"] == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.state = "backup"  # type: ignore[misc]


# -- the notifier ---------------------------------------------------------------------------


async def test_hooks_of_one_instance_run_in_order_and_never_overlap(autojump_clock):
    running, order = [0], []

    async def slow_runner(argv, env, timeout):
        running[0] += 1
        assert running[0] == 1
        order.append(argv[-2])
        await trio.sleep(3 if argv[-2] == "backup" else 0.1)  # a slow backup script
        running[0] -= 1
        return HookOutcome(0)

    notifier = Notifier("vip1", VipNotify(master=("m",), backup=("b",), fault=("f",)), runner=slow_runner)
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run)
        for state_name in ("backup", "master", "fault", "backup", "master"):
            notifier.notify(state_name, 100)
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert order == ["backup", "master", "fault", "backup", "master"]
    assert notifier.runs == 5 and notifier.failures == 0


async def test_states_without_a_hook_run_nothing(autojump_clock):
    calls = []

    async def runner(argv, env, timeout):
        calls.append(argv)
        return HookOutcome(0)

    notifier = Notifier("vip1", VipNotify(master=("m",)), runner=runner)
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run)
        notifier.notify("backup", 100)
        notifier.notify("master", 100)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert calls == [["m", "vip1", "master", "100"]]


async def test_a_real_hook_gets_argv_and_environment(tmp_path):
    script = tmp_path / "hook.sh"
    out = tmp_path / "out"
    script.write_text(f'#!/bin/sh\necho "$@" "$WARREN_VIP_INTERFACE" "$WARREN_VIP_PRIORITY" >> {out}\n')
    script.chmod(0o755)
    with trio.fail_after(10):
        outcome = await run_command(
            [str(script), "vip1", "master", "150"], {"WARREN_VIP_INTERFACE": "eth0", "WARREN_VIP_PRIORITY": "150"}, 5
        )
    assert outcome.returncode == 0
    assert out.read_text() == "vip1 master 150 eth0 150\n"


async def test_a_hook_that_overruns_its_timeout_is_stopped_and_reported(tmp_path):
    with trio.fail_after(10):
        started = trio.current_time()
        outcome = await run_command(["sleep", "30"], {}, 0.3)
    assert outcome.returncode is None and outcome.error == "timeout"
    assert trio.current_time() - started < 5


async def test_a_missing_hook_command_is_a_failure_not_a_crash():
    with trio.fail_after(10):
        outcome = await run_command(["/nonexistent/warren-hook"], {}, 5)
    assert outcome.returncode is None and "FileNotFoundError" in outcome.error


async def test_a_failing_hook_output_is_kept_for_the_log():
    with trio.fail_after(10):
        outcome = await run_command(["sh", "-c", "echo broken >&2; exit 3"], {}, 5)
    assert (outcome.returncode, outcome.output) == (3, "broken\n")


# -- the service ------------------------------------------------------------------------------


def service_config(*vips: Vip) -> Config:
    backend = Backend(name="rabbit", servers=(Server(name="r1", address="127.0.0.1", port=5672),))
    return Config(path="x.toml", backends=(backend,), vip=vips)


async def test_the_service_exposes_every_instance_in_the_runtime_model(autojump_clock):
    host = FakeHost()
    config = service_config(vip_config(), vip_config(name="vip2", vrid=52, addresses=("10.0.0.101/32",), priority=200))
    runtime = Runtime(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(VipService(config, plumbing=host).run, runtime)
        await trio.sleep(5)
        stats = runtime.statistics().extra["vip"]
        nursery.cancel_scope.cancel()
    assert [(s.name, s.vrid, s.state) for s in stats] == [("vip1", 51, "MASTER"), ("vip2", 52, "MASTER")]


async def test_the_service_tracks_its_backend_in_the_runtime(autojump_clock):
    host = FakeHost()
    config = service_config(vip_config(track="rabbit"))
    runtime = Runtime(config)
    service = VipService(config, plumbing=host)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run, runtime)
        await trio.sleep(5)
        assert service.statistics()[0].state == "MASTER"
        runtime.backends["rabbit"].servers["r1"].up = False  # the health checks' verdict
        await trio.sleep(0.2)
        [stats] = service.statistics()
        nursery.cancel_scope.cancel()
    assert (stats.state, stats.priority) == ("BACKUP", 50)


async def test_stopping_the_service_hands_every_address_over(autojump_clock):
    host = FakeHost()
    config = service_config(vip_config(), vip_config(name="vip2", vrid=52, addresses=("10.0.0.101/32",)))
    service = VipService(config, plumbing=host)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run, Runtime(config))
        await trio.sleep(5)
        assert len(host.configured) == 2
        await service.stopping()
        assert host.configured == {}
        assert [priority for _, priority, _ in host.adverts()][-2:] == [0, 0]
        nursery.cancel_scope.cancel()


async def test_a_reload_restarts_only_the_changed_instance(autojump_clock):
    host = FakeHost()
    first, second = vip_config(), vip_config(name="vip2", vrid=52, addresses=("10.0.0.101/32",))
    config = service_config(first, second)
    service = VipService(config, plumbing=host)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run, Runtime(config))
        await trio.sleep(5)
        kept = service._running["vip1"].instance
        service.reconfigure(service_config(first, dataclasses.replace(second, priority=150)))
        await trio.sleep(0.1)
        assert service._running["vip1"].instance is kept
        assert service.statistics()[1].base_priority == 150
        service.reconfigure(service_config(first))
        await trio.sleep(0.1)
        assert [s.name for s in service.statistics()] == ["vip1"]
        assert set(host.configured) == {"10.0.0.100/24"}
        nursery.cancel_scope.cancel()


def adverts_of(host: FakeHost, vrid: int, since: float = -1.0) -> list[tuple[float, int]]:
    """(time, priority) of the adverts one virtual router sent."""
    out = []
    for channel in host.channels:
        for at, payload, src, dst in channel.sent:
            advert = decode_advert(payload[:12], src, dst)
            if advert.vrid == vrid and at >= since:
                out.append((at, advert.priority))
    return sorted(out)


async def test_a_crashing_instance_resigns_then_restarts_as_a_backup_and_the_others_run_on(autojump_clock):
    host = FakeHost()
    config = service_config(vip_config(), vip_config(name="vip2", vrid=52, addresses=("10.0.0.101/32",)))
    runtime = Runtime(config)
    service = VipService(config, plumbing=host, restart_policy=RestartPolicy(initial=1))
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run, runtime)
            await trio.sleep(5)
            assert [s.state for s in service.statistics()] == ["MASTER", "MASTER"]
            crashed = trio.current_time()
            host.channels[0].deliver(RuntimeError("a bug on vip1's receive path"))
            await trio.sleep(0.5)
            # On the way out: priority 0 first, then the address removed; vip2 untouched.
            assert adverts_of(host, 51, since=crashed)[0][1] == 0
            assert set(host.configured) == {"10.0.0.101/32"}
            assert runtime.supervisors["vip.vip1"].statistics().state == "RESTARTING"
            await trio.sleep(1)
            assert [s.state for s in service.statistics()] == ["BACKUP", "MASTER"]  # a new incarnation
            await trio.sleep(MASTER_DOWN)  # alone on the link: master again after Master_Down_Interval
            assert [s.state for s in service.statistics()] == ["MASTER", "MASTER"]
            assert set(host.configured) == {"10.0.0.100/24", "10.0.0.101/32"}
            nursery.cancel_scope.cancel()
    assert [priority for _, priority in adverts_of(host, 52)].count(0) == 1  # only at the final stop
    [crash] = [e for e in logs if e["event"] == "service.crashed"]
    assert (crash["service"], crash["error"]) == ("vip.vip1", "RuntimeError")


async def test_an_instance_whose_resignation_advert_fails_still_removes_its_address(autojump_clock):
    host = FakeHost()
    config = service_config(vip_config())
    service = VipService(config, plumbing=host, restart_policy=RestartPolicy(initial=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run, Runtime(config))
        await trio.sleep(5)
        assert set(host.configured) == {"10.0.0.100/24"}
        channel = host.channels[0]

        def broken_send(payload, src, dst):
            raise ValueError("a bug in the send path")

        channel.send = broken_send
        channel.deliver(RuntimeError("crash"))
        await trio.sleep(0.5)
        assert host.configured == {}  # gone although the priority-0 advert could not be sent
        nursery.cancel_scope.cancel()
