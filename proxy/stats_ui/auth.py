"""Basic authentication for the stats surfaces (RFC 7617), sans-I/O.

Passwords in `[stats] users` are either clear text or salted scrypt hashes
made by `warren hash-password` (:mod:`proxy.passwords`, where the format
lives). scrypt is slow on purpose (about 0.1 s and 16 MiB at the default
n=2**14), so:

- an :class:`Authenticator` answers in two steps: :meth:`~Authenticator.begin`
  decides everything cheap (cached success, rate limit, malformed header) and
  hands back a :class:`Pending` verification that the trio shell runs in a
  worker thread (hashlib.scrypt releases the GIL), then
  :meth:`~Authenticator.finish` records the verdict;
- successful verifications are cached per Authorization header (keyed by its
  SHA-256, so no password stays in memory as sent), so a refreshing page or
  a scraper pays scrypt once;
- an unknown user is verified against a decoy credential of the same kind,
  so timing does not tell which user names exist; every comparison goes
  through :func:`hmac.compare_digest`;
- failures are counted per client address (IPv6: per /64) and in a global
  budget: after `max_failures` within `window` seconds an address gets 429
  for `block` seconds, and once `global_max_failures` failures fall within
  `window` every login not already verified gets 429 until the oldest of
  them leaves the window (rotating source addresses must not multiply the
  guesses an attacker gets).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import sys
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ..passwords import SALT_BYTES, ScryptHash, b64, hash_password, is_hashed, parse_hash, verify_password

from .admission import client_key

log = structlog.get_logger("warren.stats")

# --- the Authorization header ---------------------------------------------------------


def parse_basic(header: str) -> tuple[str, str] | None:
    """(user, password) from ``Basic <base64(user:password)>``, or None if malformed.

    RFC 7617 section 2: the user-id ends at the first colon; the password
    may contain colons. UTF-8 is the charset we announce, so anything else
    is malformed.
    """
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8 once decoded
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


# --- verdicts -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Granted:
    user: str


@dataclass(frozen=True, slots=True)
class Challenge:
    """No credentials at all: answer 401 with WWW-Authenticate (not a failure)."""


@dataclass(frozen=True, slots=True)
class Denied:
    user: str


@dataclass(frozen=True, slots=True)
class Throttled:
    retry_after: float


@dataclass(frozen=True, slots=True)
class Pending:
    """A verification to run (in a thread when `expensive`), then pass to finish()."""

    user: str
    password: str
    stored: str
    known: bool
    cache_key: bytes

    @property
    def expensive(self) -> bool:
        return is_hashed(self.stored)

    def verify(self) -> bool:
        return verify_password(self.password, self.stored)


class FailureLimiter:
    """Counts failed logins per client and in all, and throttles when either is exceeded.

    Per client (an IPv4 address, an IPv6 /64): `max_failures` within
    `window` seconds block it for `block` seconds. In all: once
    `global_max_failures` failures fall within `window`, every login not
    already verified waits until the oldest of them leaves the window, so an
    attacker rotating source addresses gets at most that many guesses per
    window instead of `max_failures` per address. A throttled attempt is not
    verified and so is never counted: blocked clients do not eat the budget.
    """

    def __init__(self, max_failures: int = 5, window: float = 60.0, block: float = 60.0,
                 max_clients: int = 4096, global_max_failures: int = 60):
        self.max_failures, self.window, self.block = max_failures, window, block
        self.max_clients, self.global_max_failures = max_clients, global_max_failures
        self._failures: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._all: deque[float] = deque(maxlen=global_max_failures)

    def retry_after(self, client: str, now: float) -> float | None:
        """Seconds until `client` may try again, or None if it may now."""
        waits = [wait for wait in (self._client_retry_after(client_key(client), now), self.global_retry_after(now))
                 if wait is not None]
        return max(waits) if waits else None

    def global_retry_after(self, now: float) -> float | None:
        """Seconds until the global budget allows another attempt, or None if it does now."""
        if len(self._all) == self._all.maxlen and now - self._all[0] < self.window:
            return self._all[0] + self.window - now
        return None

    def record_failure(self, client: str, now: float) -> bool:
        """Counts one failure; True if `client` is now blocked."""
        self._all.append(now)
        key = client_key(client)
        recent = self._failures.pop(key, None) or deque(maxlen=self.max_failures)
        recent.append(now)
        self._failures[key] = recent  # re-inserted: dict order is least recently failed first
        self._forget_oldest(self._failures)
        if len(recent) == self.max_failures and now - recent[0] <= self.window:
            self._blocked_until[key] = now + self.block
            self._forget_oldest(self._blocked_until)
            recent.clear()
            return True
        return False

    def record_success(self, client: str) -> None:
        self._failures.pop(client_key(client), None)

    def _client_retry_after(self, key: str, now: float) -> float | None:
        until = self._blocked_until.get(key)
        if until is None:
            return None
        if now >= until:
            del self._blocked_until[key]
            return None
        return until - now

    def _forget_oldest(self, table: dict) -> None:
        # Bounded memory under a spray of source addresses (IPv6 makes them cheap).
        while len(table) > self.max_clients:
            del table[next(iter(table))]


class Authenticator:
    """Decides who may see the stats; see the module docstring for the protocol."""

    def __init__(self, users: Sequence[tuple[str, str]], *, limiter: FailureLimiter | None = None,
                 cache_size: int = 256, logger: Any = log):
        self._users = dict(users)
        self.log = logger
        self.limiter = limiter or FailureLimiter()
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._cache_size = cache_size
        self._decoy = _decoy_for(self._users.values())

    def begin(self, header: str | None, client: str, now: float) -> Granted | Challenge | Denied | Throttled | Pending:
        if not header:
            return Challenge()
        key = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return Granted(cached)
        retry_after = self.limiter.retry_after(client, now)
        if retry_after is not None:
            return Throttled(retry_after)
        parsed = parse_basic(header)
        if parsed is None:
            return self._failed("", client, now, reason="malformed")
        user, password = parsed
        stored = self._users.get(user)
        if stored is None:
            return Pending(user, password, self._decoy, known=False, cache_key=key)
        return Pending(user, password, stored, known=True, cache_key=key)

    def finish(self, pending: Pending, verified: bool, client: str, now: float) -> Granted | Denied:
        """Records the outcome of `pending.verify()`; an unknown user never passes."""
        if not (verified and pending.known):
            return self._failed(pending.user, client, now, reason="unknown user" if not pending.known else "bad password")
        self.limiter.record_success(client)
        self._cache[pending.cache_key] = pending.user
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return Granted(pending.user)

    def check(self, header: str | None, client: str, now: float) -> Granted | Challenge | Denied | Throttled:
        """begin + verify + finish in one call, verifying inline (tests, `warren ctl`)."""
        verdict = self.begin(header, client, now)
        if isinstance(verdict, Pending):
            return self.finish(verdict, verdict.verify(), client, now)
        return verdict

    def _failed(self, user: str, client: str, now: float, *, reason: str) -> Denied:
        blocked = self.limiter.record_failure(client, now)
        self.log.warning("stats.login_failed", client=client, user=user, reason=reason, blocked=blocked)
        retry_after = self.limiter.global_retry_after(now)
        if retry_after is not None:
            self.log.warning("stats.login_throttled", client=client, failures=self.limiter.global_max_failures,
                             window=self.limiter.window, retry_after=round(retry_after, 1))
        return Denied(user)


def _decoy_for(stored: Iterable[str]) -> str:
    """A credential nothing matches, as costly to check as the configured ones.

    It takes the scrypt parameters of the first hashed user (the key is
    random, not a hash of anything), or is a random clear password if none
    is hashed.
    """
    for value in stored:
        if is_hashed(value):
            try:
                parsed = parse_hash(value)
            except ValueError:
                continue
            return ScryptHash(parsed.n, parsed.r, parsed.p, os.urandom(SALT_BYTES), os.urandom(len(parsed.key))).encode()
    return b64(os.urandom(24))


# --- `warren hash-password` -----------------------------------------------------------


def hash_password_main(stdin=None, stdout=None, stderr=None) -> int:
    """Prints a scrypt hash of a password read twice from the terminal, or once from stdin.

    Exit status 0, or 1 if the two entries differ or the password is empty.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("warren: passwords differ", file=stderr)
            return 1
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        print("warren: empty password", file=stderr)
        return 1
    print(hash_password(password), file=stdout)
    return 0
