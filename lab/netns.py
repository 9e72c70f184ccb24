"""Network namespaces for tests and benchmarks, built and removed by this run.

`NetLab` records everything one test or benchmark makes: namespaces, links
in the root namespace, packet drops and processes. `destroy()` removes all
of it, also after a failed build, and may be called again. Every name
carries this process's PID and a serial (`wl<pid>-<n><role>`), so the runs
of several engineers on one machine never meet: processes found inside our
namespaces are ours by construction and are killed by PID; nothing is ever
killed by name.

Topologies:

- `NetLab.lan()`: a "lan" namespace holding a bridge (`br0`, subnet.200) and
  one namespace per `add_host()`, joined by a veth pair (`lan0` inside the
  host, subnet.<n>/24). `link_root()` adds a veth from the root namespace to
  the bridge (subnet.250 on the root side), for RabbitMQ nodes that run in
  the root namespace. `cut(host)` / `heal(host)` detach and reattach a
  host's bridge port: a partition whose carrier stays up (no FAULT, no FIN).
- `NetLab.pair()`: two namespaces joined by one veth pair.
- `NetLab.drop(ns, peer, port)`: packets between a namespace and a peer
  (optionally one TCP port of it) silently dropped in both directions until
  `heal()` (nftables, in that namespace only).

Processes: `command(ns, argv)` is `ip netns exec NS ARGV`, which execs, so the
PID you hold is the program's own; start it however you like and `adopt()`
it (a trio.Process, a subprocess.Popen, or any object with a synchronous
`stop()`), or use `open_process()` (trio).
"""

from __future__ import annotations

import atexit
import inspect
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Any, Sequence, Union

import trio

PREFIX = "wl"  # every namespace and root-namespace link this module makes
NFT_TABLE = "warren_lab"
_serial = itertools.count()
_open_labs: set["NetLab"] = set()
_claimed_subnets: set[str] = set()

Process = Union[trio.Process, subprocess.Popen, Any]  # Any: with a synchronous stop()


class LabError(RuntimeError):
    """A namespace, link or rule could not be made (the message has the command's stderr)."""


def netns_missing() -> str | None:
    """Why namespaces cannot be built here (not root, no iproute2), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        return f"ip netns does not work here: {done.stderr.strip()}"
    return None


def nft_missing() -> str | None:
    """Why packet drops cannot be made here (nftables' nft is not installed), or None."""
    return None if shutil.which("nft") else "nftables (nft) is not installed"


def run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 10) -> str:
    """Runs a short command; returns its stdout; LabError with stderr when it fails."""
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def ip(*args: str) -> str:
    """`ip ARGS` (LabError when it fails)."""
    return run(["ip", *args])


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


def sysctl(ns: str, setting: str) -> None:
    """`sysctl -w setting` inside ``ns`` (e.g. "net.ipv4.ip_nonlocal_bind=1")."""
    run(in_ns(ns, ["sysctl", "-qw", setting]))


def free_subnet() -> str:
    """A /24 ("10.2xx.y") no route of the root namespace covers and no lab of
    this process holds: the root side of `Lan.link_root()` lives there."""
    routes = json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]")
    used = []
    for route in routes:  # local and broadcast entries too: an address there is a conflict
        if route.get("dst", "default") != "default":
            used.append(ipaddress.ip_network(route["dst"], strict=False))
    start = os.getpid() % 10_000  # concurrent runs start far apart
    for offset in range(10_000):
        index = (start + offset) % 10_000
        subnet = f"10.{200 + index // 250}.{index % 250}"
        network = ipaddress.ip_network(f"{subnet}.0/24")
        if subnet not in _claimed_subnets and not any(network.overlaps(u) for u in used):
            _claimed_subnets.add(subnet)
            return subnet
    raise LabError("no free /24 in 10.200.0.0 - 10.239.255.0")


