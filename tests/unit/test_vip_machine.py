"""The VRRP state machine (RFC 5798 6.4) with time passed in: each rule, then whole elections."""

import heapq
import ipaddress
import itertools

import pytest

from proxy.vip.machine import (
    HANDOVER_INTERVAL,
    FollowMaster,
    MachineConfig,
    ReleaseAddresses,
    SendAdvert,
    SendGratuitous,
    State,
    StateChanged,
    TakeAddresses,
    VrrpMachine,
)
from proxy.vip.packet import Advert
from proxy.vip.peerlink import designate

V4 = ipaddress.IPv4Address
VIP = (V4("10.0.0.100"),)
OWN_IP, PEER_LOW_IP, PEER_HIGH_IP = V4("10.0.0.2"), V4("10.0.0.1"), V4("10.0.0.3")


def machine(**changes) -> VrrpMachine:
    fields = dict(vrid=51, priority=100, advert_interval=1.0, primary_ip=OWN_IP, addresses=VIP)
    fields.update(changes)
    return VrrpMachine(MachineConfig(**fields))


def advert(priority, interval_cs=100, vrid=51, addresses=VIP) -> Advert:
    return Advert(vrid, priority, interval_cs, addresses)


def backup(now=0.0, **changes) -> VrrpMachine:
    vrrp = machine(**changes)
    vrrp.start(now)
    assert vrrp.state is State.BACKUP
    return vrrp


def master(now=0.0, **changes) -> VrrpMachine:
    vrrp = backup(now, **changes)
    vrrp.on_timer(vrrp.next_deadline)
    assert vrrp.state is State.MASTER
    return vrrp


def becomes_master(reason):
    changed = StateChanged(State.BACKUP, State.MASTER, reason)
    return [changed, TakeAddresses(), SendAdvert(100, 1.0), SendGratuitous()]


class TestConfig:
    @pytest.mark.parametrize(
        "changes",
        [
            {"priority": 0},
            {"priority": 256},
            {"advert_interval": 0.0},
            {"advert_interval": 41.0},
            {"advert_interval": 0.015},  # not representable on the wire
            {"vrid": 0},
            {"addresses": ()},
            {"primary_ip": ipaddress.IPv6Address("fe80::1")},
            {"preempt_delay": -1},
        ],
    )
    def test_rejects(self, changes):
        with pytest.raises(ValueError):
            machine(**changes)


class TestTimers:
    def test_skew_and_master_down_interval_follow_rfc_formulas(self):
        vrrp = machine(priority=100)
        assert vrrp.skew == pytest.approx(156 / 256)
        assert vrrp.master_down_interval == pytest.approx(3 + 156 / 256)

    def test_higher_priority_has_less_skew(self):
        assert machine(priority=200).skew < machine(priority=100).skew

    def test_backups_adopt_the_masters_interval(self):
        vrrp = backup()
        vrrp.on_advert(5.0, advert(200, interval_cs=200), PEER_HIGH_IP)
        assert vrrp.master_adver_interval == 2.0
        assert vrrp.next_deadline == pytest.approx(5.0 + 3 * 2.0 + 156 * 2.0 / 256)


class TestInitialize:
    def test_owner_goes_straight_to_master(self):
        vrrp = machine(priority=255)
        assert vrrp.start(3.0) == [
            StateChanged(State.INIT, State.MASTER, "address_owner"),
            TakeAddresses(),
            SendAdvert(255, 1.0),
            SendGratuitous(),
        ]
        assert vrrp.next_deadline == 4.0
        assert vrrp.master_ip == OWN_IP

    def test_others_start_as_backup_with_the_down_timer(self):
        vrrp = machine()
        assert vrrp.start(3.0) == [StateChanged(State.INIT, State.BACKUP, "startup")]
        assert vrrp.next_deadline == pytest.approx(3.0 + vrrp.master_down_interval)
        assert vrrp.master_ip is None

    def test_start_twice_is_a_programming_error(self):
        vrrp = backup()
        with pytest.raises(RuntimeError):
            vrrp.start(1.0)

    def test_start_with_the_link_down_enters_fault(self):
        vrrp = machine()
        assert vrrp.interface_down(0.0) == []
        assert vrrp.start(0.0) == [StateChanged(State.INIT, State.FAULT, "interface_down")]
        assert vrrp.next_deadline is None


class TestBackup:
    def test_timer_before_the_deadline_is_a_no_op(self):
        vrrp = backup()
        assert vrrp.on_timer(vrrp.next_deadline - 0.001) == []
        assert vrrp.state is State.BACKUP

    def test_down_timer_makes_it_master(self):
        vrrp = backup()
        deadline = vrrp.next_deadline
        assert vrrp.on_timer(deadline) == becomes_master("master_down")
        assert vrrp.next_deadline == deadline + 1.0
        assert vrrp.counters.became_master == 1

    def test_an_advert_resets_the_down_timer(self):
        vrrp = backup()
        vrrp.on_advert(2.0, advert(200), PEER_HIGH_IP)
        assert vrrp.next_deadline == pytest.approx(2.0 + vrrp.master_down_interval)
        assert vrrp.master_ip == PEER_HIGH_IP
        assert vrrp.on_timer(3.0 + 156 / 256) == []

    def test_priority_zero_sets_the_down_timer_to_skew(self):
        vrrp = backup()
        vrrp.on_advert(2.0, advert(200), PEER_HIGH_IP)
        assert vrrp.on_advert(2.5, advert(0), PEER_HIGH_IP) == []
        assert vrrp.next_deadline == pytest.approx(2.5 + 156 / 256)
        assert vrrp.master_ip is None
        assert vrrp.on_timer(vrrp.next_deadline) == becomes_master("master_left")
        assert vrrp.counters.priority_zero_received == 1

    def test_equal_priority_master_is_accepted_even_with_preempt(self):
        vrrp = backup(preempt=True)
        for second in range(1, 20):
            vrrp.on_timer(float(second))
            vrrp.on_advert(float(second), advert(100), PEER_LOW_IP)
        assert vrrp.state is State.BACKUP

    def test_without_preempt_a_live_lower_master_is_never_displaced(self):
        vrrp = backup(preempt=False)
        for second in range(1, 30):
            assert vrrp.on_timer(float(second)) == []
            vrrp.on_advert(float(second), advert(50), PEER_LOW_IP)
        assert vrrp.state is State.BACKUP
        assert vrrp.master_ip == PEER_LOW_IP

    def test_with_preempt_lower_adverts_are_ignored_until_the_down_timer_fires(self):
        vrrp = backup(preempt=True)
        deadline = vrrp.next_deadline
        for now in (0.5, 1.5, 2.5, 3.5):
            vrrp.on_advert(now, advert(50), PEER_LOW_IP)
            assert vrrp.next_deadline == deadline
        assert vrrp.on_timer(deadline) == becomes_master("preempt")

    def test_preempt_delay_tolerates_a_lower_master_for_that_long(self):
        vrrp = backup(preempt=True, preempt_delay=10.0)
        second = 1.0
        while vrrp.state is State.BACKUP:
            vrrp.on_timer(second)
            if vrrp.state is State.BACKUP:
                vrrp.on_advert(second, advert(50), PEER_LOW_IP)
            second += 0.25
        # First heard at 1.0; tolerated until 11.0; the last accepted advert is at 10.75.
        assert second - 0.25 == pytest.approx(10.75 + vrrp.master_down_interval, abs=0.25)

    def test_preempt_delay_restarts_when_a_higher_master_was_seen(self):
        vrrp = backup(preempt=True, preempt_delay=5.0)
        vrrp.on_advert(1.0, advert(50), PEER_LOW_IP)
        vrrp.on_advert(4.0, advert(200), PEER_HIGH_IP)
        vrrp.on_advert(7.0, advert(50), PEER_LOW_IP)  # the window restarts here
        vrrp.on_advert(11.0, advert(50), PEER_LOW_IP)
        assert vrrp.next_deadline == pytest.approx(11.0 + vrrp.master_down_interval)

    def test_the_owner_always_preempts(self):
        vrrp = backup(preempt=False)
        vrrp.set_effective_priority(1.0, 255)
        deadline = vrrp.next_deadline
        vrrp.on_advert(2.0, advert(200), PEER_HIGH_IP)
        assert vrrp.next_deadline == deadline


