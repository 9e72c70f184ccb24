"""Admission control for new connections, sans-I/O (time is passed in).

Two independent mechanisms against reconnect storms and runaway clients:

- rates: a :class:`TokenBucket` of new connections per frontend, and one per
  client source address (:class:`SourceBuckets`, bounded in size). A client
  that finds no token is queued (its token reserved in the future, so a storm
  is spread at exactly the rate, first come first served) as long as its wait
  stays under the queue bound, else rejected. Under a queued frontend-wide
  limit the clients then wait in one :class:`StartLine`, which lets them go
  on in order at the metered rate: a promised moment alone is only kept if
  the event loop is free at it, and after a stall (a busy machine) every
  overdue client would go at once;
- counts: :class:`ConnectionCounts` of live connections per vhost and per
  user, checked when the client's Connection.Open is seen.

Each check has an action (:class:`~proxy.config.model.RateAction`,
:class:`~proxy.config.model.LimitAction`): ``queue`` / ``reject`` for rates,
``refuse`` for counts, and ``alarm`` for both, which only counts and logs.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..config.model import ConnectionLimits, Frontend, RateAction, RateLimit


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; starts full.

    Tokens may go negative: each negative token is a client already promised
    a future moment (see :meth:`reserve`).
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def reserve(self, now: float, max_wait: float) -> float | None:
        """Takes a token: the seconds to wait for it (0: now), or None (and
        nothing taken) when that wait would exceed `max_wait`."""
        self.refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        wait = (1 - self.tokens) / self.rate
        if wait > max_wait:
            return None
        self.tokens -= 1
        return wait

    def full(self, now: float) -> bool:
        """True when it is as if this bucket had never been used."""
        self.refill(now)
        return self.tokens >= self.burst


class SourceBuckets:
    """One token bucket per client address, at most `capacity` of them.

    A bucket that has refilled is dropped (a fresh one is the same); when
    more distinct addresses than `capacity` are active at once, the least
    recently seen lose their state (they get a fresh burst): memory stays
    bounded whatever the number of sources.
    """

    def __init__(self, rate: float, burst: float, capacity: int = 65536) -> None:
        self.rate, self.burst, self.capacity = rate, burst, capacity
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def reserve(self, source: str, now: float, max_wait: float) -> float | None:
        bucket = self._buckets.get(source)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[source] = TokenBucket(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(source)
        return bucket.reserve(now, max_wait)

    def _make_room(self, now: float) -> None:
        buckets = self._buckets
        if len(buckets) < self.capacity:
            return
        for source in [s for s, b in buckets.items() if b.full(now)]:
            del buckets[source]
        while len(buckets) >= self.capacity:
            buckets.popitem(last=False)


class RateMeter:
    """Events per second over the last `window` seconds, in one-second slots."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._slots: list[int] = [0] * window
        self._second = 0

    def add(self, now: float, count: int = 1) -> None:
        self._advance(int(now))
        self._slots[self._second % self.window] += count

    def rate(self, now: float) -> float:
        """The average over the last complete `window` seconds plus this one."""
        self._advance(int(now))
        return sum(self._slots) / self.window

    def _advance(self, second: int) -> None:
        if second <= self._second:
            return
        for step in range(self._second + 1, min(second, self._second + self.window) + 1):
            self._slots[step % self.window] = 0
        self._second = second


T = TypeVar("T")

# A token counts as there within this much (float rounding at the moment
# next_at() names must not leave the releaser spinning a hair short of it).
_EPSILON = 1e-9


