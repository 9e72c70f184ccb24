"""The floating IP end to end: real `warren run` processes in network namespaces.

Each test builds a small LAN: a "lan" namespace holding a bridge (br0) and the
client, and one namespace per Warren host joined to the bridge by a veth pair
(`lan0` inside the host). Every host runs a tiny TCP server on 127.0.0.1:9000
that answers with the host's name, and Warren proxies VIP:5672 to it, so a
client connection through the VIP says which host served it. One test puts a
real RabbitMQ node behind the hosts instead (a veth from the root namespace to
the bridge) and speaks AMQP through the VIP.

Everything a test starts is killed by PID and every namespace deleted, whatever
happens (the `lab` fixture: tests/viplab.py on the shared `netlab`). Failover times are printed (run with -s), never
asserted beyond generous bounds: the benchmark measures them.
"""

from __future__ import annotations

import datetime
import json
import signal
import time

import pytest
import trio

from lab import ip, wait_until
from tests.viplab import BACKEND_PORT, FRONT_PORT, NsWarren, VipLab

pytestmark = [pytest.mark.netns]


@pytest.fixture
def lab(netlab, tmp_path):
    return VipLab(netlab, tmp_path, "10.213.1")


def warren_config(
    *, priority: int, interval: str = "100ms", vip: str = "10.213.1.100", vrid: int = 51,
    backend: str = f"127.0.0.1:{BACKEND_PORT}", extra_vip: str = "", health: str = "", more: str = "",
) -> str:  # fmt: skip
    host, port = backend.rsplit(":", 1)
    return f"""
[global]
log_format = "json"
grace = "1s"

[frontends.amqp]
bind = "{vip}:{FRONT_PORT}"
backend = "local"

[backends.local]
servers = [{{ name = "here", address = "{host}", port = {port} }}]
{health}

[vip.front]
interface = "lan0"
vrid = {vrid}
priority = {priority}
advert_interval = "{interval}"
addresses = ["{vip}/32"]
{extra_vip}
{more}
"""


def logged_at(event: dict) -> float:
    """A Warren log event's wall-clock time."""
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


async def two_hosts(lab: VipLab, nursery, first: str, second: str, **started_first_only) -> tuple[NsWarren, NsWarren]:
    """h1 and h2 with their backends; h1's config ``first`` starts first and becomes master."""
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    for host in (h1, h2):
        await lab.start_backend(host)
    w1 = await lab.start_warren(nursery, h1, first)
    await w1.wait_for("vip.master", instance="front", timeout=15)
    w2 = await lab.start_warren(nursery, h2, second)
    await w2.wait_for("vip.backup", instance="front")
    return w1, w2


def report(what: str, seconds: float) -> None:
    print(f"\nVIP timing: {what}: {seconds:.3f} s")


# -- elections ---------------------------------------------------------------------------


async def test_hosts_started_at_the_same_moment_end_with_one_master_the_highest(lab):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            hosts = {name: lab.add_host(name) for name in ("h1", "h2", "h3")}
            for host in hosts.values():
                await lab.start_backend(host)
            agent = await lab.start_agent([lab.vip()])
            warrens: dict[str, NsWarren] = {}

            async def start(name: str, priority: int) -> None:
                warrens[name] = await lab.start_warren(nursery, hosts[name], warren_config(priority=priority))

            async with trio.open_nursery() as starting:  # all three at once
                for name, priority in (("h1", 150), ("h2", 120), ("h3", 100)):
                    starting.start_soon(start, name, priority)
            await lab.steadily_held_by(lab.vip(), {"h1"}, seconds=2)  # 20 advert intervals
            assert await agent.connect(lab.vip()) == "h1"
            for name in ("h2", "h3"):
                assert warrens[name].states()[-1] == "backup"
            interim = [name for name in ("h2", "h3") if "master" in warrens[name].states()]
            print(f"\nsimultaneous start: interim masters before h1 won: {interim or 'none'}")
            nursery.cancel_scope.cancel()


async def test_a_higher_priority_host_preempts_a_running_master(lab):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            # h1 (priority 100) starts alone and is master; then h2 (150) joins.
            low, high = await two_hosts(lab, nursery, warren_config(priority=100), warren_config(priority=150))
            await high.wait_for("vip.master", instance="front", reason="preempt", timeout=10)
            await lab.steadily_held_by(lab.vip(), {"h2"}, seconds=1)
            assert low.states()[-1] == "backup"
            agent = await lab.start_agent([lab.vip()])
            assert await agent.served_by(lab.vip(), "h2")
            nursery.cancel_scope.cancel()


