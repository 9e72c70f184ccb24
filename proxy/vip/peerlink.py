"""The peer link between Warren VRRP peers: wire format and handshake (sans-I/O).

A backup keeps one TCP connection to the master it follows. A process that
dies has its sockets closed by its kernel, so the backup learns of the
death at once (FIN or RST) instead of after 3 advert intervals. See
:mod:`proxy.vip.links` for the trio shell and docs/vip.md for the security
trade-off.

The handshake, four fixed-size messages (backup = client, master = server)::

    backup -> master   Hello     "WPL1" vrid flags nonce_b[16]
    master -> backup   Greeting  "WPL1" vrid status nonce_m[16] proof_m[32]
    backup -> master   proof_b[32]
    master -> backup   0x01      (accepted: the link is up)

With a VRRP secret (``[vip.<name>.auth]``), both proofs are HMAC-SHA256
under a key derived from it (:func:`link_key`, never the advert key), over
the role, the VRID, both nonces and (the master's) the status; the secret
never travels. Without one, proofs are 32 zero bytes: the link is then
exactly as trustworthy as unauthenticated VRRP itself.

The master proves itself first and answers every well-formed hello, even
when it turns the link down (BUSY, UNKNOWN_VRID, AUTH_MISMATCH,
VERSION_MISMATCH): a backup that gets a proven greeting knows the master's
Warren is alive.

The hello's flags say what the backup speaks: bit 0 authenticated, the
other bits its *features* (FEATURES: 0x02, the messages on an established
link, since the designated successor). A master links only a backup with
exactly its own features and answers any other with a proven
VERSION_MISMATCH, so two Warren versions whose links carry different
messages never hold a link that one of them breaks at once (re-linking in
a loop): both keep the RFC timers. The first Warren with a peer link
(features 0) closes the connection, without a greeting, on a hello with
features; a backup takes that for a version mismatch too, never for a death.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy.vip.packet import IPAddress

MAGIC = b"WPL1"
DEFAULT_PORT = 5798
NONCE_SIZE = 16
PROOF_SIZE = 32
NO_PROOF = bytes(PROOF_SIZE)
ACCEPTED = b"\x01"
FLAG_AUTHENTICATED = 0x01
FLAG_MESSAGES = 0x02  # priority reports and successor names travel on the established link
FEATURES = FLAG_MESSAGES  # what this version speaks; change it with the link's messages

_HELLO = struct.Struct("!4sBB16s")
_GREETING = struct.Struct("!4sBB16s32s")
HELLO_SIZE = _HELLO.size
GREETING_SIZE = _GREETING.size
_KEY_LABEL = b"warren peer link v1"


class Status(enum.IntEnum):
    OK = 0
    BUSY = 1  # too many links: the master is alive, try later
    UNKNOWN_VRID = 2  # no instance of that VRID here (any more)
    AUTH_MISMATCH = 3  # one side has a secret, the other not
    NOT_A_PEER = 4  # unicast mode: the backup is not in the master's peers
    VERSION_MISMATCH = 5  # the backup's features are not the master's: no link, RFC timers


class LinkError(ValueError):
    """A message that breaks the protocol; ``reason`` is a short stable word for counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def link_key(secret: str) -> bytes:
    """The link's HMAC key, derived from the instance's VRRP secret (domain-separated from adverts)."""
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


# -- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    vrid: int
    authenticated: bool
    nonce: bytes = field(default_factory=new_nonce)
    features: int = FEATURES  # the flags but FLAG_AUTHENTICATED: another version's may differ

    def __post_init__(self) -> None:
        _check_vrid(self.vrid)
        _check_size("nonce", self.nonce, NONCE_SIZE)
        if not 0 <= self.features <= 0xFF or self.features & FLAG_AUTHENTICATED:
            raise ValueError("features must be a flags byte without FLAG_AUTHENTICATED")

    def encode(self) -> bytes:
        flags = self.features | (FLAG_AUTHENTICATED if self.authenticated else 0)
        return _HELLO.pack(MAGIC, self.vrid, flags, self.nonce)


