"""Floating-IP failover time: Warren's VRRP against keepalived 2.2.7 + HAProxy.

Every case builds its own LAN of network namespaces (lab/netns.py): a
bridge with the client, and two hosts h1 (priority 150, the master) and h2
(priority 100). Each host runs a tiny TCP responder on 127.0.0.1:9000 that
answers with the host's name, and the contender: `warren run` (a frontend on
VIP:5672 proxying to the responder, and `[vip.front]`), or keepalived (the
VRRP instance) plus HAProxy (the same frontend, bound to the VIP with
`ip_nonlocal_bind`). A prober in the client namespace starts a connection to
VIP:5672 every 5 ms, each bounded by 200 ms and successful only when a
responder's name arrives; the metric is the longest gap between the starts of
successful connections, from the last success before the event on. Then the
event: the master host crashes (every process in it SIGSTOPped, then
SIGKILLed, half an advert interval after one of its adverts, so that both
contenders crash at the same point of the cycle), its contender is stopped gracefully (SIGTERM to Warren / to
keepalived), or its responder is killed (the proxy's only backend lost).
After a crash at 0.1 s intervals, whether the VIP is still configured on the
dead master's interface 10 s after the crash (1 = yes) is recorded too.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lab import Host, Lan, NetLab, backend_argv, in_ns, netns_missing, sysctl

from .. import contenders as C
from ..contenders import REPO
from ..model import Metric, Target
from ..procs import Managed, read_event, send_line, spawn
from .base import Benchmark, MeasureError

BACKEND_PORT = 9000
FRONT_PORT = 5672
SUBNET = "10.216.1"  # inside the namespaces only
VIP_LAST = 100
PROBE_PERIOD = 0.005
PROBE_TIMEOUT = 0.2

# Starts a connection every PERIOD whatever the others do, so the resolution
# does not depend on the timeout. Lines on stdin: "status" -> the last
# success; "stop" -> every success (start time, who answered) and every
# failure (start time, end time, how: an error's name, "closed", "timeout").
PROBER = r"""
import json, os, selectors, socket, sys, time
host, port, period, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
sel = selectors.DefaultSelector()
sel.register(0, selectors.EVENT_READ, None)
pending, successes, failures, buffered = {}, [], [], b""
next_at = time.monotonic()

def finish(sock, ok, name=""):
    start, _ = pending.pop(sock)
    sel.unregister(sock)
    sock.close()
    if ok:
        successes.append((start, name))
    else:
        failures.append((start, time.monotonic(), name))

print(json.dumps({"event": "ready"}), flush=True)
while True:
    now = time.monotonic()
    if now >= next_at:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            pass
        pending[sock] = (now, now + timeout)
        sel.register(sock, selectors.EVENT_READ, "sock")
        next_at = max(next_at + period, now)
    for sock, (start, deadline) in list(pending.items()):
        if now > deadline:
            finish(sock, False, "timeout")
    for key, _ in sel.select(max(0.0, next_at - time.monotonic())):
        if key.data is None:
            chunk = os.read(0, 4096)
            if not chunk:
                sys.exit(0)
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                if line == b"status":
                    last = successes[-1] if successes else None
                    print(json.dumps({"event": "status", "last": last}), flush=True)
                elif line == b"stop":
                    print(json.dumps({"event": "done", "ok": successes, "failed": failures}), flush=True)
                    sys.exit(0)
            continue
        sock = key.fileobj
        try:
            data = sock.recv(64)
        except OSError as error:
            finish(sock, False, error.__class__.__name__)
            continue
        finish(sock, bool(data), data.decode(errors="replace") if data else "closed")
"""


# A crash at a random moment of the advert cycle moves the gap by up to one
# interval (100 ms at 0.1 s), far more than the contenders differ by; so the
# crash is placed at the same point of the cycle for both: half an interval
# after an advert of the master, seen on its bridge port. Prints the
# monotonic time of the SIGSTOP (the same clock as the prober's), and its
# wall-clock time (that of Warren's log timestamps).
CRASHER = r"""
import json, os, signal, socket, sys, time
port, master, offset = sys.argv[1], socket.inet_aton(sys.argv[2]), float(sys.argv[3])
pids = [int(pid) for pid in sys.argv[4:]]
# ETH_P_ALL: a bridge port hands its frames to the bridge before any
# protocol-specific packet socket would see them.
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
sock.bind((port, 0))
deadline = time.monotonic() + 10
while True:
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        frame = sock.recv(256)
    except socket.timeout:
        print(json.dumps({"event": "error", "message": "no advert from the master within 10 s"}), flush=True)
        sys.exit(1)
    if frame[12:14] == b"\x08\x00" and frame[14 + 9] == 112 and frame[14 + 12 : 14 + 16] == master:
        break