async def test_without_preemption_a_running_master_keeps_the_vip(lab):
    nopreempt = "preempt = false"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            low, high = await two_hosts(
                lab, nursery, warren_config(priority=100, extra_vip=nopreempt),
                warren_config(priority=150, extra_vip=nopreempt),
            )  # fmt: skip
            await lab.steadily_held_by(lab.vip(), {"h1"}, seconds=2)  # the lower one, still
            assert high.states() == ["backup"]
            low.process.kill()
            await high.wait_for("vip.master", instance="front", timeout=10)
            await lab.wait_holders(lab.vip(), {"h2"})
            nursery.cancel_scope.cancel()


async def test_two_instances_run_active_active_and_fail_over_together(lab):
    def config(priority_a: int, priority_b: int) -> str:
        second = f"""
[vip.second]
interface = "lan0"
vrid = 52
priority = {priority_b}
advert_interval = "100ms"
addresses = ["{lab.vip(101)}/32"]
"""
        text = warren_config(priority=priority_a, more=second)
        both = f'bind = ["{lab.vip()}:{FRONT_PORT}", "{lab.vip(101)}:{FRONT_PORT}"]'
        return text.replace(f'bind = "{lab.vip()}:{FRONT_PORT}"', both)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            w1, w2 = await two_hosts(lab, nursery, config(150, 100), config(100, 150))
            await w2.wait_for("vip.master", instance="second", timeout=10)
            await lab.steadily_held_by(lab.vip(), {"h1"}, seconds=1)
            await lab.steadily_held_by(lab.vip(101), {"h2"}, seconds=0.5)
            agent = await lab.start_agent([])
            assert await agent.served_by(lab.vip(), "h1") and await agent.served_by(lab.vip(101), "h2")
            w2.process.kill()
            await lab.wait_holders(lab.vip(101), {"h1"}, timeout=10)
            await agent.served_by(lab.vip(101), "h1")
            assert await lab.holders(lab.vip()) == {"h1"}
            nursery.cancel_scope.cancel()


# -- failures of the master ----------------------------------------------------------------


@pytest.mark.parametrize("interval", ["1s", "100ms"])
async def test_a_killed_master_is_replaced_and_its_vip_expires_by_itself(lab, interval):
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            w1, w2 = await two_hosts(
                lab, nursery,
                warren_config(priority=150, interval=interval), warren_config(priority=100, interval=interval),
            )  # fmt: skip
            agent = await lab.start_agent([lab.vip()])
            assert await agent.served_by(lab.vip(), "h1")
            killed = time.time()
            w1.process.kill()  # SIGKILL: no goodbye, no cleanup
            took_over = await w2.wait_for("vip.master", instance="front", timeout=15)
            served = await agent.served_by(lab.vip(), "h2")
            expired = await lab.wait_holders(lab.vip(), {"h2"}, timeout=15)  # the lease ran out on h1
            report(f"advert {interval}, master SIGKILL -> backup is master", logged_at(took_over) - killed)
            report(f"advert {interval}, master SIGKILL -> client served by the backup", served - killed)
            report(f"advert {interval}, master SIGKILL -> VIP gone from the killed host", expired - killed)
            assert logged_at(took_over) - killed < 10
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("interval", ["1s", "100ms"])
async def test_a_stopping_master_hands_the_vip_over_before_it_stops_accepting(lab, interval):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            w1, w2 = await two_hosts(
                lab, nursery,
                warren_config(priority=150, interval=interval), warren_config(priority=100, interval=interval),
            )  # fmt: skip
            agent = await lab.start_agent([lab.vip()])
            assert await agent.served_by(lab.vip(), "h1")
            stopped = time.time()
            w1.signal(signal.SIGTERM)
            took_over = await w2.wait_for("vip.master", instance="front", reason="master_left", timeout=10)
            served = await agent.served_by(lab.vip(), "h2")
            with trio.fail_after(10):
                assert await w1.process.wait() == 0  # a clean exit on the one SIGTERM
            # The address left before the listeners closed: clients never met a closed port here.
            assert w1.index_of("vip.addresses_removed") < w1.index_of("warren.stopping")
            assert await lab.holders(lab.vip()) == {"h2"}
            report(f"advert {interval}, master SIGTERM -> backup is master", logged_at(took_over) - stopped)
            report(f"advert {interval}, master SIGTERM -> client served by the backup", served - stopped)
            nursery.cancel_scope.cancel()


