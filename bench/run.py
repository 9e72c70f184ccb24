"""The benchmark driver: `python -m bench.run [--quick | --smoke] [--only NAME [--merge]]`.

Runs every benchmark (bench.suites.ALL) with a progress display: per
benchmark, its environment once, then rounds in which every contender is
measured in turn (the order changes each round: round_order), then writes RESULTS.md,
results.json and ratios.png. A failed measurement is reported and the run
goes on; every process started is stopped by PID on the way out, also on
Ctrl-C or SIGTERM. Exit status: 0 when every benchmark that could run
produced numbers, 1 otherwise, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import signal
import sys
import time
import traceback
from pathlib import Path

import structlog

from . import contenders as C
from . import merge, report
from .lab import Lab, Mode
from .model import BenchResult
from .procs import raise_nofile_limit, stop_all
from .progress import Progress
from .suites import ALL, NAMES, Benchmark
from .suites.base import fmt_values

OUT_DIR = Path(__file__).resolve().parent


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="a short run (a few minutes)")
    speed.add_argument("--smoke", action="store_true",
                       help="seconds per benchmark, tiny sizes: checks that each produces numbers")
    parser.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(NAMES)}")
    parser.add_argument("--case", action="append", default=[], metavar="KEY",
                        help="only this case of a benchmark made of cases (repeatable), e.g. failover's "
                             "crash_1s, crash_100ms, stop_100ms, backend_1s")
    parser.add_argument("--rounds", type=int, help="rounds per benchmark (overrides the mode's)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where to write the results")
    parser.add_argument("--workdir", type=Path, help="keep configs and logs here (default: a temp dir)")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also run the Warren of this checkout as contender 'baseline' (an A/B of "
                             "two versions) in the benchmarks that start Warren as a plain process")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: replace only these benchmarks in the existing RESULTS.md and "
                             "results.json of --out-dir, keeping the others (the report's head lists each "
                             "re-run with its command, date and load)")
    args = parser.parse_args(argv)
    if args.merge and (not args.only or args.case or args.baseline):
        parser.error("--merge needs --only and takes whole benchmarks: no --case, no --baseline")
    if args.merge and not (args.out_dir / "RESULTS.md").is_file():
        parser.error(f"--merge: no {args.out_dir / 'RESULTS.md'} to merge into")
    return args


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def round_order(contenders: tuple[str, ...], r: int) -> list[str]:
    """The order of the contenders in round `r` (from 0): rotated by one every
    other round, and every other round reversed, so that over 2 x n rounds
    each of n contenders is measured in each place, and after each other
    contender, equally often (for n <= 3; about as often above).

    Why: a measurement inherits some of the load of the one before it (the
    broker cleaning up after its closed connections, its sockets in
    TIME_WAIT). With a plain rotation each contender always followed the
    same one, and that was worth ~5 % of AMQP handshake rate: the same
    Warren measured once as "warren" (after HAProxy) and once as
    "baseline" (after Warren) differed by that much (bench/OPTIMISATIONS.md,
    session 10)."""
    n = len(contenders)
    shift = (r // 2) % n
    order = list(contenders[shift:] + contenders[:shift])
    return order[::-1] if r % 2 else order


def run_benchmark(bench: Benchmark, progress: Progress) -> BenchResult:
    """All rounds of one benchmark; errors are recorded in the result."""
    result = bench.new_result()
    began = time.monotonic()
    result.skipped = bench.missing()
    if result.skipped:
        progress.note(f"== {bench.name}: skipped ({result.skipped})")
        return result
    rounds = bench.rounds()
    progress.note(f"== {bench.name}: {bench.title}, {rounds} round(s)")
    measured = 0
    try:
        with bench.environment() as env:
            for r in range(rounds):
                for contender in round_order(bench.contenders, r):
                    label = f"{bench.name} round {r + 1}/{rounds} {contender}"
                    progress.begin(label)
                    measured += 1
                    try:
                        values = bench.measure(env, contender, r)
                    except Exception as error:  # one failed measurement does not end the run
                        result.errors.append(f"round {r + 1} {contender}: {error}")
                        progress.finish(label, str(error).splitlines()[0][:200], failed=True)
                        continue
                    result.record(r, contender, values)
                    progress.finish(label, fmt_values(values, bench.metrics))
                bench.after_round(result, r)
    except Exception as error:  # the environment could not be set up (or torn down)
        result.errors.append(f"setup: {error}")
        progress.note(f"{bench.name}: FAILED: {error}")
        progress.note(traceback.format_exc(limit=6))
        progress.done_count += rounds * len(bench.contenders) - measured  # keep the count honest
    result.commands, result.notes = bench.commands, bench.notes
    result.seconds = time.monotonic() - began
    return result


# The benchmarks that can run a baseline Warren: those whose contenders are started by
# contenders.start() alone, and failover (its own start in namespaces knows "baseline").
_BASELINE_READY = ("requests", "connrate", "bulk", "amqp_connrate", "amqp", "tls_amqp", "storm", "storm_limited",
                   "failover")


def with_baseline(benches: list[Benchmark], checkout: Path) -> None:
    """Adds the contender "baseline" (Warren from `checkout`) after "warren"."""
    if not (checkout / "proxy" / "__main__.py").is_file():
        raise SystemExit(f"--baseline {checkout}: not a Warren checkout (no proxy/__main__.py)")
    C.BASELINE = checkout.resolve()
    for bench in benches:
        if bench.name in _BASELINE_READY and "warren" in bench.contenders:
            bench.contenders = (*bench.contenders, "baseline")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    mode = Mode("smoke" if args.smoke else "quick" if args.quick else "full", rounds=args.rounds)
    raise_nofile_limit()
    # The RabbitMQ helpers log every node start and stop; the progress
    # display says what matters.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    signal.signal(signal.SIGTERM, _interrupt)
    progress = Progress()
    started = datetime.datetime.now(datetime.timezone.utc)
    began = time.monotonic()
    load_at_start = report.load_average()
    lab = Lab(mode, args.workdir, progress)
    lab.cases = tuple(args.case)
    results: list[BenchResult] = []
    try:
        benches = [cls(lab) for cls in ALL if not args.only or cls.name in args.only]
        if args.baseline:
            with_baseline(benches, args.baseline)
        runnable = [b for b in benches if b.missing() is None]
        progress.total = sum(b.rounds() * len(b.contenders) for b in runnable)
        if mode.name == "smoke" and any(b.needs_rabbit for b in runnable):
            lab.start_rabbit_in_background()  # overlaps the nodes' start-up with the rest
        progress.note(f"warren bench: {mode.name} run, {len(runnable)} benchmark(s), "
                      f"{progress.total} measurements; work directory {lab.workdir}")
        for bench in benches:
            results.append(run_benchmark(bench, progress))
    except KeyboardInterrupt:
        progress.note("interrupted: stopping everything")
        return 130
    finally:
        stop_all()
        failed = any(r.errors for r in results)
        lab.close(keep_workdir=failed)
        if failed and lab.kept:
            progress.note(f"logs kept in {lab.workdir}")
    meta = {
        "command": report.command_line(argv),
        "mode": mode.name,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.monotonic() - began, 1),
        "machine": report.machine(),
        "versions": report.versions(),
    }
    meta["machine"]["load average at the start (1, 5, 15 min)"] = load_at_start
    write = merge.write_merged if args.merge else report.write_all
    for path in write(args.out_dir, results, meta):
        progress.note(f"wrote {path}")
    for result, label, target, observed, verdict in report.target_rows(results):
        progress.note(f"  {result.name:9} {label:28} {target:18} {observed:>12}  {verdict.strip('*')}")
    incomplete = [r.name for r in results if not r.skipped and not r.rounds]
    return 1 if incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
