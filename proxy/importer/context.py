"""What the HAProxy translators share: the input, the notes, the draft, and a few helpers."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.config.durations import format_duration

from .draft import Draft
from .haproxy import HaproxyFile, Line, Section, parse_time
from .haproxy_tls import TlsGlobals
from .report import Notes

AMQP_PORTS = frozenset({5670, 5671, 5672})
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True, slots=True)
class FrontendFacts:
    """What the keepalived translation needs to know of a translated frontend."""

    name: str
    hosts: tuple[str, ...]  # bind hosts ("0.0.0.0" for any)
    backend: str


@dataclass
class HaproxyContext:
    cfg: HaproxyFile
    notes: Notes
    draft: Draft
    hash_password: Callable[[str], str]
    runtime_dir: str
    global_maxconn: tuple[int, Line] | None = None
    spread: tuple[float, Line] | None = None
    frontends: list[FrontendFacts] = field(default_factory=list)
    tls: TlsGlobals = field(default_factory=TlsGlobals)
    frontend_names: UniqueNames = field(default_factory=lambda: UniqueNames(()))
    backend_names: dict[str, str] = field(default_factory=dict)  # section name -> Warren backend name

    def backend_name(self, section_name: str) -> str:
        return self.backend_names.get(section_name) or warren_name(section_name)

    def source(self, section: Section) -> str:
        title = f"{section.kind} {section.name}".strip()
        return f"{self.cfg.path}:{section.line}: {title}"


def warren_name(raw: str) -> str:
    """A name Warren accepts (1-64 of A-Z a-z 0-9 _ . -), as close to ``raw`` as possible."""
    return (_NAME_CHARS.sub("-", raw) or "unnamed")[:64]


class UniqueNames:
    """Warren names of one kind (frontends, backends), each given once.

    A section whose name Warren accepts as written keeps it: it is reserved
    from the start. A name Warren rewrites (``a?b`` as ``a-b``) or a name the
    importer makes up (``<name>-tls`` for a section's TLS listeners) that is
    already someone's gets ``-2``, ``-3``...
    """

    def __init__(self, section_names) -> None:
        self._reserved = {raw for raw in section_names if warren_name(raw) == raw}
        self._taken: set[str] = set()

    def own(self, raw: str) -> str:
        """The name of the section called ``raw``."""
        name = warren_name(raw)
        if name in self._taken or (name != raw and name in self._reserved):
            return self.new(name)
        self._taken.add(name)
        return name

    def new(self, wanted: str) -> str:
        """``wanted``, or a free variant if a section or an earlier name has it."""
        name, number = wanted, 2
        while name in self._taken or name in self._reserved:
            suffix = f"-{number}"
            name, number = wanted[: 64 - len(suffix)] + suffix, number + 1
        self._taken.add(name)
        return name


def taken_note(wanted: str, name: str) -> str | None:
    return None if wanted == name else f'"{wanted}" is taken by another section: written "{name}"'


def name_note(raw: str, name: str) -> str | None:
    return None if raw == name else f'name "{raw}" written "{name}" (Warren names use A-Z a-z 0-9 _ . -)'


def seconds(text: str) -> float:
    return parse_time(text)


def duration_text(value: float) -> str:
    return format_duration(value)


def time_value(ctx: HaproxyContext, line: Line, text: str) -> float | None:
    """``text`` in seconds, or None after reporting why it could not be read."""
    try:
        return parse_time(text)
    except ValueError as error:
        ctx.notes.ignored(line.number, line.words, f"{error}; left out")
        return None


def integer_value(ctx: HaproxyContext, line: Line, text: str, low: int = 0, high: int | None = None) -> int | None:
    """``text`` as an integer in range, or None after reporting why not."""
    try:
        value = int(text)
    except ValueError:
        ctx.notes.ignored(line.number, line.words, f'"{text}" is not an integer; left out')
        return None
    if value < low or (high is not None and value > high):
        limit = f"{low}-{high}" if high is not None else f">= {low}"
        ctx.notes.ignored(line.number, line.words, f"{value} is out of range ({limit}); left out")
        return None
    return value


def bind_text(host: str, port: int) -> str:
    if host in ("", "*", "0.0.0.0"):
        return f"*:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
