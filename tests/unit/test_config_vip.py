"""Specification of the `[vip.<name>]` sections: what loads, the defaults, and every mistake
reported with its key path and line."""

from __future__ import annotations

from textwrap import dedent

import pytest

from proxy.config import ConfigError, Problem, parse_config
from proxy.config.model import Vip, VipAuth, VipGarp, VipNotify

FILE = "conf/warren.toml"
BACKEND = """\
[backends.rabbit]
servers = [{ name = "r1", address = "127.0.0.1", port = 5672 }]
"""
MINIMAL = """\
[vip.front]
interface = "eth0"
vrid = 51
addresses = ["10.0.0.100/24"]
"""


def load(text: str):
    return parse_config(BACKEND + dedent(text), FILE)


def only_vip(text: str) -> Vip:
    (vip,) = load(text).vip
    return vip


def problems(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return caught.value.problems


def only_problem(text: str) -> Problem:
    (problem,) = problems(text)
    return problem


def test_a_minimal_instance_gets_the_documented_defaults():
    vip = only_vip(MINIMAL)
    assert vip == Vip(
        name="front", interface="eth0", vrid=51, addresses=("10.0.0.100/24",), priority=100,
        advert_interval=1.0, peers=(), source=None, preempt=True, preempt_delay=None, track=None,
        weight=50, resign_on_track_failure=True, lease=4.0, garp=VipGarp(), notify=VipNotify(), auth=None,
    )  # fmt: skip
    assert vip.garp == VipGarp(burst=5, burst_delay=0.01, repeat_after=5.0, refresh=None, refresh_burst=1)
    assert vip.notify.timeout == 5.0


def test_no_vip_section_means_no_floating_address():
    assert parse_config(BACKEND, FILE).vip == ()


def test_every_key_is_read_into_the_model():
    vip = only_vip(
        """\
        [vip.front]
        interface = "ens3"
        vrid = 7
        priority = 200
        advert_interval = "250ms"
        addresses = ["192.0.2.10/24", "192.0.2.11"]
        peers = ["192.0.2.2", "192.0.2.3"]
        source = "192.0.2.1"
        preempt = false
        preempt_delay = "30s"
        track = "rabbit"
        weight = 120
        resign_on_track_failure = false
        lease = "10s"
        garp = { burst = 3, burst_delay = "50ms", repeat_after = "2s", refresh = "1m", refresh_burst = 2 }
        notify = { master = "/usr/local/bin/vip-notify --role 'front door'", fault = "logger vip", timeout = "2s" }
        auth = { secret = "correct horse battery staple", max_age = "1m" }
        """
    )
    assert (vip.interface, vip.vrid, vip.priority, vip.advert_interval) == ("ens3", 7, 200, 0.25)
    assert vip.addresses == ("192.0.2.10/24", "192.0.2.11/32")  # a bare address is a host route
    assert (vip.peers, vip.source) == (("192.0.2.2", "192.0.2.3"), "192.0.2.1")
    assert (vip.preempt, vip.preempt_delay, vip.track, vip.weight) == (False, 30.0, "rabbit", 120)
    assert (vip.resign_on_track_failure, vip.lease) == (False, 10.0)
    assert vip.garp == VipGarp(burst=3, burst_delay=0.05, repeat_after=2.0, refresh=60.0, refresh_burst=2)
    assert vip.notify == VipNotify(
        master=("/usr/local/bin/vip-notify", "--role", "front door"), backup=None, fault=("logger", "vip"), timeout=2.0
    )
    assert vip.auth == VipAuth(secret="correct horse battery staple", max_age=60.0)


def test_several_instances_run_side_by_side():
    config = load(
        MINIMAL
        + """\
        [vip.second]
        interface = "eth0"
        vrid = 52
        addresses = ["10.0.0.101/24"]
        [vip.v6]
        interface = "eth0"
        vrid = 51
        addresses = ["2001:db8::100/64"]
        """
    )
    assert [(vip.name, vip.vrid) for vip in config.vip] == [("front", 51), ("second", 52), ("v6", 51)]


@pytest.mark.parametrize(
    ("interval", "priority", "lease"),
    [
        ("1s", 100, 4.0),  # 3 + 156/256 s, rounded up
        ("1s", 255, 4.0),  # 3 + 1/256 s
        ("100ms", 100, 2.0),  # never below 2 s
        ("2s", 100, 8.0),
    ],
)
def test_the_lease_defaults_to_the_master_down_interval_rounded_up(interval, priority, lease):
    vip = only_vip(MINIMAL + f'advert_interval = "{interval}"\npriority = {priority}\n')
    assert vip.lease == lease


def test_a_lease_of_zero_makes_the_addresses_permanent():
    assert only_vip(MINIMAL + "lease = 0\n").lease is None


def test_a_fractional_lease_is_rounded_up_to_whole_seconds():
    assert only_vip(MINIMAL + 'lease = "2.5s"\n').lease == 3.0


# --- mistakes, each with its key path and line -----------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("priority = 0", "priority", "expected 1-255, got 0"),
        ("priority = 256", "priority", "expected 1-255, got 256"),
        ('advert_interval = "5ms"', "advert_interval", "expected 10ms-40.95s, got 5ms"),
        ('advert_interval = "41s"', "advert_interval", "expected 10ms-40.95s, got 41s"),
        ('advert_interval = "15ms"', "advert_interval",
         "expected whole centiseconds (VRRP counts in 10ms steps), got 15ms"),
        ('lease = "1s"', "lease", "expected 0 (off) or at least 2s (lifetimes are whole seconds), got 1s"),
        ("weight = 0", "weight", "expected 1-254, got 0"),
        ('peers = ["10.0.0.2", "peer-b"]', "peers[1]", '"peer-b" is not an IP address'),
        ('source = "10.0.0.1:112"', "source", '"10.0.0.1:112" is not an IP address'),
        ("preempt = 1", "preempt", "expected boolean, got integer 1"),
        ('colour = "blue"', "colour", "unknown key"),
        ('peer = ["10.0.0.2"]', "peer", 'unknown key; did you mean "peers"?'),
    ],
)  # fmt: skip
def test_a_bad_value_names_its_key_and_line(line, key, message):
    problem = only_problem(MINIMAL + line + "\n")
    assert (problem.key, problem.line, problem.message) == (f"vip.front.{key}", 7, message)


