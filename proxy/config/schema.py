"""A small declarative validator: parsed TOML in, model values or problems out.

A section of the file is described by a mapping of TOML key -> :class:`Field`;
a field's *kind* converts one value (checking type and range) and reports what
is wrong at its key path. Kinds compose: :func:`table` reads a sub-table and
hands the converted values to a builder (usually the model dataclass itself),
:func:`named_tables` reads ``[frontends.<name>]``-style maps and
:func:`array_of_tables` reads ``[[...servers]]``. Nothing stops at the first
problem: every kind reports what it finds and returns :data:`INVALID`, so one
run lists all problems in the file.

A kind is ``kind(value, at, report) -> converted value | INVALID``; the
simplest are plain functions ``value -> converted`` raising :class:`Invalid`,
wrapped by :func:`leaf`.
"""

from __future__ import annotations

import datetime
import difflib
import enum
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Path = tuple[str | int, ...]


class Invalid(ValueError):
    """A value is wrong; the message says why, in words an operator understands.

    ``at``: where below the value being built the problem is (a builder
    checking a nested key), relative to the value's own path.
    """

    def __init__(self, message: str, at: Path = ()):
        super().__init__(message)
        self.at = at


class _InvalidMarker:
    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _InvalidMarker()
"""Returned by a kind that has reported a problem; its parent reports nothing more about it."""


@dataclass
class Report:
    """Problems found so far, each a key path and a message."""

    issues: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, at: Path, message: str) -> None:
        self.issues.append((at, message))


Kind = Callable[[Any, Path, Report], Any]


@dataclass(frozen=True, slots=True)
class Field:
    kind: Kind
    required: bool = False
    attr: str | None = None  # the model attribute, when it differs from the TOML key


# --- describing values and paths --------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_path(path: Iterable[str | int]) -> str:
    """``("backends", "rabbit", "servers", 2, "port")`` -> ``backends.rabbit.servers[2].port``.

    Keys that are not bare TOML keys are quoted: ``backends."eu.rabbit".retries``.
    """
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            text += f".{key}" if text else key
    return text


def toml_type(value: object) -> str:
    """The TOML name of a parsed value's type."""
    if isinstance(value, bool):
        return "boolean"
    for python_type, name in (
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (dict, "table"),
        (datetime.datetime, "datetime"),
        (datetime.date, "date"),
        (datetime.time, "time"),
    ):
        if isinstance(value, python_type):
            return name
    return type(value).__name__


def toml_repr(value: object, limit: int = 40) -> str:
    """A short TOML-looking rendering of a value for messages."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, list):
        text = "[" + ", ".join(toml_repr(item, limit) for item in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k} = {toml_repr(v, limit)}" for k, v in value.items()) + "}"
    elif isinstance(value, (datetime.date, datetime.time)):
        text = value.isoformat()
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: object) -> str:
    """``string "10"``, ``boolean true``: how a message says what it got."""
    return f"{toml_type(value)} {toml_repr(value)}"


def suggestion(word: str, choices: Iterable[str]) -> str:
    """``'; did you mean "maxconn"?'`` when a close match exists, else ``''``."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f'; did you mean "{close[0]}"?' if close else ""


# --- leaf kinds -------------------------------------------------------------------


def leaf(convert: Callable[[Any], Any]) -> Kind:
    """Make a kind from ``convert(value) -> converted`` that raises Invalid."""

    def kind(value: Any, at: Path, report: Report) -> Any:
        try:
            return convert(value)
        except Invalid as error:
            report.add(at, str(error))
            return INVALID

    return kind


def expect_type(value: object, python_type: type | tuple[type, ...], name: str) -> None:
    """Raise Invalid unless ``value`` is of ``python_type``; booleans are never numbers."""
    if isinstance(value, bool) and python_type is not bool or not isinstance(value, python_type):
        raise Invalid(f"expected {name}, got {describe(value)}")


