"""The shape of a benchmark module, and helpers they share.

A benchmark sets up an environment once (backends, usually the proxies too),
then the driver calls `measure(env, contender, round_index)` for each
contender in turn, round after round, and `after_round` to derive metrics
that need several contenders of the same round (e.g. latency added over the
direct connection).
"""

from __future__ import annotations

import shlex
import subprocess
from contextlib import contextmanager
from typing import Any, Iterator

from ..contenders import CONTENDERS
from ..contenders import missing as contender_missing
from ..lab import Lab
from ..model import BenchResult, Metric, Target
from ..procs import ProcessFailed, tool_missing


class MeasureError(RuntimeError):
    """A measurement ran but produced no usable number."""


class Benchmark:
    name: str = ""
    title: str = ""
    description: str = ""
    contenders: tuple[str, ...] = CONTENDERS
    metrics: tuple[Metric, ...] = ()
    targets: tuple[Target, ...] = ()
    tools: tuple[str, ...] = ()  # executables that must be on PATH
    python_modules: tuple[str, ...] = ()  # importable modules needed
    needs_rabbit: bool = False

    def __init__(self, lab: Lab):
        self.lab = lab
        self.mode = lab.mode
        self.commands: dict[str, str] = {}  # label -> one exact load command, for the report
        self.notes: list[str] = []

    def rounds(self) -> int:
        return self.mode.rounds or self.mode.pick(5, 3, 1)

    def missing(self) -> str | None:
        """Why this benchmark cannot run here (a tool is missing), or None."""
        for name in self.contenders:
            if reason := contender_missing(name):
                return reason
        if reason := tool_missing(*self.tools):
            return reason
        for module in self.python_modules:
            try:
                __import__(module)
            except ImportError:
                return f"Python module {module} is not installed (pip install -e '.[bench]')"
        if self.needs_rabbit:
            return self.lab.rabbit_missing()
        return None

    def new_result(self) -> BenchResult:
        return BenchResult(self.name, self.title, self.description, self.contenders, self.metrics,
                           self.targets)

    @contextmanager
    def environment(self) -> Iterator[Any]:
        yield None

    def measure(self, env: Any, contender: str, round_index: int) -> dict[str, float]:
        raise NotImplementedError

    def after_round(self, result: BenchResult, round_index: int) -> None:
        pass

    def remember(self, label: str, argv: list[str]) -> None:
        """Keeps the first command run under `label` (ports vary by contender)."""
        self.commands.setdefault(label, shlex.join(argv))


def run_tool(argv: list[str], timeout: float) -> str:
    """Runs a load tool to completion; stdout, or ProcessFailed with its output."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise ProcessFailed(f"{argv[0]} did not finish within {timeout:.0f}s") from error
    if done.returncode != 0:
        raise ProcessFailed(f"{shlex.join(argv)} exited {done.returncode}: "
                            f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def fmt_values(values: dict[str, float], metrics: tuple[Metric, ...]) -> str:
    """'label value unit, ...' for the progress line."""
    parts = []
    for metric in metrics:
        if metric.key in values:
            parts.append(f"{metric.label} {values[metric.key]:.{metric.digits}f} {metric.unit}")
    return ", ".join(parts)