time.sleep(offset)
at, wall = time.monotonic(), time.time()
for pid in pids:
    os.kill(pid, signal.SIGSTOP)
for pid in pids:
    os.kill(pid, signal.SIGKILL)
print(json.dumps({"event": "crashed", "at": at, "wall": wall}), flush=True)
"""
CRASH_PHASE = 0.5  # of the advert interval, after the master's advert


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    advert: float  # seconds
    event: str  # "crash", "stop" or "backend"
    check_linger: bool = False


CASES = (
    Case("crash_1s", "advert 1 s, master SIGKILL: gap", 1.0, "crash"),
    Case("crash_100ms", "advert 0.1 s, master SIGKILL: gap", 0.1, "crash", check_linger=True),
    Case("stop_100ms", "advert 0.1 s, graceful stop: gap", 0.1, "stop"),
    Case("backend_1s", "advert 1 s, master's backend lost: gap", 1.0, "backend"),
)
SMOKE_CASES = CASES[1:2]
LINGER = Metric("lingers", "killed master keeps the VIP (1 = yes)", "bool", False, 0)


def longest_gap(successes: list[float], event: float) -> float:
    """Seconds between consecutive successful connection starts, at most,
    from the last success before `event` on (MeasureError without both)."""
    times = sorted(successes)
    before = [t for t in times if t < event]
    if not before or times[-1] < event:
        raise MeasureError("no successful connection before and after the event")
    window = [t for t in times if t >= before[-1]]
    return max(later - earlier for earlier, later in zip(window, window[1:]))


# -- configurations (pure) ---------------------------------------------------------

def warren_config(vip: str, priority: int, case: Case) -> str:
    track = 'track = "local"\n' if case.event == "backend" else ""
    return f"""[global]
log_format = "json"
grace = "1s"

[frontends.front]
bind = "{vip}:{FRONT_PORT}"
backend = "local"

[backends.local]
servers = [{{ name = "here", address = "127.0.0.1", port = {BACKEND_PORT} }}]

[backends.local.health]
kinds = ["tcp"]
inter = "100ms"
timeout = "100ms"
rise = 1
fall = 1
init_state = "up"

[vip.front]
interface = "lan0"
vrid = 51
priority = {priority}
advert_interval = "{round(case.advert * 1000)}ms"
addresses = ["{vip}/32"]
{track}"""


def keepalived_config(vip: str, priority: int, case: Case) -> str:
    script = track = ""
    if case.event == "backend":
        # keepalived runs scripts at most once a second (interval >= 1).
        script = f"""vrrp_script backend_up {{
    script "/bin/bash -c 'exec 3<>/dev/tcp/127.0.0.1/{BACKEND_PORT}'"
    interval 1
    timeout 1
    fall 1
    rise 1
    weight -60
}}
"""
        track = "    track_script {\n        backend_up\n    }\n"
    return f"""global_defs {{
    vrrp_version 3
    script_user root
    enable_script_security
}}
{script}vrrp_instance front {{
    state BACKUP
    interface lan0
    virtual_router_id 51
    priority {priority}
    advert_int {case.advert:g}
    virtual_ipaddress {{
        {vip}/32 dev lan0
    }}
{track}}}
"""


def haproxy_config(vip: str) -> str:
    return f"""global
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout check 100ms
    retries 3
    option redispatch
frontend front
    bind {vip}:{FRONT_PORT}
    default_backend local
backend local
    server here 127.0.0.1:{BACKEND_PORT} check inter 100ms rise 1 fall 1
"""


# -- one host's contender --------------------------------------------------------------

@dataclass
class Side:
    """What runs on one host: the responder and the contender's processes."""

    host: Host
    responder: Managed
    main: Managed  # Warren, or keepalived (its parent process)
    log: Path

    def logged(self, text: str) -> bool:
        try:
            return text in self.log.read_text(errors="replace")
        except FileNotFoundError:
            return False


