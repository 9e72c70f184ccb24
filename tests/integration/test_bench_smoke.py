"""The benchmark harness works: `python -m bench.run --smoke` produces numbers
for every benchmark (their values are not judged here), writes its reports,
and the contenders it starts get valid, equivalent configurations.

One smoke run (seconds per benchmark: one round, tiny sizes) serves all the
per-benchmark tests, a second one the TLS benchmarks; it runs only the benchmarks whose tests are selected, so
`-m "not rabbit"` also leaves out the RabbitMQ ones. A benchmark whose tool is
not installed is skipped with the harness's reason.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import contenders as C
from bench.model import BenchResult, Metric, Target, add_difference
from bench.suites import ALL
from bench.suites._http import parse_wrk
from bench.suites.base import MeasureError
from bench.suites.bulk import parse_iperf3
from proxy.config import load_config

REPO = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT = 600  # about three minutes alone (more with a Warren row per relay path, and on a busy machine); a hung tool must not hang the suite

BENCH_PARAMS = [pytest.param(b, id=b.name, marks=[pytest.mark.rabbit] if b.needs_rabbit else [])
                for b in ALL]


def _selected_benchmarks(request: pytest.FixtureRequest) -> list[str]:
    names = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module is request.module and callspec and "bench" in callspec.params:
            names.append(callspec.params["bench"].name)
    return sorted(set(names))


def _is_tls(name: str) -> bool:
    return name.startswith("tls_")


def _run_smoke(names: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs the smoke mode of `names` once; its exit status, stderr and outputs."""
    out = tmp_path_factory.mktemp("bench-smoke")
    argv = [sys.executable, "-m", "bench.run", "--smoke", "--out-dir", str(out)]
    for name in names:
        argv += ["--only", name]
    # Its own process group, killed whole if it overruns or pytest's timeout interrupts
    # the wait: the contenders it started go with it (its RabbitMQ nodes, in sessions
    # of their own, are reaped by proxy.devcluster when it dies).
    with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as run:
        try:
            _, stderr = run.communicate(timeout=SMOKE_TIMEOUT)
        except BaseException:
            os.killpg(run.pid, signal.SIGKILL)  # the group lives while we have not reaped its leader
            run.wait()
            raise
    results_json = out / "results.json"
    assert results_json.exists(), f"no results.json; exit {run.returncode}\n{stderr[-3000:]}"
    return {"status": run.returncode, "stderr": stderr, "out": out,
            "json": json.loads(results_json.read_text()), "names": names}


