"""Rebalancing a backend after a broker returns, sans-I/O (ages passed in).

AMQP connections live for hours, so a broker that comes back (a restart, a
rolling upgrade) gets no connections until clients happen to reconnect,
while the others carry everything. :func:`plan` says which connections to
close so that they reconnect and the balancer places them on the
under-loaded servers:

- the share of each usable active server is the backend's connections on
  usable active servers times its weight over the sum of weights;
- the backend is balanced when no server holds more than its share by more
  than `tolerance` (a fraction of the share, and at least one connection);
- otherwise each over-loaded server gives up its excess over its share,
  oldest connections first, never one younger than `min_age`, and at most
  `budget` in all (the caller's close rate), taken in turn from the
  over-loaded servers so that they shed together.

A closed client reconnects through the balancer; with ``leastconn`` it lands
on the under-loaded server, with ``roundrobin`` in proportion to the
weights, so a few rounds converge. Repeated at a bounded rate, this is safe
to run every second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerLoad:
    """One server as the planner sees it; `connections` are (id, age in seconds)."""

    name: str
    weight: int
    usable: bool  # up, READY, weight > 0, active (not a backup)
    connections: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class Move:
    server: str
    conn_id: int
    age: float


@dataclass(frozen=True, slots=True)
class Plan:
    balanced: bool
    shares: dict[str, float]  # the target per usable server
    counts: dict[str, int]
    moves: tuple[Move, ...]  # the connections to close now, in order
    excess: int  # connections over their share in all (what a full rebalance moves)


def shares(servers: Sequence[ServerLoad]) -> dict[str, float]:
    usable = [s for s in servers if s.usable and s.weight > 0]
    total_weight = sum(s.weight for s in usable)
    total = sum(len(s.connections) for s in usable)
    if not total_weight:
        return {}
    return {s.name: total * s.weight / total_weight for s in usable}


def is_balanced(counts: dict[str, int], targets: dict[str, float], tolerance: float) -> bool:
    """No usable server above its share by more than `tolerance` (and one connection)."""
    return all(counts[name] <= share + max(1.0, tolerance * share) for name, share in targets.items())


def plan(servers: Sequence[ServerLoad], *, tolerance: float, min_age: float, budget: int) -> Plan:
    """What to close now; `budget` bounds the moves (use a large one for a dry run)."""
    targets = shares(servers)
    counts = {s.name: len(s.connections) for s in servers if s.name in targets}
    balanced = len(targets) < 2 or is_balanced(counts, targets, tolerance)
    if balanced:
        return Plan(True, targets, counts, (), 0)
    queues = []
    excess = 0
    for server in servers:
        share = targets.get(server.name)
        if share is None:
            continue
        over = counts[server.name] - math.ceil(share)
        if over <= 0:
            continue
        excess += over
        eligible = sorted((c for c in server.connections if c[1] >= min_age), key=lambda c: (-c[1], c[0]))
        queues.append([Move(server.name, conn_id, age) for conn_id, age in eligible[:over]])
    moves: list[Move] = []
    while len(moves) < budget and any(queues):
        for queue in queues:
            if queue and len(moves) < budget:
                moves.append(queue.pop(0))
    return Plan(False, targets, counts, tuple(moves), excess)