class StartLine(Generic[T]):
    """The clients a frontend's queued rate limit holds, let go on in order,
    at `rate` per second and at most `burst` at once. Clock-free: every call
    says what time it is; one releaser drives it (asks :meth:`next_at` when
    to call :meth:`due` next, and lets those clients go on at once).

    Its bucket gives a token only at the moment a client really goes on and
    never lends one ahead, so whatever the releaser's timing (late wake-ups,
    an event loop stalled for seconds) the clients let go within any T
    seconds number at most `burst` + `rate` x T. A stall only delays the
    line: nobody overtakes, nobody is skipped, nobody goes twice.
    """

    __slots__ = ("bucket", "driven", "_waiting", "_gone")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.bucket = TokenBucket(rate, burst, now)
        self.driven = False  # the shell's: whether a releaser runs for this line
        self._waiting: deque[T] = deque()
        self._gone: set[T] = set()  # withdrawn, still in _waiting until they reach its head

    def __len__(self) -> int:
        return len(self._waiting) - len(self._gone)

    def enter(self, client: T, now: float) -> bool:
        """True: `client` goes on now (its token taken); False: it waits at the end of the line."""
        if not self._waiting and self._take(now):
            return True
        self._waiting.append(client)
        return False

    def withdraw(self, client: T) -> None:
        """A waiting client is gone (killed, closed): it will not be let go."""
        self._gone.add(client)

    def due(self, now: float, gave_up: Callable[[T], bool] | None = None) -> list[T]:
        """The clients that go on now, first come first, each with its token taken.

        `gave_up`, if given, is asked of each client at its turn, before a
        token is taken: one that gave up while waiting (True) leaves the line
        and takes no token (what it means, and what becomes of the client,
        is the caller's)."""
        waiting, gone, going = self._waiting, self._gone, []
        while waiting:
            if waiting[0] in gone:
                gone.discard(waiting.popleft())
                continue
            if not self._has_token(now):
                break
            client = waiting.popleft()
            if gave_up is None or not gave_up(client):
                self.bucket.tokens -= 1
                going.append(client)
        return going

    def next_at(self) -> float | None:
        """When the first waiting client may go; None: nobody waits."""
        waiting, gone = self._waiting, self._gone
        while waiting and waiting[0] in gone:
            gone.discard(waiting.popleft())
        if not waiting:
            return None
        bucket = self.bucket
        return bucket.stamp + max(0.0, 1 - bucket.tokens) / bucket.rate

    def drain(self) -> list[T]:
        """Everyone still waiting, in order, out of the line (its releaser stops)."""
        waiting = [client for client in self._waiting if client not in self._gone]
        self._waiting.clear()
        self._gone.clear()
        return waiting

    def _has_token(self, now: float) -> bool:
        bucket = self.bucket
        bucket.refill(now)
        return bucket.tokens >= 1 - _EPSILON

    def _take(self, now: float) -> bool:
        if not self._has_token(now):
            return False
        self.bucket.tokens -= 1
        return True


@dataclass(frozen=True, slots=True)
class Admitted:
    """A rate gate's answer: the client's expected wait (0: none), or `wait`
    None: rejected. `hold`: how long it waits before it lines up in the
    gate's :class:`StartLine` (all of `wait` when the gate has none)."""

    wait: float | None
    limit: str | None = None  # which limit decided (for the log line), None: none was hit
    hold: float = 0.0


_GO = Admitted(0.0)