class TestMaster:
    def test_advertises_every_interval(self):
        vrrp = master()
        start = vrrp.next_deadline
        for tick in range(5):
            assert vrrp.on_timer(start + tick) == [SendAdvert(100, 1.0)]
            assert vrrp.next_deadline == start + tick + 1

    def test_steps_down_on_a_higher_priority(self):
        vrrp = master()
        now = vrrp.next_deadline - 0.5
        # One advert of its own first: the new master, hearing a rival, re-announces the VIP.
        assert vrrp.on_advert(now, advert(200, interval_cs=50), PEER_LOW_IP) == [
            SendAdvert(100, 1.0),
            StateChanged(State.MASTER, State.BACKUP, "higher_priority"),
            ReleaseAddresses(),
        ]
        assert vrrp.master_ip == PEER_LOW_IP
        assert vrrp.next_deadline == pytest.approx(now + 3 * 0.5 + 156 * 0.5 / 256)

    def test_a_healed_partition_ends_with_the_winner_announcing_whichever_advert_crosses_first(self):
        # Both sides were masters; the winner's advert reaches the loser first (the other
        # order is test_a_lower_priority_master_is_answered_at_once_and_the_vip_reannounced).
        winner = master(priority=200, primary_ip=PEER_HIGH_IP)
        loser = master(primary_ip=OWN_IP)
        now = max(winner.next_deadline, loser.next_deadline) - 0.5
        [answer, *_] = loser.on_advert(now, advert(200), PEER_HIGH_IP)
        assert answer == SendAdvert(100, 1.0) and loser.state is State.BACKUP
        heard = winner.on_advert(now, advert(answer.priority, answer.interval_cs), OWN_IP)
        assert SendGratuitous() in heard and winner.state is State.MASTER

    def test_steps_down_on_equal_priority_from_a_higher_address(self):
        vrrp = master()
        actions = vrrp.on_advert(vrrp.next_deadline - 0.5, advert(100), PEER_HIGH_IP)
        assert actions == [
            SendAdvert(100, 1.0), StateChanged(State.MASTER, State.BACKUP, "tie_break"), ReleaseAddresses()
        ]

    def test_equal_priority_from_a_lower_address_is_answered_at_once(self):
        vrrp = master()
        now = vrrp.next_deadline - 0.5
        assert vrrp.on_advert(now, advert(100), PEER_LOW_IP) == [SendAdvert(100, 1.0), SendGratuitous()]
        assert vrrp.state is State.MASTER
        assert vrrp.next_deadline == now + 1.0

    def test_a_lower_priority_master_is_answered_at_once_and_the_vip_reannounced(self):
        vrrp = master()
        now = vrrp.next_deadline - 0.5
        assert vrrp.on_advert(now, advert(50), PEER_HIGH_IP) == [SendAdvert(100, 1.0), SendGratuitous()]
        assert vrrp.next_deadline == now + 1.0

    def test_priority_zero_from_a_peer_is_answered_with_an_advert(self):
        vrrp = master()
        now = vrrp.next_deadline - 0.5
        assert vrrp.on_advert(now, advert(0), PEER_HIGH_IP) == [SendAdvert(100, 1.0)]
        assert vrrp.next_deadline == now + 1.0

    def test_master_ip_is_our_own(self):
        assert master().master_ip == OWN_IP


class TestShutdown:
    def test_master_sends_priority_zero_then_releases(self):
        vrrp = master()
        assert vrrp.shutdown(9.0) == [
            StateChanged(State.MASTER, State.INIT, "shutdown"),
            SendAdvert(0, 0.01),  # the shortest interval: backups hand over after a tiny skew
            ReleaseAddresses(),
        ]
        assert (vrrp.state, vrrp.next_deadline, vrrp.master_ip) == (State.INIT, None, None)
        assert vrrp.counters.priority_zero_sent == 1

    def test_backup_just_stops(self):
        vrrp = backup()
        assert vrrp.shutdown(1.0) == [StateChanged(State.BACKUP, State.INIT, "shutdown")]
        assert vrrp.next_deadline is None

    def test_shutdown_when_not_started_is_a_no_op(self):
        assert machine().shutdown(0.0) == []

    def test_init_ignores_adverts_and_timers_and_can_restart(self):
        vrrp = master()
        vrrp.shutdown(5.0)
        assert vrrp.on_advert(6.0, advert(200), PEER_HIGH_IP) == []
        assert vrrp.on_timer(100.0) == []
        assert vrrp.start(7.0)[0] == StateChanged(State.INIT, State.BACKUP, "startup")


