"""Basic authentication for the stats surfaces (RFC 7617), sans-I/O.

Passwords in `[stats] users` are either clear text or salted scrypt hashes
made by `warren hash-password`: ``scrypt$<n>$<r>$<p>$<salt>$<key>`` with salt
and key in unpadded URL-safe base64. scrypt is slow on purpose (about 0.1 s
and 16 MiB at the default n=2**14), so:

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
- failures are counted per client address; after `max_failures` within
  `window` seconds the address gets 429 for `block` seconds.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import os
import sys
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import structlog

log = structlog.get_logger("warren.stats")

SCHEME = "scrypt"
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
MAX_N = 2**20  # beyond this a config typo would cost seconds and a GiB per login


# --- hashes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def encode(self) -> str:
        return "$".join((SCHEME, str(self.n), str(self.r), str(self.p), _b64(self.salt), _b64(self.key)))


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P,
                  salt: bytes | None = None) -> str:
    """A new ``scrypt$n$r$p$salt$key`` string for `password` with a random salt."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    key = _scrypt(password.encode(), salt, n, r, p, KEY_BYTES)
    return ScryptHash(n, r, p, salt, key).encode()


def is_hashed(stored: str) -> bool:
    return stored.startswith(SCHEME + "$")


def parse_hash(stored: str) -> ScryptHash:
    """Raises ValueError saying what is wrong with a ``scrypt$...`` string."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError('expected "scrypt$n$r$p$salt$key"')
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except (ValueError, binascii.Error):
        raise ValueError("bad number or base64 in scrypt hash") from None
    if n < 2 or n > MAX_N or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError(f"scrypt parameters out of range: n={n} r={r} p={p}")
    if len(salt) < 8 or len(key) < 16:
        raise ValueError("scrypt salt or key too short")
    return ScryptHash(n, r, p, salt, key)


def verify_password(password: str, stored: str) -> bool:
    """True if `password` matches `stored` (clear text or scrypt hash), in constant time.

    A malformed hash never matches. Clear-text passwords are compared as
    SHA-256 digests so that the comparison does not leak their length.
    """
    if is_hashed(stored):
        try:
            parsed = parse_hash(stored)
        except ValueError:
            return False
        key = _scrypt(password.encode(), parsed.salt, parsed.n, parsed.r, parsed.p, len(parsed.key))
        return hmac.compare_digest(key, parsed.key)
    given = hashlib.sha256(password.encode()).digest()
    return hmac.compare_digest(given, hashlib.sha256(stored.encode()).digest())


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # hashlib's default maxmem (32 MiB) refuses n=2**15 r=8 (needs 128*r*n = 32 MiB + overhead).
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * r * n + 2**20)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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
    """Counts failed logins per client address and blocks noisy ones for a while."""

    def __init__(self, max_failures: int = 5, window: float = 60.0, block: float = 60.0,
                 max_clients: int = 4096):
        self.max_failures, self.window, self.block = max_failures, window, block
        self.max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}

    def retry_after(self, client: str, now: float) -> float | None:
        """Seconds until `client` may try again, or None if it may now."""
        until = self._blocked_until.get(client)
        if until is None:
            return None
        if now >= until:
            del self._blocked_until[client]
            return None
        return until - now

    def record_failure(self, client: str, now: float) -> bool:
        """Counts one failure; True if `client` is now blocked."""
        recent = self._failures.pop(client, None) or deque(maxlen=self.max_failures)
        recent.append(now)
        self._failures[client] = recent  # re-inserted: dict order is least recently failed first
        self._forget_oldest(self._failures)
        if len(recent) == self.max_failures and now - recent[0] <= self.window:
            self._blocked_until[client] = now + self.block
            self._forget_oldest(self._blocked_until)
            recent.clear()
            return True
        return False

    def record_success(self, client: str) -> None:
        self._failures.pop(client, None)

    def _forget_oldest(self, table: dict) -> None:
        # Bounded memory under a spray of source addresses (IPv6 makes them cheap).
        while len(table) > self.max_clients:
            del table[next(iter(table))]


class Authenticator:
    """Decides who may see the stats; see the module docstring for the protocol."""

    def __init__(self, users: Sequence[tuple[str, str]], *, limiter: FailureLimiter | None = None,
                 cache_size: int = 256):
        self._users = dict(users)
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
        log.warning("stats.login_failed", client=client, user=user, reason=reason, blocked=blocked)
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
    return _b64(os.urandom(24))


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
