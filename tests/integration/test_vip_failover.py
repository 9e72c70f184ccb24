"""The floating IP end to end: real `warren run` processes in network namespaces.

Each test builds a small LAN: a "lan" namespace holding a bridge (br0) and the
client, and one namespace per Warren host joined to the bridge by a veth pair
(`lan0` inside the host). Every host runs a tiny TCP server on 127.0.0.1:9000
that answers with the host's name, and Warren proxies VIP:5672 to it, so a
client connection through the VIP says which host served it. One test puts a
real RabbitMQ node behind the hosts instead (a veth from the root namespace to
the bridge) and speaks AMQP through the VIP.

Everything a test starts is killed by PID and every namespace deleted, whatever
happens (the `lab` fixture). Failover times are printed (run with -s), never
asserted beyond generous bounds: the benchmark measures them.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.warrenproc import WarrenProcess, write

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BACKEND_PORT = 9000
FRONT_PORT = 5672
_serial = itertools.count()

# -- the lab ------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    port: str  # its bridge port, in the lan namespace


BACKEND = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", {port}))
server.listen(64)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    try:
        conn.sendall(b"{name}")
    except OSError:
        pass
    conn.close()
"""

AGENT = r"""
import json, socket, sys, threading, time
vips = {socket.inet_aton(ip): ip for ip in sys.argv[1:]}
frames = []
capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
capture.bind(("br0", 0))

def record_gratuitous_arp():
    while True:
        frame = capture.recv(2048)
        sender, target = frame[28:32], frame[38:42]
        if frame[20:22] == b"\x00\x01" and sender == target and sender in vips:
            frames.append({"t": time.time(), "ip": vips[sender], "mac": frame[22:28].hex()})

threading.Thread(target=record_gratuitous_arp, daemon=True).start()

def connect(request):
    try:
        with socket.create_connection((request["host"], request["port"]), timeout=request["timeout"]) as sock:
            data = b""
            while chunk := sock.recv(100):
                data += chunk
        return {"ok": True, "data": data.decode()}
    except OSError as error:
        return {"ok": False, "error": str(error)}

def amqp(request):
    import pika
    params = pika.ConnectionParameters(
        host=request["host"], port=request["port"], connection_attempts=1, socket_timeout=2,
        stack_timeout=5, blocked_connection_timeout=5)
    try:
        connection = pika.BlockingConnection(params)
        channel = connection.channel()
        channel.queue_declare(queue=request["queue"])
        if request.get("publish"):
            channel.basic_publish("", request["queue"], request["publish"].encode())
        got = None
        if request.get("get"):
            _, _, body = channel.basic_get(request["queue"], auto_ack=True)
            got = body.decode() if body is not None else None
        connection.close()
        return {"ok": True, "got": got}
    except Exception as error:
        return {"ok": False, "error": repr(error)}

print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "connect":
        reply = connect(request)
    elif request["op"] == "amqp":
        reply = amqp(request)
    else:
        reply = {"frames": list(frames)}
    print(json.dumps(reply), flush=True)
"""


class Agent:
    """A Python process in the lan namespace: the client, and a gratuitous-ARP recorder on br0."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    async def _line(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise AssertionError("the lan agent died")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    async def ready(self) -> None:
        while await self._line() != b"ready":
            pass

    async def call(self, **request) -> dict:
        await self.process.stdin.send_all(json.dumps(request).encode() + b"\n")
        return json.loads(await self._line())

    async def connect(self, host: str, port: int = FRONT_PORT, timeout: float = 0.1) -> str | None:
        """Who answers through ``host``: a host's name, or None."""
        reply = await self.call(op="connect", host=host, port=port, timeout=timeout)
        return reply["data"] if reply["ok"] and reply["data"] else None

    async def served_by(self, host: str, expected: str, timeout: float = 10) -> float:
        """Poll until a connection through ``host`` reaches ``expected``; returns when (wall clock)."""
        with trio.fail_after(timeout):
            while await self.connect(host) != expected:
                await trio.sleep(0.02)
        return time.time()

    async def gratuitous_arp(self) -> list[dict]:
        return (await self.call(op="arp"))["frames"]


