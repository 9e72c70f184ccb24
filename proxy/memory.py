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

Also, once at start-up with a VIP peer link: the start-up memory moved onto
huge pages (:func:`collapse_startup_memory`), which a killed process's kernel
frees faster.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gc
import os
import time

import structlog
import trio

log = structlog.get_logger("warren.memory")

INTERVAL = 5.0
WAVE = 256  # closed connections since the last trim that make one worthwhile


def collect_startup_garbage() -> None:
    """The full collection before :func:`freeze_startup_objects`, run before any service
    starts: it walks every object (about 30 ms of CPU for Warren's 60,000, 140-300 ms
    of wall time at load 16), and a VIP instance already running would read no advert
    meanwhile: a joining backup whose event loop was blocked past its master-down
    deadline took over (reason master_down) from a live master, once in a few starts
    under load."""
    gc.collect()


def freeze_startup_objects(*, collected: bool = False) -> None:
    """Moves every object alive once Warren has started (modules, config,
    runtime model, tens of thousands) out of the cyclic collector's reach.

    A stream of connections keeps promoting objects into the oldest
    generation (a connection's objects live across a few young
    collections), and each full collection walked every start-up object
    again: about 5 % of Warren's CPU under wrk with `Connection: close`.
    Frozen objects are still freed by reference counting; only a cycle
    among them would stay, and start-up objects live for the whole run
    anyway. ``collected``: :func:`collect_startup_garbage` ran before the
    services started, so only the young generations (what they allocated
    since, a few milliseconds) are collected before the freeze.
    """
    gc.collect(1 if collected else 2)
    gc.freeze()


MADV_COLLAPSE = 25  # Linux 6.1: make a range one transparent huge page, now
HUGE_PAGE = 2 << 20
PAGE = 4096
DENSE = 0.75  # at least this share of a huge page's range resident: collapsing it adds little


def collapse_startup_memory(*, dense: float = DENSE) -> int:
    """Moves the densely used parts of the process's private anonymous memory (the malloc
    heap, Python's arenas where the kernel merged them: mostly start-up objects) onto
    transparent huge pages; returns how many 2 MiB ranges moved (0 where the kernel cannot).

    Why: a killed process's kernel frees its whole address space before it closes
    any socket (``exit_mm()`` runs before ``exit_files()``), so a killed VIP
    master's peer link ends only after that teardown, and freeing 4 KiB pages
    one by one is its cost: measured here, 48 MiB of anonymous memory took
    12.5 ms on 4 KiB pages and 2.8 ms on huge pages (docs/vip.md, the peer
    link). ``MADV_COLLAPSE`` works whatever the THP sysfs mode (but ``never``)
    and leaves later allocations on ordinary pages, so only ranges already at
    least ``dense`` resident move and the RSS grows by their holes only. It blocks
    for 10-140 ms (measured under load): Warren runs it once, in a worker thread (the
    ``madvise`` calls release the GIL), before it reports ready.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    except (OSError, AttributeError, TypeError):
        return 0
    madvise = libc.madvise
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    started, collapsed = time.monotonic(), 0
    try:
        for start in _dense_huge_ranges(pagemap, dense):
            if madvise(start, HUGE_PAGE, MADV_COLLAPSE) == 0:
                collapsed += 1
            elif not collapsed and ctypes.get_errno() in (errno.EINVAL, errno.EPERM):
                break  # an older kernel, or THP off (later, one range's EINVAL only skips it)
    finally:
        os.close(pagemap)
    log.info("memory.huge_pages", collapsed_mib=collapsed * HUGE_PAGE >> 20,
             ms=round((time.monotonic() - started) * 1000, 1))
    return collapsed


def _dense_huge_ranges(pagemap: int, dense: float):
    """Starts of the 2 MiB-aligned ranges inside private anonymous writable mappings
    with at least ``dense`` of their pages present (the pagemap's bit 63)."""
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    for fields in regions:
        if fields[1] != "rw-p" or fields[4] != "0" or (len(fields) > 5 and fields[5] != "[heap]"):
            continue
        low, high = (int(part, 16) for part in fields[0].split("-"))
        for start in range(-(-low // HUGE_PAGE) * HUGE_PAGE, high - HUGE_PAGE + 1, HUGE_PAGE):
            entries = os.pread(pagemap, HUGE_PAGE // PAGE * 8, start // PAGE * 8)
            present = sum(entries[i + 7] >> 7 for i in range(0, len(entries), 8))
            if present >= dense * (HUGE_PAGE // PAGE):
                yield start


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
