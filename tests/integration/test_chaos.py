"""Chaos in network namespaces: real RabbitMQ nodes, real `warren run`
processes, real AMQP clients, and faults that send no FIN.

One LAN for the module (lab.Lan): hosts h1 and h2 run Warren, the bridge's
namespace runs the clients (a canary of publishers with confirms,
lab/canary.py), and two clustered RabbitMQ nodes run in the root namespace,
listening on the root side of a veth to the bridge (their traffic crosses
the LAN like a real broker's). The cluster and the LAN are built once for
the module; each test starts its own Warren processes and canary.

- A broker partitioned from Warren (its packets dropped both ways, nftables)
  is marked DOWN by its watch connection's silence, its clients are closed
  (`shutdown-sessions`) and reconnect to the other broker; no confirmed
  message is lost.
- The master's link cut (its bridge port detached: no carrier loss, no FIN)
  while publishers go through the VIP: the backup takes over, every client
  reconnects through it, no confirmed message is lost; once the link heals
  there is exactly one master again.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest
import trio

from lab import Host, Lan, NetLab, netns_missing, nft_missing, start_nodes, wait_until
from proxy.devcluster import RabbitCluster, unavailable_reason
from tests.canary import Canary
from tests.warrenproc import OWN_SESSION, WarrenProcess, write

pytestmark = [pytest.mark.netns, pytest.mark.rabbit, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
FRONT_PORT = 5672
PUBLISHERS = 6


@dataclass
class Chaos:
    net: NetLab
    lan: Lan
    h1: Host
    h2: Host
    broker_ip: str
    cluster: RabbitCluster
    tmp: Path

    @property
    def ports(self) -> list[int]:
        return [node.spec.amqp_port for node in self.cluster]


@pytest.fixture(scope="module")
def chaos(tmp_path_factory) -> Iterator[Chaos]:
    for reason in (netns_missing(), nft_missing(), unavailable_reason()):
        if reason:
            pytest.skip(reason)
    net = NetLab()
    cluster = None
    try:
        lan = net.lan()
        h1, h2 = lan.add_host("h1"), lan.add_host("h2")
        broker_ip = lan.link_root()
        cluster = start_nodes(2, cluster=True, tag="x", also_listen=broker_ip)
        yield Chaos(net, lan, h1, h2, broker_ip, cluster, tmp_path_factory.mktemp("chaos"))
    finally:
        if cluster is not None:
            cluster.close()
        net.destroy()


# -- the parts -----------------------------------------------------------------------------


def warren_config(chaos: Chaos, host: Host, bind: str, vip: str = "") -> str:
    servers = ", ".join(
        f'{{ name = "n{i}", address = "{chaos.broker_ip}", port = {port} }}' for i, port in enumerate(chaos.ports)
    )
    return f"""
[global]
log_format = "json"
grace = "1s"
control_socket = "{chaos.tmp / f'{host.name}.sock'}"

[frontends.amqp]
bind = "{bind}:{FRONT_PORT}"
backend = "rabbit"

[backends.rabbit]
balance = "roundrobin"
servers = [{servers}]

[backends.rabbit.timeout]
connect = "1s"

[backends.rabbit.health]
kinds = ["amqp", "watch"]
inter = "500ms"
timeout = "1s"
rise = 1
fall = 2
on_marked_down = "shutdown-sessions"

[backends.rabbit.health.amqp]
heartbeat = "1s"
{vip}
"""


def vip_section(vip: str, priority: int) -> str:
    return f"""
