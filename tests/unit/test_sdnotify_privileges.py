"""The systemd notify messages and the capability rules, without systemd or privileges."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
import trio

from lab import wait_until
from proxy.config import parse_config
from proxy.privileges import descriptors_needed, effective_capabilities, explain, missing, needed_capabilities
from proxy.sdnotify import Notifier, message, status_line, watchdog_interval


def test_messages_are_newline_separated_key_values_on_one_line_each():
    assert message(READY=1, STATUS="a\nb") == b"READY=1\nSTATUS=a b"


@pytest.mark.parametrize("environ, pid, expected", [
    ({"WATCHDOG_USEC": "2000000"}, 7, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 7, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "8"}, 7, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, 7, None),
    ({}, 7, None),
])  # fmt: skip
def test_the_watchdog_pings_at_half_its_timeout_and_only_for_its_process(environ, pid, expected):
    assert watchdog_interval(environ, pid) == expected


def test_the_status_line_counts_servers_up_vips_and_sessions():
    server = SimpleNamespace
    stats = SimpleNamespace(
        backends=[SimpleNamespace(servers=[server(up=True), server(up=False), server(up=True)])],
        frontends=[SimpleNamespace(current_sessions=4), SimpleNamespace(current_sessions=3)],
        extra={"vip": (SimpleNamespace(name="front", state="MASTER"),)},
    )
    assert status_line(stats) == "servers up 2/3; vip front MASTER; sessions 7"


def test_without_notify_socket_the_notifier_does_nothing():
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    notifier.ready("x")  # no socket, no error


def drain_pings(receiver: socket.socket) -> int:
    """The WATCHDOG=1 datagrams queued on ``receiver`` now (a Unix datagram is queued
    by the sender's own send call, so this counts every ping sent so far)."""
    count = 0
    while True:
        try:
            count += receiver.recv(100) == b"WATCHDOG=1"
        except BlockingIOError:
            return count


async def test_watchdog_pings_come_from_the_event_loop_and_stop_while_it_is_blocked(tmp_path):
    # No clock in the assertions: the pings are counted at points the event loop
    # cannot interleave with, so a loaded machine cannot blur "during" and "after".
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.setblocking(False)
        notifier = Notifier(path, watchdog=0.05)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifier.keep_alive, lambda: "ok")
                await wait_until(lambda: drain_pings(receiver), timeout=10, what="a first watchdog ping")
                time.sleep(0.6)  # a wedged event loop (a blocking call): 12 ping intervals
                assert drain_pings(receiver) == 0  # nothing pinged while the loop was blocked
                await wait_until(lambda: drain_pings(receiver), timeout=10, what="the pings resumed")
                nursery.cancel_scope.cancel()
        finally:
            notifier.close()


VIP_AND_LOW_PORT = """
[frontends.amqp]
bind = "10.0.0.100:{port}"
backend = "be"
[backends.be]
servers = [{{ name = "a", address = "10.0.0.1", port = 5672 }}]
[vip.front]
interface = "eth0"
vrid = 1
addresses = ["10.0.0.100/24"]
"""


def test_a_vip_needs_net_admin_and_net_raw_and_a_low_port_net_bind_service():
    config = parse_config(VIP_AND_LOW_PORT.format(port=672), "w.toml")
    needs = needed_capabilities(config)
    assert [(n.capability, n.what) for n in needs] == [
        ("CAP_NET_ADMIN", "vip.front"), ("CAP_NET_RAW", "vip.front"), ("CAP_NET_BIND_SERVICE", "frontends.amqp"),
    ]
    assert needed_capabilities(config, unprivileged_port_start=0)[2:] == []  # the sysctl allows low ports
    assert missing(needs, {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}) == []
    [lacking] = missing(needs, {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"})
    text = explain(lacking)
    assert "vip.front: needs CAP_NET_RAW" in text and "AmbientCapabilities=CAP_NET_RAW" in text


def test_the_kernel_relay_needs_bpf_and_net_admin_and_sys_admin_stands_in_for_bpf():
    plain = VIP_AND_LOW_PORT.split("[vip.front]")[0].format(port=5672)
    assert needed_capabilities(parse_config(plain.replace("[frontends", '[global]\nrelay = "auto"\n\n[frontends'),
                                            "w.toml")) == []  # auto falls back to splice
    config = parse_config(plain.replace("[frontends", '[global]\nrelay = "kernel"\n\n[frontends'), "w.toml")
    needs = needed_capabilities(config)
    assert [(n.capability, n.what) for n in needs] == [("CAP_BPF", "global.relay"), ("CAP_NET_ADMIN", "global.relay")]
    assert missing(needs, {"CAP_SYS_ADMIN", "CAP_NET_ADMIN"}) == []  # before Linux 5.8
    assert [n.capability for n in missing(needs, {"CAP_NET_ADMIN"})] == ["CAP_BPF"]


def test_a_plain_config_on_high_ports_needs_no_capability():
    config = parse_config(VIP_AND_LOW_PORT.split("[vip.front]")[0].format(port=5672), "w.toml")
    assert needed_capabilities(config) == []
    assert descriptors_needed(config) == 256 + 2 * 2000


def test_effective_capabilities_are_read_from_the_status_file(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000003000\n")  # bits 12 and 13
    assert effective_capabilities(str(status)) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert effective_capabilities(str(tmp_path / "missing")) == set()
