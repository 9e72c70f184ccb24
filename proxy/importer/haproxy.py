"""HAProxy's configuration file as a model: sections of tokenised lines (sans-I/O).

Parsing follows HAProxy 2.x's own rules: a line is split into words on
unescaped, unquoted blanks; ``#`` starts a comment; ``\\`` escapes the next
character; double and single quotes group words. A line that starts with a
section keyword (``global``, ``defaults``, ``frontend``...) opens that
section; every other line belongs to the section above it. Each proxy
section remembers the ``defaults`` section in force where it starts (HAProxy
applies the last one before it).

:func:`parse_haproxy` raises :class:`ImportParseError` naming the file and
line for what HAProxy itself would refuse to read (an unterminated quote, a
directive outside any section).
"""

from __future__ import annotations

from dataclasses import dataclass

SECTION_KEYWORDS = frozenset({
    "global", "defaults", "frontend", "backend", "listen", "resolvers", "peers", "userlist",
    "mailers", "program", "http-errors", "ring", "cache", "log-forward", "traces", "crt-store",
})  # fmt: skip
PROXY_KINDS = frozenset({"frontend", "backend", "listen"})


class ImportParseError(Exception):
    """An input file cannot be read as the configuration it should be."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path, self.line, self.message = path, line, message
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class Line:
    """One directive: its line number and its words (``words[0]`` is the keyword)."""

    number: int
    words: tuple[str, ...]

    @property
    def keyword(self) -> str:
        return self.words[0]

    @property
    def args(self) -> tuple[str, ...]:
        return self.words[1:]

    def starts(self, *words: str) -> bool:
        return self.words[: len(words)] == words

    def arg(self, index: int = 1) -> str:
        """``words[index]``, or "" when the line is shorter."""
        return self.words[index] if len(self.words) > index else ""


@dataclass(frozen=True, slots=True)
class Section:
    kind: str  # "global", "defaults", "frontend", ...
    name: str  # "" when the section has none (global, anonymous defaults)
    line: int
    lines: tuple[Line, ...]
    defaults: Section | None = None  # the defaults section in force (proxy sections)

    def find(self, *words: str) -> list[Line]:
        """Directives of this section starting with ``words``."""
        return [line for line in self.lines if line.starts(*words)]

    def last(self, *words: str) -> Line | None:
        """The last directive starting with ``words`` here, else in the defaults in force."""
        found = self.find(*words)
        if found:
            return found[-1]
        return self.defaults.last(*words) if self.defaults is not None else None


@dataclass(frozen=True, slots=True)
class HaproxyFile:
    path: str
    sections: tuple[Section, ...]

    def of_kind(self, *kinds: str) -> list[Section]:
        return [section for section in self.sections if section.kind in kinds]


def parse_haproxy(text: str, path: str) -> HaproxyFile:
    """The sections of ``text``; raises ImportParseError with the line."""
    sections: list[Section] = []
    current: tuple[str, str, int, list[Line]] | None = None
    defaults: Section | None = None

    def close() -> None:
        nonlocal defaults
        if current is None:
            return
        kind, name, number, lines = current
        in_force = defaults if kind in PROXY_KINDS else None
        section = Section(kind, name, number, tuple(lines), in_force)
        sections.append(section)
        if kind == "defaults":
            defaults = section

    for number, raw in enumerate(text.splitlines(), 1):
        words = split_words(raw, path, number)
        if not words:
            continue
        if words[0] in SECTION_KEYWORDS:
            close()
            current = (words[0], words[1] if len(words) > 1 else "", number, [])
            continue
        if current is None:
            raise ImportParseError(path, number, f'"{words[0]}" outside of any section')
        current[3].append(Line(number, tuple(words)))
    close()
    return HaproxyFile(path, tuple(sections))


def split_words(raw: str, path: str, number: int) -> list[str]:
    """HAProxy's word splitting of one line (quotes, backslash escapes, comments)."""
    words: list[str] = []
    word: list[str] = []
    in_word = False
    quote = ""
    chars = iter(raw)
    for ch in chars:
        if quote:
            if ch == quote:
                quote = ""
            elif ch == "\\" and quote == '"':
                word.append(next(chars, "\\"))
            else:
                word.append(ch)
            continue
        if ch in "\"'":
            quote, in_word = ch, True
        elif ch == "\\":
            word.append(next(chars, "\\"))
            in_word = True
        elif ch == "#":
            break
        elif ch.isspace():
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
        else:
            word.append(ch)
            in_word = True
    if quote:
        raise ImportParseError(path, number, f"unterminated {quote} quote")
    if in_word:
        words.append("".join(word))
    return words


def parse_time(text: str, default_unit: str = "ms") -> float:
    """HAProxy's time format, a whole number with an optional unit (``2000``, ``2s``), in seconds.

    Raises ValueError for anything else. Units: us, ms, s, m, h, d.
    """
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    digits = len(text) - len(text.lstrip("0123456789"))
    number, unit = text[:digits], text[digits:] or default_unit
    if not number or unit not in units:
        raise ValueError(f'"{text}" is not a time (a number with an optional unit us, ms, s, m, h or d)')
    return int(number) * units[unit]
