"""The contenders: a direct connection, HAProxy and Warren, with equivalent settings.

Both proxies listen on a free loopback port, forward to the same servers with
roundrobin, `retries 3` plus redispatch, no idle timeouts (HAProxy needs
some, so an hour), the same frontend `maxconn`, and the same health checks:

* plain TCP backends: HAProxy `check` (a connect check), Warren kinds ["tcp"];
* AMQP backends: HAProxy `option tcp-check` sending the AMQP 0-9-1 protocol
  header and expecting Connection.Start (class 10, method 10), Warren kinds
  ["amqp", "watch"]; with `on-marked-down shutdown-sessions` / on_marked_down
  = "shutdown-sessions" when asked for.

Both use inter/rise/fall/timeout from `Health`. HAProxy starts every server
UP; Warren's default is DOWN until `rise` checks pass, so Warren gets
`init_state = "up"` to start the same way (the harness waits until traffic
passes through either proxy before measuring anyway). HAProxy runs with its
default thread count (one per CPU), in TCP mode, without splicing (its
default); Warren with its defaults (the kernel relay path where its start-up
self-test passes and finds no hazard, else splice; a `bulk` spec marks the frontend `bulk = true`,
which splices) and `log_level = "warning"`, which silences its per-connection
log line as HAProxy without a `log` line logs nothing. The Warren variants
`warren-splice` and `warren-kernel` pin `[global] relay` (the latter also
without `bulk`), for a row per relay path where the paths differ.

`config_haproxy` / `config_warren` are pure; `start()` runs one contender.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .procs import Managed, free_ports, spawn, tool_missing, wait_listening

REPO = Path(__file__).resolve().parent.parent
# `--baseline DIR`: another checkout of Warren, run as the contender
# "baseline" beside "warren" (an A/B of two versions in one run).
BASELINE: Path | None = None
CONTENDERS = ("direct", "haproxy", "warren")
# Warren pinned to one relay path: contender name -> [global] relay.
WARREN_VARIANTS = {"warren-splice": "splice", "warren-kernel": "kernel"}
HOST = "127.0.0.1"
# Connection.Start starts with frame type 1, channel 0, a 4-byte size, then
# class 10 method 10; the size varies, so HAProxy looks for the class/method.
AMQP_HEADER_HEX = "414d515000000901"  # "AMQP" 0 0 9 1
AMQP_START_HEX = "000a000a"


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    host: str = HOST


@dataclass(frozen=True)
class Health:
    """Health-check settings given to both proxies (seconds)."""

    protocol: str = "tcp"  # "tcp" or "amqp"
    inter: float = 2.0
    rise: int = 2
    fall: int = 3
    timeout: float = 2.0
    shutdown_sessions: bool = False
    heartbeat: float | None = None  # Warren's AMQP watch heartbeat (HAProxy has none); None: default


@dataclass(frozen=True)
class ProxySpec:
    """What a proxy forwards to, and how."""

    servers: tuple[Server, ...]
    health: Health = field(default_factory=Health)
    maxconn: int = 9000  # 8,000 idle connections plus room; the same for both
    stats_socket: bool = False  # start() gives each proxy a `show stat` socket (Contender.stats_socket)
    bulk: bool = False  # Warren's frontend carries bulk streams (`bulk = true`: splice)
    balance: str = "roundrobin"
    # New connections per second at most (HAProxy `rate-limit sessions`, Warren a
    # [frontends.*.rate_limit] token bucket of a tenth of a second's burst, action "queue").
    rate_limit: float | None = None
    rebalance: Rebalancing | None = None  # Warren only: HAProxy has no equivalent
    tls_crt: str | None = None  # terminate TLS with this PEM (chain + key): `bind ... ssl crt` / [tls] crt
    tls_resumption: bool = True  # False: no tickets, no session cache: every handshake is a full one

    @property
    def mode(self) -> str:
        """Warren's frontend mode: "amqp" in front of brokers, "tcp" for plain backends (HAProxy: tcp)."""
        return "amqp" if self.health.protocol == "amqp" else "tcp"


