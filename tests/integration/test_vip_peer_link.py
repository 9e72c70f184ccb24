"""The VIP peer link end to end: real `warren run` processes (and keepalived) in network namespaces.

A backup holds a TCP link to its Warren master, which names it its
successor over that link. A killed master's kernel ends it: the designated
backup takes over at once (reason `master_link_lost`). No FIN
(a frozen master, a blocked port) leaves the RFC timers in charge (reason
`master_down`), and keepalived on either side neither serves nor needs the
link. Times are printed (run with -s), asserted only through the reason that
decided the takeover; bench/ measures them.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from lab import nft_missing, wait_until
from lab.backend import READY, backend_argv
from lab.netns import signal_pid
from tests.integration.test_vip_failover import VipLab, logged_at, report, two_hosts, warren_config
from tests.viplab import BACKEND_PORT, FRONT_PORT

pytestmark = [pytest.mark.netns]

SECRET = 'auth = { secret = "peer-link-test-secret-0123" }'
LINK_PORT = 5798

needs_keepalived = pytest.mark.skipif(shutil.which("keepalived") is None, reason="needs keepalived")


@pytest.fixture
def lab(netlab, tmp_path):
    return VipLab(netlab, tmp_path, "10.213.2")


def config(lab: VipLab, priority: int, interval: str = "100ms", extra: str = "") -> str:
    return warren_config(priority=priority, interval=interval, vip=lab.vip(), extra_vip=extra)


@pytest.mark.parametrize("interval, extra", [("1s", ""), ("100ms", ""), ("100ms", SECRET)],
                         ids=["1s", "100ms", "100ms-auth"])
async def test_a_killed_master_is_replaced_through_the_peer_link(lab, interval, extra):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            w1, w2 = await two_hosts(lab, nursery, config(lab, 150, interval, extra), config(lab, 100, interval, extra))
            await w2.wait_for("vip.peer_link_up", instance="front", master=lab.hosts["h1"].ip)
            # h1 names its only linked backup its successor: h2 will not wait for its skew
            await w2.wait_for("vip.successor", instance="front", master=lab.hosts["h1"].ip, designated=True)
            agent = await lab.start_agent([lab.vip()])
            assert await agent.served_by(lab.vip(), "h1")
            killed = time.time()
            w1.process.kill()
            gone = await w2.wait_for("vip.master_gone", instance="front", timeout=10)
            took_over = await w2.wait_for("vip.master", instance="front", timeout=10)
            assert took_over["reason"] == "master_link_lost"  # not master_down: no 3 intervals waited
            served = await agent.served_by(lab.vip(), "h2")
            report(f"advert {interval}{' auth' if extra else ''}, master SIGKILL -> link end seen", logged_at(gone) - killed)
            report(f"advert {interval}{' auth' if extra else ''}, master SIGKILL -> backup is master",
                   logged_at(took_over) - killed)
            report(f"advert {interval}{' auth' if extra else ''}, master SIGKILL -> client served", served - killed)
            nursery.cancel_scope.cancel()


async def test_of_two_backups_the_one_the_master_designated_takes_over_and_the_other_follows_it(lab):
    # Adverts every second: a backup's RFC timers (3 intervals) are then far longer than
    # a loaded host can delay the successor's takeover (at 100 ms, a CI run saw h2's fire).
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            w1, w2 = await two_hosts(lab, nursery, config(lab, 150, "1s"), config(lab, 100, "1s"))
            h1, h3 = lab.hosts["h1"], lab.add_host("h3")
            await w2.wait_for("vip.successor", instance="front", master=h1.ip, designated=True)  # the only one
            await lab.start_backend(h3)
            w3 = await lab.start_warren(nursery, h3, config(lab, 120, "1s"))
            # h3 outranks h2: h1 names it, and tells h2 that it is no longer the successor
            await w3.wait_for("vip.successor", instance="front", master=h1.ip, designated=True)
            await w2.wait_for("vip.successor", instance="front", master=h1.ip, designated=False)
            w1.process.kill()
            took_over = await w3.wait_for("vip.master", instance="front", timeout=10)
            assert took_over["reason"] == "master_link_lost"
            # h2 left the link's end to its RFC timers (it did not race h3) and follows h3
            await w2.wait_for("vip.peer_link_up", instance="front", master=h3.ip)
            assert not [e for e in w2.events if e.get("event") == "vip.master"]
            nursery.cancel_scope.cancel()


async def test_a_frozen_master_sends_no_fin_and_the_rfc_timers_apply(lab):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            w1, w2 = await two_hosts(lab, nursery, config(lab, 150), config(lab, 100))
            await w2.wait_for("vip.peer_link_up", instance="front")
            w1.signal(signal.SIGSTOP)
            try:
                took_over = await w2.wait_for("vip.master", instance="front", timeout=10)
            finally:
                w1.signal(signal.SIGCONT)
            assert took_over["reason"] == "master_down"
            assert not [e for e in w2.events if e.get("event") == "vip.master_gone"]
            nursery.cancel_scope.cancel()


@pytest.mark.skipif(nft_missing() is not None, reason=str(nft_missing()))
async def test_a_master_whose_fin_cannot_reach_the_backup_is_replaced_by_the_rfc_timers(lab):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            w1, w2 = await two_hosts(lab, nursery, config(lab, 150), config(lab, 100))
            await w2.wait_for("vip.peer_link_up", instance="front")
            h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
            with lab.net.drop(h2.ns, h1.ip, LINK_PORT):  # the link's packets vanish; adverts still pass
                w1.process.kill()
                took_over = await w2.wait_for("vip.master", instance="front", timeout=10)
            assert took_over["reason"] == "master_down"
            nursery.cancel_scope.cancel()


async def test_a_master_that_hands_over_on_purpose_is_not_mistaken_for_a_dead_one(lab):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            w1, w2 = await two_hosts(lab, nursery, config(lab, 150), config(lab, 100))
            await w2.wait_for("vip.peer_link_up", instance="front")
            w1.signal(signal.SIGTERM)  # priority 0 first; the link ends afterwards
            took_over = await w2.wait_for("vip.master", instance="front", timeout=10)
            assert took_over["reason"] == "master_left"
            with trio.fail_after(10):
                assert await w1.process.wait() == 0
            nursery.cancel_scope.cancel()


# A client that opens one connection and holds it (prints "held" once it is relayed).
CLIENT = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("held", flush=True)
sys.stdin.read()
"""

