"""What happened to every directive of the imported files (sans-I/O).

Each :class:`Entry` is one line of the report ``warren import`` prints on
stderr: ``haproxy.cfg:12: approximated: balance static-rr: ...``. Secrets
(``stats auth`` passwords, keepalived's ``auth_pass``) are replaced by
``<hidden>`` in the directive shown, so the report can be pasted anywhere.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Status(enum.StrEnum):
    TRANSLATED = "translated"  # Warren does the same
    APPROXIMATED = "approximated"  # something close; the note says how and why
    IGNORED = "ignored"  # no meaning for Warren, or not supported; the note says why
    SUSPICIOUS = "suspicious"  # translated as written, but probably a mistake


HIDDEN = "<hidden>"
_SECRET_AFTER = frozenset({"auth_pass", "password", "insecure-password", "secret"})


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    line: int
    status: Status
    directive: str  # as written, secrets hidden
    note: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.status}: {self.directive}: {self.note}"


def shown(words: Iterable[str]) -> str:
    """The directive as the report shows it, with every secret replaced."""
    words = list(words)
    out: list[str] = []
    for index, word in enumerate(words):
        previous = words[index - 1] if index else ""
        if previous in _SECRET_AFTER:
            out.append(HIDDEN)
        elif words[:2] == ["stats", "auth"] and index == 2 and ":" in word:
            out.append(word.split(":", 1)[0] + ":" + HIDDEN)
        else:
            out.append(word)
    return " ".join(out)


class Notes:
    """Collects the entries of one input file; each line is accounted for once per distinct note."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: list[Entry] = []
        self._seen: set[tuple[int, Status, str]] = set()
        self.lines: set[int] = set()  # lines with at least one entry

    def add(self, status: Status, line: int, words: Iterable[str], note: str) -> None:
        key = (line, status, note)
        if key in self._seen:
            return  # a defaults line applied to several sections says the same thing once
        self._seen.add(key)
        self.lines.add(line)
        self.entries.append(Entry(self.path, line, status, shown(words), note))

    def translated(self, line: int, words: Iterable[str], note: str) -> None:
        self.add(Status.TRANSLATED, line, words, note)

    def approximated(self, line: int, words: Iterable[str], note: str) -> None:
        self.add(Status.APPROXIMATED, line, words, note)

    def ignored(self, line: int, words: Iterable[str], note: str) -> None:
        self.add(Status.IGNORED, line, words, note)

    def suspicious(self, line: int, words: Iterable[str], note: str) -> None:
        self.add(Status.SUSPICIOUS, line, words, note)


def sorted_entries(entries: Iterable[Entry]) -> list[Entry]:
    """By file (in the order given), then line; a line's entries keep their order."""
    entries = list(entries)
    files = list(dict.fromkeys(entry.path for entry in entries))
    return sorted(entries, key=lambda entry: (files.index(entry.path), entry.line))


def exit_status(entries: Iterable[Entry]) -> int:
    """0 when everything was translated, 2 when anything was approximated, ignored or suspicious."""
    return 0 if all(entry.status is Status.TRANSLATED for entry in entries) else 2


def summary(entries: Iterable[Entry]) -> str:
    counts = {status: 0 for status in Status}
    for entry in entries:
        counts[entry.status] += 1
    return ", ".join(f"{counts[status]} {status}" for status in Status)
