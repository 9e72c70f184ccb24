"""Connection slots for the stats page and the control socket, sans-I/O.

A server with a fixed number of connection slots is easy to fill: connect
and say nothing (slowloris). :class:`Slots` keeps every connection in one of
two states:

- *waiting*: it has not sent a whole request yet (a fresh connection, a
  slow one, a keep-alive connection between requests);
- *busy*: its request is complete and is being answered.

When a new connection would exceed the limit, overall or for its client,
the connection that has been waiting longest (of that client, for the
per-client limit) is evicted to make room; only when every slot in question
is busy is the newcomer refused. A real client sends its request at once,
so it is busy almost as soon as it connects, and a flood of silent
connections can neither keep it out nor hold a slot for long.

A client is its IPv4 address, or the /64 of its IPv6 address (one host
usually owns a whole /64, so counting single IPv6 addresses would bound
nothing).
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

IPV6_CLIENT_PREFIX = 64


def client_key(host: str) -> str:
    """What per-client limits count by: the IPv4 address, or the IPv6 /64 (other text as is)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 4:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))


@dataclass(frozen=True, slots=True)
class Refused:
    """No slot: every slot in question is busy. `reason`: "limit" or "per_client"."""

    reason: str
    client: str


class Slot:
    """One admitted connection; the shell reports its state and releases it when it ends."""

    __slots__ = ("client", "_slots", "_on_evict", "_state")

    def __init__(self, slots: Slots, client: str, on_evict: Callable[[], None]):
        self.client, self._slots, self._on_evict = client, slots, on_evict
        self._state = "waiting"

    def busy(self) -> None:
        """Its request is complete: not evictable until waiting() again."""
        self._slots._set_busy(self)

    def waiting(self) -> None:
        """It waits for (more of) a request again: evictable, and newest of the waiting."""
        self._slots._set_waiting(self)

    def release(self) -> None:
        """The connection ended (idempotent; an evicted slot is already released)."""
        self._slots._release(self)

    @property
    def evicted(self) -> bool:
        return self._state == "evicted"


class Slots:
    """At most `limit` connections, at most `per_client` of them from one client."""

    def __init__(self, limit: int, per_client: int | None = None):
        self.limit, self.per_client = limit, per_client
        self._held: Counter[str] = Counter()  # client -> slots held
        self._waiting: OrderedDict[Slot, None] = OrderedDict()  # oldest first
        self._waiting_by_client: dict[str, OrderedDict[Slot, None]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def admit(self, host: str, on_evict: Callable[[], None]) -> tuple[Slot | Refused, list[Slot]]:
        """A slot for a connection from `host` (waiting), and the slots evicted to make room.

        Each evicted slot's `on_evict` has been called; the shell closes that
        connection. Returns a :class:`Refused` instead of a slot when nothing
        could be evicted.
        """
        client = client_key(host)
        evicted: list[Slot] = []
        if self.per_client is not None and self._held[client] >= self.per_client:
            victim = _oldest(self._waiting_by_client.get(client))
            if victim is None:
                return Refused("per_client", client), evicted
            evicted.append(self._evict(victim))
        if self._count >= self.limit:
            victim = _oldest(self._waiting)
            if victim is None:
                return Refused("limit", client), evicted
            evicted.append(self._evict(victim))
        slot = Slot(self, client, on_evict)
        self._held[client] += 1
        self._count += 1
        self._set_waiting(slot)
        return slot, evicted

    def _evict(self, slot: Slot) -> Slot:
        self._release(slot)
        slot._state = "evicted"
        slot._on_evict()
        return slot

    def _set_busy(self, slot: Slot) -> None:
        if slot._state == "waiting":
            self._unlist(slot)
            slot._state = "busy"

    def _set_waiting(self, slot: Slot) -> None:
        if slot._state in ("waiting", "busy"):
            self._unlist(slot)
            slot._state = "waiting"
            self._waiting[slot] = None
            self._waiting_by_client.setdefault(slot.client, OrderedDict())[slot] = None

    def _release(self, slot: Slot) -> None:
        if slot._state not in ("waiting", "busy"):
            return
        self._unlist(slot)
        slot._state = "released"
        self._count -= 1
        self._held[slot.client] -= 1
        if not self._held[slot.client]:
            del self._held[slot.client]

    def _unlist(self, slot: Slot) -> None:
        if slot in self._waiting:
            del self._waiting[slot]
            mine = self._waiting_by_client[slot.client]
            del mine[slot]
            if not mine:
                del self._waiting_by_client[slot.client]


def _oldest(waiting: OrderedDict[Slot, None] | None) -> Slot | None:
    return next(iter(waiting), None) if waiting else None
