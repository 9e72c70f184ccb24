"""Load Warren's TOML configuration into the frozen model, or explain every problem.

The contract for messages (docs/configuration.md, "Errors"): one line per
problem, ``<file>:<line>: <key path>: <message>``, for example::

    conf/warren.toml:12: backends.rabbit.servers[2].port: expected 1-65535, got 70000

``:<line>`` is left out when no line is known, and ``<key path>: `` when the
problem concerns the whole file (unreadable, not TOML). All problems are found
in one pass and reported together, sorted by line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass

from .locate import key_lines, nearest_line
from .model import Config
from .schema import INVALID, Report, format_path
from .sections import ADVICE, build_config


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration file."""

    path: str  # the file
    key: str  # "backends.rabbit.servers[2].port"; "" for the file as a whole
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self._where()}: {self.key}: {self.message}" if self.key else f"{self._where()}: {self.message}"

    def as_warning(self) -> str:
        """``<file>:<line>: warning: <key>: <message>``: a valid file's advice."""
        return f"{self._where()}: warning: {self.key}: {self.message}"

    def _where(self) -> str:
        return self.path if self.line is None else f"{self.path}:{self.line}"


class ConfigError(Exception):
    """The file cannot be used; ``problems`` lists every reason, ``str()`` one line each."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the file at ``path``. Raises ConfigError."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ConfigError([Problem(name, "", None, f"cannot read: {error.strerror}")]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        message = f"cannot read: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start})"
        raise ConfigError([Problem(name, "", None, message)]) from None
    return parse_config(text, name, runnable=True)


def parse_config(text: str, path: str, *, runnable: bool = False) -> Config:
    """Validate TOML ``text``; ``path`` names the file in messages and in ``Config.path``.

    Raises ConfigError listing every problem; what is valid but worth a
    warning is in ``Config.warnings``. ``runnable`` (what
    :func:`load_config` asks for every file Warren runs, checks or reloads)
    also refuses a configuration without any frontend: an empty or
    half-written file must never close every front port.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        problem = Problem(path, "", syntax_error_line(str(error), text), f"invalid TOML: {error}")
        raise ConfigError([problem]) from None
    report = Report()
    config = build_config(document, path, report, runnable=runnable)
    if config is INVALID:
        raise ConfigError(_problems(report, text, path))
    advice = Report()
    for advise in ADVICE:
        advise(document, advice)
    if advice.issues:
        config = dataclasses.replace(config, warnings=tuple(p.as_warning() for p in _problems(advice, text, path)))
    return config


def locate_problems(path: str, issues: list[tuple[tuple[str | int, ...], str]],
                    text: str | None = None) -> list[Problem]:
    """Problems found after loading (TLS files, ...) at their keys and lines in `text`, or in the file at `path`."""
    if text is None:
        try:
            with open(path, encoding="utf-8-sig") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError):
            text = ""
    report = Report(list(issues))
    return _problems(report, text, path)


def syntax_error_line(message: str, text: str) -> int | None:
    """The line tomllib names in ``message``: "(at line 3, column 5)" or "(at end of document)"."""
    found = re.search(r"\(at line (\d+), column \d+\)", message)
    if found:
        return int(found.group(1))
    if "(at end of document)" in message:
        return max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
    return None


def _problems(report: Report, text: str, path: str) -> list[Problem]:
    lines = key_lines(text)
    problems = [Problem(path, format_path(at), nearest_line(lines, at), message) for at, message in report.issues]
    # Sorted by line so the list reads like the file; stable, so one line's problems keep their order.
    return sorted(problems, key=lambda problem: (problem.line is None, problem.line or 0))