class TestFilters:
    def test_another_vrid_is_counted_and_ignored(self):
        vrrp = backup()
        deadline = vrrp.next_deadline
        assert vrrp.on_advert(1.0, advert(200, vrid=52), PEER_HIGH_IP) == []
        assert vrrp.next_deadline == deadline
        assert vrrp.counters.errors == 1
        assert vrrp.counters.adverts_received == 0

    def test_ipv6_advert_or_source_is_ignored(self):
        vrrp = backup()
        v6 = (ipaddress.IPv6Address("2001:db8::1"),)
        vrrp.on_advert(1.0, advert(200, addresses=v6), ipaddress.IPv6Address("fe80::9"))
        vrrp.on_advert(1.0, advert(200), ipaddress.IPv6Address("fe80::9"))
        assert vrrp.counters.errors == 2
        assert vrrp.master_ip is None

    def test_our_own_looped_back_advert_is_ignored(self):
        vrrp = master()
        assert vrrp.on_advert(1.0, advert(100), OWN_IP) == []
        assert vrrp.counters.adverts_received == 0

    def test_a_different_address_list_is_counted_but_processed(self):
        """RFC 5798 7.1: a misconfiguration to report, not a reason to ignore the master."""
        vrrp = backup()
        vrrp.on_advert(1.0, advert(200, addresses=(V4("10.0.0.200"),)), PEER_HIGH_IP)
        assert vrrp.counters.address_mismatch == 1
        assert vrrp.master_ip == PEER_HIGH_IP

    def test_string_source_addresses_are_accepted(self):
        vrrp = backup()
        vrrp.on_advert(1.0, advert(200), "10.0.0.3")
        assert vrrp.master_ip == PEER_HIGH_IP

    def test_note_error_counts_packets_the_shell_dropped(self):
        vrrp = machine()
        vrrp.note_error()
        assert vrrp.counters.errors == 1


class TestPriorityTracking:
    def test_master_readvertises_a_changed_priority_at_once(self):
        vrrp = master()
        assert vrrp.set_effective_priority(5.2, 40) == [SendAdvert(40, 1.0)]
        assert vrrp.next_deadline == 6.2
        assert vrrp.set_effective_priority(5.3, 40) == []

    def test_backup_priority_changes_its_skew(self):
        vrrp = backup()
        assert vrrp.set_effective_priority(1.0, 200) == []
        assert vrrp.skew == pytest.approx(56 / 256)

    def test_backup_with_raised_priority_preempts_the_master(self):
        vrrp = backup(preempt=True)
        vrrp.on_advert(1.0, advert(150), PEER_HIGH_IP)
        vrrp.set_effective_priority(1.5, 200)
        deadline = vrrp.next_deadline
        vrrp.on_advert(2.0, advert(150), PEER_HIGH_IP)  # now lower than us: ignored
        assert vrrp.next_deadline == deadline
        assert vrrp.on_timer(deadline)[0] == StateChanged(
            State.BACKUP, State.MASTER, "preempt"
        )

    @pytest.mark.parametrize("priority", [0, 256])
    def test_rejects_out_of_range(self, priority):
        with pytest.raises(ValueError):
            machine().set_effective_priority(0.0, priority)


class TestResign:
    def test_master_hands_over_at_once(self):
        vrrp = master()
        vrrp.set_effective_priority(5.0, 40)
        assert vrrp.resign(5.1) == [
            StateChanged(State.MASTER, State.BACKUP, "resign"),
            SendAdvert(0, 0.01),
            ReleaseAddresses(),
        ]
        assert vrrp.next_deadline == pytest.approx(5.1 + 3 + 216 / 256)

    def test_resigned_backup_does_not_preempt_a_lower_master(self):
        vrrp = master(priority=150)
        vrrp.resign(5.0)
        for second in range(6, 30):
            vrrp.on_timer(float(second))
            vrrp.on_advert(float(second), advert(100), PEER_LOW_IP)
        assert vrrp.state is State.BACKUP

    def test_resigned_backup_still_takes_over_when_nobody_else_does(self):
        vrrp = master()
        vrrp.resign(5.0)
        assert vrrp.on_timer(vrrp.next_deadline)[0] == StateChanged(State.BACKUP, State.MASTER, "master_down")

    def test_reinstate_restores_preemption(self):
        vrrp = master(priority=150)
        vrrp.resign(5.0)
        vrrp.on_advert(6.0, advert(100), PEER_LOW_IP)
        assert vrrp.reinstate(6.5) == []
        vrrp.on_advert(7.0, advert(100), PEER_LOW_IP)
        assert vrrp.next_deadline == pytest.approx(6.0 + vrrp.master_down_interval)

    def test_resign_as_backup_only_stops_preemption(self):
        vrrp = backup(priority=150)
        assert vrrp.resign(1.0) == []
        vrrp.on_advert(2.0, advert(100), PEER_LOW_IP)
        assert vrrp.next_deadline == pytest.approx(2.0 + vrrp.master_down_interval)


class TestFault:
    def test_interface_down_as_master_releases_the_vip(self):
        vrrp = master()
        assert vrrp.interface_down(5.0) == [
            StateChanged(State.MASTER, State.FAULT, "interface_down"),
            ReleaseAddresses(),
        ]
        assert (vrrp.next_deadline, vrrp.master_ip) == (None, None)

    def test_fault_ignores_adverts_and_timers(self):
        vrrp = backup()
        assert vrrp.interface_down(1.0) == [StateChanged(State.BACKUP, State.FAULT, "interface_down")]
        assert vrrp.on_advert(2.0, advert(0), PEER_HIGH_IP) == []
        assert vrrp.on_timer(100.0) == []
        assert vrrp.interface_down(3.0) == []

    def test_interface_up_goes_through_initialize(self):
        vrrp = master()
        vrrp.interface_down(5.0)
        assert vrrp.interface_up(6.0) == [StateChanged(State.FAULT, State.BACKUP, "interface_up")]
        assert vrrp.next_deadline == pytest.approx(6.0 + vrrp.master_down_interval)

    def test_owner_returns_to_master_when_the_link_is_back(self):
        vrrp = machine(priority=255)
        vrrp.start(0.0)
        vrrp.interface_down(1.0)
        assert vrrp.interface_up(2.0)[0] == StateChanged(State.FAULT, State.MASTER, "address_owner")

    def test_interface_up_outside_fault_is_a_no_op(self):
        assert backup().interface_up(1.0) == []