class NsWarren(WarrenProcess):
    """`warren run` inside a namespace (`ip netns exec` execs, so the PID is Python's)."""

    def __init__(self, host: Host, config_path: Path) -> None:
        super().__init__(config_path)
        self.host = host

    async def start(self, nursery: trio.Nursery, timeout: float = 30) -> dict:
        self.process = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", self.host.ns, PYTHON, "-m", "proxy", "run", str(self.config_path)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
        nursery.start_soon(self._read_log)
        return await self.wait_for("warren.started", timeout=timeout)

    def states(self, instance: str = "front") -> list[str]:
        """The instance's state events so far: ["backup", "master", ...]."""
        names = {"vip.master": "master", "vip.backup": "backup", "vip.fault": "fault", "vip.stopped": "stopped"}
        return [names[e["event"]] for e in self.events if e.get("event") in names and e.get("instance") == instance]

    def index_of(self, event: str, **fields) -> int:
        for index, logged in enumerate(self.events):
            if logged.get("event") == event and all(logged.get(k) == v for k, v in fields.items()):
                return index
        raise AssertionError(f"{self.host.name} never logged {event} {fields}")


class Lab:
    """Namespaces, links and processes of one test; :meth:`destroy` removes all of it."""

    def __init__(self, tag: str, tmp_path: Path, subnet: str) -> None:
        self.tag, self.tmp_path, self.subnet = tag, tmp_path, subnet
        self.lan = f"wv{tag}l"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.processes: list[trio.Process] = []  # everything started, killed at the end if alive
        self.root_link: str | None = None
        self.agent: Agent | None = None
        self._add_namespace(self.lan)
        _ip("-n", self.lan, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.lan, "addr", "add", f"{subnet}.200/24", "dev", "br0")
        _ip("-n", self.lan, "link", "set", "br0", "up")

    def _add_namespace(self, ns: str) -> None:
        try:
            _ip("netns", "add", ns)
        except subprocess.CalledProcessError as error:
            pytest.skip(f"cannot create network namespaces: {error.stderr!r}")
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        # IPv6 addresses usable at once (no duplicate address detection) on links made later.
        subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip

    def vip(self, last: int = 100) -> str:
        return f"{self.subnet}.{last}"

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        host = Host(name, f"wv{self.tag}{name}", f"{self.subnet}.{index}", f"p{name}")
        self._add_namespace(host.ns)
        _ip("link", "add", "lan0", "netns", host.ns, "type", "veth", "peer", "name", host.port, "netns", self.lan)
        _ip("-n", self.lan, "link", "set", host.port, "master", "br0", "up")
        _ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "lan0")
        _ip("-n", host.ns, "link", "set", "lan0", "up")
        self.hosts[name] = host
        return host

    def link_root_namespace(self) -> str:
        """A veth from the root namespace to the bridge; returns the root side's address."""
        self.root_link = f"wv{self.tag}r"
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", "root", "netns", self.lan)
        _ip("-n", self.lan, "link", "set", "root", "master", "br0", "up")
        address = f"{self.subnet}.250"
        _ip("addr", "add", f"{address}/24", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")
        return address

    async def _open(self, ns: str, argv: list[str], **options) -> trio.Process:
        process = await trio.lowlevel.open_process(["ip", "netns", "exec", ns, *argv], cwd=REPO, **options)
        self.processes.append(process)  # held, pipes open (see start_backend)
        return process

    async def start_backend(self, host: Host) -> trio.Process:
        code = BACKEND.format(port=BACKEND_PORT, name=host.name)
        process = await self._open(host.ns, [PYTHON, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        # Read the whole line: print() may write "ready" and its newline separately, and
        # a pipe closed in between would end the backend with BrokenPipeError.
        output = b""
        with trio.fail_after(10):
            while b"ready\n" not in output:
                output += await process.stdout.receive_some()
        return process

    async def start_agent(self, vips: list[str]) -> Agent:
        process = await self._open(
            self.lan, [PYTHON, "-c", AGENT, *vips], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.agent = Agent(process)
        with trio.fail_after(10):
            await self.agent.ready()
        return self.agent

    async def start_warren(self, nursery: trio.Nursery, host: Host, config: str) -> NsWarren:
        path = write(self.tmp_path / f"{host.name}.toml", config)
        warren = NsWarren(host, path)
        try:
            await warren.start(nursery)
        finally:
            if warren.process is not None:
                self.processes.append(warren.process)
        return warren

    async def holders(self, vip: str) -> set[str]:
        """Hosts whose lan0 carries ``vip`` now, as the kernel (iproute2) reports it."""
        found = set()
        for host in self.hosts.values():
            show = ["ip", "-n", host.ns, "-j", "addr", "show", "dev", "lan0"]
            done = await trio.run_process(show, capture_stdout=True)
            [link] = json.loads(done.stdout)
            if any(info.get("local") == vip for info in link.get("addr_info", [])):
                found.add(host.name)
        return found

    async def wait_holders(self, vip: str, expected: set[str], timeout: float = 15) -> float:
        with trio.fail_after(timeout):
            while await self.holders(vip) != expected:
                await trio.sleep(0.02)
        return time.time()

    async def steadily_held_by(self, vip: str, expected: set[str], seconds: float) -> None:
        """Reach ``expected`` holders, then keep exactly them for ``seconds`` (observation, not sync)."""
        await self.wait_holders(vip, expected)
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            assert await self.holders(vip) == expected
            await trio.sleep(0.05)

    async def mac_of(self, host: Host) -> str:
        done = await trio.run_process(["ip", "-n", host.ns, "-j", "link", "show", "lan0"], capture_stdout=True)
        return json.loads(done.stdout)[0]["address"].replace(":", "")

    def destroy(self) -> None:
        for process in self.processes:
            _kill_child(process.pid)
        for ns in self.namespaces:
            listing = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
            for pid in listing.stdout.split():  # hooks and anything else started inside: ours
                _kill(int(pid))
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        if self.root_link is not None:
            subprocess.run(["ip", "link", "del", self.root_link], capture_output=True, timeout=10)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_child(pid: int) -> None:
    """SIGKILL our child ``pid`` if it still runs, and reap it; outside trio (fixture teardown).

    waitpid() only answers for our own unreaped children, so a PID that was
    reaped already (and may belong to someone else by now) is never signalled.
    """
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return  # reaped already
    if done == 0:
        _kill(pid)
        os.waitpid(pid, 0)


@pytest.fixture
def lab(tmp_path):
    tag = f"{os.getpid() % 10000}{next(_serial)}"
    made = Lab(tag, tmp_path, "10.213.1")
    try:
        yield made
    finally:
        made.destroy()


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


async def two_hosts(lab: Lab, nursery, first: str, second: str, **started_first_only) -> tuple[NsWarren, NsWarren]:
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
            _ip("-n", lab.lan, "link", "set", lab.hosts["h1"].port, "nomaster")
            await w2.wait_for("vip.master", instance="front", timeout=10)
            await lab.wait_holders(lab.vip(), {"h1", "h2"})  # each side has a master
            assert w1.states()[-1] == "master"
            agent = await lab.start_agent([lab.vip()])
            assert await agent.served_by(lab.vip(), "h2")  # the side the client can reach
            _ip("-n", lab.lan, "link", "set", lab.hosts["h1"].port, "master", "br0")
            await lab.steadily_held_by(lab.vip(), {"h1"}, seconds=1.5)
            assert w2.states()[-1] == "backup"
            await agent.served_by(lab.vip(), "h1", timeout=5)  # h1 re-announced itself
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
            _ip("-n", lab.hosts["h1"].ns, "link", "set", "lan0", "down")
            await w1.wait_for("vip.fault", instance="front", timeout=10)
            await w2.wait_for("vip.master", instance="front", timeout=10)
            await lab.wait_holders(lab.vip(), {"h2"})
            _ip("-n", lab.hosts["h1"].ns, "link", "set", "lan0", "up")
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
            took_over = await w2.wait_for("vip.master", instance="front", timeout=10)
            served = await agent.served_by(lab.vip(), "h2")
            assert took_over["reason"] == "master_left"  # a priority-0 resignation, not a timeout
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
            _ip("-n", lab.lan, "neigh", "add", lab.vip(), "lladdr", "02:00:00:00:00:01", "dev", "br0", "nud", "stale")
            agent = await lab.start_agent([lab.vip()])
            w1 = await lab.start_warren(nursery, h1, warren_config(priority=150, extra_vip=garp))
            became = logged_at(await w1.wait_for("vip.master", instance="front", timeout=15))
            with trio.fail_after(10):
                while len(frames := await agent.gratuitous_arp()) < 6:
                    await trio.sleep(0.1)
            mac = await lab.mac_of(h1)
            assert {frame["mac"] for frame in frames} == {mac}
            offsets = [frame["t"] - became for frame in frames]
            assert all(-0.05 < offset < 0.5 for offset in offsets[:3]), offsets  # the burst, at once
            assert all(0.9 < offset < 1.6 for offset in offsets[3:6]), offsets  # the repeat, 1 s later
            done = await trio.run_process(["ip", "-n", lab.lan, "-j", "neigh", "show", lab.vip()], capture_stdout=True)
            assert json.loads(done.stdout)[0]["lladdr"].replace(":", "") == mac  # the client moved
            nursery.cancel_scope.cancel()


async def test_an_ipv6_vip_fails_over_with_neighbour_advertisements(lab):
    vip6 = "fd00:213::100"

    def config(priority: int) -> str:
        text = warren_config(priority=priority).replace(f'"{lab.vip()}:{FRONT_PORT}"', f'"[{vip6}]:{FRONT_PORT}"')
        return text.replace(f'"{lab.vip()}/32"', f'"{vip6}/128"')

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _ip("-n", lab.lan, "addr", "add", "fd00:213::200/64", "dev", "br0", "nodad")
            w1, w2 = await two_hosts(lab, nursery, config(150), config(100))
            for index, host in enumerate(lab.hosts.values(), 1):  # the prefix route back to the client
                _ip("-n", host.ns, "addr", "add", f"fd00:213::{index}/64", "dev", "lan0", "nodad")
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


async def test_amqp_clients_reconnect_through_the_vip_after_the_master_is_killed(tmp_path, rabbit_node_factory):
    from proxy.devcluster import free_ports

    tag = f"{os.getpid() % 10000}{next(_serial)}"
    subnet = f"10.214.{os.getpid() % 250}"
    lab = Lab(tag, tmp_path, subnet)
    try:
        broker_ip = lab.link_root_namespace()
        [port] = free_ports(1)
        node = rabbit_node_factory(extra_conf={"listeners.tcp.2": f"{broker_ip}:{port}"})
        assert node is not None
        vip = lab.vip()

        def config(priority: int) -> str:
            return warren_config(priority=priority, vip=vip, backend=f"{broker_ip}:{port}")

        queue = f"warren-vip-{tag}"
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
                with trio.fail_after(15):
                    while not (reply := await agent.call(**amqp, get=True))["ok"]:
                        await trio.sleep(0.05)
                reconnected = time.time()
                assert reply["got"] == "before failover"
                assert await lab.holders(vip) in ({"h2"}, {"h1", "h2"})  # h1's lease may not have run out yet
                report("advert 100ms, master SIGKILL -> AMQP handshake through the VIP succeeds", reconnected - killed)
                nursery.cancel_scope.cancel()
    finally:
        lab.destroy()