def check_range(value: float, low: float | None, high: float | None) -> None:
    """Raise Invalid unless ``low <= value <= high`` (a None bound is open)."""
    if low is not None and high is not None:
        if not low <= value <= high:
            raise Invalid(f"expected {low}-{high}, got {value}")
    elif low is not None and not value >= low:
        raise Invalid(f"expected at least {low}, got {value}")
    elif high is not None and not value <= high:
        raise Invalid(f"expected at most {high}, got {value}")


def integer(low: int | None = None, high: int | None = None) -> Kind:
    def convert(value: Any) -> int:
        expect_type(value, int, "integer")
        check_range(value, low, high)
        return value

    return leaf(convert)


def number(low: float | None = None, high: float | None = None) -> Kind:
    """An integer or float, returned as float."""

    def convert(value: Any) -> float:
        expect_type(value, (int, float), "number")
        check_range(value, low, high)
        return float(value)

    return leaf(convert)


def boolean() -> Kind:
    def convert(value: Any) -> bool:
        expect_type(value, bool, "boolean")
        return value

    return leaf(convert)


def string(check: Callable[[str], Any] | None = None, *, empty: bool = False) -> Kind:
    """A string, optionally passed through ``check(text) -> converted`` (which raises Invalid)."""

    def convert(value: Any) -> Any:
        expect_type(value, str, "string")
        if not value and not empty:
            raise Invalid("expected a non-empty string")
        return check(value) if check else value

    return leaf(convert)


def choice(options: type[enum.Enum] | Iterable[str]) -> Kind:
    """One of a fixed set of strings; an enum class yields its members."""
    values = [member.value for member in options] if isinstance(options, type) else list(options)

    def convert(value: Any) -> Any:
        expect_type(value, str, "string")
        if value not in values:
            listed = ", ".join(f'"{option}"' for option in values)
            raise Invalid(f'expected one of {listed}, got "{value}"' + suggestion(value, values))
        return options(value) if isinstance(options, type) else value

    return leaf(convert)


# --- compound kinds ---------------------------------------------------------------


def one_or_many(element: Kind, *, what: str = "string") -> Kind:
    """A single value or a non-empty array of them; always yields a tuple."""

    def kind(value: Any, at: Path, report: Report) -> Any:
        if not isinstance(value, list):
            converted = element(value, at, report)
            return INVALID if converted is INVALID else (converted,)
        if not value:
            report.add(at, f"expected a {what} or a non-empty array of them")
            return INVALID
        return array(element)(value, at, report)

    return kind


def array(element: Kind, *, unique: bool = False, nonempty: bool = False) -> Kind:
    """An array converted element by element into a tuple; problems name ``key[i]``."""

    def kind(value: Any, at: Path, report: Report) -> Any:
        if not isinstance(value, list):
            report.add(at, f"expected array, got {describe(value)}")
            return INVALID
        if nonempty and not value:
            report.add(at, "expected a non-empty array")
            return INVALID
        items = [element(item, at + (index,), report) for index, item in enumerate(value)]
        ok = INVALID not in items
        if unique:
            ok = _report_duplicates(value, at, report) and ok
        return tuple(items) if ok else INVALID

    return kind


def _report_duplicates(values: list[Any], at: Path, report: Report) -> bool:
    first_seen: dict[str, int] = {}
    ok = True
    for index, value in enumerate(values):
        key = toml_repr(value, limit=1_000_000)
        if key in first_seen:
            earlier = format_path(at + (first_seen[key],))
            report.add(at + (index,), f"duplicate {toml_repr(value)} (already at {earlier})")
            ok = False
        else:
            first_seen[key] = index
    return ok


def mapping(value_kind: Kind, *, check_key: Callable[[str], None] | None = None) -> Kind:
    """A non-empty table of free-form keys -> values; yields a tuple of (key, value) pairs in file order."""

    def kind(value: Any, at: Path, report: Report) -> Any:
        if not isinstance(value, dict):
            report.add(at, f"expected table, got {describe(value)}")
            return INVALID
        if not value:
            report.add(at, "expected at least one entry")
            return INVALID
        pairs, ok = [], True
        for key, raw in value.items():
            if check_key and not _passes(check_key, key, at + (key,), report):
                ok = False
            converted = value_kind(raw, at + (key,), report)
            ok = ok and converted is not INVALID
            pairs.append((key, converted))
        return tuple(pairs) if ok else INVALID

    return kind


