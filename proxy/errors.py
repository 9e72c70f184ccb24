"""Errors shared across Warren's layers."""

from __future__ import annotations


class StartupError(Exception):
    """Warren (or one of its services) could not start; `problems` lists every
    reason, one line each, as the operator should read them."""

    def __init__(self, problems: list[str] | str):
        problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(problems))
        self.problems = problems