def signal_pid(pid: int, signum: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def kill_child(pid: int) -> None:
    """SIGKILLs our child ``pid`` if it still runs, and reaps it.

    waitpid() answers only for our own unreaped children, so a PID that was
    reaped already (and may belong to someone else by now) is never signalled.
    """
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return  # reaped already (or not ours)
    if done == 0:
        signal_pid(pid)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


@dataclass(frozen=True)
class Host:
    """A namespace on a `Lan`: `lan0` carries `ip`/24; `port` is its bridge port."""

    name: str
    ns: str
    ip: str
    port: str


@dataclass(frozen=True)
class Side:
    """One end of a `Pair`: its namespace, interface and address (/24)."""

    ns: str
    ifname: str
    ip: ipaddress.IPv4Address


@dataclass(frozen=True)
class Pair:
    a: Side
    b: Side


class Drop:
    """Packets between a namespace and ``peer`` (one TCP port of it, or all
    traffic) dropped in both directions: no FIN, no RST, no ICMP. `heal()`
    lets them through again; it is also a context manager."""

    def __init__(self, ns: str, peer: str, port: int | None, chain: str):
        self.ns, self.peer, self.port = ns, peer, port
        family = "ip" if ipaddress.ip_address(peer).version == 4 else "ip6"
        out = f"{family} daddr {peer}" + (f" tcp dport {port}" if port else "")
        back = f"{family} saddr {peer}" + (f" tcp sport {port}" if port else "")
        self._chains = {f"{chain}_out": ("output", out), f"{chain}_in": ("input", back)}
        script = [f"add table inet {NFT_TABLE}"]
        for name, (hook, match) in self._chains.items():
            script.append(f"add chain inet {NFT_TABLE} {name} {{ type filter hook {hook} priority 0 ; }}")
            script.append(f"add rule inet {NFT_TABLE} {name} {match} drop")
        self._nft(script)  # one transaction: both directions at once
        self.active = True

    def heal(self) -> None:
        if self.active:
            script = []
            for name in self._chains:  # a base chain must be empty before it goes
                script += [f"flush chain inet {NFT_TABLE} {name}", f"delete chain inet {NFT_TABLE} {name}"]
            self._nft(script)
            self.active = False

    def _nft(self, script: list[str]) -> None:
        run(in_ns(self.ns, ["nft", "-f", "-"]), stdin="\n".join(script) + "\n")

    def __enter__(self) -> Drop:
        return self

    def __exit__(self, *exc_info) -> None:
        self.heal()


class NetLab:
    """Namespaces, links, drops and processes of one test or benchmark run.

    Build with `namespace()`, `lan()`, `pair()`, `drop()`; start processes
    with `command()` + `adopt()` or `open_process()`; `destroy()` (or leaving
    the `with` block) kills every process started here or found in our
    namespaces, by PID, and deletes every namespace and link. A lab left
    open is destroyed at interpreter exit."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}-{next(_serial)}"
        self.namespaces: list[str] = []
        self.root_links: list[str] = []
        self.processes: list[Process] = []
        self._drops = itertools.count()
        _open_labs.add(self)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc_info) -> None:
        self.destroy()

    # -- building ----------------------------------------------------------
    def namespace(self, role: str) -> str:
        """A new namespace named after ``role`` (loopback up, IPv6 addresses
        usable at once: no duplicate address detection on its links)."""
        ns = f"{self.tag}{role}"
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        sysctl(ns, "net.ipv6.conf.default.accept_dad=0")
        return ns

    def root_link_name(self) -> str:
        """A name for an interface in the root namespace, unique on this machine (<= 15 bytes)."""
        return f"{PREFIX}{os.getpid()}r{next(_serial)}"  # at most 2 + 7 + 1 + 5 bytes

    def lan(self, subnet: str | None = None) -> Lan:
        """A bridge in its own namespace; ``subnet`` ("10.213.1") or a free one."""
        return Lan(self, subnet or free_subnet())

    def pair(self, subnet: str = "10.213.0") -> Pair:
        """Namespaces `a` and `b` joined by one veth pair (subnet.1 and subnet.2)."""
        sides = []
        for letter, last in (("a", 1), ("b", 2)):
            sides.append(Side(self.namespace(letter), f"veth{letter}", ipaddress.IPv4Address(f"{subnet}.{last}")))
        a, b = sides
        ip("link", "add", a.ifname, "netns", a.ns, "type", "veth", "peer", "name", b.ifname, "netns", b.ns)
        for side in (a, b):
            ip("-n", side.ns, "addr", "add", f"{side.ip}/24", "dev", side.ifname)
            ip("-n", side.ns, "link", "set", side.ifname, "up")
        return Pair(a, b)

    def drop(self, ns: str, peer: str, port: int | None = None) -> Drop:
        """Drops packets between ``ns`` and ``peer`` (TCP ``port`` of it, or all) until heal()."""
        if reason := nft_missing():
            raise LabError(reason)
        return Drop(ns, peer, port, f"drop{next(self._drops)}")

    # -- processes ---------------------------------------------------------
    def command(self, ns: str, argv: Sequence[str]) -> list[str]:
        return in_ns(ns, argv)

    def adopt(self, process: Process) -> Process:
        """Registers a process started for this lab: killed at destroy() if still running."""
        self.processes.append(process)
        return process

    async def open_process(self, ns: str, argv: Sequence[str], **options) -> trio.Process:
        """``argv`` started inside ``ns`` (trio.lowlevel.open_process options), adopted."""
        return self.adopt(await trio.lowlevel.open_process(self.command(ns, argv), **options))

    # -- looking -----------------------------------------------------------
    def pids(self, ns: str) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
        return [int(pid) for pid in done.stdout.split()]

    def addresses(self, ns: str, dev: str = "lan0") -> dict[str, dict]:
        """The addresses on ``dev`` in ``ns`` as the kernel reports them: {"ip": iproute2's info}."""
        links = json.loads(ip("-n", ns, "-j", "addr", "show", "dev", dev))
        return {info["local"]: info for link in links for info in link.get("addr_info", [])}

    def mac(self, ns: str, dev: str = "lan0") -> str:
        """The link-layer address of ``dev`` in ``ns``, as 12 hex digits."""
        return json.loads(ip("-n", ns, "-j", "link", "show", dev))[0]["address"].replace(":", "")

    # -- cleanup -----------------------------------------------------------
    def destroy(self) -> None:
        """Kills what runs in our namespaces and what we adopted (by PID), deletes
        our root links and namespaces. Best effort, idempotent."""
        for ns in self.namespaces:
            for pid in self.pids(ns):  # everything in them was started by this run
                signal_pid(pid)
        for process in self.processes:
            _reap(process)
        self.processes.clear()
        for link in self.root_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)
        self.root_links.clear()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.namespaces.clear()
        _open_labs.discard(self)


class Lan:
    """A bridge (br0, subnet.200/24) in namespace `ns`; hosts hang off it."""

    def __init__(self, lab: NetLab, subnet: str):
        self.lab, self.subnet = lab, subnet
        self.hosts: dict[str, Host] = {}
        self.root_link: str | None = None
        self.ns = lab.namespace("lan")
        ip("-n", self.ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", self.ns, "addr", "add", f"{subnet}.200/24", "dev", "br0")
        ip("-n", self.ns, "link", "set", "br0", "up")

    def address(self, last: int) -> str:
        return f"{self.subnet}.{last}"

    def add_host(self, name: str) -> Host:
        """A namespace whose `lan0` (subnet.<n>/24, n = 1, 2, ...) is bridged to the lan."""
        host = Host(name, self.lab.namespace(name), self.address(len(self.hosts) + 1), f"p{name}")
        ip("link", "add", "lan0", "netns", host.ns, "type", "veth", "peer", "name", host.port, "netns", self.ns)
        ip("-n", self.ns, "link", "set", host.port, "master", "br0", "up")
        ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "lan0")
        ip("-n", host.ns, "link", "set", "lan0", "up")
        self.hosts[name] = host
        return host

    def link_root(self) -> str:
        """A veth from the root namespace to the bridge; returns the root side's
        address (subnet.250), where root-namespace services can listen."""
        if self.root_link is None:
            name = self.lab.root_link_name()
            ip("link", "add", name, "type", "veth", "peer", "name", "root", "netns", self.ns)
            self.lab.root_links.append(name)
            self.root_link = name
            ip("-n", self.ns, "link", "set", "root", "master", "br0", "up")
            ip("addr", "add", f"{self.address(250)}/24", "dev", name)
            ip("link", "set", name, "up")
        return self.address(250)

    def cut(self, host: Host) -> None:
        """Detaches the host from the bridge: nothing passes, its carrier stays up."""
        ip("-n", self.ns, "link", "set", host.port, "nomaster")

    def heal(self, host: Host) -> None:
        ip("-n", self.ns, "link", "set", host.port, "master", "br0")


def _reap(process: Process) -> None:
    stop = getattr(process, "stop", None)
    if callable(stop) and not inspect.iscoroutinefunction(stop):
        stop()
    elif isinstance(process, subprocess.Popen):
        if process.poll() is None:
            process.kill()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            pass
    else:
        kill_child(process.pid)


@atexit.register
def _destroy_forgotten_labs() -> None:
    for lab in list(_open_labs):
        lab.destroy()
