"""Idle limits from the negotiated AMQP heartbeat, sans-I/O.

AMQP peers send a heartbeat frame when they have sent nothing for the
negotiated interval h (RabbitMQ and its clients every h/2), and a peer that
has heard nothing for 2h considers the other dead (spec 4.2.7). Warren applies
the same rule to each side of the connection it relays: a side silent for
longer than :func:`dead_after` (2h and a second of scheduling slack) is gone,
and the connection is closed with ``cD`` or ``sD``. A live idle connection is
never cut, whatever h is; a connection that negotiated no heartbeat (h = 0)
gets the configured fallback instead (or no limit).
"""

from __future__ import annotations

from dataclasses import dataclass

HEARTBEAT_FACTOR = 2
SLACK = 1.0  # seconds: the peers' timers and ours are not in step


def dead_after(heartbeat: int | None) -> float | None:
    """Seconds of silence from one side after which it is dead; None without heartbeat."""
    if not heartbeat:
        return None
    return HEARTBEAT_FACTOR * heartbeat + SLACK


@dataclass(frozen=True, slots=True)
class IdleLimits:
    """The idle limits of an established connection (None: no limit)."""

    client: float | None
    server: float | None


def idle_limits(heartbeat: int | None, *, fallback: float | None, server: float | None) -> IdleLimits:
    """Limits for a connection that negotiated `heartbeat` (None: not AMQP, or not seen).

    `fallback` is the client-side limit without a heartbeat; `server` the
    backend's own server timeout, which wins when it is set (an operator's
    explicit choice), else the heartbeat rule applies to the broker's side too.
    """
    limit = dead_after(heartbeat)
    if limit is None:
        return IdleLimits(client=fallback, server=server)
    return IdleLimits(client=limit, server=server if server is not None else limit)