class TestStalls:
    """A SIGSTOPped / paused process resumes with timers long overdue and adverts queued."""

    def stalled_master(self):
        vrrp = master()
        last_advert = vrrp.next_deadline - 1.0
        return vrrp, last_advert + 3.5  # > 3 intervals of silence: backups may have taken over

    def test_a_late_master_timer_steps_down_silently(self):
        vrrp, resumed = self.stalled_master()
        assert vrrp.on_timer(resumed) == [StateChanged(State.MASTER, State.BACKUP, "stalled"), ReleaseAddresses()]
        assert vrrp.next_deadline == pytest.approx(resumed + vrrp.master_down_interval)
        assert vrrp.counters.stalls == 1

    def test_it_leaves_the_vip_to_an_equal_priority_new_master(self):
        vrrp, resumed = self.stalled_master()
        vrrp.on_timer(resumed)
        actions = []
        for tick in range(20):
            now = resumed + 0.1 + tick
            actions += vrrp.on_advert(now, advert(100), PEER_LOW_IP) + vrrp.on_timer(now)
        assert TakeAddresses() not in actions
        assert vrrp.master_ip == PEER_LOW_IP

    def test_a_queued_advert_read_before_the_timer_also_triggers_the_step_down(self):
        """Without the stall check a master answers a lower/equal master by re-announcing the VIP."""
        vrrp, resumed = self.stalled_master()
        actions = vrrp.on_advert(resumed, advert(100), PEER_LOW_IP)
        assert actions == [StateChanged(State.MASTER, State.BACKUP, "stalled"), ReleaseAddresses()]
        assert vrrp.master_ip == PEER_LOW_IP

    def test_against_a_lower_new_master_normal_preemption_applies(self):
        vrrp, resumed = self.stalled_master()
        vrrp.on_timer(resumed)
        vrrp.on_advert(resumed + 0.2, advert(50), PEER_LOW_IP)
        assert vrrp.state is State.BACKUP
        assert vrrp.on_timer(resumed + vrrp.master_down_interval)[0].reason == "preempt"

    def test_a_merely_late_timer_still_advertises(self):
        vrrp = master()
        assert vrrp.on_timer(vrrp.next_deadline + 1.9) == [SendAdvert(100, 1.0)]

    def test_a_very_late_backup_timer_waits_one_interval_for_queued_adverts(self):
        vrrp = backup()
        resumed = vrrp.next_deadline + 5.0
        assert vrrp.on_timer(resumed) == []
        assert vrrp.next_deadline == resumed + 1.0
        vrrp.on_advert(resumed + 0.01, advert(200), PEER_HIGH_IP)  # the live master, from the queue
        assert vrrp.on_timer(resumed + 1.0) == []
        assert vrrp.state is State.BACKUP

    def test_the_backup_defers_only_once(self):
        vrrp = backup()
        resumed = vrrp.next_deadline + 5.0
        vrrp.on_timer(resumed)
        assert vrrp.on_timer(vrrp.next_deadline + 5.0)[0].new is State.MASTER


class TestCounters:
    def test_counts_what_happened(self):
        vrrp = master()
        vrrp.on_timer(vrrp.next_deadline)
        vrrp.on_advert(vrrp.next_deadline - 0.5, advert(0), PEER_HIGH_IP)
        vrrp.shutdown(50.0)
        counters = vrrp.counters
        assert (counters.adverts_sent, counters.priority_zero_sent) == (4, 1)
        assert (counters.adverts_received, counters.priority_zero_received) == (1, 1)
        assert counters.became_master == 1

    def test_build_advert(self):
        vrrp = machine(advert_interval=0.1)
        assert vrrp.build_advert(SendAdvert(0, 0.1)) == Advert(51, 0, 10, VIP)


class TestPeerLink:
    """FollowMaster says whom a backup keeps a link to; master_link_lost acts like priority 0."""

    LINK_SKEW = 156 / 256 * HANDOVER_INTERVAL  # priority 100

    def test_a_backup_follows_the_master_it_hears(self):
        vrrp = backup(peer_link=True)
        assert vrrp.on_advert(1.0, advert(200), PEER_HIGH_IP) == [FollowMaster(PEER_HIGH_IP)]
        assert vrrp.on_advert(2.0, advert(200), PEER_HIGH_IP) == []  # said once
        assert vrrp.on_advert(2.5, advert(100), V4("10.0.0.9")) == [FollowMaster(V4("10.0.0.9"))]

    def test_nothing_is_followed_without_the_peer_link(self):
        vrrp = backup()
        actions = vrrp.on_advert(1.0, advert(200), PEER_HIGH_IP) + vrrp.on_timer(10.0)
        assert not any(isinstance(action, FollowMaster) for action in actions)

    def test_a_backup_that_becomes_master_follows_nobody(self):
        vrrp = backup(peer_link=True)
        vrrp.on_advert(1.0, advert(200), PEER_HIGH_IP)
        assert vrrp.on_timer(vrrp.next_deadline)[-1] == FollowMaster(None)
        assert vrrp.state is State.MASTER

    @pytest.mark.parametrize("leaving", [
        lambda vrrp: vrrp.on_advert(2.0, advert(0, interval_cs=1), PEER_HIGH_IP),  # priority 0
        lambda vrrp: vrrp.shutdown(2.0),
        lambda vrrp: vrrp.interface_down(2.0),
    ])
    def test_the_link_is_dropped_when_there_is_no_master_to_follow(self, leaving):
        vrrp = backup(peer_link=True)
        vrrp.on_advert(1.0, advert(200), PEER_HIGH_IP)
        assert leaving(vrrp)[-1] == FollowMaster(None)

    def test_a_master_stepping_down_follows_the_new_master(self):
        vrrp = master(peer_link=True)
        actions = vrrp.on_advert(5.0, advert(200), PEER_HIGH_IP)
        assert actions[-1] == FollowMaster(PEER_HIGH_IP) and vrrp.state is State.BACKUP

    def test_a_resumed_master_that_stalled_follows_whom_it_hears(self):
        vrrp = master(peer_link=True)
        assert vrrp.on_advert(vrrp.next_deadline + 10, advert(200), PEER_HIGH_IP)[-1] == FollowMaster(PEER_HIGH_IP)

    def test_losing_the_followed_masters_link_takes_over_after_the_skew(self):
        vrrp = backup(peer_link=True)
        vrrp.on_advert(1.0, advert(200), PEER_HIGH_IP)
        assert vrrp.master_link_lost(1.5, PEER_HIGH_IP) == [FollowMaster(None)]
        assert vrrp.next_deadline == pytest.approx(1.5 + self.LINK_SKEW)  # not 1 + 3.6 s
        assert vrrp.master_ip is None and vrrp.counters.master_link_lost == 1
        assert vrrp.on_timer(vrrp.next_deadline)[0] == StateChanged(State.BACKUP, State.MASTER, "master_link_lost")

    def test_an_address_given_as_text_is_understood(self):
        vrrp = backup(peer_link=True)
        vrrp.on_advert(1.0, advert(200), PEER_HIGH_IP)
        vrrp.master_link_lost(1.5, str(PEER_HIGH_IP))
        assert vrrp.counters.master_link_lost == 1

    def test_the_link_skew_keeps_the_backups_in_priority_order(self):
        high, low = backup(priority=200, peer_link=True), backup(priority=100, peer_link=True)
        for vrrp in (high, low):
            vrrp.on_advert(1.0, advert(250), PEER_HIGH_IP)
            vrrp.master_link_lost(2.0, PEER_HIGH_IP)
        assert 2.0 < high.next_deadline < low.next_deadline <= 2.0 + HANDOVER_INTERVAL

    def test_a_preempting_backup_takes_over_early_too(self):
        vrrp = backup(priority=200, peer_link=True)
        vrrp.on_advert(1.0, advert(100), PEER_LOW_IP)  # a lower master, about to be preempted
        vrrp.master_link_lost(1.5, PEER_LOW_IP)
        assert vrrp.next_deadline == pytest.approx(1.5 + 56 / 256 * HANDOVER_INTERVAL)

    def test_an_advert_heard_before_the_skew_ends_keeps_it_a_backup(self):
        vrrp = backup(peer_link=True)
        vrrp.on_advert(1.0, advert(200), PEER_HIGH_IP)
        vrrp.master_link_lost(1.5, PEER_HIGH_IP)
        assert vrrp.on_advert(1.501, advert(200), V4("10.0.0.9")) == [FollowMaster(V4("10.0.0.9"))]
        assert vrrp.on_timer(1.6) == [] and vrrp.state is State.BACKUP

    @pytest.mark.parametrize("situation", ["other_master", "no_master", "master", "init", "fault", "twice"])
    def test_a_link_that_is_not_the_followed_masters_changes_nothing(self, situation):
        vrrp = backup(peer_link=True)
        vrrp.on_advert(1.0, advert(200), PEER_HIGH_IP)
        lost = PEER_HIGH_IP
        if situation == "other_master":
            lost = V4("10.0.0.9")
        elif situation == "no_master":
            vrrp.on_advert(1.2, advert(0, interval_cs=1), PEER_HIGH_IP)
        elif situation == "master":
            vrrp.on_timer(vrrp.next_deadline)
        elif situation == "init":
            vrrp.shutdown(1.2)
        elif situation == "fault":
            vrrp.interface_down(1.2)
        elif situation == "twice":
            vrrp.master_link_lost(1.3, lost)
        before = (vrrp.state, vrrp.next_deadline, vrrp.counters.master_link_lost)
        assert vrrp.master_link_lost(1.5, lost) == []
        assert (vrrp.state, vrrp.next_deadline, vrrp.counters.master_link_lost) == before