def test_missing_required_keys_are_each_reported():
    found = problems("[vip.front]\npriority = 120\n")
    assert sorted(p.key for p in found) == ["vip.front.addresses", "vip.front.interface", "vip.front.vrid"]
    assert {p.message for p in found} == {"missing required key"}


@pytest.mark.parametrize(
    ("addresses", "key", "message"),
    [
        ("[]", "addresses", "expected a non-empty array"),
        ('["10.0.0.300/24"]', "addresses[0]",
         '"10.0.0.300/24" is not an IP address with an optional prefix length, e.g. "10.0.0.100/24"'),
        ('["224.0.0.18"]', "addresses[0]",
         '"224.0.0.18" cannot be a floating address (multicast, unspecified or loopback)'),
        ('["10.0.0.100/24", "10.0.0.100/24"]', "addresses[1]",
         'duplicate "10.0.0.100/24" (already at vip.front.addresses[0])'),
    ],
)  # fmt: skip
def test_bad_addresses_are_named_by_index(addresses, key, message):
    text = f'[vip.front]\ninterface = "eth0"\nvrid = 51\naddresses = {addresses}\n'
    problem = only_problem(text)
    assert (problem.key, problem.line, problem.message) == (f"vip.front.{key}", 6, message)


def test_an_instance_carries_one_ip_family():
    found = problems(
        """\
        [vip.front]
        interface = "eth0"
        vrid = 51
        addresses = ["10.0.0.100/24", "2001:db8::100"]
        peers = ["2001:db8::2"]
        source = "10.0.0.1"
        """
    )
    assert [(p.key, p.line) for p in found] == [("vip.front.addresses[1]", 6), ("vip.front.peers[0]", 7)]
    assert found[0].message == (
        "IPv6 address in an IPv4 instance: one instance carries one IP family (use a second instance for the other)"
    )
    assert found[1].message.startswith("IPv6 peer in an IPv4 instance")