@dataclass(frozen=True, slots=True)
class Greeting:
    vrid: int
    status: Status
    nonce: bytes
    proof: bytes

    def __post_init__(self) -> None:
        _check_vrid(self.vrid)
        _check_size("nonce", self.nonce, NONCE_SIZE)
        _check_size("proof", self.proof, PROOF_SIZE)

    def encode(self) -> bytes:
        return _GREETING.pack(MAGIC, self.vrid, self.status, self.nonce, self.proof)


def decode_hello(data: bytes) -> Hello:
    """Exactly HELLO_SIZE bytes; :class:`LinkError` otherwise. Any features decode (the
    master answers unknown ones with VERSION_MISMATCH, see :class:`MasterHandshake`)."""
    if len(data) != HELLO_SIZE:
        raise LinkError("bad_length", f"hello of {len(data)} bytes")
    magic, vrid, flags, nonce = _HELLO.unpack(data)
    if magic != MAGIC:
        raise LinkError("bad_magic")
    if not 1 <= vrid <= 255:
        raise LinkError("bad_vrid", str(vrid))
    return Hello(vrid, bool(flags & FLAG_AUTHENTICATED), nonce, flags & ~FLAG_AUTHENTICATED)


def decode_greeting(data: bytes) -> Greeting:
    """Exactly GREETING_SIZE bytes; :class:`LinkError` otherwise."""
    if len(data) != GREETING_SIZE:
        raise LinkError("bad_length", f"greeting of {len(data)} bytes")
    magic, vrid, status, nonce, proof = _GREETING.unpack(data)
    if magic != MAGIC:
        raise LinkError("bad_magic")
    if not 1 <= vrid <= 255:
        raise LinkError("bad_vrid", str(vrid))
    try:
        status = Status(status)
    except ValueError:
        raise LinkError("bad_status", str(status)) from None
    return Greeting(vrid, status, nonce, proof)


# -- messages on an established link -------------------------------------------------------


class Kind(enum.IntEnum):
    PRIORITY = 1  # backup -> master
    SUCCESSOR = 2  # master -> backup


_FRAME = struct.Struct("!BB")  # kind, payload length
FRAME_MAX = _FRAME.size + 16


@dataclass(frozen=True, slots=True)
class PriorityReport:
    """A backup's effective priority (1..255), as its machine has it."""

    priority: int

    def __post_init__(self) -> None:
        if not 1 <= self.priority <= 255:
            raise ValueError("priority must be 1..255")

    def encode(self) -> bytes:
        return _FRAME.pack(Kind.PRIORITY, 1) + bytes([self.priority])


@dataclass(frozen=True, slots=True)
class Successor:
    """The backup the master designates to replace it (None: no linked backup)."""

    address: IPAddress | None

    def encode(self) -> bytes:
        packed = self.address.packed if self.address is not None else b""
        return _FRAME.pack(Kind.SUCCESSOR, len(packed)) + packed


Message = PriorityReport | Successor
_EXPECTED = {PriorityReport: Kind.PRIORITY, Successor: Kind.SUCCESSOR}


class MessageReader:
    """Incremental decoder of one direction's messages: :meth:`feed` bytes as they come.

    ``expect`` is the one message class this side may receive. Anything else
    (an unknown or unexpected kind, a wrong length or value) raises
    :class:`LinkError`; at most one frame (FRAME_MAX bytes) is ever buffered.
    """

    def __init__(self, expect: type[PriorityReport] | type[Successor]) -> None:
        self._kind = _EXPECTED[expect]
        self._buffer = b""

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _FRAME.size:
            kind, length = _FRAME.unpack_from(self._buffer)
            if kind != self._kind:
                raise LinkError("unexpected_kind", str(kind))
            if length not in _LENGTHS[kind]:
                raise LinkError("bad_length", f"{Kind(kind).name.lower()} of {length} bytes")
            end = _FRAME.size + length
            if len(self._buffer) < end:
                break
            payload, self._buffer = self._buffer[_FRAME.size : end], self._buffer[end:]
            messages.append(_decode(kind, payload))
        return messages


_LENGTHS = {Kind.PRIORITY: (1,), Kind.SUCCESSOR: (0, 4, 16)}


def _decode(kind: int, payload: bytes) -> Message:
    if kind == Kind.PRIORITY:
        if payload[0] == 0:
            raise LinkError("bad_priority", "0")
        return PriorityReport(payload[0])
    return Successor(ipaddress.ip_address(payload) if payload else None)