class Failover(Benchmark):
    name = "failover"
    title = "Floating-IP failover time (client-side gap)"
    description = ("Two hosts in network namespaces; a client connects to the VIP every 5 ms (200 ms "
                   "timeout, success = the responder's answer); the longest gap between successful "
                   "connections once the master crashes, stops or loses its backend. keepalived 2.2.7 "
                   "with HAProxy against Warren, the same VRRPv3 settings.")
    contenders = ("keepalived", "warren")
    tools = ("keepalived", "haproxy", "ip")
    metrics = tuple(Metric(c.key, c.label, "s", False, 3) for c in CASES) + (LINGER,)
    smoke_metrics = tuple(Metric(c.key, c.label, "s", False, 3) for c in SMOKE_CASES) + (LINGER,)
    targets = (
        # A killed Warren master's kernel ends the peer link: the backup it designated its
        # successor takes over at once, whatever the advert interval.
        Target("crash_1s", "<=", 0.02, baseline=None),
        Target("crash_100ms", "<=", 0.02, baseline=None),
        Target("stop_100ms", "<=", 0.05, baseline=None),
        Target("backend_1s", "<=", 1.0, baseline=None),
        Target("lingers", "<=", 0, baseline=None),
    )

    def missing(self) -> str | None:
        return netns_missing() or super().missing()

    def cases(self) -> tuple[Case, ...]:
        if self.lab.cases:  # --case: only those
            return tuple(case for case in CASES if case.key in self.lab.cases)
        return self.mode.pick(CASES, CASES, SMOKE_CASES)

    def new_result(self):
        """Only the metrics (and targets) of the cases that run."""
        result = super().new_result()
        keys = {case.key for case in self.cases()}
        if any(case.check_linger for case in self.cases()):
            keys.add(LINGER.key)
        result.metrics = tuple(metric for metric in result.metrics if metric.key in keys)
        result.targets = tuple(target for target in result.targets if target.metric in keys)
        return result

    def linger_wait(self) -> float:
        """After the crash: 10 s; smoke: just past Warren's lease at 0.1 s (2 s)."""
        return self.mode.pick(10.0, 10.0, 3.0)

    @contextmanager
    def environment(self) -> Iterator[None]:
        self.notes.append(self._configs_note())
        yield None

    def measure(self, env: None, contender: str, round_index: int) -> dict[str, float]:
        values: dict[str, float] = {}
        for case in self.cases():
            workdir = self.lab.dir("failover", f"r{round_index + 1}-{contender}-{case.key}")
            values.update(self._measure_case(contender, case, workdir))
        return values

    # -- one case ----------------------------------------------------------------------

    def _measure_case(self, contender: str, case: Case, workdir: Path) -> dict[str, float]:
        with NetLab() as net:
            lan = net.lan(SUBNET)
            vip = lan.address(VIP_LAST)
            h1, h2 = lan.add_host("h1"), lan.add_host("h2")
            master = self._start_side(lan, contender, h1, 150, case, vip, workdir)
            _wait(lambda: vip in net.addresses(h1.ns), 20, f"{contender} on h1 never held the VIP", master)
            backup = self._start_side(lan, contender, h2, 100, case, vip, workdir)
            _wait(lambda: backup.logged(_BACKUP_LINE[contender]), 20,
                  f"{contender} on h2 never became backup", backup)
            # A backup's master-down timer runs from its start until the first advert
            # arrives (RFC 5798 6.4.1); settle so that the timer runs from an advert.
            time.sleep(2 * case.advert + 0.1)
            prober = _spawn(lan, lan.ns, "prober", [sys.executable, "-c", PROBER, vip, str(FRONT_PORT),
                                                    str(PROBE_PERIOD), str(PROBE_TIMEOUT)],
                            workdir / "prober.log", pipe_stdio=True)
            read_event(prober, "ready", 10)
            _wait(lambda: _last_served(prober) == "h1", 10, "the client never reached h1 via the VIP", master)
            event, wall = self._trigger(lan, case, master)
            _wait(lambda: _last_served(prober) == "h2", 30, "the client never reached h2 via the VIP")
            time.sleep(0.2)  # a few more probes: the gap is closed by then
            send_line(prober, "stop")
            done = read_event(prober, "done", 10)
            values = {case.key: longest_gap([t for t, _ in done["ok"]], event)}
            if contender in WARRENS and case.event == "crash":
                if PROFILE_HEADING not in self.notes:
                    self.notes += ["", PROFILE_HEADING, ""]
                served = min((t for t, name in done["ok"] if name == "h2" and t >= event), default=None)
                self.notes.append(_takeover_profile(contender, case, values[case.key], backup.log, wall,
                                                    None if served is None else served - event))
            if case.check_linger:
                time.sleep(max(0.0, event + self.linger_wait() - time.monotonic()))
                values[LINGER.key] = 1.0 if vip in net.addresses(h1.ns) else 0.0
            return values

    def _start_side(self, lan: Lan, contender: str, host: Host, priority: int, case: Case, vip: str,
                    workdir: Path) -> Side:
        responder = _spawn(lan, host.ns, f"responder-{host.name}",
                           backend_argv(BACKEND_PORT, answer=host.name, close=True),
                           workdir / f"responder-{host.name}.log", pipe_stdio=True)
        read_event(responder, "ready", 10)
        log = workdir / f"{contender}-{host.name}.log"
        if contender in WARRENS:
            path = workdir / f"warren-{host.name}.toml"
            path.write_text(warren_config(vip, priority, case))
            cwd, env = REPO, None
            if contender == "baseline":  # --baseline DIR: the Warren of that checkout
                assert C.BASELINE is not None
                cwd, env = C.BASELINE, {**os.environ, "PYTHONPATH": str(C.BASELINE)}
            main = _spawn(lan, host.ns, f"{contender}-{host.name}", [sys.executable, "-m", "proxy", "run", str(path)],
                          log, cwd=cwd, env=env)
            self.remember("warren", ["warren", "run", path.name])
        else:
            sysctl(host.ns, "net.ipv4.ip_nonlocal_bind=1")  # HAProxy binds the VIP before it has it
            cfg = workdir / f"haproxy-{host.name}.cfg"
            cfg.write_text(haproxy_config(vip))
            _spawn(lan, host.ns, f"haproxy-{host.name}", ["haproxy", "-f", str(cfg), "-db"],
                   workdir / f"haproxy-{host.name}.log")
            conf = workdir / f"keepalived-{host.name}.conf"
            conf.write_text(keepalived_config(vip, priority, case))
            argv = ["keepalived", "-n", "-l", "-G", "-P", "-f", str(conf),
                    "-p", str(workdir / f"keepalived-{host.name}.pid"),
                    "-r", str(workdir / f"keepalived-vrrp-{host.name}.pid")]
            main = _spawn(lan, host.ns, f"keepalived-{host.name}", argv, log)
            self.remember("keepalived", ["keepalived", *argv[1:6], conf.name, "-p", "PIDFILE", "-r", "VRRP_PIDFILE"])
            self.remember("haproxy", ["haproxy", "-f", cfg.name, "-db"])
        return Side(host, responder, main, log)

    @staticmethod
    def _trigger(lan: Lan, case: Case, master: Side) -> tuple[float, float]:
        """Brings the event about; returns when it happened (time.monotonic(), time.time())."""
        if case.event == "crash":
            host = master.host
            pids = [str(pid) for pid in lan.lab.pids(host.ns)]
            crasher = _spawn(lan, lan.ns, "crasher", [sys.executable, "-c", CRASHER, host.port, host.ip,
                                                      str(CRASH_PHASE * case.advert), *pids],
                             None, pipe_stdio=True)
            crashed = read_event(crasher, "crashed", 15)
            return crashed["at"], crashed["wall"]
        event, wall = time.monotonic(), time.time()
        if case.event == "stop":
            master.main.popen.send_signal(signal.SIGTERM)
        else:
            master.responder.popen.kill()
        return event, wall

    def _configs_note(self) -> str:
        vip = f"{SUBNET}.{VIP_LAST}"
        parts = ["Configurations (h1 shown, priority 150; h2 has priority 100; the `track` / "
                 "`vrrp_script` lines only in the backend-lost case):", ""]
        tracked = CASES[3]
        parts += ["Warren:", "", "```toml", warren_config(vip, 150, tracked).rstrip(), "```", "",
                  "keepalived (`keepalived -n -l -G -P -f CONF -p PIDFILE -r VRRP_PIDFILE`):", "",
                  "```", keepalived_config(vip, 150, tracked).rstrip(), "```", "",
                  "HAProxy next to keepalived (`net.ipv4.ip_nonlocal_bind = 1` in the host's namespace):",
                  "", "```", haproxy_config(vip).rstrip(), "```", "",
                  "keepalived runs a track script at most once a second (its minimum `interval`); "
                  "Warren tracks its own health checks (every 100 ms). A crash SIGSTOPs then SIGKILLs "
                  "every process of the host (keepalived and HAProxy / Warren, and the responder), half "
                  "an advert interval after an advert of the master (the same point of the cycle for "
                  "both contenders: a crash at a random moment moves the gap by up to an interval); a "
                  "graceful stop is SIGTERM to Warren or to keepalived (HAProxy keeps running). Warren "
                  "logs at info level (its VRRP state is read from the log). Warren runs with its default "
                  "peer link (TCP port 5798 on each host's LAN address): its backup learns of a killed "
                  "master's death from the link's end and, as the successor the master designated over "
                  "the link, takes over at once; keepalived waits "
                  "3 advert intervals plus its skew."]
        return "\n".join(parts)