# In the master's namespace: every TCP segment with FIN or RST that leaves lan0, in the
# order the kernel sends them (a packet tap sees outgoing frames in the sender's context).
TAP = r"""
import json, socket, struct, sys, threading
tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
tap.bind(("lan0", 0))
ends = []

def record():
    while True:
        frame, address = tap.recvfrom(2048)
        if address[2] != socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            continue
        header = 14 + (frame[14] & 0x0F) * 4
        source_port = struct.unpack_from("!H", frame, header)[0]
        if frame[header + 13] & 0x05:  # FIN or RST
            ends.append(source_port)

threading.Thread(target=record, daemon=True).start()
print("ready", flush=True)
for _ in sys.stdin:
    print(json.dumps(ends), flush=True)
"""


async def line_from(process) -> bytes:
    output = b""
    while not output.endswith(b"\n"):
        chunk = await process.stdout.receive_some(1)
        assert chunk, "the helper process died"
        output += chunk
    return output.strip()


async def test_a_killed_masters_kernel_ends_its_links_before_its_other_connections(lab):
    """The kernel releases a dead process's descriptors highest first; the links sit at the top,
    so they end before client connections made later (which have higher descriptors by birth)."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            h1, h2 = lab.add_host("h1"), lab.add_host("h2")
            holder = await lab.open_process(h1.ns, backend_argv(BACKEND_PORT), stdout=subprocess.PIPE)
            assert await line_from(holder) == READY.encode()  # accepts and holds every connection
            await lab.start_backend(h2)
            w1 = await lab.start_warren(nursery, h1, config(lab, 150))
            await w1.wait_for("vip.master", instance="front", timeout=15)
            w2 = await lab.start_warren(nursery, h2, config(lab, 100))
            await w2.wait_for("vip.peer_link_up", instance="front", master=h1.ip)
            tap = await lab.open_process(h1.ns, [sys.executable, "-c", TAP], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE)
            assert await line_from(tap) == b"ready"
            client = await lab.open_process(lab.lan.ns, [sys.executable, "-c", CLIENT, lab.vip(), str(FRONT_PORT)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert await line_from(client) == b"held"
            w1.process.kill()
            await w2.wait_for("vip.master_gone", instance="front", timeout=10)

            async def both_ended() -> list[int]:
                await tap.stdin.send_all(b"report\n")
                ends = json.loads(await line_from(tap))
                return ends if {LINK_PORT, FRONT_PORT} <= set(ends) else []

            await wait_until(both_ended, timeout=10, what="the link and the client connection ended")
            await tap.stdin.send_all(b"report\n")
            ends = json.loads(await line_from(tap))
            assert ends.index(LINK_PORT) < ends.index(FRONT_PORT), ends
            nursery.cancel_scope.cancel()


# -- mixed groups with keepalived ----------------------------------------------------------


def keepalived_config(lab: VipLab, priority: int) -> str:
    return f"""global_defs {{
    vrrp_version 3
}}
vrrp_instance front {{
    state BACKUP
    interface lan0
    virtual_router_id 51
    priority {priority}
    advert_int 0.1
    virtual_ipaddress {{
        {lab.vip()}/32 dev lan0
    }}
}}
"""


async def start_keepalived(lab: VipLab, host, priority: int) -> None:
    conf = Path(lab.tmp_path) / f"keepalived-{host.name}.conf"
    conf.write_text(keepalived_config(lab, priority))
    await lab.net.open_process(host.ns, [
        "keepalived", "-n", "-l", "-D", "--vrrp", "-f", str(conf),
        "-p", str(conf.with_suffix(".pid")), "-r", str(conf.with_suffix(".vrrp.pid")),
    ])  # fmt: skip


@needs_keepalived
async def test_behind_a_keepalived_master_a_warren_backup_keeps_the_rfc_timers(lab):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            h1, h2 = lab.add_host("h1"), lab.add_host("h2")
            await lab.start_backend(h2)
            await start_keepalived(lab, h1, 150)
            await lab.wait_holders(lab.vip(), {"h1"})
            w2 = await lab.start_warren(nursery, h2, config(lab, 100))
            unavailable = await w2.wait_for("vip.peer_link_unavailable", instance="front", timeout=10)
            assert unavailable["outcome"] == "gone"  # nothing listens there: refused, and fine
            await lab.steadily_held_by(lab.vip(), {"h1"}, seconds=1)  # one master: keepalived
            assert w2.states() == ["backup"]
            # keepalived's two processes, stopped first: its VRRP child would otherwise have
            # a moment, between its parent's SIGKILL and its own, to send a priority-0 goodbye
            # (it is told of its parent's death), and the takeover would be `master_left`.
            pids = lab.net.pids(h1.ns)
            for signum in (signal.SIGSTOP, signal.SIGKILL):
                for pid in pids:
                    signal_pid(pid, signum)
            took_over = await w2.wait_for("vip.master", instance="front", timeout=10)
            assert took_over["reason"] == "master_down"
            nursery.cancel_scope.cancel()


@needs_keepalived
async def test_a_keepalived_backup_takes_over_from_a_killed_warren_master(lab):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            h1, h2 = lab.add_host("h1"), lab.add_host("h2")
            await lab.start_backend(h1)
            w1 = await lab.start_warren(nursery, h1, config(lab, 150))
            await w1.wait_for("vip.master", instance="front", timeout=15)
            await start_keepalived(lab, h2, 100)
            await lab.steadily_held_by(lab.vip(), {"h1"}, seconds=1)  # keepalived stays backup
            w1.process.kill()
            await lab.wait_holders(lab.vip(), {"h2"}, timeout=15)  # h1's lease ran out, keepalived took over
            nursery.cancel_scope.cancel()

