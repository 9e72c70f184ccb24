"""`make soak`: Warren held under load and faults for a long time, proven flat.

    python -m bench.soak [--minutes 30] [--smoke] [--out-dir bench]

One `warren run` in front of three clustered RabbitMQ nodes, for the whole
duration:

- 8,000 AMQP connections held (channel open, idle), spread over several
  client processes (each fd limit is 20,000; Warren holds two descriptors per
  connection); a client whose connection ends opens it again at once;
- 200 new AMQP connections a second, each opened, then closed politely;
- a broker SIGKILLed every 2 minutes (the nodes in turn) and restarted at
  once (it rejoins the cluster);
- a SIGHUP every 30 s, alternating a server's weight so every reload
  reconciles a real change;
- a canary of publishers with confirms on a quorum queue (lab/canary.py);
- every 5 s, Warren's RSS and open descriptors, its sessions (`show stat`)
  and the connections the clients hold.

The report (SOAK.md, soak.json) gives the least-squares slopes of RSS and of
descriptors per hour over the samples after the warm-up, the canary's
confirmed and lost messages, and the service crashes: `service.crashed`
events in Warren's log (supervision logs one per crash), error-level events
and lines that are not JSON (tracebacks), and whether Warren was still
running at the end and stopped cleanly on SIGTERM.

`--smoke` is the short variant the test suite runs (24 s, small
numbers; figures meaningless, the wiring proven).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from lab import start_nodes
from proxy.devcluster import RabbitNode

from .lab import BROKER_CONF
from .procs import Managed, free_ports, raise_nofile_limit, read_event, rss_kb, send_line, spawn, wait_listening
from .report import load_average, machine
from .suites.detection import show_stat

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    minutes: float = 30.0
    held: int = 8000
    holders: int = 4  # client processes holding the connections
    churn: float = 200.0  # new connections a second
    kill_every: float = 120.0
    hup_every: float = 30.0
    sample_every: float = 5.0
    warmup: float = 120.0  # seconds of samples left out of the slopes
    publishers: int = 4

    @classmethod
    def smoke(cls) -> Settings:
        return cls(minutes=0.4, held=200, holders=2, churn=20.0, kill_every=8.0, hup_every=3.0,
                   sample_every=1.0, warmup=4.0, publishers=2)


def warren_config(nodes: list[RabbitNode], port: int, control: Path, weight: int) -> str:
    servers = "\n".join(
        f'[[backends.rabbit.servers]]\nname = "{node.spec.name}"\naddress = "127.0.0.1"\n'
        f"port = {node.spec.amqp_port}\nweight = {weight if i == 0 else 100}\n"
        for i, node in enumerate(nodes))
    return f"""\
[global]
log_format = "json"
log_level = "warning"  # no line per connection: 200 new ones a second
control_socket = "{control}"

[frontends.amqp]
bind = "127.0.0.1:{port}"
backend = "rabbit"
maxconn = 9500

[backends.rabbit]
balance = "leastconn"  # a restarted broker gets the new connections
retries = 3
redispatch = true

# A killed broker's sockets close with it (its clients reconnect by themselves)
# and the watch connection sees it at once; a check slowed down by the load
# (200 handshakes a second on shared cores) must not mark a serving broker
# DOWN, and a DOWN must not close thousands of sessions into a reconnect storm.
[backends.rabbit.health]
kinds = ["amqp", "watch"]
inter = "2s"
timeout = "5s"
rise = 2
fall = 3

{servers}"""


def slope_per_hour(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) samples, in value per hour."""
    if len(samples) < 3:
        return None
    times = [t for t, _ in samples]
    values = [v for _, v in samples]
    mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
    var = sum((t - mean_t) ** 2 for t in times)
    if var == 0:
        return None
    return 3600 * sum((t - mean_t) * (v - mean_v) for t, v in samples) / var


