"""The VRRPv3 state machine (RFC 5798 section 6.4), sans-I/O and clock-free.

Every input is a method taking ``now`` (seconds, any monotonic clock) and
returns the actions to carry out, in order. The shell keeps one timer: call
:meth:`VrrpMachine.on_timer` at :attr:`VrrpMachine.next_deadline` (calling it
early or spuriously is a harmless no-op).

Deviations from, and additions to, the RFC (all deliberate):

- A master that hears a lower-priority advert (or an equal one from a lower
  address) answers with an advert at once (RFC: discard) so that the second
  master steps down immediately, and re-announces the VIP (SendGratuitous)
  because that master may have won the clients' ARP caches; keepalived does
  both. The shell should restart, not stack, a running announcement plan.
- FAULT (keepalived's state): the interface is down, the VIP is released and
  adverts are ignored until the interface comes back (then Initialize again).
- ``resign``: when the proxy behind the VIP is unhealthy the master sends
  priority 0 at once and becomes BACKUP, so the best healthy backup takes over
  after its skew time (~0.6 s at a 1 s interval) instead of the ~4 s keepalived
  needs when a weighted track script merely lowers the priority. While
  resigned the machine never preempts a live master (it still takes over when
  no master is heard at all). ``reinstate`` ends that.
- ``preempt_delay`` (keepalived's): a backup tolerates a lower-priority master
  for that long after first hearing it before it starts ignoring its adverts.
- Stalls (SIGSTOP, VM pause, starved event loop). A master whose timer fires
  so late that more than 3 advert intervals passed since its last advert may
  already have been replaced (backups wait 3 x interval + skew): it must not
  simply advertise, re-announce the VIP and take it back from a new master of
  higher or equal priority. So when its timer fires, or it hears any advert,
  after such a silence, it releases the VIP silently and becomes BACKUP
  with a full Master_Down_Interval, i.e. it listens before it acts: a
  higher-or-equal master keeps the VIP; against a lower one, normal
  preemption applies (takeover after Master_Down_Interval). The cost: after
  such a stall with no other node alive, the VIP comes back Master_Down_Interval
  later. A backup whose down timer fires more than one interval late likewise
  waits one more Master_Adver_Interval (once) so that adverts queued in its
  socket while it was frozen are read before it decides the master is gone.
- Peer link (``peer_link``; Warren peers only). A backup follows its master
  over a TCP link (:class:`FollowMaster` says to whom, whenever that
  changes). When the link ends with FIN or RST and the master's Warren is
  confirmed gone (the shell's concern), :meth:`VrrpMachine.master_link_lost`
  acts as the master's priority-0 advert would: the takeover comes after the
  skew (computed from HANDOVER_INTERVAL) instead of Master_Down_Interval. A
  master that is frozen or cut off sends no FIN: the RFC timers still apply.
- Designated successor (peer link). The master names, over the links, the
  linked backup that should replace it (highest priority, then highest
  address: :func:`proxy.vip.peerlink.designate`); :meth:`successor_designated`
  tells the machine. That backup, unless resigned, takes over at once,
  without skew, when its master's link is lost. The others leave that loss
  to the RFC timers: the successor's advert reaches them long before their
  Master_Down_Interval ends, however starved its host (a skew of a few
  milliseconds raced it and lost on a loaded host: two takeovers, the
  address moved twice). A backup told that nobody is the successor (or told
  nothing yet) keeps its skew. A designation counts only while its master is
  the one followed: any other master, or none, forgets it. A stale or wrong
  one (the master died before its update arrived) at worst starts a lower
  backup first: a higher one that preempts takes over at its own skew as
  without designation, and two designated backups (impossible from one
  master's messages) would settle like any two masters, on the first advert.
  If the designated successor dies with the master, the others take over by
  the RFC timers, as without a peer link.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from proxy.vip.packet import Advert, IPAddress, interval_to_cs

OWNER_PRIORITY = 255
STALL_ADVERTS = 3  # a master silent for this many intervals may have been replaced


# The interval a leaving master puts in its priority-0 advert (the protocol's
# minimum, one centisecond): Warren backups hand over after a skew computed
# from it. See _backup_heard.
HANDOVER_INTERVAL = 0.01


class State(enum.StrEnum):
    INIT = "init"
    BACKUP = "backup"
    MASTER = "master"
    FAULT = "fault"


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """One virtual router. ``ValueError`` on an invalid combination.

    ``advert_interval`` is in seconds (0.01 .. 40.95, centisecond resolution).
    ``accept`` is RFC 5798 Accept_Mode; the machine only carries it for the shell.
    """

    vrid: int
    priority: int
    advert_interval: float
    primary_ip: IPAddress
    addresses: tuple[IPAddress, ...]
    preempt: bool = True
    preempt_delay: float = 0.0
    accept: bool = False
    peer_link: bool = False  # emit FollowMaster actions

    def __post_init__(self) -> None:
        if not 1 <= self.priority <= OWNER_PRIORITY:
            raise ValueError("priority must be 1..255")
        if self.preempt_delay < 0:
            raise ValueError("preempt_delay must be >= 0")
        if abs(interval_to_cs(self.advert_interval) - self.advert_interval * 100) > 1e-6:
            raise ValueError("advert_interval must be a whole number of centiseconds")
        advert = Advert(self.vrid, self.priority, 1, self.addresses)  # validates vrid/addresses
        if self.primary_ip.version != advert.family_version:
            raise ValueError("primary_ip and the virtual addresses must share one family")


@dataclass(frozen=True, slots=True)
class SendAdvert:
    """Send an advert with this priority; ``interval`` in seconds."""

    priority: int
    interval: float

    @property
    def interval_cs(self) -> int:
        return interval_to_cs(self.interval)


@dataclass(frozen=True, slots=True)
class TakeAddresses:
    """Configure the virtual addresses on the interface (as renewable leases)."""


@dataclass(frozen=True, slots=True)
class ReleaseAddresses:
    """Remove the virtual addresses from the interface."""


@dataclass(frozen=True, slots=True)
class SendGratuitous:
    """Start announcing the addresses (gratuitous ARP / unsolicited NA, per the GarpPlan)."""


@dataclass(frozen=True, slots=True)
class FollowMaster:
    """Keep a peer link to ``address``, the master this backup follows; None: no link."""

    address: IPAddress | None


@dataclass(frozen=True, slots=True)
class StateChanged:
    """Informational: log it, update metrics, run notify hooks."""

    old: State
    new: State
    reason: str


Action = SendAdvert | TakeAddresses | ReleaseAddresses | SendGratuitous | StateChanged | FollowMaster


@dataclass(slots=True)
class Counters:
    adverts_sent: int = 0
    adverts_received: int = 0
    priority_zero_sent: int = 0
    priority_zero_received: int = 0
    became_master: int = 0
    errors: int = 0  # adverts for another VRID/family, plus what the shell reports
    address_mismatch: int = 0  # RFC 5798 7.1: logged, still processed
    stalls: int = 0
    master_link_lost: int = 0  # the followed master's Warren went away (acted upon)
    successor_takeovers: int = 0  # of those, taken over at once as the designated successor


def _input(method: Callable[..., list[Action]]) -> Callable[..., list[Action]]:
    """An input of the machine: its actions, then FollowMaster if whom a backup follows changed."""

    @functools.wraps(method)
    def handled(self: VrrpMachine, *args: object, **kwargs: object) -> list[Action]:
        actions = method(self, *args, **kwargs) + self._follow_changes()
        if self._designation is not None and self._designation[0] != self.master_ip:
            self._designation = None  # a designation is only good for the master that made it
        return actions

    return handled


class VrrpMachine:
    """One VRRP instance. See the module docstring for the exact semantics."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.state = State.INIT
        self.priority = config.priority  # effective priority (tracking changes it)
        self.master_adver_interval = config.advert_interval
        self.master_ip: IPAddress | None = None
        self.next_deadline: float | None = None
        self.resigned = False
        self.counters = Counters()
        self._link_up = True
        self._last_advert_sent: float | None = None
        self._lower_master_since: float | None = None
        self._down_reason = "master_down"
        self._stall_deferred = False
        self._followed: IPAddress | None = None
        # (the master followed, the successor it named): None while it named nobody
        self._designation: tuple[IPAddress, IPAddress] | None = None

    # -- derived timers (RFC 5798 6.1) -------------------------------------

    @property
    def skew(self) -> float:
        """Skew_Time = ((256 - Priority) * Master_Adver_Interval) / 256."""
        return ((256 - self.priority) * self.master_adver_interval) / 256

    @property
    def designated(self) -> bool:
        """Whether the master followed now named this backup its successor."""
        return self._designation is not None and self._designation[1] == self.config.primary_ip

    @property
    def master_down_interval(self) -> float:
        """Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time."""
        return 3 * self.master_adver_interval + self.skew

    def build_advert(self, action: SendAdvert) -> Advert:
        """The :class:`Advert` a :class:`SendAdvert` action stands for."""
        return Advert(self.config.vrid, action.priority, action.interval_cs, self.config.addresses)

    # -- inputs ---------------------------------------------------------------

    @_input
    def start(self, now: float) -> list[Action]:
        """Leave INIT (RFC 6.4.1): the owner becomes MASTER, others BACKUP; FAULT if the link is down."""
        if self.state is not State.INIT:
            raise RuntimeError("start() called twice")
        if not self._link_up:
            return [self._transition(State.FAULT, "interface_down")]
        return self._initialize(now, "startup")

    @_input
    def shutdown(self, now: float) -> list[Action]:
        """Back to INIT; a master sends priority 0 first (RFC 6.4.3) and releases the VIP."""
        if self.state is State.INIT:
            return []
        was_master = self.state is State.MASTER
        actions: list[Action] = [self._transition(State.INIT, "shutdown")]
        if was_master:
            actions += [self._advert(0), ReleaseAddresses()]
        self.next_deadline = None
        self.master_ip = None
        self._lower_master_since = None
        return actions

    @_input
    def on_advert(self, now: float, advert: Advert, src_ip: IPAddress | str) -> list[Action]:
        """A verified, decoded advert from ``src_ip`` (RFC 6.4.2 / 6.4.3)."""
        if self.state in (State.INIT, State.FAULT):
            return []
        src = ipaddress.ip_address(src_ip)
        if src == self.config.primary_ip:
            return []  # our own advert, looped back
        family = self.config.primary_ip.version
        if advert.vrid != self.config.vrid or not advert.family_version == src.version == family:
            self.counters.errors += 1
            return []
        if set(advert.addresses) != set(self.config.addresses):
            self.counters.address_mismatch += 1
        self.counters.adverts_received += 1
        if advert.priority == 0:
            self.counters.priority_zero_received += 1
        if self.state is State.BACKUP:
            return self._backup_heard(now, advert, src)
        return self._master_heard(now, advert, src)

    @_input
    def on_timer(self, now: float) -> list[Action]:
        """The single timer: Adver_Timer as MASTER, Master_Down_Timer as BACKUP."""
        if self.next_deadline is None or now < self.next_deadline:
            return []
        if self.state is State.MASTER:
            return self._master_timer(now)
        return self._backup_timer(now)

    @_input
    def set_effective_priority(self, now: float, priority: int) -> list[Action]:
        """Tracking changed the priority (1..255); a master re-advertises at once."""
        if not 1 <= priority <= OWNER_PRIORITY:
            raise ValueError("priority must be 1..255")
        changed = priority != self.priority
        self.priority = priority
        if changed and self.state is State.MASTER:
            return self._advertise(now)
        return []

    @_input
    def resign(self, now: float) -> list[Action]:
        """The proxy is unhealthy: a master hands over now (priority 0).

        In any state, the machine then never preempts a live master until :meth:`reinstate`.
        """
        self.resigned = True
        if self.state is not State.MASTER:
            return []
        actions: list[Action] = [self._transition(State.BACKUP, "resign")]
        actions += [self._advert(0), ReleaseAddresses()]
        self._arm_down_timer(now, self.config.advert_interval, master_ip=None)
        return actions

    @_input
    def reinstate(self, now: float) -> list[Action]:
        """The proxy is healthy again: preemption (if configured) resumes with the next advert."""
        self.resigned = False
        return []

    @_input
    def interface_down(self, now: float) -> list[Action]:
        """The link went down: FAULT, releasing the VIP if we held it."""
        self._link_up = False
        if self.state in (State.INIT, State.FAULT):
            return []
        was_master = self.state is State.MASTER
        actions: list[Action] = [self._transition(State.FAULT, "interface_down")]
        if was_master:
            actions.append(ReleaseAddresses())
        self.next_deadline = None
        self.master_ip = None
        return actions

    @_input
    def interface_up(self, now: float) -> list[Action]:
        """The link is back: leave FAULT through Initialize."""
        self._link_up = True
        if self.state is not State.FAULT:
            return []
        return self._initialize(now, "interface_up")

    @_input
    def master_link_lost(self, now: float, master: IPAddress | str) -> list[Action]:
        """The peer link to ``master`` ended (FIN or RST) and its Warren is gone (the shell
        confirmed it: a new connection was refused). A backup following that master acts as
        on its priority-0 advert: it takes over after the skew, computed from
        HANDOVER_INTERVAL; at once if that master designated it (:meth:`successor_designated`)
        and it is not resigned. Ignored when the master designated another backup (that one's
        advert is due; the down timer stands), and in any other case (another master by now,
        not a backup).
        """
        if not self._following(master) or (self._designation is not None and not self.designated):
            return []
        self.counters.master_link_lost += 1
        if self.designated and not self.resigned:
            self.counters.successor_takeovers += 1
            return self._become_master(now, "master_link_lost")
        self._master_leaving(now, HANDOVER_INTERVAL, "master_link_lost")
        return []

    @_input
    def successor_designated(self, now: float, master: IPAddress | str, successor: IPAddress | None) -> list[Action]:
        """``master`` named ``successor`` (None: nobody) over the peer link. Recorded only by a
        backup following that master, and only until it follows another (or none): it decides
        what :meth:`master_link_lost` does."""
        if self._following(master):
            assert self.master_ip is not None
            self._designation = None if successor is None else (self.master_ip, ipaddress.ip_address(successor))
        return []

    def note_error(self) -> None:
        """The shell dropped a packet (decode/auth failure): count it."""
        self.counters.errors += 1

    # -- state logic ---------------------------------------------------------

    def _initialize(self, now: float, reason: str) -> list[Action]:
        if self.priority == OWNER_PRIORITY:
            return self._become_master(now, "address_owner")
        actions: list[Action] = [self._transition(State.BACKUP, reason)]
        self._arm_down_timer(now, self.config.advert_interval, master_ip=None)
        return actions

    def _backup_heard(self, now: float, advert: Advert, src: IPAddress) -> list[Action]:
        if advert.priority == 0:
            # RFC 6.4.2: the master is leaving; the best backup (smallest skew) goes
            # first. Warren's leaving master advertises the shortest interval
            # (HANDOVER_INTERVAL) so that the skew, and the handover, shrink to a
            # few milliseconds; the priorities still order the backups. (The RFC
            # keeps Master_Adver_Interval here; a plain VRRPv3 backup does, and
            # still takes over after its usual skew.)
            self._master_leaving(now, advert.interval, "master_left")
            return []
        if advert.priority >= self.priority or not self._preempting():
            if advert.priority >= self.priority:
                self._lower_master_since = None
            self._arm_down_timer(now, advert.interval, master_ip=src)
            return []
        if self._within_preempt_delay(now):
            self._arm_down_timer(now, advert.interval, master_ip=src)
            return []
        # Preempt: discard the lower-priority advert; the down timer will fire.
        self.master_ip = src
        self._down_reason = "preempt"
        return []

    def _master_heard(self, now: float, advert: Advert, src: IPAddress) -> list[Action]:
        if self._stalled(now):
            return self._step_down_stalled(now) + self._backup_heard(now, advert, src)
        if advert.priority == 0:
            return self._advertise(now)  # RFC 6.4.3: a leaving peer; reassert at once
        higher = advert.priority > self.priority
        if higher or (advert.priority == self.priority and src > self.config.primary_ip):
            reason = "higher_priority" if higher else "tie_break"
            # Two masters (a healed partition): ours may have announced the VIP last, and
            # the winner re-announces only when it hears a rival master. If its advert
            # reached us first, one advert of ours before stepping down makes it do so
            # (keepalived's vrrp_higher_prio_send_advert); else clients keep our MAC.
            actions: list[Action] = [
                self._advert(self.priority), self._transition(State.BACKUP, reason), ReleaseAddresses()
            ]
            self._arm_down_timer(now, advert.interval, master_ip=src)
            return actions
        # Another node believes it is master and may have announced the VIP: make it
        # step down now and win the clients' ARP caches back (keepalived does both).
        return self._advertise(now) + [SendGratuitous()]

    def _master_timer(self, now: float) -> list[Action]:
        if self._stalled(now):
            return self._step_down_stalled(now)
        return self._advertise(now)

    def _stalled(self, now: float) -> bool:
        last = self._last_advert_sent
        return last is not None and now - last > STALL_ADVERTS * self.config.advert_interval

    def _step_down_stalled(self, now: float) -> list[Action]:
        self.counters.stalls += 1
        actions: list[Action] = [self._transition(State.BACKUP, "stalled"), ReleaseAddresses()]
        self._arm_down_timer(now, self.config.advert_interval, master_ip=None)
        return actions

    def _backup_timer(self, now: float) -> list[Action]:
        assert self.next_deadline is not None
        late = now - self.next_deadline
        if late > self.master_adver_interval and not self._stall_deferred:
            # Frozen past our deadline: read what is queued before declaring the master dead.
            self.counters.stalls += 1
            self._stall_deferred = True
            self.next_deadline = now + self.master_adver_interval
            return []
        return self._become_master(now, self._down_reason)

    def _become_master(self, now: float, reason: str) -> list[Action]:
        actions: list[Action] = [self._transition(State.MASTER, reason), TakeAddresses()]
        self.counters.became_master += 1
        self.master_ip = self.config.primary_ip
        self.master_adver_interval = self.config.advert_interval
        self._lower_master_since = None
        return actions + self._advertise(now) + [SendGratuitous()]

    # -- helpers ----------------------------------------------------------------

    def _master_leaving(self, now: float, interval: float, reason: str) -> None:
        """The followed master is going: take over after the skew (at ``interval``, at most
        the current one) unless another master is heard first."""
        interval = min(self.master_adver_interval, interval)
        self._set_deadline(now + (256 - self.priority) * interval / 256)
        self._down_reason = reason
        self.master_ip = None
        self._lower_master_since = None

    def _following(self, master: IPAddress | str) -> bool:
        return self.state is State.BACKUP and self.master_ip is not None and ipaddress.ip_address(master) == self.master_ip

    def _follow_changes(self) -> list[Action]:
        wanted = self.master_ip if self.config.peer_link and self.state is State.BACKUP else None
        if wanted == self._followed:
            return []
        self._followed = wanted
        return [FollowMaster(wanted)]

    def _preempting(self) -> bool:
        # RFC 6.1: the address owner always preempts, whatever Preempt_Mode says.
        wants = self.config.preempt or self.priority == OWNER_PRIORITY
        return wants and not self.resigned

    def _within_preempt_delay(self, now: float) -> bool:
        if self.config.preempt_delay <= 0:
            return False
        if self._lower_master_since is None:
            self._lower_master_since = now
        return now < self._lower_master_since + self.config.preempt_delay

    def _arm_down_timer(self, now: float, master_interval: float, *, master_ip: IPAddress | None) -> None:
        self.master_adver_interval = master_interval
        self.master_ip = master_ip
        self._down_reason = "master_down"
        self._set_deadline(now + self.master_down_interval)

    def _set_deadline(self, deadline: float) -> None:
        self.next_deadline = deadline
        self._stall_deferred = False

    def _advertise(self, now: float) -> list[Action]:
        self._last_advert_sent = now
        self._set_deadline(now + self.config.advert_interval)
        return [self._advert(self.priority)]

    def _advert(self, priority: int) -> SendAdvert:
        self.counters.adverts_sent += 1
        if priority == 0:
            self.counters.priority_zero_sent += 1
            return SendAdvert(0, HANDOVER_INTERVAL)
        return SendAdvert(priority, self.config.advert_interval)

    def _transition(self, new: State, reason: str) -> StateChanged:
        old, self.state = self.state, new
        if new is not State.MASTER:
            self._last_advert_sent = None
        return StateChanged(old, new, reason)