class TestDesignatedSuccessor:
    """The master names its successor over the link; that backup alone skips the skew."""

    def following(self, **changes) -> VrrpMachine:
        vrrp = backup(peer_link=True, **changes)
        vrrp.on_advert(1.0, advert(200), PEER_HIGH_IP)
        return vrrp

    def test_the_designated_backup_takes_over_at_once_when_the_link_is_lost(self):
        vrrp = self.following()
        assert vrrp.successor_designated(1.2, PEER_HIGH_IP, OWN_IP) == []
        actions = vrrp.master_link_lost(1.5, PEER_HIGH_IP)
        assert actions[:4] == [StateChanged(State.BACKUP, State.MASTER, "master_link_lost"), TakeAddresses(),
                               SendAdvert(100, 1.0), SendGratuitous()]
        assert actions[-1] == FollowMaster(None) and vrrp.state is State.MASTER
        assert (vrrp.counters.master_link_lost, vrrp.counters.successor_takeovers) == (1, 1)

    def test_a_backup_told_that_nobody_is_the_successor_keeps_its_skew(self):
        vrrp = self.following()
        vrrp.successor_designated(1.1, PEER_HIGH_IP, OWN_IP)
        vrrp.successor_designated(1.2, PEER_HIGH_IP, None)  # the master changed its mind
        assert vrrp.master_link_lost(1.5, PEER_HIGH_IP) == [FollowMaster(None)]
        assert vrrp.next_deadline == pytest.approx(1.5 + TestPeerLink.LINK_SKEW)
        assert vrrp.counters.successor_takeovers == 0

    def test_a_backup_not_designated_leaves_the_link_loss_to_the_rfc_timers(self):
        vrrp = self.following()
        vrrp.successor_designated(1.1, PEER_HIGH_IP, OWN_IP)
        vrrp.successor_designated(1.2, PEER_HIGH_IP, PEER_LOW_IP)  # another backup is named now
        down = vrrp.next_deadline
        assert vrrp.master_link_lost(1.5, PEER_HIGH_IP) == []
        assert vrrp.next_deadline == down == pytest.approx(1.0 + 3 + 156 / 256)  # from the last advert
        assert vrrp.master_ip == PEER_HIGH_IP and vrrp.counters.master_link_lost == 0
        assert vrrp.on_timer(down)[0] == StateChanged(State.BACKUP, State.MASTER, "master_down")  # if nobody came

    def test_only_the_followed_master_can_designate(self):
        vrrp = self.following()
        vrrp.successor_designated(1.2, V4("10.0.0.9"), OWN_IP)  # not whom we follow
        vrrp.master_link_lost(1.5, PEER_HIGH_IP)
        assert vrrp.state is State.BACKUP and vrrp.counters.successor_takeovers == 0

    @pytest.mark.parametrize("meanwhile", ["other_master", "master_left", "interface_down"])
    def test_a_designation_is_forgotten_once_another_master_or_none_is_followed(self, meanwhile):
        vrrp = self.following()
        vrrp.successor_designated(1.2, PEER_HIGH_IP, OWN_IP)
        if meanwhile == "other_master":
            vrrp.on_advert(1.3, advert(200), V4("10.0.0.9"))
        elif meanwhile == "master_left":
            vrrp.on_advert(1.3, advert(0, interval_cs=1), PEER_HIGH_IP)
        else:
            vrrp.interface_down(1.3)
            vrrp.interface_up(1.35)
        vrrp.on_advert(1.4, advert(200), PEER_HIGH_IP)  # the same master again: a stale designation
        vrrp.master_link_lost(1.5, PEER_HIGH_IP)
        assert vrrp.state is State.BACKUP and vrrp.counters.successor_takeovers == 0

    def test_a_designation_outside_backup_state_is_ignored(self):
        vrrp = master(peer_link=True)
        assert vrrp.successor_designated(5.0, PEER_HIGH_IP, OWN_IP) == []
        vrrp.on_advert(5.1, advert(200), PEER_HIGH_IP)  # steps down, follows PEER_HIGH
        vrrp.master_link_lost(5.2, PEER_HIGH_IP)
        assert vrrp.state is State.BACKUP and vrrp.counters.successor_takeovers == 0

    def test_a_resigned_backup_keeps_its_skew_even_when_designated(self):
        vrrp = self.following()
        vrrp.successor_designated(1.2, PEER_HIGH_IP, OWN_IP)
        vrrp.resign(1.3)
        vrrp.master_link_lost(1.5, PEER_HIGH_IP)
        assert vrrp.state is State.BACKUP and vrrp.next_deadline == pytest.approx(1.5 + TestPeerLink.LINK_SKEW)


