"""The VIP tests' LAN: hosts on a bridge (lab.Lan), each with a tiny backend
and `warren run`, a client agent on the bridge, and an unprivileged user.

The namespaces, links and processes are the shared harness's (lab/netns.py,
the `netlab` fixture): names carry the PID, everything is removed by PID
whatever happened. This module adds what the floating-IP tests run on that
LAN: every host runs a TCP server on 127.0.0.1:9000 that answers with the
host's name (so a connection through the VIP says who served it), Warren
(optionally through a wrapper such as setpriv), and the agent, a Python
process in the bridge's namespace answering JSON requests (connect, AMQP,
gratuitous ARP seen on br0).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from lab import Host, NetLab, in_ns, wait_until, wait_until_blocking
from lab.backend import READY, backend_argv
from tests.warrenproc import WarrenProcess, write

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BACKEND_PORT = 9000
FRONT_PORT = 5672

__all__ = ["BACKEND_PORT", "FRONT_PORT", "REPO", "Agent", "NsWarren", "User", "VipLab", "unprivileged_user", "write"]

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

        async def reached() -> bool:
            return await self.connect(host) == expected

        await wait_until(reached, timeout=timeout, interval=0.02, what=f"{host} served by {expected}")
        return time.time()

    async def gratuitous_arp(self) -> list[dict]:
        return (await self.call(op="arp"))["frames"]


class NsWarren(WarrenProcess):
    """`warren run` inside a namespace (`ip netns exec` execs, so the PID is Python's)."""

    def __init__(self, host: Host, config_path: Path, wrapper: list[str] | None = None) -> None:
        super().__init__(config_path)
        self.host = host
        self.prefix = in_ns(host.ns, wrapper or [])

    def states(self, instance: str = "front") -> list[str]:
        """The instance's state events so far: ["backup", "master", ...]."""
        names = {"vip.master": "master", "vip.backup": "backup", "vip.fault": "fault", "vip.stopped": "stopped"}
        return [names[e["event"]] for e in self.events if e.get("event") in names and e.get("instance") == instance]

    def index_of(self, event: str, **fields) -> int:
        for index, logged in enumerate(self.events):
            if logged.get("event") == event and all(logged.get(k) == v for k, v in fields.items()):
                return index
        raise AssertionError(f"{self.host.name} never logged {event} {fields}")


class VipLab:
    """The LAN of one test (a lab.Lan on the test's NetLab) and what runs on it."""

    def __init__(self, net: NetLab, tmp_path: Path, subnet: str | None) -> None:
        self.net, self.tmp_path = net, tmp_path
        self.lan = net.lan(subnet)  # subnet None: one free in the root namespace (for link_root)
        self.hosts = self.lan.hosts
        self.agent: Agent | None = None

    def vip(self, last: int = 100) -> str:
        return self.lan.address(last)

    def add_host(self, name: str) -> Host:
        return self.lan.add_host(name)

    async def open_process(self, ns: str, argv: list[str], **options) -> trio.Process:
        """``argv`` in namespace ``ns`` from the repository, killed with the lab."""
        return await self.net.open_process(ns, argv, cwd=REPO, **options)

    async def start_backend(self, host: Host) -> trio.Process:
        process = await self.open_process(host.ns, backend_argv(BACKEND_PORT, answer=host.name, close=True),
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        # Read the whole line: print() may write it and its newline separately, and
        # a pipe closed in between would end the backend with BrokenPipeError. The
        # process is held (pipes open) until the lab is destroyed.
        output = b""
        with trio.fail_after(10):
            while READY.encode() + b"\n" not in output:
                output += await process.stdout.receive_some()
        return process

    async def start_agent(self, vips: list[str]) -> Agent:
        process = await self.open_process(self.lan.ns, [PYTHON, "-c", AGENT, *vips], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE)
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
                self.net.adopt(warren.process)
        return warren

    async def holders(self, vip: str) -> set[str]:
        """Hosts whose lan0 carries ``vip`` now, as the kernel (iproute2) reports it."""
        found = set()
        for host in self.hosts.values():
            if vip in await trio.to_thread.run_sync(self.net.addresses, host.ns):
                found.add(host.name)
        return found

    async def wait_holders(self, vip: str, expected: set[str], timeout: float = 15) -> float:
        async def held() -> bool:
            return await self.holders(vip) == expected

        await wait_until(held, timeout=timeout, interval=0.02, what=f"{vip} held by {sorted(expected)}")
        return time.time()

    async def steadily_held_by(self, vip: str, expected: set[str], seconds: float) -> None:
        """Reach ``expected`` holders, then keep exactly them for ``seconds`` (observation, not sync)."""
        await self.wait_holders(vip, expected)
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            assert await self.holders(vip) == expected
            await trio.sleep(0.05)


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
    _check_others_can_run_the_checkout()
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


def _check_others_can_run_the_checkout() -> None:
    """The user runs Warren from this checkout and its venv: every directory
    above them must let others in (a clone made in `mktemp -d`, mode 0700,
    does not; the failure would otherwise be "No module named proxy")."""
    for path in (Path(__file__).resolve().parent.parent, Path(sys.prefix).resolve()):
        for directory in (path, *path.parents):
            if not directory.stat().st_mode & 0o001:
                raise AssertionError(f"{directory} is closed to other users (mode "
                                     f"{directory.stat().st_mode & 0o777:o}): the unprivileged tests run Warren "
                                     f"from {path} as another user; clone into a directory others can traverse")


def _remove_user(name: str, patience: float = 15.0) -> None:
    """userdel refuses (status 8) while a process of the user is still on its way out; ask again."""

    def removed() -> bool:
        return subprocess.run(["userdel", name], capture_output=True, timeout=30).returncode != 8

    wait_until_blocking(removed, timeout=patience, interval=0.1, what=f"user {name} removed (no process left)")