def stat_rows(text: str) -> list[dict]:
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return []
    return list(csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]]))))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, settings: Settings, workdir: Path, nodes: list[RabbitNode],
                 say: Callable[[str], None]):
        self.s, self.workdir, self.nodes, self.say = settings, workdir, nodes, say
        self.processes: list[Managed] = []
        self.samples: list[dict] = []
        self.kills: list[dict] = []
        self.kills_skipped = 0
        self.reloads = 0
        self.weight = 100
        self.restarts: list[threading.Thread] = []
        self.restart_errors: list[str] = []
        self.stat_failures = 0

    # -- parts ---------------------------------------------------------------------------
    def start_warren(self) -> None:
        (self.port,) = free_ports(1)
        self.control = self.workdir / "warren.sock"
        self.config = self.workdir / "warren.toml"
        self.config.write_text(warren_config(self.nodes, self.port, self.control, self.weight))
        self.log = self.workdir / "warren.log"
        self.warren = self._spawn("warren", [sys.executable, "-m", "proxy", "run", str(self.config)], self.log)
        wait_listening(self.port, self.warren, 30)

    def _spawn(self, name: str, argv: list[str], log: Path | None, **options) -> Managed:
        process = spawn(name, argv, log_path=log, cwd=REPO, **options)
        self.processes.append(process)
        return process

    def start_clients(self) -> None:
        per = [self.s.held // self.s.holders + (i < self.s.held % self.s.holders) for i in range(self.s.holders)]
        self.holders = [
            self._spawn(f"holder{i}", [sys.executable, "-m", "bench.tools.amqp_load", "127.0.0.1", str(self.port),
                                       "--hold", str(count)], self.workdir / f"holder{i}.log", pipe_stdio=True)
            for i, count in enumerate(per)]
        for holder in self.holders:
            read_event(holder, "ready", 300)
        self.churner = self._spawn("churner", [sys.executable, "-m", "bench.tools.amqp_load", "127.0.0.1",
                                               str(self.port), "--churn", str(self.s.churn)],
                                   self.workdir / "churner.log", pipe_stdio=True)
        read_event(self.churner, "ready", 30)
        self.queue = f"soak-{os.getpid()}"
        self.canary = self._spawn("canary", [sys.executable, "-m", "lab.canary", "--url",
                                             f"amqp://guest:guest@127.0.0.1:{self.port}/", "--queue", self.queue,
                                             "--publishers", str(self.s.publishers)],
                                  self.workdir / "canary.log", pipe_stdio=True)
        read_event(self.canary, "ready", 60)

    # -- faults ----------------------------------------------------------------------------
    def kill_a_broker(self, elapsed: float) -> None:
        node = self.nodes[len(self.kills) % len(self.nodes)]
        if any(thread.is_alive() for thread in self.restarts):
            self.say(f"{elapsed:6.0f}s  previous restart still under way: kill of {node.spec.name} skipped")
            self.kills_skipped += 1
            return
        node.kill()
        self.kills.append({"at": round(elapsed, 1), "node": node.spec.name})
        self.say(f"{elapsed:6.0f}s  SIGKILL {node.spec.name}; restarting it")
        thread = threading.Thread(target=self._restart, args=(node,), daemon=True)
        thread.start()
        self.restarts.append(thread)

    def _restart(self, node: RabbitNode) -> None:
        try:
            node.start()
            node.wait_ready(180)
        except Exception as error:  # reported; the soak goes on with two nodes
            self.restart_errors.append(f"{node.spec.name}: {error}")

    def reload(self) -> None:
        self.weight = 101 if self.weight == 100 else 100
        self.config.write_text(warren_config(self.nodes, self.port, self.control, self.weight))
        self.warren.popen.send_signal(signal.SIGHUP)
        self.reloads += 1

    # -- measuring -------------------------------------------------------------------------
    def sample(self, elapsed: float) -> dict:
        pid = self.warren.pid
        asked = time.monotonic()
        try:
            stat = stat_rows(show_stat(self.control, timeout=STAT_TIMEOUT))
        except OSError as error:  # unanswered: a finding of the soak, not the end of it
            self.stat_failures += 1
            self.say(f"{elapsed:6.0f}s  show stat unanswered within {STAT_TIMEOUT:g} s ({error!r})")
            stat = None
        stat_seconds = round(time.monotonic() - asked, 3)
        frontend = next((r for r in stat or () if r["pxname"] == "amqp" and r["svname"] == "FRONTEND"), {})
        first = next((r for r in stat or () if r["pxname"] == "rabbit" and r["svname"] == self.nodes[0].spec.name),
                     {})
        held = 0
        for holder in self.holders:
            send_line(holder, "status")
            held += read_event(holder, "status", 30)["held"]
        sample = {"t": round(elapsed, 1), "rss_kb": rss_kb(pid), "fds": open_fds(pid),
                  "sessions": int(frontend["scur"]) if stat else None, "held": held,
                  "weight_first": int(first["weight"]) if first else None,
                  "stat_seconds": stat_seconds if stat else None}
        self.samples.append(sample)
        return sample

    def run(self) -> dict:
        began = time.monotonic()
        self.start_warren()
        self.start_clients()
        self.say(f"held {self.s.held} connections through Warren (pid {self.warren.pid}) after "
                 f"{time.monotonic() - began:.0f}s; soaking for {self.s.minutes:g} min")
        start = time.monotonic()
        duration = self.s.minutes * 60
        next_kill, next_hup, next_sample = self.s.kill_every, self.s.hup_every, 0.0
        while (elapsed := time.monotonic() - start) < duration:
            self.warren.raise_if_exited("during the soak")
            if elapsed >= next_sample:
                sample = self.sample(elapsed)
                next_sample += self.s.sample_every
                if len(self.samples) % max(1, round(60 / self.s.sample_every)) == 0:
                    self.say(f"{elapsed:6.0f}s  rss {sample['rss_kb'] / 1024:.1f} MiB, {sample['fds']} fds, "
                             f"{sample['sessions']} sessions, {sample['held']} held")
            if elapsed >= next_kill:
                self.kill_a_broker(elapsed)
                next_kill += self.s.kill_every
            if elapsed >= next_hup:
                self.reload()
                next_hup += self.s.hup_every
            time.sleep(max(0.0, min(next_sample, next_kill, next_hup) - (time.monotonic() - start)))
        return self.finish(time.monotonic() - start)

    def finish(self, elapsed: float) -> dict:
        alive = self.warren.alive()
        send_line(self.churner, "status")
        churn = read_event(self.churner, "status", 30)
        holders = []
        for holder in self.holders:
            send_line(holder, "status")
            holders.append(read_event(holder, "status", 30))
        send_line(self.canary, "stop")
        canary = read_event(self.canary, "done", 300)
        for process in (self.churner, *self.holders):
            send_line(process, "stop")
        for thread in self.restarts:
            thread.join(240)
        exit_status = self.warren.stop(timeout=60) if alive else self.warren.popen.returncode
        crashes = count_crashes(self.log)
        return self.report(elapsed, alive, exit_status, churn, holders, canary, crashes)

    def report(self, elapsed, alive, exit_status, churn, holders, canary, crashes) -> dict:
        steady = [s for s in self.samples if s["t"] >= self.s.warmup]
        rss = slope_per_hour([(s["t"], s["rss_kb"]) for s in steady])
        fds = slope_per_hour([(s["t"], s["fds"]) for s in steady])
        # Descriptors beyond two per session: what a leak would grow, whatever the load does.
        answered = [s for s in steady if s["sessions"] is not None]
        spare = slope_per_hour([(s["t"], s["fds"] - 2 * s["sessions"]) for s in answered])
        weights = [s["weight_first"] for s in self.samples if s["weight_first"] is not None]
        reloads_seen = sum(1 for a, b in zip(weights, weights[1:]) if a != b)
        return {
            "settings": asdict(self.s),
            "seconds": round(elapsed, 1),
            "samples": self.samples,
            "slopes": {"rss_kb_per_hour": _round(rss), "fds_per_hour": _round(fds),
                       "fds_beyond_two_per_session_per_hour": _round(spare)},
            "rss_kb": _spread([s["rss_kb"] for s in steady]),
            "fds": _spread([s["fds"] for s in steady]),
            "held": _spread([s["held"] for s in steady]),
            "sessions": _spread([s["sessions"] for s in answered]),
            "stat_seconds": _spread([s["stat_seconds"] for s in self.samples if s["stat_seconds"] is not None]),
            "stat_failures": self.stat_failures,
            "kills": self.kills,
            "kills_skipped": self.kills_skipped,
            "restart_errors": self.restart_errors,
            "reloads_sent": self.reloads,
            "reloads_seen_in_stats": reloads_seen,
            "churn": churn,
            "reconnects": sum(h["reconnects"] for h in holders),
            "canary": canary,
            "crashes": crashes,
            "warren_alive_at_end": alive,
            "warren_exit_status": exit_status,
            "machine": machine(),
            "load_average_at_end": load_average(),
        }

    def cleanup(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout=10)
        for thread in self.restarts:
            thread.join(240)


STAT_TIMEOUT = 10.0  # seconds for Warren to answer `show stat` on its control socket
NOTABLE_EVENTS = ("server.down", "backend.no_server", "config.reload_failed")  # logged at warning or above


def count_crashes(log: Path) -> dict:
    """`service.crashed` events, error-level events and non-JSON lines (tracebacks) in Warren's log."""
    crashed, errors, other, examples = 0, 0, 0, []
    notable = dict.fromkeys(NOTABLE_EVENTS, 0)
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            if line.strip():
                other += 1
                examples.append(line[:200])
            continue
        if event.get("event") in notable:
            notable[event["event"]] += 1
        if event.get("event") == "service.crashed":
            crashed += 1
            examples.append(line[:200])
        elif event.get("level") in ("error", "critical"):
            errors += 1
            examples.append(line[:200])
    return {"service_crashed": crashed, "error_events": errors, "non_json_lines": other, "examples": examples[:10],
            "events": notable}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _spread(values: list[float]) -> dict:
    if not values:
        return {}
    return {"first": values[0], "last": values[-1], "min": min(values), "max": max(values),
            "median": statistics.median(values)}


def run(settings: Settings, workdir: Path, nodes: list[RabbitNode] | None = None,
        say: Callable[[str], None] = print) -> dict:
    """Runs the soak; with ``nodes`` (three clustered, serving) on them, else on
    nodes it starts and removes. Returns the report (see module docstring)."""
    cluster = None
    if nodes is None:
        say("starting three clustered RabbitMQ nodes ...")
        cluster = start_nodes(3, cluster=True, tag="soak", extra_conf=BROKER_CONF)
        nodes = cluster.nodes
    soak = Soak(settings, workdir, list(nodes), say)
    try:
        return soak.run()
    finally:
        soak.cleanup()
        if cluster is not None:
            cluster.close()


# -- the report ------------------------------------------------------------------------------

def markdown(report: dict, command: str, finished: str) -> str:
    s, slopes, canary, crashes = report["settings"], report["slopes"], report["canary"], report["crashes"]
    mib = lambda kb: f"{kb / 1024:.1f}"  # noqa: E731
    rss, fds = report["rss_kb"], report["fds"]
    lines = [
        "# Soak: Warren under load and faults",
        "",
        f"Produced by `{command}` on {finished} ({report['seconds'] / 60:.1f} minutes of soak after the "
        f"connections were held). Machine: {report['machine']['cores']} cores, load average at the end "
        f"{report['load_average_at_end']} (other engineers' tests ran on it too). See bench/README.md.",
        "",
        f"Load: {s['held']:,} AMQP connections held by {s['holders']} client processes, {s['churn']:g} new "
        f"connections a second, a broker SIGKILLed and restarted every {s['kill_every']:g} s (in turn), "
        f"a SIGHUP every {s['hup_every']:g} s, a canary of {s['publishers']} publishers with confirms on a "
        f"quorum queue; a sample every {s['sample_every']:g} s, slopes over the samples after the first "
        f"{s['warmup']:g} s (least squares).",
        "",
        "| what | figure |",
        "|---|---|",
        f"| RSS slope | {_fmt(slopes['rss_kb_per_hour'])} kB/h (RSS {mib(rss['first'])} -> {mib(rss['last'])} MiB, "
        f"min {mib(rss['min'])}, max {mib(rss['max'])}) |",
        f"| descriptor slope | {_fmt(slopes['fds_per_hour'])} fds/h ({fds['first']} -> {fds['last']}, "
        f"min {fds['min']}, max {fds['max']}) |",
        f"| slope of descriptors beyond two per session | {_fmt(slopes['fds_beyond_two_per_session_per_hour'])} "
        f"fds/h |",
        f"| connections held by the clients | median {report['held']['median']:,}, min {report['held']['min']:,} "
        f"(reopened after losses: {report['reconnects']:,}) |",
        f"| Warren's sessions | median {report['sessions']['median']:,}, max {report['sessions']['max']:,} |",
        f"| control socket (`show stat`) | median {report['stat_seconds']['median']:.2f} s, max "
        f"{report['stat_seconds']['max']:.2f} s; unanswered within {STAT_TIMEOUT:g} s: {report['stat_failures']} |",
        f"| churned connections | {report['churn']['churned']:,} opened and closed, "
        f"{report['churn']['churn_failed']:,} failed, {report['churn']['churn_skipped']:,} skipped |",
        f"| brokers SIGKILLed and restarted | {len(report['kills'])} "
        f"({', '.join(k['node'] for k in report['kills']) or 'none'}); skipped while a restart was under way: "
        f"{report['kills_skipped']}; restart errors: {len(report['restart_errors'])} |",
        f"| reloads (SIGHUP) | {report['reloads_sent']} sent; weight change seen in `show stat` "
        f"{report['reloads_seen_in_stats']} times |",
        f"| canary: confirmed messages | {canary['confirmed']:,} (refused {canary['refused']:,}, in doubt "
        f"{canary['in_doubt']:,}, connections {canary['connections']:,}) |",
        f"| **confirmed messages lost** | **{canary['lost']}** (found in the queue: {canary['found']:,}, "
        f"duplicates {canary['duplicates']:,}) |",
        f"| **service crashes** | **{crashes['service_crashed']}** `service.crashed`; error events "
        f"{crashes['error_events']}; non-JSON log lines (tracebacks) {crashes['non_json_lines']} |",
        f"| Warren's log (warning level and above) | "
        f"{', '.join(f'`{name}` {count:,}' for name, count in crashes['events'].items())} |",
        f"| Warren at the end | {'running' if report['warren_alive_at_end'] else 'DEAD'}; exit status on "
        f"SIGTERM {report['warren_exit_status']} |",
    ]
    if crashes["examples"]:
        lines += ["", "Log lines counted above:", "", "```", *crashes["examples"], "```"]
    if report["restart_errors"]:
        lines += ["", "Restart errors:", "", *[f"- {error}" for error in report["restart_errors"]]]
    lines += ["", "Samples (one a minute):", "", "| t (s) | RSS (MiB) | fds | sessions | held |", "|---|---|---|---|---|"]
    step = max(1, round(60 / s["sample_every"]))
    for sample in report["samples"][::step]:
        lines.append(f"| {sample['t']:.0f} | {mib(sample['rss_kb'])} | {sample['fds']} | {_fmt_count(sample['sessions'])} | "
                     f"{sample['held']} |")
    return "\n".join(lines) + "\n"


def _fmt_count(value: int | None) -> str:
    return "unanswered" if value is None else str(value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+,.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="soak duration (default 30; smoke: 1)")
    parser.add_argument("--smoke", action="store_true", help="the short variant the test suite runs")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench", help="where SOAK.md and soak.json go")
    parser.add_argument("--workdir", type=Path, default=None, help="keep configurations and logs here")
    args = parser.parse_args(argv)
    settings = Settings.smoke() if args.smoke else Settings()
    if args.minutes is not None:
        settings = replace(settings, minutes=args.minutes)
    raise_nofile_limit()
    # SIGTERM (or SIGINT, ignored in a background job) ends the run through the
    # finally clauses: every process stopped by PID, the broker nodes removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="warren-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    report = run(settings, workdir, say=say)
    command = os.environ.get("SOAK_COMMAND") or " ".join(["python -m bench.soak", *(argv or sys.argv[1:])])
    finished = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "soak.json").write_text(json.dumps({"command": command, "finished": finished, **report},
                                                       indent=1) + "\n")
    (args.out_dir / "SOAK.md").write_text(markdown(report, command, finished))
    say(f"wrote {args.out_dir / 'SOAK.md'} and soak.json (work directory {workdir})")
    healthy = (report["canary"]["lost"] == 0 and report["crashes"]["service_crashed"] == 0
               and report["warren_alive_at_end"] and report["warren_exit_status"] == 0)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
