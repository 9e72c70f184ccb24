"""Small server-rendered SVG line charts, inlined in the page (no JavaScript).

A chart is a fixed-size SVG with one polyline per series; the x axis is the
sample index, right-aligned so the newest sample is at the right edge and a
young history grows from the right. The y axis starts at 0 and ends at a
"nice" maximum (1, 2 or 5 times a power of ten) printed in the corner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    values: Sequence[float]
    css_class: str  # colours live in the page's stylesheet


def nice_ceiling(value: float) -> float:
    """The smallest 1/2/5 x 10^k at or above `value` (at least 1)."""
    if value <= 1:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    raise AssertionError("unreachable")


def line_chart(title: str, series: Sequence[Series], *, capacity: int, span: str,
               fmt: Callable[[float], str] = lambda v: f"{v:g}", width: int = 360, height: int = 72) -> str:
    """An inline ``<svg>`` element; every text in it is escaped."""
    peak = nice_ceiling(max((max(s.values, default=0) for s in series), default=0))
    top, bottom = 14, height - 2
    step = width / max(1, capacity - 1)
    parts = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(title)}"><title>{escape(title)} over the last {escape(span)}</title>',
        f'<rect class="plot" x="0" y="{top}" width="{width}" height="{bottom - top}"/>',
        f'<line class="grid" x1="0" x2="{width}" y1="{(top + bottom) / 2:.1f}" y2="{(top + bottom) / 2:.1f}"/>',
    ]
    for line in series:
        points = _points(line.values, peak, width, step, top, bottom)
        if points:
            parts.append(f'<polyline class="{escape(line.css_class)}" points="{points}"/>')
    legend = " · ".join(f"{s.label} {fmt(s.values[-1]) if s.values else '-'}" for s in series)
    parts.append(f'<text class="label" x="3" y="10">{escape(title)}: {escape(legend)}</text>')
    parts.append(f'<text class="scale" x="{width - 3}" y="10" text-anchor="end">max {escape(fmt(peak))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _points(values: Sequence[float], peak: float, width: int, step: float, top: float, bottom: float) -> str:
    count = len(values)
    if count == 0:
        return ""
    scale = (bottom - top) / peak
    coords = []
    for index, value in enumerate(values):
        x = width - (count - 1 - index) * step
        y = bottom - max(0.0, min(value, peak)) * scale
        coords.append(f"{x:.1f},{y:.1f}")
    if count == 1:  # a single sample still shows as a short flat segment
        coords.insert(0, f"{max(0.0, width - step):.1f},{coords[0].split(',')[1]}")
    return " ".join(coords)
