"""The connections view: who is connected where, sortable, paged, bounded.

One query (:class:`ConnectionQuery`, from the page's query string or a ctl
command's words) selects and orders :class:`~proxy.runtime.ConnectionStats`
snapshots; three renderers show the page of rows: HTML (``<uri>;connections``),
JSON (``<uri>;connections.json``) and text (``warren ctl show sessions``).
At most :data:`PAGE_SIZE` rows are rendered whatever the number of
connections; nothing here holds a live object, and no secret exists to show.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import view
from .render_html import esc
from .style import STYLESHEET

PAGE_SIZE = 100
TEXT_LIMIT = 1000  # rows `warren ctl show sessions` prints at most
SORT_KEYS = ("age", "idle", "bytes_in", "bytes_out", "client", "name", "user", "vhost", "heartbeat", "server", "id")
_NUMERIC = frozenset({"age", "idle", "bytes_in", "bytes_out", "heartbeat", "id"})
COLUMNS = (
    ("id", "Conn"), ("client", "Client"), ("name", "Name"), ("user", "User"), ("vhost", "Vhost"),
    ("heartbeat", "Heartbeat"), ("age", "Age"), ("idle", "Idle"), ("bytes_in", "In"), ("bytes_out", "Out"),
    ("server", "Broker"),
)


class BadQuery(ValueError):
    """A query value out of range; the text says which."""


@dataclass(frozen=True, slots=True)
class ConnectionQuery:
    backend: str | None = None
    server: str | None = None
    frontend: str | None = None
    sort: str = "age"
    descending: bool = True
    page: int = 1

    @classmethod
    def from_params(cls, params: Mapping[str, Sequence[str]]) -> ConnectionQuery:
        """From a parsed query string; BadQuery for an unknown sort key or a bad page."""
        def one(name: str) -> str | None:
            values = params.get(name)
            return values[0][:200] if values else None

        sort = one("sort") or "age"
        if sort not in SORT_KEYS:
            raise BadQuery(f"sort must be one of {', '.join(SORT_KEYS)}")
        order = one("order") or "desc"
        if order not in ("asc", "desc"):
            raise BadQuery("order must be asc or desc")
        page = one("page") or "1"
        if not page.isascii() or not page.isdigit() or not 1 <= int(page[:9]) <= 10**6:
            raise BadQuery("page must be a number from 1")
        return cls(one("backend") or None, one("server") or None, one("frontend") or None, sort,
                   order == "desc", int(page))

    def params(self, **changes: Any) -> str:
        """This query as a query string, with `changes` applied."""
        values = {"backend": self.backend, "server": self.server, "frontend": self.frontend, "sort": self.sort,
                  "order": "desc" if self.descending else "asc", "page": self.page, **changes}
        from urllib.parse import urlencode

        return urlencode({k: v for k, v in values.items() if v not in (None, "")})


@dataclass(frozen=True, slots=True)
class ConnectionsPage:
    query: ConnectionQuery
    rows: tuple[Any, ...]
    total: int
    pages: int


def select(runtime: Any, query: ConnectionQuery, page_size: int = PAGE_SIZE) -> ConnectionsPage:
    found = runtime.connection_stats(query.backend, query.server, query.frontend)
    key = query.sort
    if key in _NUMERIC:
        found.sort(key=lambda c: (getattr(c, key) if getattr(c, key) is not None else -1, c.id),
                   reverse=query.descending)
    else:
        found.sort(key=lambda c: (str(getattr(c, key) or ""), c.id), reverse=query.descending)
    pages = max(1, math.ceil(len(found) / page_size))
    page = min(query.page, pages)
    start = (page - 1) * page_size
    return ConnectionsPage(query, tuple(found[start : start + page_size]), len(found), pages)


def _cell(connection: Any, key: str) -> str:
    value = getattr(connection, key)
    if key in ("age", "idle"):
        return view.human_duration(value)
    if key in ("bytes_in", "bytes_out"):
        return view.human_bytes(value)
    if key == "heartbeat":
        return "" if value is None else ("off" if value == 0 else f"{value}s")
    if key == "server":
        return f"{connection.backend}/{value}"
    if key == "name" and value is not None and connection.product and connection.product != value:
        return f"{value} ({connection.product})"
    return "" if value is None else str(value)


# -- renderers ---------------------------------------------------------------------------


def render_json(page: ConnectionsPage) -> str:
    rows = [
        {
            "id": c.id, "client": c.client, "frontend": c.frontend, "backend": c.backend, "server": c.server,
            "age": round(c.age, 3), "idle": round(c.idle, 3), "bytes": {"in": c.bytes_in, "out": c.bytes_out},
            "amqp": None if c.phase is None else {
                "phase": c.phase, "name": c.name, "product": c.product, "version": c.version,
                "user": c.user, "vhost": c.vhost, "heartbeat": c.heartbeat,
            },
        }
        for c in page.rows
    ]
    document = {"total": page.total, "page": min(page.query.page, page.pages), "pages": page.pages,
                "sort": page.query.sort, "order": "desc" if page.query.descending else "asc", "connections": rows}
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def render_text(page: ConnectionsPage) -> str:
    header = "# id client frontend backend/server age idle bytes_in bytes_out name user vhost heartbeat\n"
    lines = []
    for c in page.rows:
        fields = (c.id, c.client, c.frontend, f"{c.backend}/{c.server}", int(c.age), int(c.idle), c.bytes_in,
                  c.bytes_out, c.name, c.user, c.vhost, c.heartbeat)
        lines.append(" ".join(_word(v) for v in fields) + "\n")
    more = page.total - len(page.rows)
    tail = f"# {more} more not shown\n" if more > 0 else ""
    return header + "".join(lines) + tail


def _word(value: Any) -> str:
    """One space-free field (names may hold spaces): '-' for none."""
    if value is None or value == "":
        return "-"
    return "".join("_" if ch.isspace() else ch for ch in str(value))


def render_html(page: ConnectionsPage, uri: str) -> str:
    query = page.query
    where = " ".join(f"{k} {esc(v)}" for k, v in (("backend", query.backend), ("server", query.server),
                                                      ("frontend", query.frontend)) if v) or "all"
    head = []
    for key, label in COLUMNS:
        order = "asc" if key == query.sort and query.descending else "desc"
        mark = (" ▼" if query.descending else " ▲") if key == query.sort else ""
        head.append(f'<th><a href="{esc(uri)};connections?{esc(query.params(sort=key, order=order, page=1))}">'
                    f"{esc(label)}{mark}</a></th>")
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(_cell(c, key))}</td>" for key, _ in COLUMNS) + "</tr>" for c in page.rows
    )
    current = min(query.page, page.pages)
    links = []
    if current > 1:
        links.append(f'<a href="{esc(uri)};connections?{esc(query.params(page=current - 1))}">previous</a>')
    if current < page.pages:
        links.append(f'<a href="{esc(uri)};connections?{esc(query.params(page=current + 1))}">next</a>')
    json_link = f'<a href="{esc(uri)};connections.json?{esc(query.params())}">JSON</a>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Warren connections</title><style>{STYLESHEET}</style></head><body><main>"
        f'<header><h1>Connections <small>{where}</small></h1></header>'
        f'<nav><span><a href="{esc(uri)}">back to the statistics</a> · {json_link}</span>'
        f"<span>{page.total} connection(s) · page {current} of {page.pages} {' · '.join(links)}</span></nav>"
        f'<div class="scroll"><table class="proxy connections"><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>{rows}</tbody></table></div></main></body></html>\n"
    )
