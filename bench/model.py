"""What a benchmark measures and what Warren should reach: plain data, no I/O.

A benchmark has metrics (one number per contender per round) and targets
(Warren's median against HAProxy's or the direct connection's median, or
against a fixed bound). Rounds run the contenders alternately, so a slow spell
of a shared machine hits every contender; medians over rounds then give
honest ratios.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 2  # decimals shown in the report
    compared: bool = True  # False: context only (no ratio, not in the chart)


@dataclass(frozen=True)
class Target:
    """Warren's median `op` `value` x baseline's median (or `value` itself
    when baseline is None). op is ">=" or "<="."""

    metric: str
    op: str
    value: float
    baseline: str | None = "haproxy"
    contender: str = "warren"
    # Judged on this metric instead when the baseline's median is not positive
    # (a difference such as "latency added" means nothing once it is negative).
    fallback: str | None = None

    def describe(self) -> str:
        if self.baseline is None:
            return f"{self.op} {self.value:g}"
        return f"{self.op} {self.value:g}x {self.baseline}"

    def evaluate(self, medians: dict[str, float | None]) -> tuple[float | None, bool | None]:
        """(Warren/baseline ratio, or Warren's value for absolute targets; met?).
        Both None when a median is missing; the ratio alone is None when the
        baseline is not positive (the comparison is still made, by product)."""
        mine = medians.get(self.contender)
        if mine is None:
            return None, None
        if self.baseline is None:
            bound, observed = self.value, mine
        else:
            base = medians.get(self.baseline)
            if base is None:
                return None, None
            bound = self.value * base
            observed = mine / base if base > 0 else None
        met = mine >= bound if self.op == ">=" else mine <= bound
        return observed, met


@dataclass
class BenchResult:
    """Everything one benchmark produced in a run."""

    name: str
    title: str
    description: str
    contenders: tuple[str, ...]
    metrics: tuple[Metric, ...]
    targets: tuple[Target, ...]
    rounds: list[dict[str, dict[str, float]]] = field(default_factory=list)  # contender -> metric -> value
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None
    commands: dict[str, str] = field(default_factory=dict)  # label -> command
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, round_index: int, contender: str, values: dict[str, float]) -> None:
        while len(self.rounds) <= round_index:
            self.rounds.append({})
        self.rounds[round_index].setdefault(contender, {}).update(values)

    def samples(self, metric: str, contender: str) -> list[float]:
        return [r[contender][metric] for r in self.rounds
                if contender in r and r[contender].get(metric) is not None]

    def median(self, metric: str, contender: str) -> float | None:
        values = self.samples(metric, contender)
        return statistics.median(values) if values else None

    def medians(self, metric: str) -> dict[str, float | None]:
        return {c: self.median(metric, c) for c in self.contenders_of(metric)}

    def contenders_of(self, metric: str) -> tuple[str, ...]:
        """The contenders that produced `metric` in some round, in the
        benchmark's order (added latency, for one, has no direct value)."""
        seen = {c for r in self.rounds for c, values in r.items() if metric in values}
        return tuple(c for c in self.contenders if c in seen)

    def judge(self, target: Target) -> tuple[Target, float | None, bool | None]:
        """(the target actually judged, observed, met): `target`, or its
        fallback when the baseline's median of its metric is not positive."""
        base = self.medians(target.metric).get(target.baseline) if target.baseline else None
        if target.fallback is not None and base is not None and base <= 0:
            target = replace(target, metric=target.fallback, fallback=None)
        return (target, *target.evaluate(self.medians(target.metric)))

    def round_count(self, metric: str) -> int:
        """Rounds in which every contender of `metric` produced it."""
        names = self.contenders_of(metric)
        return sum(1 for r in self.rounds if names and all(metric in r.get(c, {}) for c in names))


def add_difference(result: BenchResult, round_index: int, metric: str, new_metric: str,
                   baseline: str = "direct") -> None:
    """Per round: new_metric = metric - baseline's metric, for every other
    contender (e.g. latency added by a proxy over the direct connection)."""
    if round_index >= len(result.rounds):
        return
    row = result.rounds[round_index]
    base = row.get(baseline, {}).get(metric)
    if base is None:
        return
    for contender, values in row.items():
        if contender != baseline and values.get(metric) is not None:
            values[new_metric] = values[metric] - base
