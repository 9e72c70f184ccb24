"""Where a SIGKILLed Warren master's failover time goes, on one clock.

    .venv/bin/python -m bench.tools.failover_trace --advert 0.1 --rounds 3 [--idle 2000]

Builds the failover benchmark's LAN (bench/suites/failover.py: h1 master at
priority 150, h2 backup at 100, the 5 ms prober in the bridge's namespace),
records kernel tracepoints with ``perf record -k CLOCK_MONOTONIC`` (the
clock of ``time.monotonic()`` in every namespace) around the crash, and
prints, per round, milliseconds from the SIGKILL to each step:

- the master's threads start exiting (``sched:sched_process_exit``: in this
  kernel before ``exit_mm``), its peer-link socket is closed by the kernel
  (``sock:inet_sock_set_state`` ESTABLISHED -> FIN_WAIT1 / CLOSE on port
  5798: ``exit_files``, after the memory is torn down);
- the backup's event loop wakes (``epoll_wait`` returns), its confirming
  connection is refused (``tcp:tcp_receive_reset``), it decides
  (``vip.master_gone`` / ``vip.master`` in its log, wall clock converted),
  adds the address (``sendto`` on its rtnetlink socket) and sends the first
  gratuitous ARP (``sendto`` on its packet socket);
- the client's attempts: the first one answered by h2, and how the ones in
  between failed (refused by the dead master's still-configured VIP,
  reset, timed out).

``--idle N`` opens N idle client connections through the master's VIP
before the crash (a loaded master: its kernel closes those 2N sockets in
descriptor order too). Needs root, perf and the lab's namespaces.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab import NetLab, backend_argv

from bench.procs import read_event, rss_kb, send_line
from bench.suites.failover import (
    BACKEND_PORT, CASES, CRASH_PHASE, CRASHER, FRONT_PORT, PROBE_PERIOD, PROBE_TIMEOUT, PROBER, REPO, SUBNET,
    VIP_LAST, _last_served, _spawn, _wait, warren_config,
)  # fmt: skip

LINK_PORT = 5798

HOLD_PORT, IDLE_FRONT_PORT = BACKEND_PORT + 1, FRONT_PORT + 1
IDLE_FRONTEND = """
[frontends.idle]
bind = "{vip}:{port}"
backend = "hold"

[backends.hold]
servers = [{{ name = "holder", address = "127.0.0.1", port = {hold} }}]
"""

IDLER = r"""
import json, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(count):
    held.append(socket.create_connection((host, port), timeout=5))
