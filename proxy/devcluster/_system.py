"""Talking to the operating system for local RabbitMQ nodes: the rabbitmq
user, free ports, rabbitmqctl, /proc, and epmd (the Erlang port mapper)."""

from __future__ import annotations

import os
import pwd
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_USER = "rabbitmq"
COOKIE_HOME = Path("/var/lib/rabbitmq")  # $HOME/.erlang.cookie for server and ctl
EPMD_PORT = 4369
# Ports come from below Linux's default ephemeral range (32768-60999), so an
# outgoing connection cannot grab one between picking it and the node binding it.
PORT_RANGE = (20000, 32000)
# Never handed out: the distribution ports of the demo cluster (`make run`: AMQP
# ports from 5681, distribution ports 20000 above them, __main__.demo_specs), so
# that tests run beside it neither take its ports nor lose theirs to its restart.
DEMO_PORTS = range(25672, 25700)
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class DevClusterError(RuntimeError):
    """A node could not be started, stopped or asked something."""


class CtlError(DevClusterError):
    """`rabbitmqctl` failed; the message carries its stderr."""


def unavailable_reason() -> str | None:
    """Why local nodes cannot run here (for pytest.skip), or None if they can."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        return "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
    try:
        uid = pwd.getpwnam(RABBITMQ_USER).pw_uid
    except KeyError:
        return f"there is no {RABBITMQ_USER!r} user"
    if os.geteuid() not in (0, uid):
        return f"starting RabbitMQ nodes needs root or the {RABBITMQ_USER!r} user"
    return None


_handed_out: set[int] = set()


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports now free on 127.0.0.1, never handed out before
    by this process. Free only at the time of the call (bind-and-release)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(*PORT_RANGE)
        if port in _handed_out or port in DEMO_PORTS or not _port_is_free(port):
            continue
        _handed_out.add(port)
        ports.append(port)
    return ports


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_ctl(nodename: str, *args: str, timeout: float = 60.0, tool: str = "rabbitmqctl") -> str:
    """`rabbitmqctl -n nodename *args` (or another CLI `tool` such as
    rabbitmq-upgrade) as the rabbitmq user; stdout or CtlError."""
    env = {
        **BASE_ENV,
        "HOME": str(COOKIE_HOME),
        "RABBITMQ_CONF_ENV_FILE": "/nonexistent",
        # rabbitmqctl is itself a distributed node; a wider port range than
        # the default 11 lets many run at once (parallel tests, other users).
        "RABBITMQ_CTL_DIST_PORT_MIN": "35672",
        "RABBITMQ_CTL_DIST_PORT_MAX": "35772",
    }
    cmd = [str(RABBITMQ_BIN / tool), "-n", nodename, *args]
    try:
        done = subprocess.run(cmd, env=env, cwd=COOKIE_HOME, capture_output=True, text=True,
                              timeout=timeout, **as_rabbitmq_user())
    except subprocess.TimeoutExpired as exc:
        raise CtlError(f"{' '.join(cmd[1:])}: no answer after {timeout}s") from exc
    if done.returncode != 0:
        raise CtlError(f"{' '.join(cmd[1:])} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True if a TCP connection to host:port is accepted (sends nothing)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def as_rabbitmq_user() -> dict:
    if os.geteuid() != 0:
        return {}
    return {"user": RABBITMQ_USER, "group": RABBITMQ_USER, "extra_groups": []}


def chown_tree(path: Path) -> None:
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(RABBITMQ_USER)
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, entry.pw_uid, entry.pw_gid)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def check_reachable_by_rabbitmq(path: Path) -> None:
    """Raises if the rabbitmq user could not enter `path` (e.g. under a 0700
    directory); parts that do not exist yet are created 0755 later."""
    uid = pwd.getpwnam(RABBITMQ_USER).pw_uid
    for part in [path, *path.parents]:
        try:
            st = part.stat()
        except FileNotFoundError:
            continue
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            raise DevClusterError(f"user {RABBITMQ_USER!r} cannot enter {part}; choose another base directory")


# -- epmd ---------------------------------------------------------------------
# The first node on a machine starts epmd (the Erlang port mapper) as a daemon.
# We stop it after our last node only if it was not running before and no other
# node (of another process, say) is registered with it.

def epmd_pids() -> list[int]:
    """PIDs of live (not zombie) epmd processes."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and comm(int(p.name)) == "epmd" and not is_zombie(int(p.name))]


def is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def epmd_names() -> list[str] | None:
    """Node names registered with the local epmd (NAMES_REQ); None if none runs."""
    try:
        with socket.create_connection(("127.0.0.1", EPMD_PORT), timeout=2.0) as sock:
            sock.sendall(b"\x00\x01n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return None
    return [line.split()[1] for line in data[4:].decode(errors="replace").splitlines() if line.startswith("name ")]


def stop_epmd_if_idle(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while epmd_names():  # dead nodes unregister as their connection closes
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)
    for pid in epmd_pids():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
