"""What the two wrk benchmarks share: the fast HTTP responder and running wrk.

The responder is a separate HAProxy in HTTP mode answering every request
itself with `http-request return` (a 2-byte body): about the cheapest HTTP
server there is, so the proxy in front of it is what the numbers show.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .. import contenders as C
from ..procs import cpu_seconds, free_ports, machine_cpu_seconds, spawn, wait_listening
from .base import Benchmark, MeasureError, run_tool

WRK_SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "wrk_report.lua"
WRK_THREADS = 2  # one per core
WRK_CONNECTIONS = 50
MAX_ERROR_SHARE = 0.01  # more failed requests than this makes a measurement invalid


def config_responder(port: int) -> str:
    return "\n".join([
        "global",
        "    maxconn 4000",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout http-keep-alive 30s",
        "frontend responder",
        f"    bind {C.HOST}:{port}",
        '    http-request return status 200 content-type "text/plain" string "ok"',
    ]) + "\n"


class HttpBenchmark(Benchmark):
    """The wrk benchmarks: every contender plus a Warren row for its other
    relay path, and each proxy's CPU per request."""

    contenders = C.with_warren_paths(C.CONTENDERS)
    metric_contenders = {"cpu": tuple(c for c in contenders if c != "direct")}  # direct: no proxy

    def __init__(self, lab) -> None:
        super().__init__(lab)
        self.notes.append(C.warren_path_note())


@contextmanager
def responder(bench: Benchmark) -> Iterator[int]:
    """The responder's port while it runs."""
    (port,) = free_ports(1)
    work = bench.lab.dir(bench.name)
    (work / "responder.cfg").write_text(config_responder(port))
    process = spawn("responder", ["haproxy", "-f", str(work / "responder.cfg"), "-db"],
                    log_path=work / "responder.log")
    with process:
        wait_listening(port, process)
        yield port


@contextmanager
def responder_and_contenders(bench: Benchmark, tls_crt: str | None = None, label: str = "",
                             tls_resumption: bool = True) -> Iterator[dict[str, C.Contender]]:
    """The responder, then every contender in front of it; all stopped after.
    With `tls_crt`, the proxies terminate TLS with it."""
    with responder(bench) as port:
        spec = C.ProxySpec(servers=(C.Server("responder", port),), tls_crt=tls_crt, tls_resumption=tls_resumption)
        with C.all_running(bench.contenders, spec, bench.lab.dir(bench.name, label)) as running:
            yield running


def parse_wrk(stdout: str) -> dict:
    """The JSON line printed by wrk_report.lua; MeasureError when absent, when
    nothing succeeded or when more than 1% of requests failed."""
    for line in stdout.splitlines():
        if line.startswith("WRKJSON "):
            report = json.loads(line[len("WRKJSON "):])
            break
    else:
        raise MeasureError(f"wrk printed no report: {stdout[-300:]!r}")
    failed = sum(report["errors"].values())
    if report["requests"] <= 0:
        raise MeasureError(f"wrk completed no request (errors {report['errors']})")
    if failed > MAX_ERROR_SHARE * report["requests"]:
        raise MeasureError(f"wrk: {failed} errors in {report['requests']} requests: {report['errors']}")
    return report


def run_wrk(bench: Benchmark, label: str, contender: C.Contender, seconds: float,
            extra: tuple[str, ...] = (), scheme: str = "http") -> dict:
    """wrk -t2 -c50 against the contender (<scheme>://) for `seconds`; the
    parsed report plus "rate" (completed requests per second) and, for a
    proxy, "cpu" (its CPU time, user + system, per completed request in µs:
    unlike a rate, barely moved by the other loads of a shared machine)."""
    host, port = contender.address
    argv = ["wrk", "-t", str(WRK_THREADS), "-c", str(WRK_CONNECTIONS), "-d", f"{seconds}s",
            "--timeout", "5s", *extra, "-s", str(WRK_SCRIPT), f"{scheme}://{host}:{port}/"]
    bench.remember(label, argv)
    before = cpu_seconds(contender.pid) if contender.pid else None
    machine_before = machine_cpu_seconds()
    report = parse_wrk(run_tool(argv, timeout=seconds + 30))
    report["rate"] = report["requests"] / (report["duration_us"] / 1e6)
    # The kernel relay path works in kernel workers and softirq, charged to
    # no proxy process: the whole machine's CPU per request (load tool and
    # responder included, the same for every contender) compares fairly.
    report["cpu_machine"] = (machine_cpu_seconds() - machine_before) / report["requests"] * 1e6
    if before is not None:
        report["cpu"] = (cpu_seconds(contender.pid) - before) / report["requests"] * 1e6
    return report