WARRENS = ("warren", "baseline")
_BACKUP_LINE = {"warren": '"vip.backup"', "baseline": '"vip.backup"', "keepalived": "Entering BACKUP STATE"}

PROFILE_HEADING = ("Where each Warren crash round's gap went (the peer link: the killed master's kernel "
                   "tears down its memory, then ends the link; the backup confirms with one refused "
                   "connection, adds the address (as the designated successor: without its skew) and sends "
                   "the first gratuitous ARP, then "
                   "logs `vip.master`; the client's next probe, every 5 ms, reaches it). Times from the "
                   "SIGKILL; the gap also counts the time from the last success before it, up to one "
                   "probe period (bench/tools/failover_trace.py breaks a round down with kernel tracepoints):")
# What the Warren backup logs on its way to master after a crash, in order.
_TAKEOVER_EVENTS = (("vip.master_gone", "link end confirmed"),
                    ("vip.master", "address added and announced"))


def _takeover_profile(contender: str, case: Case, gap: float, log: Path, crashed: float,
                      served: float | None) -> str:
    """Where a Warren crash round's gap went: ms from the crash to each step of the
    backup's takeover, read from its log, and to the client's first success after it
    (``served``, on the crash's own clock, seconds after it). One line per round, for the notes."""
    seen: dict[str, float] = {}
    reason = "?"
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            at = datetime.datetime.fromisoformat(entry["timestamp"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if entry.get("event") in dict(_TAKEOVER_EVENTS) and at >= crashed and entry["event"] not in seen:
            seen[entry["event"]] = at
            reason = entry.get("reason", reason) if entry["event"] == "vip.master" else reason
    steps = [f"{label} +{(seen[name] - crashed) * 1000:.0f}" if name in seen else f"{label} not logged"
             for name, label in _TAKEOVER_EVENTS]
    steps.append(f"client served +{served * 1000:.0f}" if served is not None else "client never served")
    who = "Warren" if contender == "warren" else f"Warren ({contender})"
    return (f"- {who}, {case.label} {gap * 1000:.0f} ms; ms after the SIGKILL: {', '.join(steps)} "
            f"(reason `{reason}`).")


def _spawn(lan: Lan, ns: str, name: str, argv: list[str], log_path: Path | None, **options) -> Managed:
    """``argv`` started inside ``ns`` (see procs.spawn), stopped with the lab."""
    return lan.lab.adopt(spawn(name, in_ns(ns, argv), log_path=log_path, **options))


def _last_served(prober: Managed) -> str | None:
    """Who answered the prober's latest successful connection."""
    send_line(prober, "status")
    last = read_event(prober, "status", 5)["last"]
    return last[1] if last else None


def _wait(condition, timeout: float, what: str, side: Side | None = None) -> None:
    """Polls `condition` every 20 ms until it holds; MeasureError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if side is not None and not side.main.alive():
            raise MeasureError(f"{what}: {side.main.name} exited\n{side.main.log_tail()}")
        if time.monotonic() > deadline:
            tail = f"\n{side.main.log_tail()}" if side is not None else ""
            raise MeasureError(f"{what} within {timeout:.0f}s{tail}")
        time.sleep(0.02)