def test_tracking_an_undefined_backend_is_a_dangling_reference():
    problem = only_problem(MINIMAL + 'track = "rabit"\n')
    assert (problem.key, problem.line) == ("vip.front.track", 7)
    assert problem.message == 'dangling backend reference: no backend named "rabit"; did you mean "rabbit"?'


def test_one_vrid_twice_on_an_interface_is_refused():
    problem = only_problem(
        MINIMAL
        + """\
        [vip.other]
        interface = "eth0"
        vrid = 51
        addresses = ["10.0.0.101/24"]
        """
    )
    assert (problem.key, problem.line) == ("vip.other.vrid", 9)
    assert problem.message == 'vrid 51 is already used on interface "eth0" by vip.front'


def test_one_address_in_two_instances_is_refused():
    problem = only_problem(
        MINIMAL
        + """\
        [vip.other]
        interface = "eth1"
        vrid = 52
        addresses = ["10.0.0.100/32"]
        """
    )
    assert (problem.key, problem.line) == ("vip.other.addresses[0]", 10)
    assert problem.message == "address 10.0.0.100 is already managed by vip.front"


@pytest.mark.parametrize("name", ["eth0 ", "a/b", "eth0:1", "averyveryverylongname"])
def test_an_impossible_interface_name_is_refused(name):
    problem = only_problem(f'[vip.front]\ninterface = "{name}"\nvrid = 51\naddresses = ["10.0.0.100"]\n')
    assert (problem.key, problem.line) == ("vip.front.interface", 4)
    assert problem.message.startswith(f'invalid interface name "{name}"')


def test_a_short_secret_is_refused_without_being_echoed():
    problem = only_problem(MINIMAL + 'auth = { secret = "hunter2" }\n')
    assert (problem.key, problem.line) == ("vip.front.auth.secret", 7)
    assert problem.message == "expected a secret of at least 16 bytes, got 7"
    assert "hunter2" not in str(problem)


def test_an_unbalanced_notify_command_is_refused_at_load():
    problem = only_problem(MINIMAL + "[vip.front.notify]\nmaster = \"/bin/notify 'oops\"\n")
    assert (problem.key, problem.line) == ("vip.front.notify.master", 8)
    assert problem.message == "cannot split the command line: No closing quotation"


def test_a_repeat_inside_the_first_burst_is_refused():
    problem = only_problem(MINIMAL + 'garp = { burst = 5, burst_delay = "1s", repeat_after = "2s" }\n')
    assert (problem.key, problem.line) == ("vip.front.garp", 7)
    assert problem.message == "repeat_after (2s) must be longer than the first burst (5 x 1s)"


def test_an_invalid_instance_name_is_refused():
    problem = only_problem('[vip."front door"]\ninterface = "eth0"\nvrid = 51\naddresses = ["10.0.0.100"]\n')
    assert problem.key == 'vip."front door"'
    assert problem.message.startswith('invalid name "front door"')


def test_all_problems_of_several_instances_come_together():
    found = problems(
        """\
        [vip.a]
        interface = "eth0"
        vrid = 300
        addresses = ["10.0.0.100"]
        [vip.b]
        interface = "eth0"
        vrid = 52
        addresses = ["10.0.0.101"]
        priority = 0
        track = "nope"
        """
    )
    assert [p.key for p in found] == ["vip.a.vrid", "vip.b.priority", "vip.b.track"]