@dataclass(frozen=True)
class Rebalancing:
    """Warren's [backends.*.rebalance] for the rebalancing benchmark."""

    rate: float = 50.0
    tolerance: float = 0.1
    min_age: float = 0.0


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def config_haproxy(spec: ProxySpec, port: int, socket_path: str | None = None) -> str:
    """haproxy.cfg for HAProxy 2.6 in TCP mode listening on HOST:port (with
    its runtime API on the UNIX socket `socket_path` when given)."""
    h = spec.health
    server_opts = f"check inter {_ms(h.inter)} rise {h.rise} fall {h.fall}"
    if h.shutdown_sessions:
        server_opts += " on-marked-down shutdown-sessions"
    lines = [
        "global",
        f"    maxconn {spec.maxconn}",
        *(["    tune.ssl.cachesize 0"] if spec.tls_crt and not spec.tls_resumption else []),
        *([f"    stats socket {socket_path} mode 600 level operator"] if socket_path else []),
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 1h",
        "    timeout server 1h",
        f"    timeout check {_ms(h.timeout)}",
        "    retries 3",
        "    option redispatch",
        "frontend bench",
        f"    bind {HOST}:{port}" + (f" ssl crt {spec.tls_crt}" if spec.tls_crt else "")
        + (" no-tls-tickets" if spec.tls_crt and not spec.tls_resumption else ""),
        f"    maxconn {spec.maxconn}",
        *([f"    rate-limit sessions {round(spec.rate_limit)}"] if spec.rate_limit else []),
        "    default_backend servers",
        "backend servers",
        f"    balance {spec.balance}",
    ]
    if h.protocol == "amqp":
        lines += [
            "    option tcp-check",
            f"    tcp-check send-binary {AMQP_HEADER_HEX}",
            f"    tcp-check expect binary {AMQP_START_HEX}",
        ]
    lines += [f"    server {s.name} {s.host}:{s.port} {server_opts}" for s in spec.servers]
    return "\n".join(lines) + "\n"


def config_warren(spec: ProxySpec, port: int, socket_path: str | None = None, relay: str | None = None) -> str:
    """Warren's TOML listening on HOST:port, equivalent to config_haproxy
    (with `warren ctl` on the UNIX socket `socket_path` when given)."""
    h = spec.health
    kinds = '["amqp", "watch"]' if h.protocol == "amqp" else '["tcp"]'
    lines = [
        "[global]",
        'log_format = "json"',
        'log_level = "warning"  # no per-connection line (HAProxy here logs nothing)',
        *([f'control_socket = "{socket_path}"'] if socket_path else []),
        *([f'relay = "{relay}"'] if relay else []),
        "",
        "[frontends.bench]",
        f'bind = ["{HOST}:{port}"]',
        'backend = "servers"',
        f'mode = "{spec.mode}"',
        f"maxconn = {spec.maxconn}",
        *(["bulk = true  # bulk streams: spliced"] if spec.bulk and relay != "kernel" else []),
        # A tenth of a second's burst: any one second then admits at most 1.1 x rate.
        *([f'rate_limit = {{ rate = {spec.rate_limit:g}, burst = {max(1.0, spec.rate_limit / 10):g}, '
           'action = "queue" }'] if spec.rate_limit else []),
        *([f'tls = {{ crt = "{spec.tls_crt}"{"" if spec.tls_resumption else ", tickets = false"} }}']
          if spec.tls_crt else []),
        "",
        "[backends.servers]",
        f'balance = "{spec.balance}"',
        "retries = 3",
        "redispatch = true",
        "",
        "[backends.servers.timeout]",
        'connect = "5s"',
        *(['queue = "60s"  # a rate-limited storm waits its turn'] if spec.rate_limit else []),
        "",
        "[backends.servers.health]",
        f"kinds = {kinds}",
        f'inter = "{_ms(h.inter)}ms"',
        f"rise = {h.rise}",
        f"fall = {h.fall}",
        f'timeout = "{_ms(h.timeout)}ms"',
        'init_state = "up"  # as HAProxy starts its servers',
    ]
    if h.shutdown_sessions:
        lines.append('on_marked_down = "shutdown-sessions"')
    if h.heartbeat is not None:
        lines += ["", "[backends.servers.health.amqp]", f'heartbeat = "{round(h.heartbeat)}s"']
    if spec.rebalance is not None:
        r = spec.rebalance
        lines += ["", "[backends.servers.rebalance]", f"rate = {r.rate:g}", f"tolerance = {r.tolerance:g}",
                  f'min_age = "{_ms(r.min_age) if r.min_age else 0}ms"', 'interval = "250ms"']
    for s in spec.servers:
        lines += ["", "[[backends.servers.servers]]", f'name = "{s.name}"', f'address = "{s.host}"',
                  f"port = {s.port}"]
    return "\n".join(lines) + "\n"


class Contender:
    """A running contender: where clients connect, and which processes it is."""

    def __init__(self, name: str, address: tuple[str, int], process: Managed | None = None,
                 stats_socket: Path | None = None):
        self.name = name
        self.address = address
        self.process = process
        self.stats_socket = stats_socket  # answers `show stat` (HAProxy's CSV) when set

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def check_alive(self) -> None:
        if self.process is not None:
            self.process.raise_if_exited("while benchmarked")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __repr__(self) -> str:
        return f"<Contender {self.name} {self.address[0]}:{self.address[1]}>"


def missing(name: str) -> str | None:
    """Why contender `name` cannot run here, or None."""
    return tool_missing("haproxy") if name == "haproxy" else None


@functools.cache
def _kernel_availability():
    from proxy.io.sockmap import probe

    return probe()


