"""`make fuzz`: a long campaign of the property tests, with counts per target.

    python -m tests.properties.campaign --minutes 20 --examples 2000 --report bench/FUZZ.md

The targets are found, not listed: every test module under tests/ with
hypothesis properties (a ``@given`` test), those of tests/properties (one
parser of outside input each) and those that live beside unit tests (only
their properties run). A module whose properties are no fuzz target (a model
checked over real sockets, say) says so and why in a module-level
``CAMPAIGN_LEFT_OUT = "..."``; the report lists it with that reason.
The time is shared equally among them; a target runs in rounds, each a
pytest run under the "fuzz" hypothesis profile with `--examples` examples
per property and a fresh random seed, until its share is spent (a round
that has begun finishes). A failing round's output, with the seed and
hypothesis's reproduction blob, is kept in full (below); the fuzz profile's
example database (.hypothesis/) replays the failure in the next campaign on
this machine. `make test` does not see that database (the derandomized "ci"
profile has none, and CI starts from a clean clone): a failure found here
is fixed and kept as an ``@example`` of its property.

The report (markdown) gives the command, the machine, and per target and
property the rounds and examples run; a failing round's output is kept in
full under the report's name with `.failures.txt` appended.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# What the properties found so far, each fixed and kept as an @example and a regression test.
FOUND = (
    "stats server: an absolute request target with a broken authority (`GET http://[`) made urlsplit() "
    "raise: a 500 with a traceback, before any login (test_stats_http.py; now split by hand, never raises)",
    "stats server: a `CONNECT` the handler answered 2xx made h11 switch protocols and refuse the body: the "
    "client got nothing and the log an error (test_stats_http.py; now 501 whatever the handler says)",
    "TLS files: a certificate whose extensions (or names) are damaged loaded, since cryptography parses them "
    "lazily, and reading its SANs raised ValueError instead of a TlsFileError naming the file "
    "(test_tls_files.py; now read at load and refused as a certificate that cannot be parsed)",
    "importer: a control character in a section line (`backend rabbit\\x08`) made tomlkit refuse the "
    "output's source comment: a traceback instead of a report (test_importer_input.py; now escaped)",
)


_PROPERTY = re.compile(r"^\s*@(?:hypothesis\.)?given\(", re.M)
_LEFT_OUT = re.compile(r"""^CAMPAIGN_LEFT_OUT = (["'])(?P<reason>.*?)\1""", re.M)


def discover(tests: Path = ROOT / "tests") -> tuple[list[Path], dict[Path, str]]:
    """(targets, {left-out module: reason}): the test modules under `tests` with properties.

    tests/properties/ comes first, then the others in path order.
    """
    chosen, left_out = [], {}
    for path in sorted(tests.rglob("test_*.py"), key=lambda p: (p.parent.name != "properties", p)):
        text = path.read_text(encoding="utf-8")
        if not _PROPERTY.search(text):
            continue
        if reason := _LEFT_OUT.search(text):
            left_out[path] = reason.group("reason")
        else:
            chosen.append(path)
    return chosen, left_out


def target_name(path: Path) -> str:
    return str(path.relative_to(HERE if path.parent == HERE else ROOT / "tests"))


def run_round(target: Path, examples: int, seed: int, counts_path: str) -> tuple[bool, str]:
    env = {**os.environ, "HYPOTHESIS_PROFILE": "fuzz", "FUZZ_EXAMPLES": str(examples), "FUZZ_COUNTS": counts_path}
    command = [sys.executable, "-m", "pytest", str(target.relative_to(ROOT)), "-q", "-p", "no:cacheprovider",
               "-p", "tests.properties.counting", f"--hypothesis-seed={seed}", "--timeout=0"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    return result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


def campaign(minutes: float, examples: int) -> dict:
    chosen, left_out = discover()
    share = minutes * 60 / len(chosen)
    results: dict = {"targets": {}, "started": datetime.now(timezone.utc), "failures": [],
                     "left_out": {target_name(path): reason for path, reason in left_out.items()},
                     "load": [os.getloadavg()[0]]}
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        counts_path = os.path.join(directory, "counts.json")
        for target in chosen:
            start, rounds = time.monotonic(), 0
            per_property: dict[str, int] = defaultdict(int)
            failed: dict[str, int] = defaultdict(int)
            while time.monotonic() - start < share:
                seed = random.randrange(2**32)
                ok, output = run_round(target, examples, seed, counts_path)
                rounds += 1
                with open(counts_path) as file:
                    for nodeid, count in json.load(file).items():
                        name = nodeid.split("::", 1)[1]
                        per_property[name] += count["examples"]
                        failed[name] += not count["passed"]
                if not ok:
                    results["failures"].append((target_name(target), seed, output))
                print(f"{target_name(target)}: round {rounds} (seed {seed}) {'ok' if ok else 'FAILED'}, "
                      f"{sum(per_property.values())} examples so far", flush=True)
            results["load"].append(os.getloadavg()[0])
            results["targets"][target_name(target)] = {
                "rounds": rounds, "seconds": time.monotonic() - start,
                "properties": dict(per_property), "failed": {k: v for k, v in failed.items() if v},
            }
    results["seconds"] = time.monotonic() - began
    return results


def report(results: dict, command: str) -> str:
    total = sum(sum(t["properties"].values()) for t in results["targets"].values())
    load = results["load"]
    lines = [
        "# Fuzzing campaign (`make fuzz`)",
        "",
        "The property tests of every parser of outside input run with many random examples: every",
        "test module under tests/ with hypothesis properties is a target, found by the campaign",
        "(tests/properties/ and the properties beside unit tests; see tests/properties/campaign.py);",
        "each target in rounds of one pytest run under hypothesis's \"fuzz\" profile, a fresh seed",
        "per round, for an equal share of the time (a round that has begun finishes, so the campaign",
        "may run past its minutes). `make test` runs the same properties derandomized",
        "(100 examples each, or what a property's own `@settings` says).",
        "",
        f"Command: `{command}`  ",
        f"Run: {results['started']:%Y-%m-%d %H:%M} UTC, {results['seconds'] / 60:.1f} minutes, "
        f"on {platform.node() or 'this machine'} ({os.cpu_count()} CPUs, Python {platform.python_version()}).  ",
        f"Load average (1 min) at the start and after each target: {min(load):.1f} to {max(load):.1f},",
        f"median {statistics.median(load):.1f}: the machine was shared with other work. The campaign checks",
        "correctness only (no property has a deadline), so the load changes how many examples ran, not",
        "what they found.  ",
        f"Examples in all: **{total:,}**; failing rounds: **{len(results['failures'])}**.",
        "",
        "| target | rounds | minutes | property | examples | failing rounds |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, target in results["targets"].items():
        first = True
        for prop, count in sorted(target["properties"].items()):
            head = (f"| {name} | {target['rounds']} | {target['seconds'] / 60:.1f} " if first else "| | | ")
            lines.append(f"{head}| {prop} | {count:,} | {target['failed'].get(prop, 0)} |")
            first = False
    if results["left_out"]:
        lines += ["", "Modules with properties that are no fuzz target (they run in `make test`):", ""]
        lines += [f"- {name}: {reason}" for name, reason in sorted(results["left_out"].items())]
    lines += ["", "Bugs the properties found (each fixed, kept as an `@example` of its property and a regression",
              "test):", ""] + [f"- {bug}" for bug in FOUND]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.properties.campaign")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--examples", type=int, default=2000, help="examples per property per round")
    parser.add_argument("--report", default="bench/FUZZ.md")
    args = parser.parse_args(argv)
    command = os.environ.get("FUZZ_COMMAND") or f"python -m tests.properties.campaign --minutes {args.minutes:g} " \
                                                 f"--examples {args.examples}"
    results = campaign(args.minutes, args.examples)
    report_path = ROOT / args.report
    report_path.write_text(report(results, command))
    failures_path = report_path.with_name(report_path.name + ".failures.txt")
    if results["failures"]:
        failures_path.write_text("\n\n".join(f"== {name}, seed {seed}\n{output}" for name, seed, output
                                             in results["failures"]))
    print(f"report: {report_path}" + (f"; failures: {failures_path}" if results["failures"] else ""))
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
