"""The run's outputs: RESULTS.md (for people), results.json (for programs) and
ratios.png (Warren relative to HAProxy, one bar per metric)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from . import contenders as C
from .model import BenchResult, Metric

NAMES = {"direct": "direct", "haproxy": "HAProxy", "keepalived": "keepalived", "warren": "Warren",
         "baseline": "baseline", "warren-splice": "Warren (splice)", "warren-kernel": "Warren (kernel)"}
VARIANTS = ("warren-splice", "warren-kernel")  # Warren pinned to a relay path: compared with HAProxy too
# What Warren's medians are divided by, where both were measured.
RATIO_BASES = ("haproxy", "direct", "baseline")
DEBIAN_PACKAGES = ("haproxy", "iperf3", "wrk", "rabbitmq-server", "erlang-base", "keepalived")


# -- metadata ------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), 0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "load average at the end (1, 5, 15 min)": load_average(),
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return " ".join(_read("/proc/loadavg").split()[:3])


def _os_name() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.system()


def versions() -> dict[str, str]:
    # Which interpreter ran Warren: a build without PGO/LTO costs it ~10 % CPU (Makefile).
    found = {"python": f"{platform.python_version()} ({os.path.realpath(sys.executable)})"}
    for module in ("trio", "pika", "matplotlib"):
        try:
            found[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            found[module] = "not installed"
    for package in DEBIAN_PACKAGES:
        try:
            out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                                 text=True, timeout=10)
            found[package] = out.stdout.strip() or "not installed"
        except (OSError, subprocess.TimeoutExpired):
            found[package] = "unknown"
    found.update(C.versions())
    return found


def command_line(argv: list[str]) -> str:
    """The command that produced the run: BENCH_COMMAND (set by the Makefile)
    or the Python command line."""
    return os.environ.get("BENCH_COMMAND") or " ".join(["python -m bench.run", *argv])


# -- numbers -------------------------------------------------------------------

def _fmt(value: float | None, metric: Metric) -> str:
    if value is None:
        return "–"
    return f"{value:,.{metric.digits}f}"


def _ratio(result: BenchResult, metric: Metric, baseline: str, mine: str = "warren") -> float | None:
    mine, base = result.median(metric.key, mine), result.median(metric.key, baseline)
    if not metric.compared or mine is None or base is None or base <= 0:
        return None
    return mine / base


def records(results: list[BenchResult]) -> list[dict]:
    """One JSON record per benchmark and metric."""
    out = []
    for result in results:
        if result.skipped:
            continue
        for metric in result.metrics:
            names = result.contenders_of(metric.key)
            if not names:
                continue
            record = {
                "name": result.name, "metric": metric.key, "label": metric.label, "unit": metric.unit,
                "higher_is_better": metric.higher_is_better,
            }
            record.update({name: result.median(metric.key, name) for name in names})
            record["rounds"] = result.round_count(metric.key)
            record["samples"] = {name: result.samples(metric.key, name) for name in names}
            for baseline in RATIO_BASES:
                if baseline in names and "warren" in names:
                    record[f"warren_vs_{baseline}"] = _ratio(result, metric, baseline)
            for variant in VARIANTS:
                if "haproxy" in names and variant in names:
                    record[f"{variant}_vs_haproxy"] = _ratio(result, metric, "haproxy", variant)
            targets = [t for t in result.targets if t.metric == metric.key]
            if targets:
                record["targets"] = []
                for target in targets:
                    judged, observed, met = result.judge(target)
                    entry = {"target": target.describe(), "op": target.op, "value": target.value,
                             "baseline": target.baseline, "observed": observed, "met": met}
                    if judged.metric != target.metric:
                        entry["judged_on"] = judged.metric
                    record["targets"].append(entry)
            out.append(record)
    return out


def write_json(path: Path, results: list[BenchResult], meta: dict) -> None:
    document = {
        "meta": meta,
        "results": records(results),
        "skipped": [{"name": r.name, "reason": r.skipped} for r in results if r.skipped],
        "errors": [{"name": r.name, "error": e} for r in results for e in r.errors],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


# -- RESULTS.md ----------------------------------------------------------------

def target_rows(results: list[BenchResult]) -> list[tuple[BenchResult, str, str, str, str]]:
    """(result, metric label, target, observed, verdict) for every target."""
    rows = []
    for result in results:
        if result.skipped:
            continue
        by_key = {m.key: m for m in result.metrics}
        for target in result.targets:
            judged, observed, met = result.judge(target)
            metric = by_key[judged.metric]
            medians = result.medians(judged.metric)
            if judged is not target:
                shown = (f"{observed:.2f}x on {metric.label} ({by_key[target.metric].label} "
                         f"is negative for {target.baseline}: not a measure here)")
            elif target.baseline is None:
                shown = "–" if observed is None else f"{observed:.{metric.digits}f} {metric.unit}"
            elif observed is not None:
                shown = f"{observed:.2f}x"
            elif met is not None:  # baseline not positive: show both values
                shown = (f"{_fmt(medians[target.contender], metric)} vs "
                         f"{_fmt(medians[target.baseline], metric)} {metric.unit}")
            else:
                shown = "–"
            verdict = {True: "met", False: "**missed**", None: "no data"}[met]
            rows.append((result, by_key[target.metric].label, target.describe(), shown, verdict))
    return rows


def markdown(results: list[BenchResult], meta: dict) -> str:
    lines = [
        "# Warren benchmark results",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} ({meta['mode']} mode, "
        f"{meta['seconds'] / 60:.1f} minutes). Every benchmark runs its contenders alternately "
        "(the order changes each round: each contender is measured after each other one about equally often) "
        "for several rounds in one run; the tables show medians over "
        "rounds, so a slow spell of this shared machine hits every contender alike.",
        "",
        "Contenders: **direct** (the client talks to the backend itself), **HAProxy** "
        f"(Debian {meta['versions'].get('haproxy', '?')}, TCP mode, roundrobin, health checks on, default "
        "thread count, no splicing, no logging) and **Warren** (`warren run` with its defaults: the "
        "kernel relay path where its start-up self-test passes and finds no hazard, else splice; frontends carrying bulk "
        "streams marked `bulk = true`, which splices them; health checks on; plus "
        "`[global] log_level = \"warning\"`, which "
        "silences the per-connection `connection.closed` "
        "log line, as HAProxy without a `log` line logs nothing). Both proxies listen on loopback and "
        "forward to the same backend with equivalent settings (configurations below). Where Warren's "
        "relay paths differ, a second Warren row pins the other one (**Warren (splice)**, "
        "**Warren (kernel)**); each table says which path each Warren row used.",
        "",
        "## Targets",
        "",
        "| benchmark | metric | target for Warren | observed | |",
        "|---|---|---|---|---|",
    ]
    for result, label, target, observed, verdict in target_rows(results):
        lines.append(f"| {result.name} | {label} | {target} | {observed} | {verdict} |")
    skipped = [r for r in results if r.skipped]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{r.name} ({r.skipped})" for r in skipped) + "."]
    for result in results:
        if not result.skipped:
            lines += [""] + _section(result)
    lines += ["", "## Machine and versions", ""]
    lines += [f"- {key}: {value}" for key, value in meta["machine"].items()]
    lines += [f"- {key}: {value}" for key, value in meta["versions"].items()]
    lines += ["", "## Contender configurations", "", _configs()]
    return "\n".join(lines) + "\n"


def _section(result: BenchResult) -> list[str]:
    contenders = [c for c in result.contenders if any(c in r for r in result.rounds)]
    ratios = [("warren", b) for b in RATIO_BASES if b in contenders and "warren" in contenders]
    ratios += [(v, "haproxy") for v in VARIANTS if v in contenders and "haproxy" in contenders]
    head = ["metric", "unit", *[NAMES.get(c, c) for c in contenders],
            *[f"{NAMES[mine]} / {NAMES[b]}" for mine, b in ratios], "rounds"]
    lines = [f"## {result.name}: {result.title}", "", result.description, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric in result.metrics:
        names = result.contenders_of(metric.key)
        if not names:
            continue
        cells = [metric.label + (" (lower is better)" if not metric.higher_is_better else ""), metric.unit]
        cells += [_fmt(result.median(metric.key, c), metric) if c in names else "–" for c in contenders]
        for mine, baseline in ratios:
            ratio = _ratio(result, metric, baseline, mine) if baseline in names and mine in names else None
            cells.append("–" if ratio is None else f"{ratio:.2f}")
        cells.append(str(result.round_count(metric.key)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += _rounds_table(result)
    if result.notes:
        lines += ["", *result.notes]
    if result.commands:
        lines += ["", "Load commands (ports differ per contender):", ""]
        lines += [f"- {label}: `{command}`" for label, command in result.commands.items()]
    if result.errors:
        lines += ["", "Errors:", ""] + [f"- {e.splitlines()[0][:300]}" for e in result.errors]
    lines += ["", f"Took {result.seconds:.0f} s."]
    return lines


def _rounds_table(result: BenchResult) -> list[str]:
    """Every value measured, one row per metric and contender, one column per round."""
    count = len(result.rounds)
    if count < 2:
        return []
    lines = ["", "Per round:", "", "| metric | contender | " + " | ".join(f"r{i + 1}" for i in range(count)) + " |",
             "|---|---|" + "---|" * count]
    for metric in result.metrics:
        for c in result.contenders_of(metric.key):
            cells = [_fmt(r.get(c, {}).get(metric.key), metric) for r in result.rounds]
            lines.append(f"| {metric.key} | {NAMES.get(c, c)} | " + " | ".join(cells) + " |")
    return lines


def _configs() -> str:
    tcp = C.ProxySpec(servers=(C.Server("backend", 20001),))
    amqp = C.ProxySpec(servers=(C.Server("rmq-a", 20001), C.Server("rmq-b", 20002)),
                       health=C.Health(protocol="amqp", shutdown_sessions=True))
    parts = []
    for title, spec in (("TCP backends (bulk, requests, connrate, idle)", tcp),
                        ("AMQP backends (storm; amqp without shutdown-sessions)", amqp)):
        parts += [f"{title}, HAProxy:", "", "```", C.config_haproxy(spec, 20000).rstrip(), "```", "",
                  "Warren:", "", "```toml", C.config_warren(spec, 20000).rstrip(), "```", ""]
    return "\n".join(parts)


# -- chart -----------------------------------------------------------------------

def chart_bars(records: list[dict]) -> list[tuple[str, float, bool | None, float | None]]:
    """(label, Warren's advantage over HAProxy, target met, target line) per
    compared metric, from results.json's records; advantage > 1 means Warren
    did better (the ratio is inverted for lower-is-better metrics)."""
    bars = []
    for record in records:
        ratio = record.get("warren_vs_haproxy")
        if ratio is None or ratio <= 0:
            continue
        higher = record["higher_is_better"]
        advantage = ratio if higher else 1 / ratio
        met, line = None, None
        for target in record.get("targets", []):
            this_met = target["met"]
            met = this_met if met is None else (met and this_met)
            if target.get("baseline") == "haproxy":
                line = target["value"] if higher else 1 / target["value"]
        bars.append((f"{record['name']}: {record['label']}", advantage, met, line))
    return bars


def write_chart(path: Path, records: list[dict], meta: dict) -> bool:
    """ratios.png from results.json's records; False (and no file) when
    matplotlib is missing or no data."""
    bars = chart_bars(records)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.6))
    ys = list(range(len(bars)))[::-1]
    colors = ["#2e7d32" if met else "#c62828" if met is False else "#757575" for _, _, met, _ in bars]
    ax.barh(ys, [b[1] for b in bars], color=colors, left=0)
    for y, (_, value, _, line) in zip(ys, bars):
        ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
        if line is not None:
            ax.plot([line, line], [y - 0.4, y + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(ys, [b[0] for b in bars], fontsize=8)
    ax.set_xlabel("Warren relative to HAProxy (> 1: Warren better; black tick: target; "
                  "green met, red missed, grey no target)", fontsize=8)
    reruns = f", {len(meta['reruns'])} re-run(s) merged" if meta.get("reruns") else ""
    ax.set_title(f"Warren vs HAProxy, medians ({meta['mode']} run, {meta['date']}{reruns})", fontsize=10)
    low = min(0.2, min(b[1] for b in bars) / 1.3)
    high = max(5.0, max(b[1] for b in bars) * 1.5)
    ax.set_xlim(low, high)
    ax.set_xscale("log")
    ticks = [t for t in (0.1, 0.2, 0.25, 0.5, 1, 1.5, 2, 4, 8) if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def optimisations() -> str:
    """The hand-kept record of what each optimisation bought (bench/OPTIMISATIONS.md)."""
    notes = Path(__file__).with_name("OPTIMISATIONS.md")
    return "\n" + notes.read_text() if notes.exists() else ""


def write_all(out_dir: Path, results: list[BenchResult], meta: dict) -> list[Path]:
    """Writes RESULTS.md, results.json and ratios.png into out_dir; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "RESULTS.md", out_dir / "results.json"]
    written[0].write_text(markdown(results, meta) + optimisations())
    write_json(written[1], results, meta)
    if write_chart(out_dir / "ratios.png", records(results), meta):
        written.append(out_dir / "ratios.png")
    else:
        print("ratios.png not written (matplotlib missing or no ratios)", file=sys.stderr)
    return written
