"""Giving freed memory back to the system after a wave of connections has gone.

A TLS connection in its handshake holds OpenSSL's record buffers (about 40
kB); a thousand clients that open a handshake and stall (a scan, an attack,
a reconnect storm) free that memory when they are closed, but glibc keeps
the freed pages in its heaps, so Warren's RSS stays at the peak. Measured
here: 1,000 stalled handshakes left RSS 48 MB higher, and every such wave
fragmented the heaps a little further; ``malloc_trim(0)`` brought it back to
its level each time. So when many connections have closed since the last
look, Warren trims, at most every ``interval`` seconds (a trim of a
100 MB heap takes a few milliseconds), and once more when the wave is over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import structlog
import trio

log = structlog.get_logger("warren.memory")

INTERVAL = 5.0
WAVE = 256  # closed connections since the last trim that make one worthwhile


def freeze_startup_objects() -> None:
    """Moves every object alive once Warren has started (modules, config,
    runtime model, tens of thousands) out of the cyclic collector's reach.

    A stream of connections keeps promoting objects into the oldest
    generation (a connection's objects live across a few young
    collections), and each full collection walked every start-up object
    again: about 5 % of Warren's CPU under wrk with `Connection: close`.
    Frozen objects are still freed by reference counting; only a cycle
    among them would stay, and start-up objects live for the whole run
    anyway.
    """
    gc.collect()
    gc.freeze()


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


async def trim_after_waves(closed_total, *, interval: float = INTERVAL, wave: int = WAVE, trim=None) -> None:
    """Forever: every `interval`, trim if `closed_total()` grew by `wave` or more since the
    last trim; and once more when such a wave has ended (no close for a whole interval),
    for its tail: a wave spread over several intervals (slow clients, a busy machine)
    otherwise leaves the memory of its last fewer-than-`wave` connections untrimmed."""
    trim = trim or _malloc_trim()
    if trim is None:
        return
    last = previous = closed_total()
    tail_owed = False
    while True:
        await trio.sleep(interval)
        now = closed_total()
        quiet, previous = now == previous, now
        if now - last >= wave:
            tail_owed = True  # trim now, and its tail once the wave has ended
        elif tail_owed and quiet:
            tail_owed = False
            if now == last:  # nothing closed after the wave's last trim
                continue
        else:
            continue
        last = now
        trim(0)
        log.debug("memory.trimmed", closed=now)