class RateGate:
    """A frontend's new-connection rate limits (global and per source), its meters.

    Built from the frontend's config; rebuilt (state reset) when a reload
    changes those limits (clients already in the old gate's line go on at
    the old rate).
    """

    def __init__(self, frontend: Frontend, now: float) -> None:
        self.name = frontend.name
        self.global_limit, self.source_limit = frontend.rate_limit, frontend.source_rate_limit
        self.bucket = _bucket(self.global_limit, now)  # promises moments: who is rejected
        limit = self.global_limit
        # Under a queued frontend-wide limit every client goes on through the line.
        self.line: StartLine | None = (StartLine(limit.rate, limit.bucket_size, now)
                                       if limit is not None and limit.action is RateAction.QUEUE else None)
        source = self.source_limit
        self.sources = SourceBuckets(source.rate, source.bucket_size) if source is not None else None
        self.accepted = RateMeter()
        self.queued = 0
        self.rejected = 0
        self.alarms = 0

    def same_limits(self, frontend: Frontend) -> bool:
        return (frontend.rate_limit, frontend.source_rate_limit) == (self.global_limit, self.source_limit)

    def admit(self, source: str, now: float, max_wait: float) -> Admitted:
        """Whether a new client from `source` may go on now, later, or not at
        all. With a :attr:`line`, a client not rejected then lines up in it
        after its `hold` (its source's wait), even one that may go now."""
        self.accepted.add(now)
        answer = _GO
        sources, source_limit = self.sources, self.source_limit
        if sources is not None and source_limit is not None:  # both or neither
            answer = self._decide(source_limit, sources.reserve(source, now, self._wait_bound(
                source_limit, max_wait)), f"source {source}")
        hold = answer.wait
        if hold is None:
            return answer
        wait: float | None = hold
        bucket, global_limit = self.bucket, self.global_limit
        if bucket is not None and global_limit is not None:  # both or neither
            answer2 = self._decide(global_limit, bucket.reserve(now, self._wait_bound(global_limit, max_wait)),
                                   f"frontend {self.name}")
            if answer2.wait is None or answer2.wait > hold:
                answer, wait = answer2, answer2.wait
        if wait is None:
            return answer
        if wait:
            self.queued += 1
        if self.line is None:
            hold = wait
        return answer if answer.hold == hold else Admitted(wait, answer.limit, hold)

    @staticmethod
    def _wait_bound(limit: RateLimit, max_wait: float) -> float:
        return max_wait if limit.action is RateAction.QUEUE else 0.0

    def _decide(self, limit: RateLimit, wait: float | None, what: str) -> Admitted:
        if wait == 0.0:
            return _GO
        text = f"rate limit: {what} ({limit.rate:g}/s)"
        if limit.action is RateAction.ALARM:
            self.alarms += 1
            return Admitted(0.0, text)
        if wait is None:
            self.rejected += 1
            return Admitted(None, text)
        return Admitted(wait, text, wait)


def _bucket(limit: RateLimit | None, now: float) -> TokenBucket | None:
    return None if limit is None else TokenBucket(limit.rate, limit.bucket_size, now)


@dataclass(frozen=True, slots=True)
class LimitHit:
    """A connection limit reached: which kind ("vhost"/"user"), which name, the limit."""

    kind: str
    name: str
    limit: int

    def text(self) -> str:
        return f"warren: connection limit for {self.kind} {self.name} reached ({self.limit})"


class ConnectionCounts:
    """Live connections per vhost and per user (of one backend), and limit hits."""

    def __init__(self) -> None:
        # Plain dicts: every AMQP connection adds and removes itself (a
        # Counter's missing key and deletion are Python calls).
        self.vhosts: dict[str, int] = {}
        self.users: dict[str, int] = {}
        self.hits: Counter[str] = Counter()  # "vhost" / "user" -> times a limit was reached

    def check(self, limits: ConnectionLimits, vhost: str | None, user: str | None) -> LimitHit | None:
        """The first limit one more connection would exceed (counted as a hit), or None."""
        if vhost is not None:
            limit = limits.for_vhost(vhost)
            if limit is not None and self.vhosts.get(vhost, 0) >= limit:
                self.hits["vhost"] += 1
                return LimitHit("vhost", vhost, limit)
        if user is not None:
            limit = limits.for_user(user)
            if limit is not None and self.users.get(user, 0) >= limit:
                self.hits["user"] += 1
                return LimitHit("user", user, limit)
        return None

    def add(self, vhost: str | None, user: str | None) -> None:
        if vhost is not None:
            self.vhosts[vhost] = self.vhosts.get(vhost, 0) + 1
        if user is not None:
            self.users[user] = self.users.get(user, 0) + 1

    def remove(self, vhost: str | None, user: str | None) -> None:
        if vhost is not None:
            _count_down(self.vhosts, vhost)
        if user is not None:
            _count_down(self.users, user)


def _count_down(counts: dict[str, int], name: str) -> None:
    left = counts.get(name, 0) - 1
    if left > 0:
        counts[name] = left
    else:
        counts.pop(name, None)


def top_labels(counts: Mapping[str, int], cap: int, other: str = "other") -> dict[str, int]:
    """At most `cap` names with the largest counts (ties by name), the rest summed as `other`.

    Bounds the label cardinality of a metric whatever the number of vhosts or users.
    """
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = dict(ranked[:cap])
    rest = sum(count for _, count in ranked[cap:])
    if rest:
        kept[other] = kept.get(other, 0) + rest
    return kept


def merged(counters: Iterable[Mapping[str, int]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for counter in counters:
        total.update(counter)
    return total