# -- whole elections on a simulated segment ---------------------------------------


LINK_LOST = "link lost"  # a delivery: the peer link from the receiver to src ended
SUCCESSOR = "successor"  # a delivery (SUCCESSOR, address): src named its successor over the link


class Segment:
    """Machines exchanging adverts with a fixed one-way latency, in simulated time.

    Peer links: each machine follows whom its FollowMaster actions name; a
    :meth:`crash` ends the links to the crashed node (its kernel closes them)
    if it serves links (``serves_links``: Warren does, keepalived does not).
    """

    def __init__(self, *machines: VrrpMachine, latency: float = 0.001) -> None:
        self.machines = list(machines)
        self.latency = latency
        self.now = 0.0
        self.deliveries: list = []  # heap of (time, seq, receiver, advert or LINK_LOST, src)
        self.seq = itertools.count()
        self.holders: set[int] = set()
        self.took_vip: dict[int, list[float]] = {index: [] for index in range(len(machines))}
        self.alive = [True] * len(machines)
        self.follows: list = [None] * len(machines)
        self.serves_links = [True] * len(machines)
        self.told: dict[tuple[int, int], object] = {}  # (master, follower): the successor it was told
        self.double_since: float | None = None
        self.longest_double = 0.0  # the longest time two or more nodes held the VIP

    def apply(self, index: int, actions: list) -> None:
        vrrp = self.machines[index]
        for action in actions:
            if isinstance(action, SendAdvert):
                self.broadcast(index, vrrp.build_advert(action))
            elif isinstance(action, TakeAddresses):
                self.holders.add(index)
                self.took_vip[index].append(self.now)
            elif isinstance(action, ReleaseAddresses):
                self.holders.discard(index)
            elif isinstance(action, FollowMaster):
                self.follows[index] = action.address
        self.note_holders()
        self.tell_successors()

    def note_holders(self) -> None:
        if len(self.holders) > 1 and self.double_since is None:
            self.double_since = self.now
        elif len(self.holders) <= 1 and self.double_since is not None:
            self.longest_double = max(self.longest_double, self.now - self.double_since)
            self.double_since = None

    def tell_successors(self) -> None:
        """What every live Warren master says over its links: the successor among its
        followers (:func:`designate`), to each follower it has not told yet."""
        for index, vrrp in enumerate(self.machines):
            if not (self.alive[index] and self.serves_links[index]):
                continue
            ip = vrrp.config.primary_ip
            followers = [f for f, followed in enumerate(self.follows) if followed == ip and self.alive[f]]
            successor = designate((self.machines[f].config.primary_ip, self.machines[f].priority) for f in followers)
            for follower in followers:
                if self.told.get((index, follower), ()) != successor:
                    self.told[(index, follower)] = successor
                    heapq.heappush(self.deliveries, (self.now + self.latency, next(self.seq), follower,
                                                     (SUCCESSOR, successor), ip))
            for master, follower in list(self.told):
                if master == index and follower not in followers:
                    del self.told[(master, follower)]

    def lose_designations(self, index: int) -> None:
        """The successors ``index`` named but that have not arrived are never sent (it died first)."""
        self.deliveries = [d for d in self.deliveries if not (isinstance(d[3], tuple) and d[4] == self.machines[index].config.primary_ip)]
        heapq.heapify(self.deliveries)

    def delay(self, index: int, by: float) -> None:
        """``index`` is starved of CPU: what is on its way to it is read ``by`` seconds later."""
        self.deliveries = [(at + by, *rest) if rest[1] == index else (at, *rest) for at, *rest in self.deliveries]
        heapq.heapify(self.deliveries)

    def broadcast(self, sender: int, message: Advert) -> None:
        src = self.machines[sender].config.primary_ip
        for receiver in range(len(self.machines)):
            if receiver != sender:
                heapq.heappush(self.deliveries, (self.now + self.latency, next(self.seq), receiver, message, src))

    def kill(self, index: int) -> None:
        """SIGKILL: silent from now on (its address stays until the lease expires; not modelled)."""
        self.alive[index] = False
        self.holders.discard(index)
        self.note_holders()

    def crash(self, index: int) -> None:
        """The process dies: silent, and its kernel ends its peer links (FIN): the one it
        held to its master (which names another successor) and those to it."""
        self.kill(index)
        self.follows[index] = None
        self.tell_successors()
        if not self.serves_links[index]:
            return
        ip = self.machines[index].config.primary_ip
        for follower, followed in enumerate(self.follows):
            if followed == ip and self.alive[follower]:
                heapq.heappush(self.deliveries, (self.now + self.latency, next(self.seq), follower, LINK_LOST, ip))

    def start_all(self, at: float = 0.0, *, later: tuple[int, ...] = ()) -> None:
        """Starts every machine but those ``later`` (absent until :meth:`join`)."""
        self.now = at
        for index, vrrp in enumerate(self.machines):
            if index in later:
                self.alive[index] = False
            else:
                self.apply(index, vrrp.start(at))

    def join(self, index: int) -> None:
        self.alive[index] = True
        self.apply(index, self.machines[index].start(self.now))

    def do(self, index: int, method: str, *args) -> None:
        self.apply(index, getattr(self.machines[index], method)(self.now, *args))

    def run_until(self, end: float) -> None:
        while True:
            timers = [
                (vrrp.next_deadline, index)
                for index, vrrp in enumerate(self.machines)
                if self.alive[index] and vrrp.next_deadline is not None
            ]
            next_timer = min(timers, default=(float("inf"), -1))
            next_delivery = self.deliveries[0][0] if self.deliveries else float("inf")
            if min(next_timer[0], next_delivery) > end:
                self.now = end
                return
            if next_delivery <= next_timer[0]:
                self.now, _, receiver, message, src = heapq.heappop(self.deliveries)
                if not self.alive[receiver]:
                    continue
                if message == LINK_LOST:
                    self.apply(receiver, self.machines[receiver].master_link_lost(self.now, src))
                elif isinstance(message, tuple):
                    self.apply(receiver, self.machines[receiver].successor_designated(self.now, src, message[1]))
                else:
                    self.apply(receiver, self.machines[receiver].on_advert(self.now, message, src))
            else:
                deadline, index = next_timer
                self.now = max(self.now, deadline)  # a resumed process fires overdue timers late
                self.apply(index, self.machines[index].on_timer(self.now))

    def masters(self) -> list[int]:
        return [i for i, vrrp in enumerate(self.machines) if self.alive[i] and vrrp.state is State.MASTER]


def three_linked_hosts(*priorities: int, **changes) -> Segment:
    """Warren hosts 10.0.0.1-3 with these priorities and the peer link."""
    return Segment(*(machine(priority=priority, primary_ip=V4(f"10.0.0.{n}"), peer_link=True, **changes)
                     for n, priority in enumerate(priorities, 1)))


