"""Polling with a deadline: the one way tests wait for a condition they cannot await.

Prefer an event when the code under test offers one (a log line read as it
comes, `trio.Event`, a process exit); poll only what has no event: another
process's state, a kernel table, a counter.
"""

from __future__ import annotations

import inspect
import time
from typing import Awaitable, Callable, TypeVar, Union

import trio

T = TypeVar("T")


async def wait_until(
    predicate: Callable[[], Union[T, Awaitable[T]]],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str | None = None,
) -> T:
    """Calls ``predicate()`` every ``interval`` seconds until it returns a truthy
    value, and returns that value.

    ``predicate`` may be a plain function or return an awaitable (an async
    check such as reading a kernel table through ``trio.run_process``).
    ``interval=0`` polls at every scheduling point. Time is trio's clock, so
    under a ``MockClock`` the deadline is virtual like everything else.

    Raises AssertionError naming ``what`` (default: the predicate) and the last
    value seen once ``timeout`` seconds have passed; an async predicate still
    running at the deadline is cancelled.
    """
    last: object = None
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
            await trio.sleep(interval)
    raise _too_late(predicate, timeout, what, last)


def wait_until_blocking(
    predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.01, what: str | None = None,
) -> T:
    """`wait_until` for code outside trio (a plain test or fixture): the same
    contract, sleeping the thread between calls of a plain ``predicate``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise _too_late(predicate, timeout, what, value)
        time.sleep(interval)
    return value


def _too_late(predicate: Callable, timeout: float, what: str | None, last: object) -> AssertionError:
    described = what or getattr(predicate, "__qualname__", repr(predicate))
    return AssertionError(f"not {described} within {timeout} s (last value: {last!r})")