def kernel_path() -> str:
    """"" if Warren's kernel relay path works here (as the bench runs), else why not."""
    availability = _kernel_availability()
    return "" if availability.available else availability.reason


def kernel_hazard() -> str:
    """Why Warren's default (`relay = "auto"`) does not take a kernel path
    that works here (proxy.io.sockmap.overlap_hazard), or ""."""
    return _kernel_availability().hazard


def with_warren_paths(contenders: tuple[str, ...], *, bulk: bool = False) -> tuple[str, ...]:
    """`contenders` plus a Warren row for the other relay path, where the
    kernel path works here (else Warren's default is splice already): for
    small messages Warren's default is the kernel path, so splice is added;
    for bulk its default is splice (`bulk = true`), and so is it for small
    messages on a kernel with a hazard: then the kernel is added, except
    for bulk on such a kernel, whose load loses segments enough to hit the
    hazard within a run (Warren then resets the stream it corrupted:
    relay.kernel_duplicate)."""
    if kernel_path() or (bulk and kernel_hazard()):
        return contenders
    return (*contenders, "warren-kernel" if bulk or kernel_hazard() else "warren-splice")


def warren_path_note(*, bulk: bool = False) -> str:
    """Which relay path each Warren row used, for the report."""
    if kernel_path():
        return f"Relay path: Warren used splice (the kernel path is unavailable here: {kernel_path()})."
    if bulk and kernel_hazard():
        return ("Relay path: Warren used splice (its frontend is marked `bulk = true`, as an operator marks "
                "bulk frontends). The kernel path is not measured for bulk here: a bulk stream's load loses "
                f"segments, and {kernel_hazard()}; Warren resets such a stream (`relay.kernel_duplicate`).")
    if bulk:
        return ("Relay paths: **Warren** = splice (its frontend is marked `bulk = true`, as an operator "
                "marks bulk frontends); **Warren (kernel)** = the kernel path (the same frontend "
                "without `bulk`).")
    if kernel_hazard():
        return (f"Relay paths: **Warren** = splice (its default here: {kernel_hazard()}); "
                "**Warren (kernel)** = `relay = \"kernel\"`.")
    repaired = "; its program repairs this kernel's overlap bug" if _kernel_availability().repaired else ""
    return (f"Relay paths: **Warren** = the kernel path (its default here: the self-test passed{repaired}); "
            "**Warren (splice)** = `relay = \"splice\"`.")


def start(name: str, spec: ProxySpec, workdir: Path, *, timeout: float = 30.0) -> Contender:
    """Starts contender `name` in front of spec.servers (direct: the first
    server itself) and returns once it listens."""
    if name == "direct":
        first = spec.servers[0]
        return Contender(name, (first.host, first.port))
    workdir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    sock = workdir / "stats.sock" if spec.stats_socket else None
    if name == "haproxy":
        path = workdir / "haproxy.cfg"
        path.write_text(config_haproxy(spec, port, str(sock) if sock else None))
        argv = ["haproxy", "-f", str(path), "-db"]
    elif name in ("warren", "baseline") or name in WARREN_VARIANTS:
        path = workdir / "warren.toml"
        path.write_text(config_warren(spec, port, str(sock) if sock else None, WARREN_VARIANTS.get(name)))
        argv = [sys.executable, "-m", "proxy", "run", str(path)]
    else:
        raise ValueError(f"unknown contender {name!r}")
    cwd, env = REPO, None
    if name == "baseline":
        assert BASELINE is not None, "--baseline DIR names the baseline's checkout"
        cwd, env = BASELINE, {**os.environ, "PYTHONPATH": str(BASELINE)}
    process = spawn(name, argv, log_path=workdir / f"{name}.log", cwd=cwd, env=env)
    try:
        wait_listening(port, process, timeout)
    except BaseException:
        process.stop()
        raise
    return Contender(name, (HOST, port), process, sock)


@contextmanager
def running(name: str, spec: ProxySpec, workdir: Path) -> Iterator[Contender]:
    """start() as a context manager: the contender is stopped on exit."""
    contender = start(name, spec, workdir)
    try:
        yield contender
    finally:
        contender.stop()


@contextmanager
def all_running(names: tuple[str, ...], spec: ProxySpec, workdir: Path) -> Iterator[dict[str, Contender]]:
    """Every contender in `names` at once, each in workdir/<name>; all stopped on exit."""
    started: dict[str, Contender] = {}
    try:
        for name in names:
            started[name] = start(name, spec, workdir / name)
        yield started
    finally:
        for contender in started.values():
            contender.stop()


def versions() -> dict[str, str]:
    """Warren's version and commit, for the report (packages: see report.versions)."""
    return {"warren": _first_line([sys.executable, "-m", "proxy", "version"]) + _git_commit()}


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "proxy"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    commit = out.stdout.strip()
    if not commit:
        return ""
    return f" (commit {commit}{', with uncommitted changes in proxy/' if dirty.stdout.strip() else ''})"