def pair(**changes) -> Segment:
    a = machine(priority=150, primary_ip=V4("10.0.0.1"), **changes)
    b = machine(priority=100, primary_ip=V4("10.0.0.2"), **changes)
    return Segment(a, b)


class TestElections:
    def test_the_highest_priority_wins_and_there_is_one_master(self):
        segment = pair()
        segment.start_all()
        segment.run_until(20.0)
        assert segment.masters() == [0]
        assert segment.holders == {0}
        assert segment.took_vip == {0: [pytest.approx(3 + 106 / 256)], 1: []}

    def test_equal_priorities_started_together_settle_on_the_higher_address(self):
        segment = Segment(machine(primary_ip=V4("10.0.0.1")), machine(primary_ip=V4("10.0.0.2")))
        segment.start_all()
        segment.run_until(20.0)
        assert segment.masters() == [1]
        assert segment.holders == {1}

    def test_master_killed_backup_owns_the_vip_after_master_down_interval(self):
        segment = pair()
        segment.start_all()
        segment.run_until(10.0)
        last_advert = segment.machines[0].next_deadline - 1.0
        segment.kill(0)
        segment.run_until(20.0)
        takeover = segment.took_vip[1][0]
        assert takeover - last_advert == pytest.approx(3 + 156 / 256, abs=0.01)  # keepalived: 3.6 s

    def test_graceful_stop_hands_over_after_the_backups_skew(self):
        segment = pair()
        segment.start_all()
        segment.run_until(10.0)
        segment.do(0, "shutdown")
        stopped = segment.now
        segment.run_until(20.0)
        # skew from the leaving master's 10 ms handover interval (keepalived: 0.61 s)
        assert segment.took_vip[1][0] - stopped == pytest.approx(156 / 256 * 0.01, abs=0.002)

    def test_a_plain_vrrp_backup_keeps_its_rfc_skew_on_priority_zero(self):
        vrrp = backup()  # interval 1 s, priority 100
        vrrp.on_advert(20.0, advert(0, interval_cs=100), PEER_HIGH_IP)  # a keepalived master leaving
        assert vrrp.next_deadline == pytest.approx(20.0 + 156 / 256)

    def test_two_backups_keep_their_priority_order_on_a_fast_handover(self):
        high, low = backup(priority=200), backup(priority=100)
        for vrrp in (high, low):
            vrrp.on_advert(20.0, advert(0, interval_cs=1), PEER_HIGH_IP)
        assert high.next_deadline < low.next_deadline < 20.0 + 0.01

    def test_resign_hands_over_after_skew_and_does_not_flap_back(self):
        segment = pair()
        segment.start_all()
        segment.run_until(10.0)
        segment.do(0, "set_effective_priority", 130)  # still above the peer's 100
        segment.do(0, "resign")
        resigned = segment.now
        segment.run_until(60.0)
        assert segment.took_vip[1][0] - resigned == pytest.approx(156 / 256 * 0.01, abs=0.002)  # keepalived: 4.06 s
        assert segment.masters() == [1] and segment.took_vip[0] == [pytest.approx(3 + 106 / 256)]

    def test_reinstated_higher_priority_node_preempts_back(self):
        segment = pair()
        segment.start_all()
        segment.run_until(10.0)
        segment.do(0, "resign")
        segment.run_until(15.0)
        segment.do(0, "reinstate")
        segment.run_until(30.0)
        assert segment.masters() == [0]
        assert segment.holders == {0}

    def test_nopreempt_keeps_the_current_master_when_a_better_node_returns(self):
        segment = pair(preempt=False)
        segment.machines[0] = machine(priority=150, primary_ip=V4("10.0.0.1"), preempt=False)
        segment.alive[0] = False
        segment.apply(1, segment.machines[1].start(0.0))
        segment.run_until(10.0)
        assert segment.masters() == [1]
        segment.alive[0] = True
        segment.apply(0, segment.machines[0].start(segment.now))
        segment.run_until(40.0)
        assert segment.masters() == [1]

    def test_sigstopped_master_does_not_take_the_vip_back_from_an_equal_new_master(self):
        a = machine(priority=100, primary_ip=V4("10.0.0.1"))
        b = machine(priority=100, primary_ip=V4("10.0.0.2"))
        segment = Segment(b, a)  # b (higher address) starts first and becomes master
        segment.apply(0, b.start(0.0))
        segment.run_until(5.0)
        segment.apply(1, a.start(segment.now))
        segment.run_until(10.0)
        assert segment.masters() == [0]
        segment.alive[0] = False  # SIGSTOP: silent, but keeps its state and the VIP
        segment.run_until(20.0)
        assert segment.masters() == [1]  # a took over
        segment.alive[0] = True  # SIGCONT: b's timer is long overdue
        segment.run_until(40.0)
        assert segment.masters() == [1]
        assert segment.holders == {1}


