"""Faults injected into one named function, for supervision tests.

In-process, with pytest's monkeypatch (undone after the test)::

    fault = Fault(on=3).patch(monkeypatch, checker, "check_tcp")

In a real `warren run` process (nothing in Warren knows about it)::

    python -m tests.faults proxy.health.checker:check_tcp 3 run CONFIG

replaces the function, then runs Warren's command line with the remaining
arguments. Calls number ``on`` (1-based; several with ``3,5``) raise
:class:`InjectedFault`; every other call goes to the real function.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


class Fault:
    """``on``: which calls fail (1-based); ``when``: count only the calls whose arguments it accepts."""

    def __init__(self, on: int | Iterable[int], *, when: Callable[..., bool] | None = None) -> None:
        self.on = {on} if isinstance(on, int) else set(on)
        self.when = when
        self.calls = 0
        self.raised = 0

    def _next(self, *args, **kwargs) -> None:
        if self.when is not None and not self.when(*args, **kwargs):
            return
        self.calls += 1
        if self.calls in self.on:
            self.raised += 1
            raise InjectedFault(f"injected fault (call {self.calls})")

    def patch(self, monkeypatch, owner: object, name: str) -> Fault:
        """Puts the faulty ``owner.name`` in place for one test."""
        monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))
        return self

    def wrap(self, function: Callable) -> Callable:
        if inspect.iscoroutinefunction(function):
            @functools.wraps(function)
            async def faulty_async(*args, **kwargs):
                self._next(*args, **kwargs)
                return await function(*args, **kwargs)

            return faulty_async

        @functools.wraps(function)
        def faulty(*args, **kwargs):
            self._next(*args, **kwargs)
            return function(*args, **kwargs)

        return faulty


def inject(target: str, on: int | Iterable[int]) -> Fault:
    """Replaces ``package.module:attribute`` (or ``module:Class.method``) for good."""
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    fault = Fault(on)
    setattr(owner, name, fault.wrap(getattr(owner, name)))
    return fault


def main(argv: list[str]) -> int:
    target, calls, *warren_args = argv
    inject(target, [int(n) for n in calls.split(",")])
    from proxy.cli import main as warren

    return warren(warren_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
