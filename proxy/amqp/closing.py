"""Did an AMQP connection end with Connection.Close / Close-Ok? Sans-I/O.

RabbitMQ closes its sockets with a reset (linger 0), even after a clean
Close / Close-Ok exchange, so the socket alone cannot tell a clean end from
an abort (REFERENCE.md section 10). The relay keeps the last bytes each
direction carried (:data:`TAIL` at most, copied only from reads that pass
through user space anyway); at the end, :func:`clean_close` looks at them:

- the client closed: the broker's last frame is Close-Ok (channel 0);
- the broker closed: the client's last frame is Close-Ok, and the broker's
  last frame is its Connection.Close, whose reply code says why.

No frame tracking runs while data flows: only the tails, and only once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ..health.amqp_methods import ConnectionCloseOk
from .inspect import reply_name

TAIL: Final = 512  # a Close frame is at most 7 + 4 + 2 + 256 + 4 + 1 = 274 bytes
CLOSE_OK_FRAME: Final = ConnectionCloseOk().frame()
_FRAME_HEAD: Final = struct.Struct("!BHI")
_CLOSE_HEAD: Final = b"\x00\x0a\x00\x32"  # class 10, method 50


@dataclass(frozen=True, slots=True)
class CleanClose:
    """An AMQP close was completed before the sockets went."""

    by_broker: bool
    reply_code: int | None = None  # the broker's Close, when it closed
    reply_text: str = ""

    @property
    def reason(self) -> str | None:
        """For the log line: why a broker closed (None when the client did, or 200)."""
        if not self.by_broker or self.reply_code in (None, 200):
            return None
        return f"closed by broker: {reply_name(self.reply_code)}"


def clean_close(client_tail: bytes | None, server_tail: bytes | None) -> CleanClose | None:
    """The completed close these tails show, or None (an abort, or unknown)."""
    if server_tail and server_tail.endswith(CLOSE_OK_FRAME):
        return CleanClose(by_broker=False)
    if client_tail and client_tail.endswith(CLOSE_OK_FRAME):
        code, text = _last_close(server_tail or b"")
        return CleanClose(by_broker=True, reply_code=code, reply_text=text)
    return None


def _last_close(tail: bytes) -> tuple[int | None, str]:
    """(reply code, text) of a Connection.Close frame ending `tail`, if there is one."""
    start = tail.rfind(b"\x01\x00\x00")
    while start >= 0:
        if len(tail) - start >= 14:
            _, _, size = _FRAME_HEAD.unpack_from(tail, start)
            end = start + 7 + size
            if end + 1 == len(tail) and tail[end] == 0xCE and tail[start + 7 : start + 11] == _CLOSE_HEAD:
                code = int.from_bytes(tail[start + 11 : start + 13], "big")
                length = tail[start + 13]
                return code, tail[start + 14 : start + 14 + length].decode("utf-8", "replace")
        start = tail.rfind(b"\x01\x00\x00", 0, start)
    return None, ""