class TestElectionsWithPeerLinks:
    def test_a_crashed_master_is_replaced_by_its_designated_successor_at_the_links_end(self):
        segment = pair(peer_link=True)
        segment.start_all()
        segment.run_until(10.0)
        segment.crash(0)
        crashed = segment.now
        segment.run_until(20.0)
        # the link's end (1 ms away), no skew (keepalived: 3.6 s)
        assert segment.took_vip[1][0] - crashed == pytest.approx(0.001, abs=1e-9)
        assert segment.masters() == [1] and segment.machines[1].counters.successor_takeovers == 1

    def test_a_master_that_died_before_naming_a_successor_is_replaced_after_the_link_skew(self):
        segment = pair(peer_link=True)
        segment.start_all()
        segment.run_until(3 + 106 / 256 + 0.0015)  # b follows the new master a; its designation is on its way...
        assert segment.follows[1] == V4("10.0.0.1")
        segment.lose_designations(0)  # ...but a dies before sending it
        segment.crash(0)
        crashed = segment.now
        segment.run_until(20.0)
        # the link's end plus the skew from the 10 ms handover interval
        assert segment.took_vip[1][0] - crashed == pytest.approx(0.001 + 156 / 256 * 0.01, abs=1e-6)
        assert segment.masters() == [1] and segment.machines[1].counters.successor_takeovers == 0

    def test_a_frozen_master_sends_no_fin_so_the_rfc_timers_apply(self):
        segment = pair(peer_link=True)
        segment.start_all()
        segment.run_until(10.0)
        last_advert = segment.machines[0].next_deadline - 1.0
        segment.kill(0)  # SIGSTOP or a cut cable: nothing ends the link
        segment.run_until(20.0)
        assert segment.took_vip[1][0] - last_advert == pytest.approx(3 + 156 / 256, abs=0.01)

    def test_behind_a_plain_vrrp_master_the_backup_keeps_the_rfc_timers(self):
        segment = pair(peer_link=True)
        segment.serves_links[0] = False  # keepalived: no link to lose
        segment.start_all()
        segment.run_until(10.0)
        last_advert = segment.machines[0].next_deadline - 1.0
        segment.crash(0)
        segment.run_until(20.0)
        assert segment.took_vip[1][0] - last_advert == pytest.approx(3 + 156 / 256, abs=0.01)

    def test_a_plain_vrrp_backup_beside_a_linked_one_does_not_matter(self):
        a = machine(priority=150, primary_ip=V4("10.0.0.1"), peer_link=True)
        b = machine(priority=120, primary_ip=V4("10.0.0.2"), peer_link=True)
        c = machine(priority=200, primary_ip=V4("10.0.0.3"))  # keepalived, started later
        segment = Segment(a, b, c)
        segment.serves_links[2] = False
        segment.start_all(later=(2,))
        segment.run_until(10.0)
        segment.join(2)
        segment.run_until(30.0)
        assert segment.masters() == [2]  # keepalived preempted (priority 200)
        last_advert = c.next_deadline - 1.0
        segment.crash(2)
        segment.run_until(40.0)
        assert segment.masters() == [0]  # by the RFC timers: keepalived serves no link
        assert segment.took_vip[0][-1] - last_advert == pytest.approx(3 + 106 / 256, abs=0.01)

    def test_three_warren_hosts_end_with_the_best_survivor_as_the_only_master(self):
        segment = three_linked_hosts(200, 150, 100)
        segment.start_all()
        segment.run_until(10.0)
        segment.crash(0)
        crashed = segment.now
        segment.run_until(30.0)
        assert segment.masters() == [1] and segment.holders == {1}
        assert segment.took_vip[2] == [] and segment.took_vip[1][0] - crashed < 0.01
        assert segment.follows[2] == V4("10.0.0.2")  # c follows the new master

    def test_of_two_backups_the_designated_one_goes_first_and_the_other_follows_it(self):
        segment = three_linked_hosts(200, 150, 150)  # c ties b: the higher address wins
        segment.start_all()
        segment.run_until(10.0)
        segment.crash(0)
        crashed = segment.now
        segment.run_until(30.0)
        assert segment.took_vip[2] == [pytest.approx(crashed + 0.001)] and segment.took_vip[1] == []
        assert segment.masters() == [2] and segment.longest_double == 0.0
        assert segment.follows[1] == V4("10.0.0.3")

    def test_a_dead_designated_backup_is_replaced_in_the_designation(self):
        segment = three_linked_hosts(200, 150, 100)
        segment.start_all()
        segment.run_until(10.0)
        segment.crash(1)  # the designated backup dies; a names c once b's link is gone
        segment.run_until(12.0)
        segment.crash(0)
        crashed = segment.now
        segment.run_until(30.0)
        assert segment.took_vip[2] == [pytest.approx(crashed + 0.001)] and segment.masters() == [2]

    def test_designated_backup_and_master_dying_together_leave_the_others_the_rfc_timers(self):
        segment = three_linked_hosts(200, 150, 100)
        segment.start_all()
        segment.run_until(10.0)
        last_advert = segment.machines[0].next_deadline - 1.0
        segment.crash(1)
        segment.lose_designations(0)
        segment.crash(0)  # before a could name anyone else: c was told b
        segment.run_until(30.0)
        assert segment.took_vip[2] == [pytest.approx(last_advert + 0.001 + 3 + 156 / 256, abs=1e-6)]
        assert segment.masters() == [2] and segment.machines[2].counters.master_link_lost == 0

    @pytest.mark.parametrize("starved_for", [0.05, 2.0])
    def test_a_starved_designated_successor_is_not_raced_by_the_other_backups(self, starved_for):
        segment = three_linked_hosts(200, 150, 100)
        segment.start_all()
        segment.run_until(10.0)
        segment.crash(0)
        crashed = segment.now
        segment.delay(1, starved_for)  # b reads the link's end long after c's skew (6 ms) ended
        segment.run_until(30.0)
        assert segment.took_vip[1] == [pytest.approx(crashed + 0.001 + starved_for)]
        assert segment.took_vip[2] == [] and segment.longest_double == 0.0
        assert segment.masters() == [1] and segment.follows[2] == V4("10.0.0.2")

    @pytest.mark.parametrize("preempt", [True, False])
    def test_a_stale_designation_never_makes_two_masters_for_longer_than_an_advert_takes(self, preempt):
        a = machine(priority=200, primary_ip=V4("10.0.0.1"), peer_link=True)
        b = machine(priority=100, primary_ip=V4("10.0.0.2"), peer_link=True, preempt=preempt)
        c = machine(priority=150, primary_ip=V4("10.0.0.3"), peer_link=True, preempt=preempt)  # joins late
        segment = Segment(a, b, c)
        segment.start_all(later=(2,))
        segment.run_until(10.0)
        segment.join(2)
        segment.run_until(a.next_deadline + 0.0015)  # c hears a's next advert and links to it...
        assert segment.follows[2] == V4("10.0.0.1")
        segment.lose_designations(0)  # ...but a dies before telling anyone that c is now its successor
        segment.crash(0)
        crashed = segment.now
        segment.run_until(crashed + 30.0)
        # b, stale-designated, takes over at once; c hears it before its own skew ends
        assert segment.took_vip[1] == [pytest.approx(crashed + 0.001)] and len(segment.masters()) == 1
        if preempt:  # then c preempts the lower master, at its skew as without a designation:
            # both hold the VIP for the one advert's flight that b needs to hear c (as two
            # backups whose skews differ by less than that do without any designation)
            assert segment.masters() == [2]
            assert segment.took_vip[2] == [pytest.approx(crashed + 0.001 + 106 / 256 * 0.01)]
            assert segment.longest_double == pytest.approx(segment.latency)
        else:
            assert segment.longest_double == 0.0
            assert segment.masters() == [1] and segment.took_vip[2] == []

    def test_two_designated_backups_settle_on_the_first_advert(self):
        """Impossible from one master's messages; forced here to bound the worst case."""
        segment = three_linked_hosts(200, 150, 100)
        segment.start_all()
        segment.run_until(10.0)
        segment.machines[2].successor_designated(segment.now, V4("10.0.0.1"), V4("10.0.0.3"))  # c believes it, wrongly
        segment.crash(0)
        crashed = segment.now
        segment.run_until(30.0)
        assert segment.took_vip[1][0] == segment.took_vip[2][0] == pytest.approx(crashed + 0.001)
        assert segment.masters() == [1]
        assert segment.longest_double == pytest.approx(segment.latency)  # one advert's flight