[vip.front]
interface = "lan0"
vrid = 61
priority = {priority}
advert_interval = "100ms"
addresses = ["{vip}/32"]
"""


class NsWarren(WarrenProcess):
    """`warren run` in a host's namespace, with its control socket."""

    def __init__(self, chaos: Chaos, host: Host, config: str) -> None:
        super().__init__(write(chaos.tmp / f"{host.name}.toml", config))
        self.chaos, self.host = chaos, host
        self.socket = chaos.tmp / f"{host.name}.sock"

    async def start(self, nursery: trio.Nursery, timeout: float = 30) -> dict:
        self.process = await self.chaos.net.open_process(
            self.host.ns, [sys.executable, "-m", "proxy", "run", str(self.config_path)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=REPO, **OWN_SESSION,
        )  # fmt: skip
        nursery.start_soon(self._read_log)
        return await self.wait_for("warren.started", timeout=timeout)

    async def sessions(self) -> dict[str, int]:
        """Current sessions per server (`show stat`, the scur column), over the control socket."""
        stream = await trio.open_unix_socket(str(self.socket))
        async with stream:
            await stream.send_all(b"show stat\n")
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
        rows = csv.DictReader(io.StringIO(answer.decode().lstrip("# ")))
        return {row["svname"]: int(row["scur"]) for row in rows
                if row["pxname"] == "rabbit" and row["svname"] not in ("FRONTEND", "BACKEND")}


async def start_canary(chaos: Chaos, host: str, queue: str) -> Canary:
    """The canary in the bridge's namespace, publishing through ``host``."""
    url = f"amqp://guest:guest@{host}:{FRONT_PORT}/"
    return await Canary.start(chaos.net, chaos.lan.ns, url, queue, publishers=PUBLISHERS)


async def server_event(warren: NsWarren, event: str, server: str, after: int, timeout: float) -> dict:
    """The first ``event`` for ``server`` logged after the first ``after`` events."""

    def found() -> dict | None:
        return next((e for e in warren.events[after:] if e.get("event") == event and e.get("server") == server), None)

    return await wait_until(found, timeout=timeout, interval=0.05, what=f"{event} {server}")


async def all_up(warren: NsWarren) -> None:
    await wait_until(lambda: _up(warren) >= {"n0", "n1"}, timeout=30, interval=0.05, what="n0 and n1 UP")


def _up(warren: NsWarren) -> set[str]:
    state: dict[str, bool] = {}
    for event in warren.events:
        if event.get("event") in ("server.up", "server.down"):
            state[event["server"]] = event["event"] == "server.up"
    return {name for name, up in state.items() if up}


# -- the tests -----------------------------------------------------------------------------


async def test_a_broker_partitioned_from_warren_is_marked_down_and_its_clients_move(chaos):
    queue = f"chaos-partition-{chaos.net.tag}"
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            warren = NsWarren(chaos, chaos.h1, warren_config(chaos, chaos.h1, chaos.h1.ip))
            async with warren:
                await warren.start(nursery)
                await all_up(warren)
                canary = await start_canary(chaos, chaos.h1.ip, queue)
                try:
                    started = time.time()
                    await wait_until(lambda: canary.all_confirming_since(started), timeout=30, interval=0.2,
                                     what="every publisher confirming")
                    before = await warren.sessions()
                    assert before["n0"] > 0 and before["n1"] > 0, before  # roundrobin used both
                    mark = len(warren.events)
                    with chaos.net.drop(chaos.h1.ns, chaos.broker_ip, chaos.ports[0]):
                        partitioned = time.time()
                        down = await server_event(warren, "server.down", "n0", mark, timeout=20)
                        moved = time.time()
                        await wait_until(lambda: canary.all_confirming_since(moved), timeout=30, interval=0.2,
                                         what="every publisher confirming again")

                        async def all_on_n1() -> dict | None:
                            sessions = await warren.sessions()
                            return sessions if sessions == {"n0": 0, "n1": PUBLISHERS} else None

                        await wait_until(all_on_n1, timeout=20, interval=0.2, what="every client on n1")
                        killed = [e for e in warren.events[mark:]
                                  if e.get("event") == "connection.closed" and e.get("server") == "n0"]
                        assert killed and all(e["termination"] == "DD" for e in killed), killed
                    mark = len(warren.events)
                    await server_event(warren, "server.up", "n0", mark, timeout=20)  # healed: back in service
                    print(f"\nchaos: n0 partitioned -> DOWN ({down['check']}) after "
                          f"{logged_at(down) - partitioned:.2f}s")
                finally:
                    report = await canary.stop()
            nursery.cancel_scope.cancel()
    assert report["confirmed"] > 0 and report["lost"] == 0, report
    assert report["connections"] > PUBLISHERS, report  # the clients of n0 reconnected


async def test_the_masters_link_cut_moves_every_client_without_losing_a_confirmed_message(chaos):
    queue = f"chaos-vip-{chaos.net.tag}"
    vip = chaos.lan.address(100)
    lan, h1, h2 = chaos.lan, chaos.h1, chaos.h2
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            w1 = NsWarren(chaos, h1, warren_config(chaos, h1, vip, vip_section(vip, 150)))
            w2 = NsWarren(chaos, h2, warren_config(chaos, h2, vip, vip_section(vip, 100)))
            async with w1, w2:
                await w1.start(nursery)
                await w1.wait_for("vip.master", instance="front", timeout=15)
                await w2.start(nursery)
                await w2.wait_for("vip.backup", instance="front", timeout=15)
                await all_up(w1)
                await all_up(w2)
                canary = await start_canary(chaos, vip, queue)
                try:
                    started = time.time()
                    await wait_until(lambda: canary.all_confirming_since(started), timeout=30, interval=0.2,
                                     what="every publisher confirming through h1")
                    assert sum((await w1.sessions()).values()) == PUBLISHERS

                    lan.cut(h1)  # no FIN, no carrier loss: h1 goes on believing it is master
                    cut = time.time()
                    await w2.wait_for("vip.master", instance="front", timeout=10)
                    await wait_until(lambda: canary.all_confirming_since(cut), timeout=30, interval=0.2,
                                     what="every publisher confirming through h2")

                    async def all_through_h2() -> bool:
                        return sum((await w2.sessions()).values()) == PUBLISHERS

                    await wait_until(all_through_h2, timeout=20, interval=0.2, what="every client through h2")
                    moved = time.time() - cut

                    lan.heal(h1)
                    healed = time.time()
                    await steadily_one_master(chaos, vip, "h1", w1, w2)
                    await wait_until(lambda: canary.all_confirming_since(healed), timeout=30, interval=0.2,
                                     what="every publisher confirming after the heal")
                    print(f"\nchaos: master's link cut -> every publisher confirming through h2 after {moved:.2f}s")
                finally:
                    report = await canary.stop()
            nursery.cancel_scope.cancel()
    assert report["confirmed"] > 0 and report["lost"] == 0, report


async def steadily_one_master(chaos: Chaos, vip: str, expected: str, *warrens: NsWarren) -> None:
    """``expected`` alone holds the VIP and is the one master, for a whole second."""

    def masters() -> list[str]:
        states = {}
        for warren in warrens:
            changes = [e["event"] for e in warren.events
                       if e.get("event") in ("vip.master", "vip.backup", "vip.fault") and e.get("instance") == "front"]
            states[warren.host.name] = changes[-1] if changes else None
        return [name for name, state in states.items() if state == "vip.master"]

    def holders() -> set[str]:
        return {h.name for h in (chaos.h1, chaos.h2) if vip in chaos.net.addresses(h.ns)}

    await wait_until(lambda: masters() == [expected] and holders() == {expected}, timeout=15, interval=0.05,
                     what=f"{expected} the one master")
    end = trio.current_time() + 1.0
    while trio.current_time() < end:
        assert masters() == [expected] and holders() == {expected}, (masters(), holders())
        await trio.sleep(0.05)


def logged_at(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()