print(json.dumps({"event": "ready", "held": len(held)}), flush=True)
sys.stdin.read()
"""


def perf_events(backup: int, master_pids: list[int]) -> list[str]:
    watched = " || ".join(f"common_pid == {pid}" for pid in [backup, *master_pids])
    backup_only = f"common_pid == {backup}"
    return [
        "-e", "signal:signal_generate", "--filter", "sig == 9 || sig == 19",
        "-e", "sched:sched_process_exit",
        "-e", "sock:inet_sock_set_state", "--filter", f"sport == {LINK_PORT} || dport == {LINK_PORT}",
        "-e", "tcp:tcp_receive_reset", "--filter", f"sport == {LINK_PORT} || dport == {LINK_PORT}",
        "-e", "sched:sched_switch", "--filter", " || ".join(f"prev_pid == {pid} || next_pid == {pid}"
                                                            for pid in [backup, *master_pids]),
        "-e", "syscalls:sys_exit_epoll_wait", "--filter", backup_only,
        "-e", "syscalls:sys_enter_connect", "--filter", backup_only,
        "-e", "syscalls:sys_enter_sendto", "--filter", backup_only,
        "-e", "syscalls:sys_enter_sendmsg", "--filter", backup_only,
        "-e", "syscalls:sys_enter_write", "--filter", backup_only,
        "-e", "syscalls:sys_enter_close", "--filter", watched,
    ]


_LINE = re.compile(r"^\s*(?P<comm>.+?)\s+(?P<tid>\d+)\s+\[\d+\]\s+(?P<t>\d+\.\d+):\s+(?P<event>[\w:]+):\s*(?P<rest>.*)$")


def perf_lines(data: Path) -> list[dict]:
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,tid,cpu,time,event,trace"],
                         capture_output=True, text=True, timeout=120).stdout
    parsed = []
    for line in out.splitlines():
        if match := _LINE.match(line):
            entry = match.groupdict()
            entry["t"] = float(entry["t"])
            entry["tid"] = int(entry["tid"])
            parsed.append(entry)
    return parsed


def socket_kinds(pid: int) -> dict[int, str]:
    """fd -> "netlink" / "packet" / "raw" / "tcp:PORT:STATE" / "file" of a process (read before the crash)."""
    inodes: dict[str, str] = {}
    for table in ("netlink", "packet", "raw", "tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if not fields:
                continue
            if table.startswith("tcp"):
                port = int(fields[1].rsplit(":", 1)[1], 16)
                inodes[fields[9]] = f"tcp:{port}:{'listen' if fields[3] == '0A' else 'conn'}"
            else:
                inodes[fields[-1] if table != "raw" else fields[9]] = table
    kinds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds[int(fd)] = inodes.get(target[8:-1], "socket") if target.startswith("socket:[") else "file"
    return kinds


def log_events(log: Path, offset: float) -> list[tuple[str, float]]:
    """(event, monotonic time) of every line of a Warren JSON log."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            events.append((entry["event"], datetime.datetime.fromisoformat(entry["timestamp"]).timestamp() - offset))
        except (ValueError, KeyError, TypeError):
            continue
    return events


def one_round(advert: float, idle: int, workdir: Path,
              priorities: tuple[int, int] = (150, 100)) -> list[tuple[str, float | None, str]]:
    case = next(c for c in CASES if c.event == "crash" and c.advert == advert)
    workdir.mkdir(parents=True, exist_ok=True)
    with NetLab() as net:
        lan = net.lan(SUBNET)
        vip = lan.address(VIP_LAST)
        h1, h2 = lan.add_host("h1"), lan.add_host("h2")
        sides = {}
        for host, priority in zip((h1, h2), priorities):
            responder = _spawn(lan, host.ns, f"responder-{host.name}",
                               backend_argv(BACKEND_PORT, answer=host.name, close=True),
                               workdir / f"responder-{host.name}.log", pipe_stdio=True)
            read_event(responder, "ready", 10)
            config = workdir / f"warren-{host.name}.toml"
            extra = ""
            if idle and host is h1:
                # the idle connections' backend: accepts and holds
                holder = _spawn(lan, host.ns, "holder", backend_argv(HOLD_PORT), workdir / "holder.log",
                                pipe_stdio=True)
                read_event(holder, "ready", 10)
                extra = IDLE_FRONTEND.format(vip=vip, port=IDLE_FRONT_PORT, hold=HOLD_PORT)
            config.write_text(warren_config(vip, priority, case) + extra)
            sides[host.name] = _spawn(lan, host.ns, f"warren-{host.name}",
                                      [sys.executable, "-m", "proxy", "run", str(config)],
                                      workdir / f"warren-{host.name}.log", cwd=REPO)
            if host is h1:
                _wait(lambda: vip in net.addresses(h1.ns), 20, "h1 never held the VIP")
        backup_log = workdir / "warren-h2.log"
        _wait(lambda: '"vip.peer_link_up"' in backup_log.read_text(), 20, "h2 never linked to h1")
        time.sleep(2 * advert + 0.1)
        idler = None
        if idle:
            idler = _spawn(lan, lan.ns, "idler", [sys.executable, "-c", IDLER, vip, str(IDLE_FRONT_PORT), str(idle)],
                           workdir / "idler.log", pipe_stdio=True)
            read_event(idler, "ready", 120)
        prober = _spawn(lan, lan.ns, "prober", [sys.executable, "-c", PROBER, vip, str(FRONT_PORT),
                                                str(PROBE_PERIOD), str(PROBE_TIMEOUT)],
                        workdir / "prober.log", pipe_stdio=True)
        read_event(prober, "ready", 10)
        _wait(lambda: _last_served(prober) == "h1", 10, "the client never reached h1")
        master, backup = sides["h1"].pid, sides["h2"].pid
        master_pids = [int(tid) for tid in os.listdir(f"/proc/{master}/task")]
        master_rss = rss_kb(master)
        master_fds = socket_kinds(master)
        backup_fds = socket_kinds(backup)
        data = workdir / "perf.data"
        perf = subprocess.Popen(["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-a", "-o", str(data),
                                 *perf_events(backup, master_pids)],
                                stdout=subprocess.DEVNULL, stderr=open(workdir / "perf.log", "wb"))
        time.sleep(1.0)  # perf attaches its events
        pids = [str(pid) for pid in net.pids(h1.ns)]
        crasher = _spawn(lan, lan.ns, "crasher", [sys.executable, "-c", CRASHER, h1.port, h1.ip,
                                                  str(CRASH_PHASE * advert), *pids], None, pipe_stdio=True)
        crashed = read_event(crasher, "crashed", 15)
        _wait(lambda: _last_served(prober) == "h2", 30, "the client never reached h2")
        time.sleep(0.2)
        backup_fds.update(socket_kinds(backup))  # sockets opened for the takeover
        perf.send_signal(signal.SIGINT)
        perf.wait(60)
        send_line(prober, "stop")
        done = read_event(prober, "done", 10)
        if idler is not None:
            idler.popen.kill()
        offset = crashed["wall"] - crashed["at"]  # wall - monotonic, the same instant
        logged = log_events(backup_log, offset)
        trace = perf_lines(data)
    return timeline(crashed["at"], trace, logged, done, master, master_pids, backup, master_rss, master_fds,
                    backup_fds, idle)


