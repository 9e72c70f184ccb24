"""The Warren configuration being built by the translators, and its TOML text.

A :class:`Draft` is a list of tables (``[backends.rabbit]``, ``[vip.front]``),
each with the source line it came from; :func:`render` writes it with tomlkit,
so the file is real TOML with a comment naming ``file:line`` above every
translated section and server. Sub-tables are plain dicts; an array of tables
(the servers) is a list of :class:`Item`, each with its own source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tomlkit
from tomlkit.items import Table as TomlTable


@dataclass
class Item:
    """One element of an array of tables (a server), with its source comment."""

    source: str
    values: dict[str, Any]


@dataclass
class Table:
    path: tuple[str, ...]
    source: str  # "haproxy.cfg:20: backend rabbit"
    values: dict[str, Any] = field(default_factory=dict)

    def sub(self, key: str) -> dict[str, Any]:
        """The sub-table ``key`` (``timeout``, ``health``...), created empty when new."""
        return self.values.setdefault(key, {})


@dataclass
class Draft:
    tables: list[Table] = field(default_factory=list)

    def table(self, path: tuple[str, ...], source: str) -> Table:
        """The table at ``path``; created (with ``source``) on first use."""
        for table in self.tables:
            if table.path == path:
                return table
        table = Table(path, source)
        self.tables.append(table)
        return table

    def new(self, path: tuple[str, ...], source: str) -> Table:
        """A new table at ``path``. Named sections (a frontend, a backend, a VIP) get their
        own table each; two at one path would merge silently, so that is a bug here."""
        if self.find(path) is not None:
            raise ValueError(f"importer bug: two sections translated to [{'.'.join(path)}]")
        table = Table(path, source)
        self.tables.append(table)
        return table

    def find(self, path: tuple[str, ...]) -> Table | None:
        return next((table for table in self.tables if table.path == path), None)

    def named(self, kind: str) -> list[Table]:
        """The ``[kind.<name>]`` tables, in order."""
        return [table for table in self.tables if len(table.path) == 2 and table.path[0] == kind]


def render(draft: Draft, header: list[str]) -> str:
    document = tomlkit.document()
    for line in header:
        document.add(tomlkit.comment(_printable(line)))
    for table in draft.tables:
        document.add(tomlkit.nl())
        parent: Any = document
        for key in table.path[:-1]:
            if key not in parent:
                parent.add(key, tomlkit.table(is_super_table=True))
            parent = parent[key]
        parent.add(table.path[-1], _table(table.source, table.values))
    return tomlkit.dumps(document)


def _table(source: str, values: dict[str, Any]) -> TomlTable:
    result = tomlkit.table()
    if source:
        result.add(tomlkit.comment(_printable(source)))
    # Plain values first, then sub-tables, then arrays of tables: TOML needs the
    # plain keys of a table before its first sub-table header.
    for key, value in sorted(values.items(), key=lambda kv: _rank(kv[1])):
        if isinstance(value, dict):
            result.add(key, _table("", value))
        elif _rank(value) == 2:
            array = tomlkit.aot()
            for item in value:
                array.append(_table(item.source, item.values))
            result.add(key, array)
        else:
            result.add(key, value)
    return result


def _printable(text: str) -> str:
    """``text`` for a TOML comment, which may not hold control characters: those
    (a stray backspace in a haproxy.cfg line) are written as escapes (``\\x08``)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\t" else ascii(ch)[1:-1] for ch in text)


def _rank(value: Any) -> int:
    if isinstance(value, dict):
        return 1
    if isinstance(value, list) and value and isinstance(value[0], Item):
        return 2
    return 0
