"""Rebalancing backends: the service that applies :mod:`proxy.amqp.rebalance` plans.

Every backend with a ``[backends.<name>.rebalance]`` table is looked at every
``interval``; a backend an operator asked to rebalance ("rebalance now" on
the page or ``warren ctl rebalance backend B``) is looked at until it is
balanced, with the table's settings or the defaults. Either way closes go
through one token bucket per backend, so ``rate`` closes per second is a
bound no combination of automatic and manual runs exceeds.

A close is a kill with the note ``rebalanced``: the session drains what the
kernel holds for both sockets and closes them, so both sides get a FIN (no
reset) and the client reconnects through the balancer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
import trio

from ..config.model import Config, Rebalance
from ..runtime import BackendRuntime, KillReason, Runtime
from .admission import TokenBucket
from .rebalance import Plan, ServerLoad, plan

log = structlog.get_logger("warren.rebalance")

REBALANCED = "rebalanced"
DEFAULT = Rebalance()
TICK = 0.25  # how often the service wakes to see which backend is due


@dataclass(slots=True)
class RebalanceState:
    """A backend's rebalancing: its close budget, whether an operator asked, totals."""

    bucket: TokenBucket
    settings: Rebalance
    requested: bool = False  # "rebalance now": go on until balanced
    due: float = 0.0  # next look (monotonic)
    closed: int = 0
    last_excess: int = 0


def state_of(backend: BackendRuntime, now: float) -> RebalanceState:
    """The backend's state, made (or remade when its settings changed) on demand."""
    settings = backend.config.rebalance or DEFAULT
    state = backend.rebalance
    if state is None or state.settings != settings:
        rate = settings.rate
        previous = state
        state = RebalanceState(TokenBucket(rate, max(1.0, rate), now), settings)
        if previous is not None:
            state.requested, state.closed = previous.requested, previous.closed
        backend.rebalance = state
    return state


def loads(backend: BackendRuntime, now: float) -> list[ServerLoad]:
    return [
        ServerLoad(
            server.name, server.weight, server.available and not server.config.backup,
            tuple((conn.id, now - conn.started) for conn in server.connections if conn.kill_reason is None),
        )
        for server in backend.servers.values()
    ]


def rebalance(backend: BackendRuntime, now: float, *, dry_run: bool = False) -> Plan:
    """Plans, and unless `dry_run` closes, within the backend's close budget."""
    state = state_of(backend, now)
    settings = state.settings
    budget = 1_000_000 if dry_run else _tokens(state.bucket, now)
    result = plan(loads(backend, now), tolerance=settings.tolerance, min_age=settings.min_age, budget=budget)
    state.last_excess = result.excess
    if dry_run:
        return result
    if result.balanced:
        state.requested = False
        return result
    by_id = {conn.id: conn for server in backend.servers.values() for conn in server.connections}
    for move in result.moves:
        conn = by_id.get(move.conn_id)
        if conn is not None and state.bucket.reserve(now, 0.0) is not None:
            conn.kill(KillReason.KILLED, note=REBALANCED)
            state.closed += 1
    if result.moves:
        log.info("rebalance.closed", backend=backend.name, closed=len(result.moves), excess=result.excess,
                 counts=result.counts)
    return result


def request(backend: BackendRuntime, now: float) -> Plan:
    """"Rebalance now": a first round at once, then every interval until balanced."""
    state = state_of(backend, now)
    state.requested = True
    state.due = now + state.settings.interval
    return rebalance(backend, now)


def _tokens(bucket: TokenBucket, now: float) -> int:
    bucket.full(now)  # refills
    return max(0, int(bucket.tokens))


def describe(backend: str, result: Plan, *, dry_run: bool) -> str:
    """A one-line notice for the page or ctl."""
    if result.balanced:
        return f"{backend}: balanced " + _counts(result) + " (nothing to move)"
    movers: dict[str, int] = {}
    for move in result.moves:
        movers[move.server] = movers.get(move.server, 0) + 1
    moved = ", ".join(f"{name} {count}" for name, count in movers.items()) or "none old enough"
    verb = "would close" if dry_run else "closing"
    return (f"{backend}: {result.excess} connection(s) over their share {_counts(result)}; "
            f"{verb} {len(result.moves)} now ({moved})")


def _counts(result: Plan) -> str:
    return "(" + ", ".join(f"{name} {count}/{result.shares[name]:.0f}" for name, count in result.counts.items()) + ")"


class RebalanceService:
    """Looks at the backends that rebalance, every TICK (a supervised service:
    its state lives in the runtime's backends, so a restart loses nothing)."""

    name = "rebalance"

    def __init__(self, config: Config) -> None:
        self.config = config

    def reconfigure(self, config: Config) -> None:
        self.config = config

    async def run(self, runtime: Runtime, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.tick(runtime, time.monotonic())
            await trio.sleep(TICK)

    def tick(self, runtime: Runtime, now: float) -> None:
        for backend in runtime.backends.values():
            state = backend.rebalance
            automatic = backend.config.rebalance is not None
            if not automatic and (state is None or not state.requested):
                continue
            state = state_of(backend, now)
            if now < state.due:
                continue
            state.due = now + state.settings.interval
            rebalance(backend, now)