def timeline(stopped: float, trace: list[dict], logged: list[tuple[str, float]], probes: dict, master: int,
             master_pids: list[int], backup: int, master_rss: int, master_fds: dict[int, str],
             backup_fds: dict[int, str], idle: int) -> list[tuple[str, float | None, str]]:
    def first(predicate, after: float = 0.0) -> dict | None:
        return next((e for e in trace if e["t"] >= after and predicate(e)), None)

    kill = first(lambda e: e["event"] == "signal:signal_generate" and "sig=9" in e["rest"]
                 and f"pid={master} " in e["rest"] + " ")
    t0 = kill["t"] if kill else stopped
    exits = [e for e in trace if e["event"] == "sched:sched_process_exit" and e["tid"] in master_pids]
    link_closed = first(lambda e: e["event"] == "sock:inet_sock_set_state" and f"sport={LINK_PORT} " in e["rest"]
                        and "oldstate=TCP_ESTABLISHED" in e["rest"], t0)
    lc = link_closed["t"] if link_closed else t0
    backup_running = first(lambda e: e["event"] == "sched:sched_switch" and f"next_pid={backup} " in e["rest"], lc)
    woke = first(lambda e: e["event"] == "syscalls:sys_exit_epoll_wait" and e["tid"] == backup, lc)
    connect = first(lambda e: e["event"] == "syscalls:sys_enter_connect" and e["tid"] == backup, lc)
    reset = first(lambda e: e["event"] == "tcp:tcp_receive_reset", lc)

    def sent_on(kind: str, after: float) -> dict | None:
        def match(e):
            if e["event"] != "syscalls:sys_enter_sendto" or e["tid"] != backup:
                return False
            fd = re.search(r"fd: (0x)?([0-9a-f]+)", e["rest"])
            return fd is not None and backup_fds.get(int(fd.group(2), 16)) == kind
        return first(match, after)

    after = {}
    for name, at in logged:
        if at >= t0 - 0.001:
            after.setdefault(name, at)
    confirmed = reset["t"] if reset else lc
    lease = sent_on("netlink", confirmed)
    garp = sent_on("packet", confirmed)
    served = min((start for start, name in probes["ok"] if name == "h2" and start > t0), default=None)
    last_h1 = max((start for start, name in probes["ok"] if name == "h1" and start < t0), default=None)
    failures = [f for f in probes["failed"] if f[0] >= (last_h1 or t0)]
    kinds: dict[str, int] = {}
    for _, _, how in failures:
        kinds[how] = kinds.get(how, 0) + 1
    ms = lambda t: None if t is None else (t - t0) * 1000  # noqa: E731
    link_fd = ", ".join(f"fd {fd}" for fd, kind in sorted(master_fds.items()) if kind == f"tcp:{LINK_PORT}:conn")
    order = " ".join(f"{fd}={kind}" for fd, kind in sorted(master_fds.items()) if kind != "file")
    sockets = sum(1 for kind in master_fds.values() if kind.startswith("tcp"))
    last_exit = exits[-1] if exits else None
    on_cpu = 0.0
    if last_exit is not None and link_closed is not None:
        running_since = last_exit["t"]
        for e in trace:
            if e["event"] != "sched:sched_switch" or not last_exit["t"] <= e["t"] <= link_closed["t"]:
                continue
            if f"prev_pid={last_exit['tid']} " in e["rest"] and running_since is not None:
                on_cpu += e["t"] - running_since
                running_since = None
            elif f"next_pid={last_exit['tid']} " in e["rest"]:
                running_since = e["t"]
        if running_since is not None:
            on_cpu += link_closed["t"] - running_since
    rows = [
        ("SIGKILL sent to the master", 0.0, f"SIGSTOP {1000 * (stopped - t0):+.1f} ms; master RSS {master_rss / 1024:.0f} MiB, "
                                            f"{len(master_pids)} threads, {sockets} TCP sockets ({idle} idle clients)"),
        ("master's first thread exits", ms(exits[0]["t"]) if exits else None, ""),
        ("master's last thread exits", ms(exits[-1]["t"]) if exits else None, f"{len(exits)} threads"),
        ("master's link socket closed by its kernel", ms(link_closed["t"]) if link_closed else None,
         f"{link_fd}; the exiting thread ran {on_cpu * 1000:.1f} ms of it; sockets: {order}"),
        ("backup scheduled after that", ms(backup_running["t"]) if backup_running else None, ""),
        ("backup's epoll_wait returns", ms(woke["t"]) if woke else None, ""),
        ("backup's confirming connect()", ms(connect["t"]) if connect else None, ""),
        ("backup receives the RST", ms(reset["t"]) if reset else None, ""),
        ("backup logs vip.master_gone", ms(after.get("vip.master_gone")), ""),
        ("backup adds the address (netlink sendto)", ms(lease["t"]) if lease else None, ""),
        ("backup sends the first gratuitous ARP", ms(garp["t"]) if garp else None, ""),
        ("backup logs vip.master", ms(after.get("vip.master")), ""),
        ("client: last success before (h1)", ms(last_h1), ""),
        ("client: first success after (h2)", ms(served), f"failures between: {kinds}"),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--advert", type=float, default=0.1, choices=(0.1, 1.0))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--idle", type=int, default=0, help="idle client connections held through the master")
    parser.add_argument("--priorities", type=int, nargs=2, default=(150, 100), metavar=("MASTER", "BACKUP"),
                        help="the hosts' priorities (the benchmark's: 150 100); the backup is the designated successor")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp") / f"failover-trace-{os.getpid()}")
    args = parser.parse_args()
    for index in range(args.rounds):
        rows = one_round(args.advert, args.idle, args.workdir / f"r{index + 1}", tuple(args.priorities))
        load = os.getloadavg()[0]
        print(f"round {index + 1}, advert {args.advert:g} s, priorities {args.priorities[0]}/{args.priorities[1]}, "
              f"load average {load:.1f}")
        for label, at, note in rows:
            shown = "-" if at is None else f"{at:+7.1f} ms"
            print(f"  {shown:>11}  {label}{'  (' + note + ')' if note else ''}")


if __name__ == "__main__":
    main()