async def test_a_partitioned_master_and_the_healed_network_end_with_one_master(lab):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            w1, w2 = await two_hosts(lab, nursery, warren_config(priority=150), warren_config(priority=100))
            # Cut h1 off the LAN without touching its link: its interface stays up.
            lab.lan.cut(lab.hosts["h1"])
            await w2.wait_for("vip.master", instance="front", timeout=10)
            await lab.wait_holders(lab.vip(), {"h1", "h2"})  # each side has a master
            assert w1.states()[-1] == "master"
            agent = await lab.start_agent([lab.vip()])
            assert await agent.served_by(lab.vip(), "h2")  # the side the client can reach
            lab.lan.heal(lab.hosts["h1"])
            await lab.steadily_held_by(lab.vip(), {"h1"}, seconds=1.5)
            assert w2.states()[-1] == "backup"
            # h1 re-announced itself (the stepping-down h2 advertised once, so h1 heard a
            # rival master whichever advert crossed first). Without that the client would
            # keep h2's MAC until its ARP entry ages out: 15-45 s, well past this wait.
            await agent.served_by(lab.vip(), "h1", timeout=10)
            nursery.cancel_scope.cancel()


async def test_a_frozen_master_that_resumes_listens_before_it_takes_the_vip_back(lab):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            w1, w2 = await two_hosts(lab, nursery, warren_config(priority=150), warren_config(priority=100))
            w1.signal(signal.SIGSTOP)  # a hang: no adverts, no renewals, no goodbye
            try:
                await w2.wait_for("vip.master", instance="front", timeout=10)
                await lab.wait_holders(lab.vip(), {"h2"}, timeout=10)  # h1's lease ran out meanwhile
            finally:
                w1.signal(signal.SIGCONT)
            await w1.wait_for("vip.backup", instance="front", reason="stalled", timeout=10)
            # Then ordinary preemption: h1 (150) takes over after a full Master_Down_Interval.
            await lab.steadily_held_by(lab.vip(), {"h1"}, seconds=1)
            assert w2.states()[-1] == "backup"
            nursery.cancel_scope.cancel()


async def test_an_interface_going_down_is_a_fault_that_releases_the_vip(lab):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            w1, w2 = await two_hosts(lab, nursery, warren_config(priority=150), warren_config(priority=100))
            ip("-n", lab.hosts["h1"].ns, "link", "set", "lan0", "down")
            await w1.wait_for("vip.fault", instance="front", timeout=10)
            await w2.wait_for("vip.master", instance="front", timeout=10)
            await lab.wait_holders(lab.vip(), {"h2"})
            ip("-n", lab.hosts["h1"].ns, "link", "set", "lan0", "up")
            await lab.steadily_held_by(lab.vip(), {"h1"}, seconds=1)  # back, and preempts
            assert w1.states()[-3:] == ["fault", "backup", "master"]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("interval", ["1s", "100ms"])
async def test_a_master_whose_backend_fails_its_health_checks_hands_the_vip_over(lab, interval):
    health = """
[backends.local.health]
kinds = ["tcp"]
inter = "100ms"
timeout = "100ms"
rise = 1
fall = 1
init_state = "up"
"""
    tracked = 'track = "local"'
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            h1, h2 = lab.add_host("h1"), lab.add_host("h2")
            backend1 = await lab.start_backend(h1)
            await lab.start_backend(h2)
            w1 = await lab.start_warren(
                nursery, h1, warren_config(priority=150, interval=interval, health=health, extra_vip=tracked)
            )
            await w1.wait_for("vip.master", instance="front", timeout=15)
            w2 = await lab.start_warren(
                nursery, h2, warren_config(priority=100, interval=interval, health=health, extra_vip=tracked)
            )
            await w2.wait_for("vip.backup", instance="front")
            agent = await lab.start_agent([lab.vip()])
            assert await agent.served_by(lab.vip(), "h1")
            lost = time.time()
            backend1.kill()  # RabbitMQ gone on h1: this host can no longer serve
            track_failed = await w1.wait_for("vip.track_failed", instance="front", timeout=10)
            # A priority-0 resignation, not a timeout. Named, not "the first vip.master": under
            # load h2 may have been master for a moment at its start (its loop blocked past the
            # master-down deadline), before h1's advert sent it back.
            took_over = await w2.wait_for("vip.master", instance="front", reason="master_left", timeout=10)
            served = await agent.served_by(lab.vip(), "h2")
            report(f"advert {interval}, tracked backend down -> h1 noticed", logged_at(track_failed) - lost)
            report(f"advert {interval}, tracked backend down -> backup is master", logged_at(took_over) - lost)
            report(f"advert {interval}, tracked backend down -> client served by the backup", served - lost)
            await lab.start_backend(h1)  # healthy again: preemption resumes
            await lab.steadily_held_by(lab.vip(), {"h1"}, seconds=1)
            nursery.cancel_scope.cancel()


# -- on the wire -------------------------------------------------------------------------------


