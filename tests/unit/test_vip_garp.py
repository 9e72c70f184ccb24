"""Gratuitous ARP / unsolicited NA frames byte by byte, and the announcement schedule."""

import ipaddress
import itertools
import struct

import pytest

from proxy.vip.garp import (
    GarpPlan,
    announcement_frames,
    format_mac,
    gratuitous_arp,
    parse_mac,
    unsolicited_na,
)
from proxy.vip.packet import internet_checksum

MAC = bytes.fromhex("020000aabbcc")
VIP4 = ipaddress.IPv4Address("10.0.0.100")
VIP6 = ipaddress.IPv6Address("2001:db8::100")


class TestGratuitousArp:
    frame = gratuitous_arp(MAC, VIP4)

    def test_ethernet_broadcast_from_our_mac(self):
        assert self.frame[0:6] == b"\xff" * 6
        assert self.frame[6:12] == MAC
        assert self.frame[12:14] == b"\x08\x06"

    def test_arp_request_announcing_the_vip(self):
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack("!HHBBH6s4s6s4s", self.frame[14:42])
        assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
        assert (sha, spa, tpa) == (MAC, VIP4.packed, VIP4.packed)
        assert tha == b"\x00" * 6

    def test_padded_to_the_ethernet_minimum(self):
        assert len(self.frame) == 60
        assert self.frame[42:] == b"\x00" * 18

    def test_rejects_a_bad_mac(self):
        with pytest.raises(ValueError):
            gratuitous_arp(b"\x01\x02", VIP4)


class TestUnsolicitedNa:
    frame = unsolicited_na(MAC, VIP6)

    def test_ethernet_to_the_all_nodes_multicast_mac(self):
        assert self.frame[0:6] == bytes.fromhex("333300000001")
        assert self.frame[6:12] == MAC
        assert self.frame[12:14] == b"\x86\xdd"

    def test_ipv6_header(self):
        version_flow, length, next_header, hop_limit, src, dst = struct.unpack("!IHBB16s16s", self.frame[14:54])
        assert version_flow >> 28 == 6
        assert (length, next_header, hop_limit) == (32, 58, 255)  # RFC 4861 7.1.2: hop limit 255
        assert src == VIP6.packed
        assert dst == ipaddress.IPv6Address("ff02::1").packed

    def test_neighbour_advertisement_with_override_and_target_option(self):
        icmp = self.frame[54:86]
        icmp_type, code, _, flags, target = struct.unpack("!BBHI16s", icmp[:24])
        assert (icmp_type, code) == (136, 0)
        assert flags == 0x20000000  # override only: not a router, not solicited
        assert target == VIP6.packed
        assert icmp[24:] == b"\x02\x01" + MAC

    def test_checksum_uses_the_ipv6_pseudo_header(self):
        src, dst, icmp = self.frame[22:38], self.frame[38:54], self.frame[54:86]
        pseudo = src + dst + struct.pack("!I", len(icmp)) + b"\x00\x00\x00\x3a"
        assert internet_checksum(pseudo + icmp) == 0

    def test_explicit_source_address(self):
        source = ipaddress.IPv6Address("fe80::1")
        frame = unsolicited_na(MAC, VIP6, source)
        assert frame[22:38] == source.packed
        pseudo = frame[22:38] + frame[38:54] + struct.pack("!I", 32) + b"\x00\x00\x00\x3a"
        assert internet_checksum(pseudo + frame[54:86]) == 0


def test_announcement_frames_pick_the_protocol_per_family():
    frames = announcement_frames(MAC, [VIP4, VIP6])
    assert frames == [gratuitous_arp(MAC, VIP4), unsolicited_na(MAC, VIP6)]


def test_mac_text_round_trip():
    assert parse_mac("02:00:00:aa:bb:cc") == MAC
    assert format_mac(MAC) == "02:00:00:aa:bb:cc"
    for bad in ("02:00:00:aa:bb", "0200.00aa.bbcc", "02:00:00:aa:bb:zz"):
        with pytest.raises(ValueError):
            parse_mac(bad)


class TestGarpPlan:
    def test_default_is_keepalived_5_then_5_after_5_seconds(self):
        times = list(GarpPlan(burst_delay=0.0).send_times(100.0))
        assert times == [100.0] * 5 + [105.0] * 5

    def test_burst_spacing(self):
        times = list(GarpPlan(burst=3, burst_delay=0.1, repeat_after=None).send_times(0.0))
        assert times == pytest.approx([0.0, 0.1, 0.2])

    def test_refresh_is_endless_and_in_order(self):
        plan = GarpPlan(burst=2, burst_delay=0.5, repeat_after=5.0, refresh=2.0)
        times = list(itertools.islice(plan.send_times(0.0), 9))
        assert times == [0.0, 0.5, 2.0, 4.0, 5.0, 5.5, 6.0, 8.0, 10.0]

    def test_refresh_burst(self):
        plan = GarpPlan(burst=1, repeat_after=None, refresh=10.0, refresh_burst=2, burst_delay=0.2)
        assert list(itertools.islice(plan.send_times(0.0), 5)) == pytest.approx([0.0, 10.0, 10.2, 20.0, 20.2])

    @pytest.mark.parametrize(
        "changes",
        [
            {"burst": 0},
            {"refresh_burst": 0},
            {"burst_delay": -0.1},
            {"refresh": 0.0},
            {"burst": 5, "burst_delay": 1.0, "repeat_after": 3.0},
        ],
    )
    def test_rejects(self, changes):
        with pytest.raises(ValueError):
            GarpPlan(**changes)