def designate(backups: Iterable[tuple[IPAddress, int]]) -> IPAddress | None:
    """The successor among ``(address, priority)`` pairs: the highest priority, then the
    highest address, as VRRP itself breaks ties (RFC 5798 6.4.3); None when there is none."""
    best = max(backups, key=lambda backup: (backup[1], backup[0].version, int(backup[0])), default=None)
    return best[0] if best is not None else None


# -- proofs --------------------------------------------------------------------------------


def master_proof(key: bytes | None, vrid: int, backup_nonce: bytes, master_nonce: bytes, status: Status) -> bytes:
    if key is None:
        return NO_PROOF
    return _mac(key, b"master", bytes([vrid, status]), backup_nonce, master_nonce)


def backup_proof(key: bytes | None, vrid: int, backup_nonce: bytes, master_nonce: bytes) -> bytes:
    if key is None:
        return NO_PROOF
    return _mac(key, b"backup", bytes([vrid]), backup_nonce, master_nonce)


def _mac(key: bytes, role: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(key, role, hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


# -- the two sides ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Greeted:
    """What a greeting told the backup.

    ``proven``: the greeting came from a holder of the key (without a key:
    any well-formed greeting), so that master's Warren is alive. ``reply``:
    the backup's proof to send when the status is OK, else empty.
    """

    status: Status
    proven: bool
    reply: bytes


class BackupHandshake:
    """The backup's side: :meth:`hello`, then :meth:`greeted` with the master's greeting.

    ``greeted`` raises :class:`LinkError` for a greeting that breaks the
    protocol or claims OK without the proof.
    """

    def __init__(self, vrid: int, key: bytes | None, *, nonce: bytes | None = None,
                 features: int = FEATURES) -> None:
        self.vrid, self.key = vrid, key
        self._hello = Hello(vrid, key is not None, nonce or new_nonce(), features)

    def hello(self) -> bytes:
        return self._hello.encode()

    def greeted(self, data: bytes) -> Greeted:
        greeting = decode_greeting(data)
        if greeting.vrid != self.vrid:
            raise LinkError("wrong_vrid", str(greeting.vrid))
        expected = master_proof(self.key, self.vrid, self._hello.nonce, greeting.nonce, greeting.status)
        proven = hmac.compare_digest(expected, greeting.proof)
        if greeting.status is Status.OK:
            if not proven:
                raise LinkError("bad_proof")
            return Greeted(greeting.status, True, backup_proof(self.key, self.vrid, self._hello.nonce, greeting.nonce))
        # A master without the key answers AUTH_MISMATCH unproven; so could anyone.
        return Greeted(greeting.status, proven, b"")


class MasterHandshake:
    """The master's side of one connection: :meth:`greet` a hello, then :meth:`check` the backup's proof."""

    def __init__(self, key: bytes | None, *, nonce: bytes | None = None) -> None:
        self.key = key
        self.nonce = nonce or new_nonce()
        self.status: Status | None = None
        self._hello: Hello | None = None

    def greet(self, hello: Hello, status: Status) -> bytes:
        """The greeting for ``hello``; the caller decided ``status`` (registration, limits,
        peers). A hello whose authentication differs from ours gets AUTH_MISMATCH, unproven;
        one with other features than ours VERSION_MISMATCH, proven."""
        if status is Status.OK and hello.authenticated != (self.key is not None):
            status = Status.AUTH_MISMATCH
        elif status is Status.OK and hello.features != FEATURES:
            status = Status.VERSION_MISMATCH
        key = None if status is Status.AUTH_MISMATCH else self.key
        self._hello, self.status = hello, status
        return Greeting(hello.vrid, status, self.nonce, master_proof(key, hello.vrid, hello.nonce, self.nonce, status)).encode()

    def check(self, proof: bytes) -> bool:
        """Whether the backup proved the shared key (without a key: sent the 32 zero bytes)."""
        if self._hello is None or self.status is not Status.OK:
            return False
        expected = backup_proof(self.key, self._hello.vrid, self._hello.nonce, self.nonce)
        return hmac.compare_digest(expected, proof)


def _check_vrid(vrid: int) -> None:
    if not 1 <= vrid <= 255:
        raise ValueError("vrid must be 1..255")


def _check_size(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")
