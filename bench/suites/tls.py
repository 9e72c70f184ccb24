"""TLS benchmarks: both proxies terminate TLS with the same certificates.

The certificates (an ECDSA P-256 and an RSA 2048 server certificate from one
test CA, tests/tlsca.py) are made once per run in the work directory.
HAProxy: `bind ... ssl crt FILE` (its defaults: TLS 1.2-1.3, tickets);
Warren: `[frontends.bench.tls] crt = FILE` (the same defaults). Backends
are in clear: TLS termination is what is measured.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from .. import contenders as C
from ..model import Metric, Target
from ..procs import free_ports, spawn, wait_listening
from ._http import responder_and_contenders, run_wrk
from .amqp_publish import AmqpPublish
from .base import Benchmark, MeasureError, run_tool
from .idle import Idle

_made: dict[str, dict[str, str]] = {}


def certificates(bench: Benchmark) -> dict[str, str]:
    """{"ecdsa": pem, "rsa": pem} for localhost, made once per run."""
    key = str(bench.lab.workdir)
    if key not in _made:
        from tests.tlsca import TestCA

        directory = bench.lab.dir("tls-certificates")
        ca = TestCA(Path(directory), "Warren Bench CA")
        local = dict(dns=("localhost",), ips=("127.0.0.1",))
        _made[key] = {"ecdsa": ca.issue("bench-ecdsa", **local).pem,
                      "rsa": ca.issue("bench-rsa", rsa_bits=2048, **local).pem}
    return _made[key]


class TlsConnRate(Benchmark):
    name = "tls_connrate"
    title = "New TLS connections (wrk over HTTPS, Connection: close)"
    description = ("wrk -t2 -c50 over HTTPS with `Connection: close`: a full TLS handshake per request, "
                   "terminated by the contender, plaintext to the responder; once with an ECDSA P-256 "
                   "certificate, once with RSA 2048. wrk resumes sessions when it can, so both proxies run "
                   "without resumption here (HAProxy `no-tls-tickets` and `tune.ssl.cachesize 0`, Warren "
                   "`tickets = false`).")
    contenders = ("haproxy", "warren")
    tools = ("wrk", "haproxy")
    metrics = (
        Metric("ecdsa", "ECDSA P-256 handshakes", "conn/s", True, 0),
        Metric("rsa", "RSA 2048 handshakes", "conn/s", True, 0),
        Metric("ecdsa_cpu", "proxy CPU per ECDSA connection", "µs", False, 1),
        Metric("rsa_cpu", "proxy CPU per RSA connection", "µs", False, 1),
    )
    targets = (Target("ecdsa", ">=", 0.8), Target("rsa", ">=", 0.8))

    def seconds(self) -> int:
        return self.mode.pick(8, 3, 1)

    @contextmanager
    def environment(self) -> Iterator[dict[str, dict[str, C.Contender]]]:
        certs = certificates(self)
        with ExitStack() as stack:
            yield {kind: stack.enter_context(responder_and_contenders(self, certs[kind], kind, tls_resumption=False))
                   for kind in ("ecdsa", "rsa")}

    def measure(self, env, contender: str, round_index: int) -> dict[str, float]:
        values = {}
        for kind, running in env.items():
            report = run_wrk(self, f"wrk HTTPS Connection: close ({kind})", running[contender],
                             self.seconds(), ("-H", "Connection: close"), scheme="https")
            running[contender].check_alive()
            values[kind] = report["rate"]
            if "cpu" in report:
                values[f"{kind}_cpu"] = report["cpu"]
        return values


class TlsKeepAlive(Benchmark):
    name = "tls_requests"
    title = "Small requests over TLS, keep-alive (wrk over HTTPS)"
    description = ("wrk -t2 -c50 over HTTPS with keep-alive (50 TLS sessions, ECDSA P-256), the "
                   "contender decrypting and re-encrypting every 2-byte answer; requests per second.")
    contenders = ("haproxy", "warren")
    tools = ("wrk", "haproxy")
    metrics = (
        Metric("rate", "rate", "req/s", True, 0),
        Metric("cpu", "proxy CPU per request", "µs", False, 1),
    )
    targets = (Target("rate", ">=", 0.7),)

    def seconds(self) -> int:
        return self.mode.pick(8, 3, 1)

    @contextmanager
    def environment(self) -> Iterator[dict[str, C.Contender]]:
        with responder_and_contenders(self, certificates(self)["ecdsa"]) as running:
            yield running

    def measure(self, env, contender: str, round_index: int) -> dict[str, float]:
        report = run_wrk(self, "wrk HTTPS keep-alive", env[contender], self.seconds(), scheme="https")
        env[contender].check_alive()
        return {key: report[key] for key in ("rate", "cpu") if key in report}


class TlsBulk(Benchmark):
    name = "tls_bulk"
    title = "TLS bulk throughput, one stream"
    description = ("One TLS stream (bench.tools.tls_bulk, 256 KiB writes, TLS 1.3 AES-256-GCM) "
                   "decrypted by the contender and forwarded in clear to a sink; GB/s sent.")
    contenders = ("haproxy", "warren")
    tools = ("haproxy",)
    metrics = (Metric("stream1", "1 stream", "GB/s", True),)
    targets = (Target("stream1", ">=", 0.8),)

    def seconds(self) -> int:
        return self.mode.pick(5, 2, 1)

    @contextmanager
    def environment(self) -> Iterator[dict[str, C.Contender]]:
        (port,) = free_ports(1)
        work = self.lab.dir(self.name)
        sink = spawn("sink", [sys.executable, "-m", "bench.tools.tls_bulk", "sink", str(port)],
                     log_path=work / "sink.log", cwd=C.REPO)
        with sink:
            wait_listening(port, sink)
            spec = C.ProxySpec(servers=(C.Server("sink", port),), tls_crt=certificates(self)["ecdsa"])
            with C.all_running(self.contenders, spec, work) as running:
                yield running

    def measure(self, env, contender: str, round_index: int) -> dict[str, float]:
        host, port = env[contender].address
        argv = [sys.executable, "-m", "bench.tools.tls_bulk", "send", host, str(port), str(self.seconds())]
        self.remember("sender", argv)
        out = run_tool(argv, timeout=self.seconds() + 30)
        env[contender].check_alive()
        try:
            report = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as error:
            raise MeasureError(f"tls_bulk printed no report: {out[-200:]!r}") from error
        return {"stream1": report["bytes"] / report["seconds"] / 1e9}


class TlsIdle(Idle):
    name = "tls_idle"
    title = "Idle TLS connections (memory)"
    description = ("COUNT TLS connections (TLS 1.3, ECDSA P-256) held open through the contender to an "
                   "echo backend, each proven by one echoed ping; growth of the proxy's VmRSS divided by "
                   "COUNT.")
    client_flags = ("--tls",)
    targets = (Target("per_conn", "<=", 1.2),)

    def tls_crt(self) -> str | None:
        return certificates(self)["ecdsa"]


class TlsAmqp(AmqpPublish):
    name = "tls_amqp"
    title = "AMQP publish with confirms over AMQPS (pika, RabbitMQ)"
    description = ("As `amqp`, with both pika clients speaking AMQPS to the contender, which terminates "
                   "TLS (ECDSA P-256) and forwards in clear to the RabbitMQ node.")
    contenders = ("haproxy", "warren")
    metric_contenders = {"cpu": contenders}
    client_flags = ("--tls",)
    targets = (Target("publish", ">=", 0.95),)

    def tls_crt(self) -> str | None:
        return certificates(self)["ecdsa"]
