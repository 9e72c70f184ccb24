"""keepalived's configuration file as a tree of statements (sans-I/O).

keepalived reads words separated by blanks; ``#`` and ``!`` start comments;
double quotes group words (``script "killall -0 haproxy"``); ``{`` opens a
block that ``}`` closes, on the same line or later ones
(``unicast_peer { 10.0.0.2 }``). Each statement becomes a :class:`Node`: its
words and, for a block, its children (one per line inside it, so
``virtual_ipaddress`` entries are nodes too).

:func:`parse_keepalived` raises ImportParseError with the line of an
unbalanced brace or an unterminated quote.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .haproxy import ImportParseError


@dataclass(frozen=True, slots=True)
class Node:
    line: int
    words: tuple[str, ...]
    children: tuple[Node, ...] | None = None  # None: not a block

    @property
    def keyword(self) -> str:
        return self.words[0] if self.words else ""

    @property
    def args(self) -> tuple[str, ...]:
        return self.words[1:]

    def find(self, keyword: str) -> list[Node]:
        return [child for child in self.children or () if child.keyword == keyword]

    def first(self, keyword: str) -> Node | None:
        found = self.find(keyword)
        return found[0] if found else None


_OPEN, _CLOSE, _END = object(), object(), object()


def parse_keepalived(text: str, path: str) -> tuple[Node, ...]:
    """The top-level statements of ``text``."""
    tokens = list(_tokens(text, path))
    nodes, position, closed_at = _statements(tokens, 0, path)
    if closed_at is not None:
        raise ImportParseError(path, closed_at, 'unexpected "}" without a matching "{"')
    return tuple(nodes)


def _statements(tokens: list, position: int, path: str) -> tuple[list[Node], int, int | None]:
    """Statements from ``position`` up to a closing brace (its line returned) or the end."""
    nodes: list[Node] = []
    words: list[str] = []
    start = 0
    while position < len(tokens):
        line, token = tokens[position]
        position += 1
        if token is _OPEN:
            children, position, closed = _statements(tokens, position, path)
            if closed is None:
                raise ImportParseError(path, line, '"{" is never closed')
            nodes.append(Node(start if words else line, tuple(words), tuple(children)))
            words = []
        elif token is _CLOSE or token is _END:
            if words:
                nodes.append(Node(start, tuple(words)))
                words = []
            if token is _CLOSE:
                return nodes, position, line
        else:
            if not words:
                start = line
            words.append(token)
    if words:
        nodes.append(Node(start, tuple(words)))
    return nodes, position, None


def _tokens(text: str, path: str) -> Iterator[tuple[int, object]]:
    for number, raw in enumerate(text.splitlines(), 1):
        yield from ((number, token) for token in _line_tokens(raw, path, number))
        yield number, _END


def _line_tokens(raw: str, path: str, number: int) -> Iterator[object]:
    word: list[str] = []
    quoted = False
    in_word = False
    for ch in raw:
        if quoted:
            if ch == '"':
                quoted = False
            else:
                word.append(ch)
            continue
        if ch == '"':
            quoted = in_word = True
        elif ch in "#!" and not in_word:
            break
        elif ch.isspace() or ch in "{}":
            if in_word:
                yield "".join(word)
                word, in_word = [], False
            if ch == "{":
                yield _OPEN
            elif ch == "}":
                yield _CLOSE
        else:
            word.append(ch)
            in_word = True
    if quoted:
        raise ImportParseError(path, number, 'unterminated " quote')
    if in_word:
        yield "".join(word)
