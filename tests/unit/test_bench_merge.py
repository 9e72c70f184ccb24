"""`python -m bench.run --only NAME --merge`: one benchmark re-run into the last full results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import merge, report
from bench.model import BenchResult, Metric, Target
from bench.run import parse as parse_args

RATE = Metric("rate", "rate", "req/s", higher_is_better=True)
GAP = Metric("gap", "gap", "s", higher_is_better=False, digits=3)


def result(name: str, warren: float, haproxy: float, metric: Metric = RATE, rounds: int = 2) -> BenchResult:
    r = BenchResult(name=name, title=f"{name} title", description=f"what {name} measures",
                    contenders=("haproxy", "warren"), metrics=(metric,),
                    targets=(Target(metric.key, ">=" if metric.higher_is_better else "<=", 1.0),))
    for i in range(rounds):
        r.record(i, "haproxy", {metric.key: haproxy})
        r.record(i, "warren", {metric.key: warren})
    r.commands = {"load": f"load-tool for {name}"}
    r.seconds = 12
    return r


def meta(command: str, date: str) -> dict:
    return {"command": command, "mode": "full", "date": date, "seconds": 600.0,
            "machine": {"cores": 2, "load average at the start (1, 5, 15 min)": "0.5 0.4 0.3",
                        "load average at the end (1, 5, 15 min)": "1.5 0.9 0.5"},
            "versions": {"haproxy": "2.6", "warren": "abc1234", "python": "3.11.2 (/usr/bin/python3.11)"}}


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    results = [result("bulk", 2.0, 1.0), result("requests", 80.0, 100.0), result("failover", 0.04, 3.0, GAP)]
    report.write_all(tmp_path, results, meta("make bench", "2026-12-06 13:12 UTC"))
    return tmp_path


def sections(path: Path) -> dict[str, str]:
    return merge.parse((path / "RESULTS.md").read_text()).sections


def test_a_merge_replaces_only_the_benchmarks_re_run(full_run: Path):
    before_md, before_json = sections(full_run), json.loads((full_run / "results.json").read_text())
    merge.write_merged(full_run, [result("requests", 130.0, 100.0)], meta("python -m bench.run --only requests --merge",
                                                                            "2026-12-06 16:50 UTC"))
    after = merge.parse((full_run / "RESULTS.md").read_text())
    assert after.sections["bulk"] == before_md["bulk"]
    assert after.sections["failover"] == before_md["failover"]
    assert "| 130.00 | 1.30 |" in after.sections["requests"]
    assert "| 80.00 |" not in after.sections["requests"]
    assert after.target_rows["requests"] == ["| requests | rate | >= 1x haproxy | 1.30x | met |"]
    assert after.target_rows["bulk"] == ["| bulk | rate | >= 1x haproxy | 2.00x | met |"]
    assert list(after.sections) == ["bulk", "requests", "failover"]  # the suites' order
    assert after.reruns == ["- requests: `python -m bench.run --only requests --merge` on 2026-12-06 16:50 UTC "
                            "(full mode, 10.0 minutes; load average at the start 0.5 0.4 0.3, at the end "
                            "1.5 0.9 0.5; Warren abc1234 on Python 3.11.2 (/usr/bin/python3.11))"]
    assert "Produced by `make bench` on 2026-12-06 13:12 UTC" in "\n".join(after.head)
    document = json.loads((full_run / "results.json").read_text())
    by_name = {r["name"]: r for r in document["results"]}
    assert by_name["bulk"] == next(r for r in before_json["results"] if r["name"] == "bulk")
    assert by_name["requests"]["warren_vs_haproxy"] == pytest.approx(1.3)
    assert [r["name"] for r in document["results"]] == ["bulk", "requests", "failover"]
    assert document["meta"]["date"] == "2026-12-06 13:12 UTC"
    assert [r["names"] for r in document["meta"]["reruns"]] == [["requests"]]


def test_re_runs_accumulate_and_a_later_one_wins(full_run: Path):
    merge.write_merged(full_run, [result("requests", 130.0, 100.0)], meta("first", "d1"))
    merge.write_merged(full_run, [result("requests", 90.0, 100.0), result("bulk", 1.0, 2.0)], meta("second", "d2"))
    after = merge.parse((full_run / "RESULTS.md").read_text())
    assert [line.split("`")[1] for line in after.reruns] == ["first", "second"]
    assert after.reruns[1].startswith("- requests, bulk: ")
    assert after.target_rows["requests"] == ["| requests | rate | >= 1x haproxy | 0.90x | **missed** |"]
    assert after.target_rows["bulk"] == ["| bulk | rate | >= 1x haproxy | 0.50x | **missed** |"]
    document = json.loads((full_run / "results.json").read_text())
    assert len(document["meta"]["reruns"]) == 2
    assert sum(r["name"] == "requests" for r in document["results"]) == 1


def test_a_benchmark_without_figures_keeps_the_previous_ones(full_run: Path, capsys):
    before = (full_run / "RESULTS.md").read_text()
    failed = result("requests", 0, 0, rounds=0)
    failed.errors.append("wrk did not start")
    assert merge.write_merged(full_run, [failed], meta("m", "d")) == []
    assert (full_run / "RESULTS.md").read_text() == before
    assert "not merged" in capsys.readouterr().err


def test_the_committed_results_parse_into_every_benchmark_and_target():
    committed = Path(__file__).resolve().parents[2] / "bench"
    parsed = merge.parse((committed / "RESULTS.md").read_text())
    records = json.loads((committed / "results.json").read_text())["results"]
    assert sum(len(rows) for rows in parsed.target_rows.values()) == sum(len(r.get("targets", [])) for r in records)
    assert set(parsed.sections) == {r["name"] for r in records}
    assert parsed.machine.startswith("## Machine and versions")


def test_merge_takes_whole_benchmarks_into_existing_results(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--merge"])  # which benchmarks?
    with pytest.raises(SystemExit):
        parse_args(["--only", "failover", "--case", "crash_1s", "--merge"])
    with pytest.raises(SystemExit):
        parse_args(["--only", "requests", "--merge", "--out-dir", str(tmp_path)])  # nothing to merge into
