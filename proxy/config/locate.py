"""Find the line where a key path is written in TOML source text.

``tomllib`` returns plain dicts without positions, so error messages get their
line numbers from this separate, forgiving scan of the text. It understands
what a configuration file uses: ``[table]`` and ``[[array.of.tables]]`` headers
(each ``[[...]]`` counts as the next index), ``key = value`` lines with bare,
quoted and dotted keys, inline tables and (possibly multi-line) arrays, whose
elements get their index: in ``servers = [ {...}, {...} ]`` the second ``{`` is
``servers[1]``. Strings and comments are skipped so brackets inside them do not
confuse it.

It is only a hint for messages: it never raises, and on input it does not
understand it returns what it found so far (or None).
"""

from __future__ import annotations

import string
from collections.abc import Sequence

Path = tuple[str | int, ...]

_BARE = frozenset(string.ascii_letters + string.digits + "_-")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def locate(text: str, path: Sequence[str | int]) -> int | None:
    """The 1-based line of ``path`` in ``text``, else of its nearest enclosing key, else None."""
    return nearest_line(key_lines(text), path)


def nearest_line(lines: dict[Path, int], path: Sequence[str | int]) -> int | None:
    """Look ``path`` up in a :func:`key_lines` map, falling back to ever shorter prefixes."""
    key = tuple(path)
    while key:
        if key in lines:
            return lines[key]
        key = key[:-1]
    return None


def key_lines(text: str) -> dict[Path, int]:
    """Map every key path written in ``text`` (and each of its prefixes) to its first line."""
    scanner = _Scanner(text)
    try:
        scanner.document()
    except Exception:  # noqa: BLE001 - a hint for messages must never hide the real error
        pass
    return scanner.lines


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: dict[Path, int] = {}
        self.arrays: dict[Path, int] = {}  # [[array]] path -> index of its latest element

    # --- structure ---

    def document(self) -> None:
        prefix: Path = ()
        while True:
            self.skip_blank(newlines=True)
            if self.at_end():
                return
            if self.peek() == "[":
                prefix = self.header()
            else:
                self.key_value(prefix)
            self.skip_line()

    def header(self) -> Path:
        line = self.line
        is_array = self.peek(1) == "["
        self.advance(2 if is_array else 1)
        parts = self.key()
        if not parts:
            return ()
        if is_array:
            array = self.resolve(parts[:-1]) + (parts[-1],)
            index = self.arrays.get(array, -1) + 1
            self.arrays[array] = index
            prefix = array + (index,)
        else:
            prefix = self.resolve(parts)
        self.record(prefix, line)
        return prefix

    def resolve(self, parts: Sequence[str]) -> Path:
        """``[a.b]`` after ``[[a]]`` means a table in the latest element of ``a``."""
        path: Path = ()
        for part in parts:
            path += (part,)
            if path in self.arrays:
                path += (self.arrays[path],)
        return path

    def key_value(self, prefix: Path) -> None:
        line = self.line
        parts = self.key()
        if not parts:
            return
        path = prefix + tuple(parts)
        self.record(path, line)
        self.skip_blank(newlines=False)
        if self.peek() == "=":
            self.advance()
            self.value(path)

    def value(self, path: Path) -> None:
        self.skip_blank(newlines=False)
        first = self.peek()
        if first == "{":
            self.inline_table(path)
        elif first == "[":
            self.array(path)
        elif first == '"':
            self.basic_string()
        elif first == "'":
            self.literal_string()
        else:
            while not self.at_end() and self.peek() not in ",]}\n#":
                self.advance()

    def inline_table(self, path: Path) -> None:
        self.advance()  # "{"
        while not self.at_end():
            self.skip_blank(newlines=True)
            if self.peek() == "}":
                self.advance()
                return
            before = self.pos
            if self.peek() == ",":
                self.advance()
            else:
                self.key_value(path)
            if self.pos == before:
                self.advance()  # something unexpected: step over it

    def array(self, path: Path) -> None:
        self.advance()  # "["
        index = 0
        while not self.at_end():
            self.skip_blank(newlines=True)
            if self.peek() == "]":
                self.advance()
                return
            before = self.pos
            if self.peek() == ",":
                self.advance()
            else:
                element = path + (index,)
                self.record(element, self.line)
                self.value(element)
                index += 1
            if self.pos == before:
                self.advance()

    def record(self, path: Path, line: int) -> None:
        for end in range(1, len(path) + 1):
            self.lines.setdefault(path[:end], line)

    # --- tokens ---

    def key(self) -> list[str]:
        """A bare, quoted or dotted key; an empty list if there is none here."""
        parts: list[str] = []
        while True:
            self.skip_blank(newlines=False)
            first = self.peek()
            if first == '"':
                parts.append(self.basic_string())
            elif first == "'":
                parts.append(self.literal_string())
            elif first and first in _BARE:
                start = self.pos
                while self.peek() and self.peek() in _BARE:
                    self.advance()
                parts.append(self.text[start : self.pos])
            else:
                return parts
            self.skip_blank(newlines=False)
            if self.peek() != ".":
                return parts
            self.advance()

    def basic_string(self) -> str:
        if self.text.startswith('"""', self.pos):
            self.advance(3)
            return self.until('"""', escapes=True, multiline=True)
        self.advance()
        return self.until('"', escapes=True, multiline=False)

    def literal_string(self) -> str:
        if self.text.startswith("'''", self.pos):
            self.advance(3)
            return self.until("'''", escapes=False, multiline=True)
        self.advance()
        return self.until("'", escapes=False, multiline=False)

    def until(self, close: str, *, escapes: bool, multiline: bool) -> str:
        chars: list[str] = []
        while not self.at_end():
            if self.text.startswith(close, self.pos):
                self.advance(len(close))
                return "".join(chars)
            char = self.peek()
            if char == "\n" and not multiline:
                break  # unterminated: stop at the end of the line
            if escapes and char == "\\":
                chars.append(self.escape())
            else:
                chars.append(char)
                self.advance()
        return "".join(chars)

    def escape(self) -> str:
        self.advance()  # the backslash
        char = self.peek()
        if char in ("u", "U"):
            width = 4 if char == "u" else 8
            digits = self.text[self.pos + 1 : self.pos + 1 + width]
            self.advance(1 + width)
            try:
                return chr(int(digits, 16))
            except ValueError:
                return ""
        self.advance()
        return _ESCAPES.get(char, "")

    def skip_blank(self, *, newlines: bool) -> None:
        while not self.at_end():
            char = self.peek()
            if char in " \t\r" or (newlines and char == "\n"):
                self.advance()
            elif char == "#":
                end = self.text.find("\n", self.pos)
                self.advance((len(self.text) if end < 0 else end) - self.pos)
                if not newlines:
                    return
            else:
                return

    def skip_line(self) -> None:
        end = self.text.find("\n", self.pos)
        self.advance((len(self.text) if end < 0 else end + 1) - self.pos)

    def peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def advance(self, count: int = 1) -> None:
        end = min(self.pos + max(count, 0), len(self.text))
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end
