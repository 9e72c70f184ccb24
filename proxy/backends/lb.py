"""Balancing algorithms, sans-I/O.

Each algorithm picks one server among candidates the caller has already
filtered (available, with a free slot, not excluded). A candidate is any
hashable object (compared by identity) with `name`, `weight` (int >= 1) and
`current_sessions`; weights are read at every pick, so a weight changed at
run time takes effect on the next pick.
"""

from __future__ import annotations

import hashlib
import math
from typing import Protocol, Sequence

from ..config.model import Balance


class Candidate(Protocol):
    @property
    def name(self) -> str: ...

    weight: int

    @property
    def current_sessions(self) -> int: ...


class Balancer(Protocol):
    def pick(self, candidates: Sequence[Candidate], client_ip: str) -> Candidate | None: ...


class SmoothRoundRobin:
    """Smooth weighted round-robin: over any window of sum(weights) picks,
    each server is chosen exactly `weight` times, interleaved rather than in
    bursts (weights 5,1,1 give a a b a c a a, not a a a a a b c).

    Each pick adds every candidate's weight to its running score, chooses the
    highest score and subtracts the total from the winner. Scores are kept
    per candidate object (a server keeps its object across reloads while it
    keeps its name), which spares reading names on every pick.
    """

    def __init__(self) -> None:
        self._scores: dict[Candidate, int] = {}

    def pick(self, candidates: Sequence[Candidate], client_ip: str) -> Candidate | None:
        if not candidates:
            return None
        total = 0
        best = None
        best_score = 0
        scores = self._scores
        for server in candidates:
            weight = server.weight
            score = scores.get(server, 0) + weight
            scores[server] = score
            total += weight
            if best is None or score > best_score:
                best, best_score = server, score
        assert best is not None
        scores[best] = best_score - total
        if len(scores) > 2 * len(candidates):
            self._forget_absent(candidates)
        return best

    def _forget_absent(self, candidates: Sequence[Candidate]) -> None:
        present = set(candidates)
        self._scores = {s: v for s, v in self._scores.items() if s in present}


class LeastConn:
    """Fewest current sessions relative to weight; ties rotate so equal
    servers share new connections (HAProxy's leastconn, recommended for
    long-lived AMQP connections)."""

    def __init__(self) -> None:
        self._rotation = 0

    def pick(self, candidates: Sequence[Candidate], client_ip: str) -> Candidate | None:
        if not candidates:
            return None
        load = [(s.current_sessions + 1) / s.weight for s in candidates]
        lowest = min(load)
        tied = [s for s, l in zip(candidates, load) if l == lowest]
        self._rotation += 1
        return tied[self._rotation % len(tied)]


class First:
    """The first server in configuration order that has a free slot; meant to
    be used with server maxconn so servers fill one after the other."""

    def pick(self, candidates: Sequence[Candidate], client_ip: str) -> Candidate | None:
        return candidates[0] if candidates else None


class SourceHash:
    """Same client address, same server, while the server set is stable.

    Weighted rendezvous hashing: each server scores -weight / ln(u) with u a
    uniform hash of (client, server); the highest wins. A server leaving or
    joining moves only the clients that hash to it, and a server of weight 2
    wins twice as many clients as one of weight 1.
    """

    def pick(self, candidates: Sequence[Candidate], client_ip: str) -> Candidate | None:
        best = None
        best_score = -math.inf
        for server in candidates:
            digest = hashlib.blake2b(
                f"{client_ip}\0{server.name}".encode(), digest_size=8
            ).digest()
            unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)  # in (0, 1)
            score = -server.weight / math.log(unit)
            if score > best_score:
                best, best_score = server, score
        return best


def make_balancer(balance: Balance) -> Balancer:
    if balance is Balance.ROUNDROBIN:
        return SmoothRoundRobin()
    if balance is Balance.LEASTCONN:
        return LeastConn()
    if balance is Balance.FIRST:
        return First()
    if balance is Balance.SOURCE:
        return SourceHash()
    raise ValueError(f"unknown balance {balance!r}")
