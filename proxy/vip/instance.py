"""One VRRP instance: the trio shell around :class:`proxy.vip.machine.VrrpMachine`.

The machine decides; this module feeds it and carries out its actions. Tasks,
all in the instance's nursery:

- *receive*: raw socket (once readable, every queued packet, read without
  waiting) -> drop other VRIDs (RFC 5798 7.1: not ours, not an error) -> in
  unicast mode, drop senders that are not peers -> optional HMAC check and
  replay guard -> ``decode_advert`` -> ``on_advert``. Anything dropped is
  counted under ``dropped_<reason>`` and ``errors``.
- *timer*: ``on_timer`` at ``next_deadline``, but first the packets already
  queued on the socket: a process descheduled past its deadline (CPU
  starvation, a GC pause, SIGSTOP) wakes with its master's adverts unread, and
  trio may run the timer task before the receive task. Those adverts arrived
  before the deadline took effect, so they come first (keepalived reads before
  it times out, too).
- *link*: polls the interface about once per advert interval (0.1-1 s).
  Down (or missing) is FAULT: the VIP is released. A recreated interface gets
  a new socket, since multicast membership goes with the old one.
- *track*: every 100 ms, whether the tracked backend has a server available
  here. If not, the priority drops by ``weight`` and, with
  ``resign_on_track_failure``, a master resigns at once (priority-0 advert);
  when servers return, the priority is restored and preemption resumes.
- *addresses* (:class:`proxy.vip.rawsock.AddressKeeper`): holds or releases the addresses as
  the machine says, as leases renewed while held, and announces them
  (gratuitous ARP / unsolicited NA) once they are really configured.
- *notify*: the :class:`proxy.vip.notify.Notifier` worker.
- *peer link* (with a :class:`proxy.vip.links.LinkServer`): the instance
  accepts links from backups on its source address, and as a backup holds
  one to the master the machine follows (:class:`proxy.vip.links.MasterLink`),
  reporting its priority on it; the successor its master names becomes the
  machine's ``successor_designated``, a master confirmed gone its ``master_link_lost``.

Adverts are sent synchronously from whichever task produced them: the raw
socket never blocks and ordering with the machine's state stays exact.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from proxy.config.model import Vip
from proxy.errors import StartupError
from proxy.vip.auth import ReplayGuard, SequenceSource, sign, verify
from proxy.vip.links import LinkServer, MasterLink, Registration
from proxy.vip.machine import (
    Action, FollowMaster, MachineConfig, ReleaseAddresses, SendAdvert, SendGratuitous, State, StateChanged,
    TakeAddresses, VrrpMachine,
)  # fmt: skip
from proxy.vip.netlink import InterfaceNotFound
from proxy.vip.notify import Notifier, Runner, run_command
from proxy.vip.packet import (
    MULTICAST_V4, MULTICAST_V6, Advert, IPAddress, PacketError, decode_advert, encode_advert,
)  # fmt: skip
from proxy.vip.peerlink import link_key
from proxy.vip.rawsock import RETRY_DELAY, AddressKeeper, Channel, LinkInfo, LinuxPlumbing, Plumbing, Received

log = structlog.get_logger("warren.vip")


class VipNotPermitted(StartupError, PermissionError):
    """Raw sockets or address changes are not allowed to this process."""


PRECISE_WINDOW = 0.002  # seconds of a backup's master-down timer spun rather than slept
# Packets read in one go: about what the default receive buffer (rmem_default, 208 KiB)
# holds of small ones, so all a stall queued, but a flood cannot hold the event loop long.
READ_LIMIT = 256
TRACK_POLL = 0.1  # the health checks' own inter x fall dominates the reaction time anyway
CLEANUP_BUDGET = 3.0  # seconds to remove the addresses when the instance ends abnormally
STATE_EVENTS = {
    State.MASTER: "vip.master",
    State.BACKUP: "vip.backup",
    State.FAULT: "vip.fault",
    State.INIT: "vip.stopped",
}
_HOST_ERRORS = (OSError, InterfaceNotFound)


@dataclass(frozen=True, slots=True)
class VipStats:
    """A snapshot of one instance for the stats page.

    ``state`` is ``MASTER``, ``BACKUP``, ``FAULT`` or ``INIT`` (the stats page's
    upper-case vocabulary; logs and hooks say ``master``...); ``priority`` is the
    effective one; ``master`` the current master's address as far as this host
    knows; ``last_transition`` is seconds ago.
    """

    name: str
    state: str
    priority: int
    base_priority: int
    vrid: int
    interface: str
    addresses: tuple[str, ...]
    master: str | None
    last_transition: float
    counters: dict[str, int]


class VipInstance:
    """One ``[vip.<name>]``: :meth:`run` until cancelled; :meth:`stop` hands over first.

    ``health`` (for ``track``) returns whether the tracked backend has a
    server available; it is polled on the trio thread. ``links``: the
    process's peer-link sockets (None: no peer link, plain VRRP).
    """

    def __init__(
        self,
        config: Vip,
        *,
        plumbing: Plumbing | None = None,
        health: Callable[[], bool] | None = None,
        hook_runner: Runner = run_command,
        links: LinkServer | None = None,
    ) -> None:
        self.config = config
        self.plumbing: Plumbing = plumbing or LinuxPlumbing()
        self.ips = tuple(ipaddress.ip_interface(address).ip for address in config.addresses)
        self.version = self.ips[0].version
        self.machine: VrrpMachine | None = None
        self.counters: collections.Counter[str] = collections.Counter()
        self.notifier = Notifier(
            config.name, config.notify, interface=config.interface, addresses=config.addresses, runner=hook_runner
        )
        self._keeper = AddressKeeper(
            config, self.ips, self.plumbing, self.counters, before_renewing=self._run_due_timer
        )
        self._health = health if config.track else None
        self._healthy = True
        self._key = config.auth.secret.encode() if config.auth else None
        self._sequence = SequenceSource()
        self._replay = ReplayGuard(max_age=config.auth.max_age if config.auth else None)
        peers = tuple(ipaddress.ip_address(peer) for peer in config.peers)
        self._peers = frozenset(peers)
        self._destinations = peers or (MULTICAST_V4 if self.version == 4 else MULTICAST_V6,)
        self._link_period = min(1.0, max(0.1, config.advert_interval))
        self._source: IPAddress | None = None
        self._channel: Channel | None = None
        self._receive_scope = trio.CancelScope()
        self._link_up = True
        self._waiting_label = "init"  # the state shown before the machine exists
        self._last_transition = 0.0
        self._timer_wake = trio.Event()
        self._send_failing = False
        self._stopped = False
        self._nursery: trio.Nursery | None = None
        self._links = links if config.peer_link.enabled else None
        self._registration: Registration | None = None
        self._master_link: MasterLink | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Clean up stale addresses, join the election and run until cancelled.

        Reports started once the election is joined, or once it is known that
        the interface is not usable yet (then the instance waits in FAULT).
        ``VipNotPermitted`` (a StartupError) if raw sockets are not allowed (CAP_NET_RAW).
        Whatever ends it, a crash included, a master resigns on the way out
        (:meth:`_clean_up`). An instance runs once: a restart is a new instance.
        """
        self._last_transition = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._remove_stale()
                await nursery.start(self.notifier.run)
                await nursery.start(self._keeper.run)
                ready = await self._prepare()
                if ready:
                    self._join_election(nursery)
                task_status.started()
                while not ready:
                    await trio.sleep(self._link_period)
                    if self._stopped:
                        break
                    if ready := await self._prepare():
                        self._join_election(nursery)
        finally:
            await self._clean_up()

    async def stop(self) -> None:
        """Graceful stop: a master sends priority 0 and removes its addresses; returns once they are gone.

        Bound it at the call site. The instance then takes part in nothing
        until it is cancelled.
        """
        if self._stopped:
            return
        self._stopped = True
        if self.machine is not None:
            self._apply(self.machine.shutdown(trio.current_time()))
        self._keeper.release()
        await self._keeper.released.wait()

    async def _clean_up(self) -> None:
        """However the run ends (cancelled, or crashed): a master sends priority 0, then the
        addresses go, even if the advert could not be sent; two hosts never both keep them."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_BUDGET):
            try:
                if self.machine is not None and not self._stopped:
                    self._stopped = True
                    self._apply(self.machine.shutdown(trio.current_time()))
            finally:
                self._stop_links()
                await self._keeper.remove_now()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def _remove_stale(self) -> None:
        try:
            removed = await self.plumbing.remove_stale(self.config.interface, self.config.addresses)
        except _HOST_ERRORS as error:
            log.warning("vip.stale_check_failed", instance=self.config.name, error=str(error))
            return
        if removed:
            log.warning("vip.stale_removed", instance=self.config.name, addresses=[str(ip) for ip in removed])

    async def _prepare(self) -> bool:
        """Learn the source address and open the socket; False while the interface is unusable."""
        ifname = self.config.interface
        link = await self.plumbing.link(ifname)
        source = await self._find_source() if link.index is not None else None
        if self._stopped:  # stop() came while we were asking the kernel
            return False
        if source is None:
            self._wait_in_fault("interface_missing" if link.index is None else "no_source_address")
            return False
        try:
            self._channel = self.plumbing.open_channel(ifname, self.version)
        except PermissionError as error:
            log.error(
                "vip.not_permitted", instance=self.config.name, error=str(error),
                hint="the floating IP needs root or CAP_NET_RAW + CAP_NET_ADMIN",
            )  # fmt: skip
            raise VipNotPermitted(
                f"vip {self.config.name}: cannot open a raw socket on {ifname} ({error.strerror}); "
                "the floating IP needs root or CAP_NET_RAW + CAP_NET_ADMIN"
            ) from None
        except OSError as error:  # vanished meanwhile
            self._wait_in_fault("socket_failed", error=str(error))
            return False
        self._source, self._link_up = source, link.up
        return True

    async def _find_source(self) -> IPAddress | None:
        if self.config.source is not None:
            return ipaddress.ip_address(self.config.source)
        try:
            configured = await self.plumbing.interface_ips(self.config.interface)
        except _HOST_ERRORS:
            return None
        for ip in configured:
            # RFC 5798 5.1.1.1 / 5.1.2.1: the interface's primary IPv4 address, or its IPv6 link-local one.
            if ip.version == self.version and ip not in self.ips and (ip.version == 4 or ip.is_link_local):
                return ip
        return None

    def _wait_in_fault(self, reason: str, **details: Any) -> None:
        if self._waiting_label != "fault":
            self._waiting_label = "fault"
            self._last_transition = trio.current_time()
            log.error(
                "vip.fault", instance=self.config.name, interface=self.config.interface, reason=reason, **details
            )
            self.notifier.notify("fault", self.config.priority)

    def _join_election(self, nursery: trio.Nursery) -> None:
        config = self.config
        assert self._source is not None
        self.machine = VrrpMachine(
            MachineConfig(
                vrid=config.vrid, priority=config.priority, advert_interval=config.advert_interval,
                primary_ip=self._source, addresses=self.ips, preempt=config.preempt,
                preempt_delay=config.preempt_delay or 0.0, peer_link=self._links is not None,
            )  # fmt: skip
        )
        if self._links is not None:
            self._master_link = MasterLink(
                config.name, config.vrid, self._link_key(), config.peer_link.port, self._source,
                self._master_gone, priority=self.machine.priority, on_successor=self._successor_named,
                ifindex=self._ifindex(), counters=self.counters,
            )  # fmt: skip
            self._serve_links()
        # Read the clock only now: the link's listening socket can take a while (moving it to
        # the top of the descriptor table grows the table, which waits for an RCU grace period
        # once the process has threads: 10-16 ms at load 12; 360 ms went by there in one test
        # run at load 13), and a Master_Down_Interval counted from before had run out at once.
        now = trio.current_time()
        if not self._link_up:
            self.machine.interface_down(now)
        self._check_health()
        log.info(
            "vip.started", instance=config.name, interface=config.interface, vrid=config.vrid,
            source=str(self._source), destinations=[str(d) for d in self._destinations],
            priority=self.machine.priority, lease=config.lease, auth=self._key is not None,
            peer_link=config.peer_link.port if self._links is not None else None,
        )  # fmt: skip
        self._apply(self.machine.start(now))
        nursery.start_soon(self._run_timer)
        self._start_receiving()
        nursery.start_soon(self._watch_link)
        if self._health is not None:
            nursery.start_soon(self._track)

    # -- inputs ------------------------------------------------------------------

    def _start_receiving(self) -> None:
        assert self._nursery is not None and self._channel is not None
        self._receive_scope = trio.CancelScope()
        self._nursery.start_soon(self._receive, self._channel, self._receive_scope)

    async def _receive(self, channel: Channel, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    await channel.wait_readable()
                except trio.ClosedResourceError:
                    return
                if not self._read_queued(channel):
                    await trio.sleep(RETRY_DELAY)

    def _read_queued(self, channel: Channel) -> bool:
        """Feeds the machine the packets queued on ``channel`` (up to READ_LIMIT) without
        waiting; False if reading failed (logged)."""
        for _ in range(READ_LIMIT):
            try:
                received = channel.receive_nowait()
                advert = self._accept(received)
            except trio.WouldBlock:
                break
            except PacketError as error:
                self._drop(error)
                continue
            except OSError as error:
                log.warning("vip.receive_failed", instance=self.config.name, error=str(error))
                return False
            if advert is not None and self.machine is not None:
                self._apply(self.machine.on_advert(trio.current_time(), advert, received.src))
        return True

    def _accept(self, received: Received) -> Advert | None:
        """The advert in ``received`` if it is for this instance; None if it belongs to another VRID."""
        payload = received.payload
        if len(payload) >= 2 and payload[1] != self.config.vrid:
            return None  # another virtual router on this link (e.g. our own other instance)
        if self._peers and received.src not in self._peers:
            raise PacketError("unknown_peer", str(received.src))
        if self._key is not None:
            payload, sequence = verify(payload, self._key, received.src, received.dst)
            self._replay.check(received.src, sequence, time.time())
        return decode_advert(payload, received.src, received.dst)

    def _drop(self, error: PacketError) -> None:
        self.counters[f"dropped_{error.reason}"] += 1
        if self.machine is not None:
            self.machine.note_error()
        log.debug("vip.packet_dropped", instance=self.config.name, reason=error.reason, detail=error.detail)

    def _run_due_timer(self) -> None:
        """The machine's timer, if its deadline has passed: after the packets queued meanwhile."""
        machine = self.machine
        if machine is None or machine.next_deadline is None or trio.current_time() < machine.next_deadline:
            return
        if self._channel is not None:
            self._read_queued(self._channel)
        self._apply(machine.on_timer(trio.current_time()))  # a no-op if an advert moved the deadline

    async def _run_timer(self) -> None:
        assert self.machine is not None
        # Only on the real clock: under a test's mock clock a spin would never end. Not
        # imported here: trio.testing pulls in pytest (6 MiB that a killed master's
        # kernel would free before its peer link ends; docs/vip.md, the peer link).
        testing = sys.modules.get("trio.testing")
        precise = testing is None or not isinstance(trio.lowlevel.current_clock(), testing.MockClock)
        while True:
            self._timer_wake = trio.Event()
            deadline = self.machine.next_deadline
            if deadline is None:
                deadline = math.inf
            # The master-down timer decides how soon a backup takes over. trio
            # sleeps in epoll_wait, whose timeout has whole milliseconds (rounded
            # up), so such a sleep ends up to ~1.5 ms late: a backup sleeps until
            # PRECISE_WINDOW before its deadline and spins the rest (once per
            # takeover: an advert re-arms the timer long before that point).
            spin = precise and self.machine.state is State.BACKUP
            with trio.move_on_at(deadline - PRECISE_WINDOW if spin else deadline):
                await self._timer_wake.wait()
            if spin:
                while not self._timer_wake.is_set() and trio.current_time() < deadline:
                    await trio.lowlevel.checkpoint()
            self._run_due_timer()

    async def _watch_link(self) -> None:
        while True:
            await trio.sleep(self._link_period)
            self._link_changed(await self.plumbing.link(self.config.interface))
            self._serve_links()

    # -- the peer link -----------------------------------------------------------------

    def _link_key(self) -> bytes | None:
        return link_key(self.config.auth.secret) if self.config.auth else None

    def _ifindex(self) -> int:
        return self._channel.ifindex if self._channel is not None else 0

    def _serve_links(self) -> None:
        """Accept backups' links on our source address (retried while the port is unusable)."""
        if self._links is None or self._registration is not None or self._source is None:
            return
        peers = frozenset(self._peers)
        try:
            self._registration = self._links.register(
                self._source, self.config.peer_link.port, self.config.vrid, self._link_key(),
                ifindex=self._ifindex(), peers=peers, counters=self.counters,
            )  # fmt: skip
        except (OSError, ValueError) as error:
            if self.counters["link_listen_errors"] == 0:
                log.error("vip.peer_link_listen_failed", instance=self.config.name, port=self.config.peer_link.port,
                          error=str(error))
            self.counters["link_listen_errors"] += 1
            return
        log.info("vip.peer_link_listening", instance=self.config.name, address=str(self._source),
                 port=self._registration.port)

    def _stop_links(self) -> None:
        if self._master_link is not None:
            self._master_link.stop()
        self._stop_serving_links()

    def _stop_serving_links(self) -> None:
        if self._registration is not None and self._links is not None:
            self._links.unregister(self._registration)
            self._registration = None

    def _master_gone(self, master: IPAddress) -> None:
        """The link to ``master`` ended and its Warren is confirmed gone (no FIN: never called)."""
        if self.machine is not None and not self._stopped:
            self._apply(self.machine.master_link_lost(trio.current_time(), master))

    def _successor_named(self, master: IPAddress, successor: IPAddress | None) -> None:
        """The followed ``master`` named its successor over the link."""
        if self.machine is None or self._stopped:
            return
        was = self.machine.designated
        self._apply(self.machine.successor_designated(trio.current_time(), master, successor))
        if self.machine.designated != was:
            log.info("vip.successor", instance=self.config.name, master=str(master), designated=self.machine.designated)

    def _link_changed(self, link: LinkInfo) -> None:
        assert self.machine is not None
        if link.up and (self._channel is None or link.index != self._channel.ifindex):
            self._reopen_channel()
        up = link.up and self._channel is not None
        if up == self._link_up:
            return
        self._link_up = up
        now = trio.current_time()
        if up:
            log.info("vip.link_up", instance=self.config.name, interface=self.config.interface)
            self._apply(self.machine.interface_up(now))
        else:
            log.warning("vip.link_down", instance=self.config.name, interface=self.config.interface)
            self._apply(self.machine.interface_down(now))

    def _reopen_channel(self) -> None:
        self._keeper.forget_mac()
        self._stop_serving_links()  # the interface (and its index) changed: served again by _watch_link
        self._receive_scope.cancel()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        try:
            self._channel = self.plumbing.open_channel(self.config.interface, self.version)
        except OSError as error:
            log.warning("vip.socket_failed", instance=self.config.name, error=str(error))
            return
        if self._master_link is not None and self._nursery is not None:
            self._master_link.ifindex = self._channel.ifindex
            self._master_link.follow(self._nursery, self._master_link.master)  # again, on the new interface
        self._start_receiving()

    async def _track(self) -> None:
        while True:
            await trio.sleep(TRACK_POLL)
            self._check_health()

    def _check_health(self) -> None:
        if self._health is None or self.machine is None:
            return
        healthy = bool(self._health())
        if healthy == self._healthy:
            return
        self._healthy = healthy
        now, machine, config = trio.current_time(), self.machine, self.config
        if healthy:
            log.info("vip.track_recovered", instance=config.name, backend=config.track, priority=config.priority)
            self._apply(machine.set_effective_priority(now, config.priority) + machine.reinstate(now))
            return
        self.counters["track_failures"] += 1
        lowered = max(1, config.priority - config.weight)
        log.warning(
            "vip.track_failed", instance=config.name, backend=config.track, priority=lowered,
            resign=config.resign_on_track_failure, state=machine.state.value,
        )  # fmt: skip
        actions = machine.set_effective_priority(now, lowered)
        if config.resign_on_track_failure:
            actions += machine.resign(now)
        self._apply(actions)

    # -- actions ------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        """Carries the machine's actions out, in order, except that a new master's clients
        come first: taking the addresses with an announcement adds them and sends the first
        gratuitous ARP at once (:meth:`AddressKeeper.take_over`), and state changes (logs,
        hooks) come after everything else."""
        taking = any(isinstance(action, TakeAddresses) for action in actions)
        if taking and any(isinstance(action, SendGratuitous) for action in actions):
            self._keeper.take_over()
        changes = []
        for action in actions:
            if isinstance(action, SendAdvert):
                self._send_advert(action)
            elif isinstance(action, TakeAddresses):
                self._keeper.hold()
            elif isinstance(action, ReleaseAddresses):
                self._keeper.release()
            elif isinstance(action, SendGratuitous):
                self._keeper.announce()
            elif isinstance(action, StateChanged):
                changes.append(action)
            elif isinstance(action, FollowMaster) and self._master_link is not None and self._nursery is not None:
                self._master_link.follow(self._nursery, action.address)
        for change in changes:
            self._state_changed(change)
        if self._master_link is not None and self.machine is not None:
            self._master_link.report_priority(self.machine.priority)
        self._timer_wake.set()  # the deadline may have moved

    def _send_advert(self, action: SendAdvert) -> None:
        assert self.machine is not None and self._source is not None
        if self._channel is None:
            self.counters["send_errors"] += 1
            return
        advert = self.machine.build_advert(action)
        for destination in self._destinations:
            payload = encode_advert(advert, self._source, destination)
            if self._key is not None:
                payload = sign(payload, self._sequence.next(time.time()), self._key, self._source, destination)
            try:
                self._channel.send(payload, self._source, destination)
            except OSError as error:
                self.counters["send_errors"] += 1
                if not self._send_failing:
                    self._send_failing = True
                    log.warning("vip.send_failed", instance=self.config.name, to=str(destination), error=str(error))
                continue
            if self._send_failing:
                self._send_failing = False
                log.info("vip.send_recovered", instance=self.config.name)

    def _state_changed(self, change: StateChanged) -> None:
        assert self.machine is not None
        self._last_transition = trio.current_time()
        priority = self.machine.priority
        level = log.warning if change.new is State.FAULT else log.info
        level(
            STATE_EVENTS[change.new], instance=self.config.name, previous=change.old.value,
            reason=change.reason, priority=priority, addresses=list(self.config.addresses),
        )  # fmt: skip
        self.notifier.notify(change.new.value, priority)

    # -- snapshot -----------------------------------------------------------------

    def statistics(self) -> VipStats:
        machine, config = self.machine, self.config
        counters = dataclasses.asdict(machine.counters) if machine is not None else {}
        counters.update(self.counters)
        counters.update(notify_runs=self.notifier.runs, notify_failures=self.notifier.failures)
        master = machine.master_ip if machine is not None else None
        return VipStats(
            name=config.name,
            state=(machine.state.value if machine is not None else self._waiting_label).upper(),
            priority=machine.priority if machine is not None else config.priority,
            base_priority=config.priority,
            vrid=config.vrid,
            interface=config.interface,
            addresses=tuple(config.addresses),
            master=None if master is None else str(master),
            last_transition=trio.current_time() - self._last_transition,
            counters=counters,
        )
