"""``warren import``: an existing haproxy.cfg (and keepalived.conf) as Warren's TOML.

The pure core is :func:`import_configs`: texts in, a :class:`ImportResult`
out (the TOML text, validated by Warren's own loader, and one report entry
per directive); it reads no file and draws no random number (passwords are
hashed by the ``hash_password`` it is given). :mod:`proxy.importer.command`
is the thin shell behind the command line.

Layers: :mod:`.haproxy` and :mod:`.keepalived` parse into models;
:mod:`.from_haproxy` (with :mod:`.haproxy_proxies`, :mod:`.haproxy_servers`,
:mod:`.haproxy_tls`, :mod:`.traps`) and :mod:`.from_keepalived` translate them into a
:class:`~.draft.Draft` and :class:`~.report.Entry` items; :mod:`.draft`
renders the TOML with tomlkit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import ConfigError, parse_config

from .context import HaproxyContext
from .draft import Draft, render
from .from_haproxy import translate_haproxy
from .from_keepalived import translate_keepalived
from .haproxy import ImportParseError, parse_haproxy
from .keepalived import parse_keepalived
from .report import Entry, Notes, Status, exit_status, sorted_entries, summary

__all__ = ["ImportParseError", "ImportResult", "Entry", "Status", "import_configs", "summary"]

DEFAULT_RUNTIME_DIR = "/run/warren"


@dataclass(frozen=True, slots=True)
class ImportResult:
    toml: str
    entries: tuple[Entry, ...]
    problems: tuple[str, ...] = ()  # Warren's loader refused the output (a translation the importer cannot make)

    @property
    def exit_status(self) -> int:
        """0: all translated; 1: no usable output; 2: valid output, some directives not translated as such."""
        return 1 if self.problems else exit_status(self.entries)


def import_configs(
    haproxy: tuple[str, str],
    keepalived: tuple[str, str] | None = None,
    *,
    hash_password: Callable[[str], str],
    runtime_dir: str = DEFAULT_RUNTIME_DIR,
    output_name: str = "warren.toml",
) -> ImportResult:
    """Translate ``(text, path)`` pairs. Raises ImportParseError for unreadable input."""
    haproxy_text, haproxy_path = haproxy
    cfg = parse_haproxy(haproxy_text, haproxy_path)
    nodes = parse_keepalived(*keepalived) if keepalived is not None else None
    draft = Draft()
    ctx = HaproxyContext(cfg, Notes(haproxy_path), draft, hash_password, runtime_dir)
    translate_haproxy(ctx)
    entries = list(ctx.notes.entries)
    sources = [haproxy_path]
    if nodes is not None and keepalived is not None:
        notes = Notes(keepalived[1])
        backends = [table.path[1] for table in draft.named("backends")]
        translate_keepalived(nodes, keepalived[1], notes, draft, ctx.frontends, backends)
        entries += notes.entries
        sources.append(keepalived[1])
    header = [
        f"Warren configuration imported from {' and '.join(sources)} by `warren import`.",
        "Each section names the line it came from; the import report lists every directive.",
        "Check it with `warren check <file>`; every key is described in docs/configuration.md.",
    ]
    text = render(draft, header)
    try:
        parse_config(text, output_name, runnable=True)  # as `warren check` and `warren run` load it
    except ConfigError as error:
        return ImportResult(text, tuple(sorted_entries(entries)), tuple(str(p) for p in error.problems))
    return ImportResult(text, tuple(sorted_entries(entries)))