async def test_a_new_master_announces_the_vip_with_gratuitous_arp(lab):
    garp = 'garp = { burst = 3, burst_delay = "20ms", repeat_after = "1s" }'
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            h1 = lab.add_host("h1")
            await lab.start_backend(h1)
            # The client still knows the VIP at another (the previous master's) MAC.
            ip("-n", lab.lan.ns, "neigh", "add", lab.vip(), "lladdr", "02:00:00:00:00:01", "dev", "br0", "nud", "stale")
            agent = await lab.start_agent([lab.vip()])
            w1 = await lab.start_warren(nursery, h1, warren_config(priority=150, extra_vip=garp))
            became = logged_at(await w1.wait_for("vip.master", instance="front", timeout=15))

            async def six_frames() -> list[dict] | None:
                frames = await agent.gratuitous_arp()
                return frames if len(frames) >= 6 else None

            frames = await wait_until(six_frames, timeout=10, interval=0.1, what="6 gratuitous ARP frames")
            mac = lab.net.mac(h1.ns)
            assert {frame["mac"] for frame in frames} == {mac}
            offsets = [frame["t"] - became for frame in frames]
            assert all(-0.05 < offset < 0.5 for offset in offsets[:3]), offsets  # the burst, at once
            assert all(0.9 < offset < 1.6 for offset in offsets[3:6]), offsets  # the repeat, 1 s later
            done = await trio.run_process(["ip", "-n", lab.lan.ns, "-j", "neigh", "show", lab.vip()], capture_stdout=True)
            assert json.loads(done.stdout)[0]["lladdr"].replace(":", "") == mac  # the client moved
            nursery.cancel_scope.cancel()


async def test_an_ipv6_vip_fails_over_with_neighbour_advertisements(lab):
    vip6 = "fd00:213::100"

    def config(priority: int) -> str:
        text = warren_config(priority=priority).replace(f'"{lab.vip()}:{FRONT_PORT}"', f'"[{vip6}]:{FRONT_PORT}"')
        return text.replace(f'"{lab.vip()}/32"', f'"{vip6}/128"')

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            ip("-n", lab.lan.ns, "addr", "add", "fd00:213::200/64", "dev", "br0", "nodad")
            w1, w2 = await two_hosts(lab, nursery, config(150), config(100))
            for index, host in enumerate(lab.hosts.values(), 1):  # the prefix route back to the client
                ip("-n", host.ns, "addr", "add", f"fd00:213::{index}/64", "dev", "lan0", "nodad")
            started = w1.events[w1.index_of("vip.started")]
            assert started["source"].startswith("fe80:") and started["destinations"] == ["ff02::12"]
            agent = await lab.start_agent([])
            assert await agent.served_by(vip6, "h1")
            w1.process.kill()
            await w2.wait_for("vip.master", instance="front", timeout=10)
            await agent.served_by(vip6, "h2")  # the unsolicited NA moved the client's neighbour entry
            await lab.wait_holders(vip6, {"h2"}, timeout=10)  # IPv6 leases expire too
            nursery.cancel_scope.cancel()


# -- with a real broker -----------------------------------------------------------------------


async def test_amqp_clients_reconnect_through_the_vip_after_the_master_is_killed(
    netlab, tmp_path, rabbit_node_factory
):
    from proxy.devcluster import free_ports

    lab = VipLab(netlab, tmp_path, None)  # a subnet free in the root namespace: the broker's side is there
    broker_ip = lab.lan.link_root()
    [port] = free_ports(1)
    node = rabbit_node_factory(extra_conf={"listeners.tcp.2": f"{broker_ip}:{port}"})
    assert node is not None
    vip = lab.vip()

    def config(priority: int) -> str:
        return warren_config(priority=priority, vip=vip, backend=f"{broker_ip}:{port}")

    queue = f"warren-vip-{netlab.tag}"
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            h1, h2 = lab.add_host("h1"), lab.add_host("h2")
            w1 = await lab.start_warren(nursery, h1, config(150))
            await w1.wait_for("vip.master", instance="front", timeout=15)
            w2 = await lab.start_warren(nursery, h2, config(100))
            await w2.wait_for("vip.backup", instance="front")
            agent = await lab.start_agent([vip])
            amqp = {"op": "amqp", "host": vip, "port": FRONT_PORT, "queue": queue}
            published = await agent.call(**amqp, publish="before failover")
            assert published["ok"], published
            killed = time.time()
            w1.process.kill()

            async def got() -> dict | None:
                reply = await agent.call(**amqp, get=True)
                return reply if reply["ok"] else None

            reply = await wait_until(got, timeout=15, interval=0.05, what="an AMQP client through the VIP")
            reconnected = time.time()
            assert reply["got"] == "before failover"
            assert await lab.holders(vip) in ({"h2"}, {"h1", "h2"})  # h1's lease may not have run out yet
            report("advert 100ms, master SIGKILL -> AMQP handshake through the VIP succeeds", reconnected - killed)
            nursery.cancel_scope.cancel()
