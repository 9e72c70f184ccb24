"""A small LAN of network namespaces for the benchmarks, built and torn down by PID.

`Lan` makes a "lan" namespace holding a bridge (br0, the client's side) and
one namespace per host joined to the bridge by a veth pair (`lan0` inside
the host). Processes started in a namespace are spawned through
`ip netns exec`, which execs, so the PID the harness holds is the program's
own. `destroy()` kills whatever still runs in the namespaces it created (all
of it was started by the benchmark) and deletes them; it is safe to call
after a partial build.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .procs import Managed, spawn

_serial = itertools.count()


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


def ip(*args: str) -> None:
    """Runs `ip ARGS`; CalledProcessError (with stderr) when it fails."""
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def sysctl(ns: str, setting: str) -> None:
    subprocess.run(in_ns(ns, ["sysctl", "-qw", setting]), check=True, capture_output=True, timeout=10)


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    ip: str
    port: str  # its bridge port, in the lan namespace


class Lan:
    """Namespaces and links of one measurement; `destroy()` removes all of it."""

    def __init__(self, subnet: str = "10.216.1"):
        self.tag = f"{os.getpid() % 10000}{next(_serial)}"
        self.subnet = subnet
        self.ns = f"wb{self.tag}l"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.processes: list[Managed] = []
        try:
            self._add_namespace(self.ns)
            ip("-n", self.ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            ip("-n", self.ns, "addr", "add", f"{subnet}.200/24", "dev", "br0")
            ip("-n", self.ns, "link", "set", "br0", "up")
        except BaseException:
            self.destroy()
            raise

    def _add_namespace(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def address(self, last: int) -> str:
        return f"{self.subnet}.{last}"

    def add_host(self, name: str) -> Host:
        """A namespace with `lan0` (subnet.<n>/24) bridged to the lan."""
        host = Host(name, f"wb{self.tag}{name}", self.address(len(self.hosts) + 1), f"p{name}")
        self._add_namespace(host.ns)
        ip("link", "add", "lan0", "netns", host.ns, "type", "veth", "peer", "name", host.port, "netns", self.ns)
        ip("-n", self.ns, "link", "set", host.port, "master", "br0", "up")
        ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "lan0")
        ip("-n", host.ns, "link", "set", "lan0", "up")
        self.hosts[name] = host
        return host

    def spawn(self, ns: str, name: str, argv: Sequence[str], log_path: Path | None, *,
              cwd: Path | None = None, pipe_stdio: bool = False) -> Managed:
        """Starts `argv` inside namespace `ns` (registered for cleanup)."""
        process = spawn(name, in_ns(ns, argv), log_path=log_path, cwd=cwd, pipe_stdio=pipe_stdio)
        self.processes.append(process)
        return process

    def addresses(self, ns: str, dev: str = "lan0") -> set[str]:
        """The IP addresses configured on `dev` in `ns`, as the kernel reports them."""
        done = subprocess.run(["ip", "-n", ns, "-j", "addr", "show", "dev", dev], capture_output=True,
                              text=True, timeout=10, check=True)
        return {info["local"] for link in json.loads(done.stdout) for info in link.get("addr_info", [])}

    def pids(self, ns: str) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
        return [int(pid) for pid in done.stdout.split()]

    def destroy(self) -> None:
        """Kills what runs in our namespaces, reaps our children, deletes the namespaces."""
        for ns in self.namespaces:
            for pid in self.pids(ns):  # everything in them was started by us
                _signal(pid, signal.SIGKILL)
        for process in self.processes:
            process.stop(timeout=5.0)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.namespaces.clear()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
