"""A small LAN of network namespaces for tests: hosts on a bridge, a client agent, Warren inside.

A "lan" namespace holds a bridge (br0) and the client; each host is a
namespace joined to the bridge by a veth pair (`lan0` inside the host).
Everything a :class:`Lab` starts is killed by PID and every namespace
deleted by :meth:`Lab.destroy`, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.warrenproc import WarrenProcess, write

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BACKEND_PORT = 9000
FRONT_PORT = 5672

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
    """A Python process in a namespace answering each JSON request line with a JSON line (a test's client)."""

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

    def __init__(self, host: Host, config_path: Path, wrapper: list[str] | None = None) -> None:
        super().__init__(config_path)
        self.host = host
        self.prefix = ["ip", "netns", "exec", host.ns, *(wrapper or [])]

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

    async def start_warren(self, nursery: trio.Nursery, host: Host, config: str,
                           wrapper: list[str] | None = None) -> NsWarren:
        """`warren run` in ``host`` (through ``wrapper``, e.g. setpriv) with ``config``."""
        path = write(self.tmp_path / f"{host.name}.toml", config)
        warren = NsWarren(host, path, wrapper)
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


# -- an unprivileged user with only the capabilities Warren needs -----------------------------


@dataclass(frozen=True)
class User:
    name: str
    home: Path  # a world-readable directory for its configuration files

    def setpriv(self, *capabilities: str) -> list[str]:
        """The command prefix running as this user with only ``capabilities`` (e.g. "net_admin") ambient."""
        argv = ["setpriv", "--reuid", self.name, "--regid", self.name, "--init-groups", "--no-new-privs"]
        if capabilities:
            caps = ",".join(f"+{cap}" for cap in capabilities)
            argv += ["--inh-caps", caps, "--ambient-caps", caps, "--bounding-set", f"-all,{caps}"]
        else:
            argv += ["--inh-caps", "-all", "--bounding-set", "-all"]
        return argv


@contextmanager
def unprivileged_user(tag: str) -> Iterator[User]:
    """A system user made for this test run (removed afterwards) and a directory it can read."""
    name = f"wt{tag}"[:31]
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group",
                    name], check=True, capture_output=True, timeout=30)
    home = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    home.chmod(0o755)
    try:
        yield User(name, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        _remove_user(name)


def _remove_user(name: str, patience: float = 15.0) -> None:
    """userdel refuses (status 8) while a process of the user is still on its way out; ask again."""
    deadline = time.monotonic() + patience
    while subprocess.run(["userdel", name], capture_output=True, timeout=30).returncode == 8:
        if time.monotonic() > deadline:
            raise AssertionError(f"user {name} still has processes; it was not removed")
        time.sleep(0.1)