@pytest.fixture(scope="module")
def smoke(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One smoke run of the selected plaintext benchmarks."""
    return _run_smoke([n for n in _selected_benchmarks(request) if not _is_tls(n)], tmp_path_factory)


@pytest.fixture(scope="module")
def tls_smoke(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The TLS benchmarks' own smoke run: each run stays within SMOKE_TIMEOUT on a busy machine."""
    return _run_smoke([n for n in _selected_benchmarks(request) if _is_tls(n)], tmp_path_factory)


@pytest.mark.timeout(SMOKE_TIMEOUT + 60)
@pytest.mark.parametrize("bench", BENCH_PARAMS)
def test_benchmark_produces_a_number_per_contender_and_metric(request: pytest.FixtureRequest, bench) -> None:
    smoke = request.getfixturevalue("tls_smoke" if _is_tls(bench.name) else "smoke")
    document = smoke["json"]
    skipped = {s["name"]: s["reason"] for s in document["skipped"]}
    if bench.name in skipped:
        pytest.skip(skipped[bench.name])
    errors = [e["error"] for e in document["errors"] if e["name"] == bench.name]
    assert not errors, f"{bench.name} failed:\n" + "\n".join(errors) + "\n" + smoke["stderr"][-3000:]
    records = {r["metric"]: r for r in document["results"] if r["name"] == bench.name}
    for metric in getattr(bench, "smoke_metrics", bench.metrics):  # smoke may run a subset
        record = records.get(metric.key)
        assert record is not None, f"{bench.name}: no record for {metric.key}"
        assert record["unit"] == metric.unit and record["higher_is_better"] == metric.higher_is_better
        assert record["rounds"] == 1
        expected = [c for c in bench.contenders if not (metric.key.endswith("_added") and c == "direct")]
        expected = getattr(bench, "metric_contenders", {}).get(metric.key, expected)
        for contender in expected:
            value = record.get(contender)
            assert isinstance(value, (int, float)) and math.isfinite(value), \
                f"{bench.name}/{metric.key}/{contender}: {value!r}"


@pytest.mark.timeout(SMOKE_TIMEOUT + 60)
def test_run_writes_the_report_files(smoke: dict) -> None:
    assert smoke["status"] == 0, smoke["stderr"][-3000:]
    markdown = (smoke["out"] / "RESULTS.md").read_text()
    ran = {r["name"] for r in smoke["json"]["results"]}
    for name in ran:
        assert f"## {name}: " in markdown
    assert "python -m bench.run --smoke" in smoke["json"]["meta"]["command"]
    assert smoke["json"]["meta"]["mode"] == "smoke"
    if importlib.util.find_spec("matplotlib") is None:  # the bench extra; the test extra lacks it
        return
    if ran & {"bulk", "requests", "connrate", "amqp", "storm"}:
        assert (smoke["out"] / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the pieces, without running anything ------------------------------------------

SPECS = [
    C.ProxySpec(servers=(C.Server("one", 20001),)),
    C.ProxySpec(servers=(C.Server("rmq-a", 20001), C.Server("rmq-b", 20002)),
                health=C.Health(protocol="amqp", inter=0.5, timeout=0.5, shutdown_sessions=True)),
]


@pytest.mark.parametrize("spec", SPECS, ids=["tcp", "amqp"])
def test_warren_accepts_the_generated_configuration(tmp_path: Path, spec: C.ProxySpec) -> None:
    path = tmp_path / "warren.toml"
    path.write_text(C.config_warren(spec, 20000))
    config = load_config(str(path))
    backend = config.backends[0]
    assert [s.port for s in backend.servers] == [s.port for s in spec.servers]
    assert config.frontends[0].maxconn == spec.maxconn
    assert backend.health.rise == spec.health.rise and backend.health.fall == spec.health.fall


@pytest.mark.parametrize("spec", SPECS, ids=["tcp", "amqp"])
def test_haproxy_accepts_the_generated_configuration(tmp_path: Path, spec: C.ProxySpec) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    path = tmp_path / "haproxy.cfg"
    path.write_text(C.config_haproxy(spec, 20000))
    done = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout + done.stderr


def test_targets_compare_medians_against_their_baseline() -> None:
    faster = Target("rate", ">=", 1.5)
    assert faster.evaluate({"haproxy": 100.0, "warren": 160.0}) == (1.6, True)
    assert faster.evaluate({"haproxy": 100.0, "warren": 140.0}) == (1.4, False)
    assert faster.evaluate({"haproxy": 100.0}) == (None, None)
    # Added latency can be negative through noise: no ratio, still a verdict.
    added = Target("p99_added", "<=", 2.0)
    assert added.evaluate({"haproxy": -0.1, "warren": 0.5}) == (None, False)
    assert Target("per_conn", "<=", 8.0, baseline=None).evaluate({"warren": 5.0}) == (5.0, True)


def test_a_difference_that_went_negative_is_judged_on_its_fallback_metric() -> None:
    metrics = (Metric("p99", "p99", "ms", False), Metric("p99_added", "added", "ms", False))
    target = Target("p99_added", "<=", 2.0, fallback="p99")
    result = BenchResult("x", "x", "", ("direct", "haproxy", "warren"), metrics, (target,))
    result.record(0, "direct", {"p99": 7.0})
    result.record(0, "haproxy", {"p99": 3.0, "p99_added": -4.0})
    result.record(0, "warren", {"p99": 4.5, "p99_added": -2.5})
    judged, observed, met = result.judge(target)
    assert (judged.metric, observed, met) == ("p99", 1.5, True)
    result.rounds[0]["warren"].update(p99=6.5, p99_added=-0.5)
    assert result.judge(target)[1:] == (6.5 / 3.0, False)
    # While the baseline's difference is positive, the difference itself is judged.
    result.rounds[0]["haproxy"].update(p99=8.0, p99_added=1.0)
    judged, observed, met = result.judge(target)
    assert (judged.metric, observed, met) == ("p99_added", -0.5, True)


def test_medians_and_added_latency_are_per_round() -> None:
    metrics = (Metric("p50", "p50", "ms", False), Metric("p50_added", "added", "ms", False))
    result = BenchResult("x", "x", "", ("direct", "haproxy", "warren"), metrics, ())
    for r, (direct, haproxy, warren) in enumerate([(1.0, 1.5, 2.0), (3.0, 3.2, 3.9), (1.0, 1.1, 1.3)]):
        result.record(r, "direct", {"p50": direct})
        result.record(r, "haproxy", {"p50": haproxy})
        result.record(r, "warren", {"p50": warren})
        add_difference(result, r, "p50", "p50_added")
    assert result.median("p50", "warren") == 2.0
    assert result.contenders_of("p50_added") == ("haproxy", "warren")
    assert result.median("p50_added", "haproxy") == pytest.approx(0.2)
    assert result.median("p50_added", "warren") == pytest.approx(0.9)
    assert result.round_count("p50_added") == 3


def test_tool_outputs_are_parsed_and_failures_refused() -> None:
    iperf = {"end": {"sum_received": {"bits_per_second": 8e9}}}
    assert parse_iperf3(json.dumps(iperf)) == 1.0
    with pytest.raises(MeasureError):
        parse_iperf3(json.dumps({"error": "unable to connect to server"}))
    line = ('WRKJSON {"requests": 1000, "duration_us": 1000000, "bytes": 1, "errors": {"connect": 0, '
            '"read": 0, "write": 0, "status": 0, "timeout": 0}, "latency_us": {"p50": 100.0}}')
    assert parse_wrk("Running 1s test\n" + line)["requests"] == 1000
    with pytest.raises(MeasureError):
        parse_wrk(line.replace('"status": 0', '"status": 500'))
