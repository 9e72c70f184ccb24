"""Properties of the config loader: mutations of the shipped files give a Config or a ConfigError.

An operator's file is outside input too: whatever it holds (any value of
any TOML type at any key, keys removed or misspelt, text damaged so that it
is no longer TOML, bytes that are not UTF-8), `warren check` and a SIGHUP
get a valid Config or a ConfigError naming every problem with its key and a
line inside the file, never another exception.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
import tomllib
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from proxy.config import Config, ConfigError, load_config, parse_config
from proxy.runtime import Runtime
from proxy.stats_ui.metrics import render_metrics
from proxy.stats_ui.render_csv import render_csv
from proxy.stats_ui.render_json import render_json

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([ROOT / "conf" / "warren.toml", *(ROOT / "conf" / "examples").glob("*.toml")])
TEXTS = {path.name: path.read_text() for path in SHIPPED}


def check(text: str) -> Config | ConfigError:
    """The loader's contract on `text`; returns what it gave."""
    try:
        return parse_config(text, "conf/fuzzed.toml", runnable=True)
    except ConfigError as error:
        assert error.problems, "a ConfigError must name at least one problem"
        last_line = text.count("\n") + 1
        for problem in error.problems:
            assert problem.path == "conf/fuzzed.toml" and problem.message
            assert problem.line is None or 1 <= problem.line <= last_line, (problem, last_line)
            assert "\n" not in str(problem) or "\n" in problem.message
        return error


def test_the_shipped_files_are_valid():
    for name, text in TEXTS.items():
        assert isinstance(check(text), Config), name


# --- mutations of the document ---------------------------------------------------------

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**31, 2**63 - 1, -(2**63)]),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(["", "0", "0s", "5s", "1m30s", "-1s", "1.5s", "10", "99999999999999999999d", "1e3ms",
                     "127.0.0.1:5670", "[::1]:0", "*:1", ":5670", "host:99999", "rabbit", "none",
                     "scrypt$16384$8$1$AAAA$BBBB", "scrypt$", "v2", "roundrobin", "amqp", "/", "/ x"]),
    st.datetimes(), st.dates(), st.times(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)


def paths(node, prefix=()):
    """Every key path in a parsed document (tables, arrays and leaves)."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from paths(value, prefix + (index,))


def at(document, path):
    node = document
    for part in path:
        node = node[part]
    return node


@st.composite
def mutated_documents(draw):
    document = tomllib.loads(TEXTS[draw(st.sampled_from(sorted(TEXTS)))])
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(list(paths(document))[1:]))
        parent, key = at(document, where[:-1]), where[-1]
        operation = draw(st.sampled_from(["replace", "delete", "add", "rename", "duplicate"]))
        if operation == "replace":
            parent[key] = draw(toml_values)
        elif operation == "delete":
            del parent[key]
        elif operation == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(toml_values)
        elif operation == "rename" and isinstance(parent, dict):
            parent[str(key)[:-1] + draw(st.text(max_size=2))] = parent.pop(key)
        elif operation == "duplicate" and isinstance(parent, list):
            parent.append(parent[key])
    return document


# --- a TOML writer (the `toml` package's own fails on some strings) ----------------------


def dumps(document: dict) -> str:
    """TOML text for `document`: sub-tables as [headers], arrays of tables as [[headers]]."""
    lines: list[str] = []
    _table(document, (), lines)
    return "\n".join(lines) + "\n"


def _table(table: dict, prefix: tuple[str, ...], lines: list[str]) -> None:
    nested = {k: v for k, v in table.items() if _is_table(v) or _is_table_array(v)}
    for key, value in table.items():
        if key not in nested:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in nested.items():
        path = ".".join(_key(part) for part in prefix + (key,))
        if _is_table(value):
            lines.append(f"[{path}]")
            _table(value, prefix + (key,), lines)
        else:
            for item in value:
                lines.append(f"[[{path}]]")
                _table(item, prefix + (key,), lines)


def _is_table(value) -> bool:
    return isinstance(value, dict)


def _is_table_array(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _key(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else _string(key)


def _string(text: str) -> str:
    # JSON's escapes are TOML's, but for DEL, which TOML wants escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value) if isinstance(value, int) else _string(value)
    if isinstance(value, float):
        return "nan" if value != value else {math.inf: "inf", -math.inf: "-inf"}.get(value, repr(value))
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    return "[" + ", ".join(_value(item) for item in value) + "]"


def test_the_writer_round_trips_the_shipped_files():
    for text in TEXTS.values():
        document = tomllib.loads(text)
        assert tomllib.loads(dumps(document)) == document


@given(mutated_documents())
def test_any_mutated_document_loads_or_names_its_problems(document):
    text = dumps(document)
    result = check(text)
    if isinstance(result, Config):
        assert result.frontends, "a runnable config has a frontend"
        runs(result)


def runs(config: Config) -> None:
    """A valid Config is one Warren can build its live model from and show."""
    stats = Runtime(config).statistics()
    render_csv(stats)
    render_metrics(stats)
    render_json(stats)


# --- damaged text ------------------------------------------------------------------------

edits = st.lists(
    st.tuples(st.sampled_from(["insert", "delete", "replace", "swap-lines", "cut"]), st.integers(0, 10**6),
              st.text(alphabet=st.sampled_from(list('[]{}=,."\'#\n \\_-:0123456789abcxyzé\t$')) | st.characters(),
                      max_size=6)),
    min_size=1, max_size=6,
)


def damage(text: str, changes) -> str:
    for operation, position, fragment in changes:
        position %= len(text) + 1
        if operation == "insert":
            text = text[:position] + fragment + text[position:]
        elif operation == "delete":
            text = text[:position] + text[position + len(fragment) + 1:]
        elif operation == "replace":
            text = text[:position] + fragment + text[position + len(fragment):]
        elif operation == "swap-lines":
            lines = text.split("\n")
            i, j = position % len(lines), (position // 7) % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        else:
            text = text[:position]
    return text


@given(st.sampled_from(sorted(TEXTS)), edits)
def test_any_damaged_text_loads_or_names_its_problems(name, changes):
    check(damage(TEXTS[name], changes))


@given(st.sampled_from(sorted(TEXTS)), st.data())
def test_any_bytes_in_the_file_load_or_name_their_problems(name, data):
    raw = bytearray(TEXTS[name].encode())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "warren.toml")
        with open(path, "wb") as file:
            file.write(bytes(raw))
        try:
            load_config(path)
        except ConfigError as error:
            assert error.problems and all(problem.path == path for problem in error.problems)

