"""The one way tests wait for a condition: poll it with a deadline (never sleep to synchronise)."""

from __future__ import annotations

import time

import trio


async def wait_until(predicate, timeout: float, what: str, *, step: float = 0.01) -> float:
    """Polls `predicate` every `step` s; returns the seconds it took, or fails naming `what`."""
    started = time.monotonic()
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(step)
        return time.monotonic() - started
    raise AssertionError(f"not {what} within {timeout}s")
