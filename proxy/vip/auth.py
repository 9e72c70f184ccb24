"""Optional HMAC authentication of VRRP adverts, sans-I/O.

Off by default. RFC 5798 removed authentication from VRRPv3 (section 9), and
keepalived's VRRPv2 "PASS" sends 8 clear-text bytes, so plain peers such as
keepalived interoperate with Warren only while this is off.

When on, every advert carries a trailer after the VRRP message::

    VRRP message | sequence (8 bytes, big-endian) | HMAC-SHA256 truncated to 16 bytes

The MAC covers a domain label, the IP pseudo-header (so a captured advert
cannot be re-sent from another address or to another group), the VRRP message
and the sequence. The VRRP checksum is left as RFC 5798 defines it (over the
VRRP message only), so the trailer is stripped before :func:`decode_advert`.

The sequence is a microsecond wall-clock timestamp made strictly increasing
(:class:`SequenceSource`): it keeps growing across restarts of the sender
without any stored state, as long as the sender's clock does not step back.
Receivers keep a :class:`ReplayGuard` per sender.

Trade-offs (what this does and does not buy):

- It stops forged adverts: nobody without the key can claim priority 255 to
  steal the VIP, or send priority 0 in the master's name to force failovers.
- It stops replays to a running receiver (the sequence must grow). A receiver
  that has just restarted has no memory; ``max_age`` (off by default, needs
  NTP-synchronised clocks) bounds how old a replayed advert may be.
- It cannot stop an attacker on the segment from dropping or delaying
  adverts: that still forces a failover, or a split brain if they drop in both
  directions. Nothing at this layer can.
- keepalived cannot verify the trailer and a plain VRRPv3 decoder rejects the
  longer message, so every node of a group must have the same setting; a
  mixed group ends up with several masters. Changing the key needs all nodes
  restarted with the new key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass, field

from proxy.vip.packet import IPAddress, PacketError, pseudo_header

SEQUENCE_LEN = 8
MAC_LEN = 16  # HMAC-SHA256 truncated to 128 bits (RFC 2104 section 5 allows truncation)
TRAILER_LEN = SEQUENCE_LEN + MAC_LEN
MIN_KEY_LEN = 16
_LABEL = b"warren-vrrp-hmac-v1\x00"
_SEQUENCE = struct.Struct("!Q")


class AuthError(PacketError):
    """An advert failed authentication; handled like any other bad packet."""


def sign(payload: bytes, seq: int, key: bytes, src_ip: IPAddress | str, dst_ip: IPAddress | str) -> bytes:
    """``payload`` with the authentication trailer appended (``ValueError`` on bad arguments)."""
    _check_key(key)
    if not 0 <= seq < 2**64:
        raise ValueError("sequence must fit in 64 bits")
    sequence = _SEQUENCE.pack(seq)
    return payload + sequence + _mac(key, src_ip, dst_ip, payload, sequence)


def verify(
    signed: bytes, key: bytes, src_ip: IPAddress | str, dst_ip: IPAddress | str
) -> tuple[bytes, int]:
    """Check the trailer; return ``(vrrp_payload, seq)`` or raise :class:`AuthError`.

    Replay protection is separate: feed ``seq`` to a :class:`ReplayGuard`.
    """
    _check_key(key)
    signed = bytes(signed)
    if len(signed) < TRAILER_LEN:
        raise AuthError("auth_missing", "no authentication trailer")
    payload = signed[:-TRAILER_LEN]
    sequence = signed[-TRAILER_LEN:-MAC_LEN]
    try:
        expected = _mac(key, src_ip, dst_ip, payload, sequence)
    except ValueError:
        raise AuthError("auth_bad_endpoint") from None
    if not hmac.compare_digest(expected, signed[-MAC_LEN:]):
        raise AuthError("auth_bad_mac")
    return payload, _SEQUENCE.unpack(sequence)[0]


def _mac(key: bytes, src_ip: object, dst_ip: object, payload: bytes, sequence: bytes) -> bytes:
    src, dst = ipaddress.ip_address(src_ip), ipaddress.ip_address(dst_ip)  # type: ignore[arg-type]
    message = _LABEL + pseudo_header(src, dst, len(payload)) + payload + sequence
    return hmac.new(key, message, hashlib.sha256).digest()[:MAC_LEN]


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_LEN:
        raise ValueError(f"the authentication key must be at least {MIN_KEY_LEN} bytes")


@dataclass(slots=True)
class SequenceSource:
    """Strictly increasing 64-bit sequence numbers derived from the wall clock.

    ``next(wall_time)`` returns ``max(last + 1, microseconds since the epoch)``:
    monotonic within a process even if the clock steps back, and larger than
    anything a previous run of the sender used as long as the clock did not go
    back across the restart. Pass ``time.time()``.
    """

    last: int = 0

    def next(self, wall_time: float) -> int:
        self.last = max(self.last + 1, int(wall_time * 1_000_000))
        return self.last


@dataclass(slots=True)
class ReplayGuard:
    """Rejects non-increasing sequences per sender (and, optionally, stale ones).

    ``max_age``: if set, a sequence whose timestamp is more than ``max_age``
    seconds away from the receiver's wall clock is rejected too; this protects
    a freshly restarted receiver but needs synchronised clocks.
    """

    max_age: float | None = None
    _last: dict[IPAddress, int] = field(default_factory=dict)

    def check(self, sender: IPAddress, seq: int, wall_time: float | None = None) -> None:
        """Record ``seq`` from ``sender`` or raise :class:`AuthError` (``auth_replay`` / ``auth_stale``).

        Call only after :func:`verify` succeeded, or a forger could poison the state.
        """
        last = self._last.get(sender)
        if last is not None and seq <= last:
            raise AuthError("auth_replay", f"sequence {seq} <= {last}")
        if self.max_age is not None and wall_time is not None:
            if abs(seq / 1_000_000 - wall_time) > self.max_age:
                raise AuthError("auth_stale", f"sequence {seq} too far from the clock")
        self._last[sender] = seq

    def forget(self, sender: IPAddress) -> None:
        """Drop what is known about ``sender`` (e.g. an operator reset)."""
        self._last.pop(sender, None)