def table(fields: Mapping[str, Field], build: Callable[..., Any]) -> Kind:
    """A sub-table read against ``fields``; the values go to ``build(**values)``."""

    def kind(value: Any, at: Path, report: Report) -> Any:
        values = read_table(value, fields, at, report)
        return INVALID if values is INVALID else call_builder(build, values, at, report)

    return kind


def named_tables(fields: Mapping[str, Field], build: Callable[..., Any], *, check_name: Callable[[str], None]) -> Kind:
    """``[section.<name>]`` tables; each is built with ``build(name=<name>, **values)``; yields a tuple."""

    def kind(value: Any, at: Path, report: Report) -> Any:
        if not isinstance(value, dict):
            report.add(at, f"expected table, got {describe(value)}")
            return INVALID
        built, ok = [], True
        for name, entry in value.items():
            here = at + (name,)
            name_ok = _passes(check_name, name, here, report)
            values = read_table(entry, fields, here, report)
            if not name_ok or values is INVALID:
                ok = False
                continue
            built.append(call_builder(build, {"name": name, **values}, here, report))
        return tuple(built) if ok and INVALID not in built else INVALID

    return kind


def array_of_tables(
    fields: Mapping[str, Field], build: Callable[..., Any], *, unique: str | None = None, what: str = "entry"
) -> Kind:
    """``[[a.b]]`` or ``b = [{...}, ...]``: at least one table, each built with ``build(**values)``.

    With ``unique``, that key's value must differ between entries.
    """

    def kind(value: Any, at: Path, report: Report) -> Any:
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            report.add(at, f"expected array of tables, got {describe(value)}")
            return INVALID
        if not value:
            report.add(at, f"expected at least one {what}")
            return INVALID
        ok = _report_duplicate_keys(value, unique, what, at, report) if unique else True
        built = [table(fields, build)(item, at + (index,), report) for index, item in enumerate(value)]
        return tuple(built) if ok and INVALID not in built else INVALID

    return kind


def _report_duplicate_keys(items: list[dict], key: str, what: str, at: Path, report: Report) -> bool:
    first_seen: dict[Any, int] = {}
    ok = True
    for index, item in enumerate(items):
        value = item.get(key)
        if not isinstance(value, str):
            continue
        if value in first_seen:
            earlier = format_path(at + (first_seen[value],))
            report.add(at + (index, key), f'duplicate {what} {key} "{value}" (already used by {earlier})')
            ok = False
        else:
            first_seen[value] = index
    return ok


def read_table(value: Any, fields: Mapping[str, Field], at: Path, report: Report) -> Any:
    """Convert a table's keys per ``fields``: a dict of model attribute -> value, or INVALID.

    Reports unknown keys (with the closest valid key), missing required keys
    and whatever each field's kind reports. Absent optional keys are left out,
    so the model's defaults apply.
    """
    if not isinstance(value, dict):
        report.add(at, f"expected table, got {describe(value)}")
        return INVALID
    values: dict[str, Any] = {}
    ok = True
    for key, raw in value.items():
        spec = fields.get(key)
        if spec is None:
            report.add(at + (key,), "unknown key" + suggestion(key, fields))
            ok = False
            continue
        converted = spec.kind(raw, at + (key,), report)
        if converted is INVALID:
            ok = False
        else:
            values[spec.attr or key] = converted
    for key, spec in fields.items():
        if spec.required and key not in value:
            report.add(at + (key,), "missing required key")
            ok = False
    return values if ok else INVALID


def call_builder(build: Callable[..., Any], values: dict[str, Any], at: Path, report: Report) -> Any:
    """``build(**values)``; an Invalid it raises (a check across keys) is reported at ``at``."""
    try:
        return build(**values)
    except Invalid as error:
        report.add(at + error.at, str(error))
        return INVALID


def _passes(check: Callable[[str], None], value: str, at: Path, report: Report) -> bool:
    try:
        check(value)
    except Invalid as error:
        report.add(at, str(error))
        return False
    return True
