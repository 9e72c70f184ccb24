"""Password hashes for `[stats] users`: the scrypt format `warren hash-password` writes, sans-I/O.

A stored password is clear text or ``scrypt$<n>$<r>$<p>$<salt>$<key>`` with
salt and key in unpadded URL-safe base64. The configuration loader uses
this module to refuse a malformed hash (a user who could never log in) and
to warn about clear text; the stats page's authenticator to verify logins.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

SCHEME = "scrypt"
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
MAX_N = 2**20  # beyond this a config typo would cost seconds and a GiB per login


@dataclass(frozen=True, slots=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def encode(self) -> str:
        return "$".join((SCHEME, str(self.n), str(self.r), str(self.p), b64(self.salt), b64(self.key)))


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
        salt, key = unb64(parts[4]), unb64(parts[5])
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


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
