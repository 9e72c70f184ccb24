"""Durations as operators write them: ``"500ms"``, ``"2s"``, ``"1m30s"``, ``2000``.

A string needs a unit on every number (us, ms, s, m, h, d); decimals are
allowed (``"1.5s"``) and parts add up (``"1m30s"``). A bare integer means
milliseconds, because that is what HAProxy's ``inter 2000`` means and operators
copy such numbers over. Results are float seconds.
"""

from __future__ import annotations

import math
import re

UNITS: dict[str, float] = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h|d)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:us|ms|s|m|h|d))+")
_EXAMPLES = '"500ms", "2s", "1.5s" or "1m30s"'


def parse_duration(value: object) -> float:
    """Return ``value`` in seconds (>= 0).

    Accepts a string such as ``"500ms"`` or ``"1m30s"``, or a non-negative
    integer meaning milliseconds. Raises ValueError with a message fit for an
    operator for anything else: booleans, floats, negative numbers, unitless
    strings, unknown units.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a duration such as {_EXAMPLES}, or integer milliseconds")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return value / 1000
    return _parse_duration_text(value)


def _parse_duration_text(text: str) -> float:
    compact = text.strip()
    if compact.startswith("-"):
        raise ValueError(f'a duration cannot be negative, got "{text}"')
    if re.fullmatch(r"\d+(?:\.\d+)?", compact):
        raise ValueError(
            f'missing unit in "{text}": write "{compact}ms" or "{compact}s" '
            f"(a bare integer without quotes means milliseconds)"
        )
    if not _WHOLE.fullmatch(compact):
        raise ValueError(f'expected a duration such as {_EXAMPLES}, got "{text}"')
    total = sum(float(number) * UNITS[unit] for number, unit in _PART.findall(compact))
    if not math.isfinite(total):
        raise ValueError(f'duration "{text}" is too large')
    return total


def format_duration(seconds: float | None) -> str:
    """Render seconds the way an operator would write them: ``"2s"``, ``"500ms"``, ``"1m30s"``.

    ``None`` (an optional duration that is off) renders as ``"off"``. The result
    parses back with :func:`parse_duration` to the same value (to the microsecond).
    Raises ValueError for negative or non-finite input.
    """
    if seconds is None:
        return "off"
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format duration {seconds!r}")
    micros = round(seconds * 1_000_000)
    if micros == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000)):
        count, micros = divmod(micros, size)
        if count:
            parts.append(f"{count}{unit}")
    if micros:
        parts.append(_format_below_a_minute(micros))
    return "".join(parts)


def _format_below_a_minute(micros: int) -> str:
    if micros % 1_000_000 == 0:
        return f"{micros // 1_000_000}s"
    if micros >= 1_000_000:
        whole, fraction = divmod(micros, 1_000_000)
        return f"{whole}.{fraction:06d}".rstrip("0") + "s"
    if micros % 1000 == 0:
        return f"{micros // 1000}ms"
    return f"{micros}us"
