"""A partial run merged into the previous full one (`python -m bench.run --only NAME --merge`).

A full run takes about 40 minutes of a quiet machine; an engineer who
improved one benchmark re-runs that one. Merging keeps every other
benchmark's section, target rows and JSON records exactly as the previous
run wrote them, replaces those of the benchmarks re-run, and says in the
report's head which benchmarks were re-run, when, by which command and at
what load, so no figure's provenance is lost.

RESULTS.md is split on the headings the report writes (report.markdown):
the head up to "## Targets", the targets table (one row per target, the
benchmark's name in the first cell), one "## NAME: title" section per
benchmark, then the machine, the configurations and the optimisation notes
(taken fresh from OPTIMISATIONS.md, as in a full run).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import report
from .model import BenchResult
from .suites import NAMES

_SECTION = re.compile(r"^## (\w+): ", re.M)
_TARGET_ROW = re.compile(r"^\| (\w+) \|")
_RERUNS_HEAD = "Re-run since (`--merge`), each replacing only its benchmarks' rows and sections:"


@dataclass
class Parsed:
    """RESULTS.md in the pieces a merge replaces."""

    head: list[str]  # up to the targets table
    reruns: list[str]  # lines of the re-run list, if any
    target_rows: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # the "Skipped: ..." line, if any (kept)
    sections: dict[str, str] = field(default_factory=dict)
    machine: str = ""  # "## Machine and versions" and "## Contender configurations"


def parse(text: str) -> Parsed:
    """Splits a RESULTS.md written by report.markdown (possibly merged before)."""
    head_text, sep, rest = text.partition("## Targets\n")
    if not sep:
        raise ValueError("no '## Targets' heading: not a RESULTS.md written by bench.run")
    head = head_text.rstrip("\n").split("\n")
    reruns: list[str] = []
    if _RERUNS_HEAD in head:
        at = head.index(_RERUNS_HEAD)
        reruns = [line for line in head[at + 1:] if line.startswith("- ")]
        head = head[:at]
    while head and not head[-1]:
        head.pop()
    parsed = Parsed(head=head, reruns=reruns)
    first = _SECTION.search(rest)
    machine_at = rest.find("\n## Machine and versions")
    if machine_at < 0:
        raise ValueError("no '## Machine and versions' heading")
    table = rest[:first.start() if first else machine_at]
    for line in table.split("\n"):
        match = _TARGET_ROW.match(line)
        if match and match.group(1) in NAMES:
            parsed.target_rows.setdefault(match.group(1), []).append(line)
        elif line.startswith("Skipped: "):
            parsed.skipped.append(line)
    body = rest[first.start():machine_at] if first else ""
    starts = [m for m in _SECTION.finditer(body)]
    for this, after in zip(starts, [*starts[1:], None]):
        parsed.sections[this.group(1)] = body[this.start():after.start() if after else len(body)].strip("\n")
    optimisations = rest.find("\n## Optimisations and what they bought", machine_at)
    parsed.machine = rest[machine_at:optimisations if optimisations >= 0 else len(rest)].strip("\n")
    return parsed


def _rerun_line(names: list[str], meta: dict) -> str:
    load_end = meta["machine"].get("load average at the end (1, 5, 15 min)", "?")
    load_start = meta["machine"].get("load average at the start (1, 5, 15 min)", "?")
    return (f"- {', '.join(names)}: `{meta['command']}` on {meta['date']} ({meta['mode']} mode, "
            f"{meta['seconds'] / 60:.1f} minutes; load average at the start {load_start}, "
            f"at the end {load_end}; Warren {meta['versions'].get('warren', '?')} "
            f"on Python {meta['versions'].get('python', '?')})")


def merge_markdown(previous: str, results: list[BenchResult], meta: dict) -> str:
    """The previous RESULTS.md with the benchmarks of `results` replaced."""
    old, new = parse(previous), parse(report.markdown(results, meta))
    rerun = [r.name for r in results]
    rows = {**old.target_rows, **{n: new.target_rows.get(n, []) for n in rerun}}
    note = f"Re-run on {meta['date']} (`--merge`: see the list of re-runs at the top)."
    sections = {**old.sections, **{n: f"{new.sections[n]}\n\n{note}" for n in rerun if n in new.sections}}
    for name in rerun:
        if name not in new.sections:
            sections.pop(name, None)
    lines = [*old.head, "", _RERUNS_HEAD, "", *old.reruns, _rerun_line(rerun, meta), "", "## Targets", "",
             "| benchmark | metric | target for Warren | observed | |", "|---|---|---|---|---|"]
    lines += [row for name in NAMES for row in rows.get(name, [])]
    if old.skipped:
        lines += ["", *old.skipped]
    lines += [s for name in NAMES if name in sections for s in ("", sections[name])]
    lines += ["", old.machine]
    return "\n".join(lines) + "\n"


def merge_json(previous: dict, results: list[BenchResult], meta: dict) -> dict:
    """results.json with the records of the re-run benchmarks replaced; the
    re-run's meta appended to meta["reruns"]."""
    rerun = {r.name for r in results}
    kept = [r for r in previous.get("results", []) if r["name"] not in rerun]
    records = kept + report.records(results)
    order = {name: i for i, name in enumerate(NAMES)}
    records.sort(key=lambda r: order.get(r["name"], len(order)))
    document = dict(previous)
    document["meta"] = {**previous.get("meta", {}),
                        "reruns": [*previous.get("meta", {}).get("reruns", []), {**meta, "names": sorted(rerun)}]}
    document["results"] = records
    document["skipped"] = [s for s in previous.get("skipped", []) if s["name"] not in rerun]
    document["errors"] = [e for e in previous.get("errors", []) if e["name"] not in rerun] + \
        [{"name": r.name, "error": e} for r in results for e in r.errors]
    return document


def write_merged(out_dir: Path, results: list[BenchResult], meta: dict) -> list[Path]:
    """Merges into out_dir's RESULTS.md and results.json (which must exist)
    and redraws ratios.png from the merged records; the paths written. A
    benchmark that produced no round (it failed or was skipped) keeps its
    previous figures."""
    failed = [r.name for r in results if not r.rounds]
    if failed:
        print(f"not merged (no figures in this run, the previous ones kept): {', '.join(failed)}",
              file=sys.stderr)
    results = [r for r in results if r.rounds]
    if not results:
        return []
    md_path, json_path = out_dir / "RESULTS.md", out_dir / "results.json"
    merged_md = merge_markdown(md_path.read_text(), results, meta) + report.optimisations()
    document = merge_json(json.loads(json_path.read_text()), results, meta)
    md_path.write_text(merged_md)
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    written = [md_path, json_path]
    if report.write_chart(out_dir / "ratios.png", document["results"], document["meta"]):
        written.append(out_dir / "ratios.png")
    return written
