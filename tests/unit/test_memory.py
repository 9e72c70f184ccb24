"""proxy.memory: when Warren gives freed memory back (trio's mock clock), and which memory it
moves onto huge pages."""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from proxy import app as app_module
from proxy.app import App
from proxy.config.model import Vip
from proxy.memory import trim_after_waves
from tests.proxyutil import make_config, server


async def trims_seen(closes: dict[float, int], *, until: float) -> list[float]:
    """Runs the trimmer over a script of {time: closed_total from then on}; the trim times."""
    trims: list[float] = []
    start = trio.current_time()

    def closed_total() -> int:
        now = trio.current_time() - start
        return max((n for t, n in closes.items() if t <= now), default=0)

    with trio.move_on_after(until):
        await trim_after_waves(closed_total, interval=5, wave=256,
                               trim=lambda pad: trims.append(trio.current_time() - start))
    return trims


async def test_a_wave_of_closes_is_trimmed_at_the_next_look(autojump_clock):
    assert await trims_seen({1: 1000}, until=60) == [5]


async def test_few_closes_are_not_worth_a_trim(autojump_clock):
    assert await trims_seen({1: 10, 7: 200, 40: 255}, until=60) == []


async def test_the_tail_of_a_wave_spread_over_several_looks_is_trimmed_once_it_ends(autojump_clock):
    # 600 closes by the first look, 150 more by the second, then quiet: the 150 would
    # otherwise keep their memory until the next wave.
    assert await trims_seen({1: 600, 7: 750}, until=60) == [5, 15]


async def test_a_wave_ending_at_a_look_costs_no_second_trim(autojump_clock):
    assert await trims_seen({1: 600}, until=60) == [5]



# -- huge pages for the start-up memory (a killed VIP master's peer link ends sooner) ------------

_COLLAPSE_PROBE = r"""
import ctypes, mmap, re
from proxy.memory import HUGE_PAGE, collapse_startup_memory

def mapping(touch_every):
    size = 4 * HUGE_PAGE  # whatever its alignment, it holds three whole huge pages' ranges
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for offset in range(0, size, 4096 * touch_every):
        buffer[offset] = 1
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    # A mapping of its own (MADV_DONTFORK: flags no neighbour has): else the kernel may
    # merge it with the interpreter's adjacent memory, whose dense ranges then move too
    # and grow the merged region's RSS by their holes (seen with Debian's python3.11).
    libc = ctypes.CDLL(None)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.madvise(address, size, 10) == 0  # MADV_DONTFORK
    return buffer, address

def region(address):
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read()):
        low, high = (int(part, 16) for part in block.split()[0].split("-"))
        if low <= address < high:
            return {key: int(value) for key, value in re.findall(r"^(Rss|AnonHugePages):\s+(\d+) kB", block, re.M)}

(dense, at_dense), (sparse, at_sparse) = mapping(1), mapping(8)
before = region(at_dense), region(at_sparse)
collapsed = collapse_startup_memory()
print((collapsed, before, (region(at_dense), region(at_sparse))))
"""


def test_densely_used_private_memory_moves_onto_huge_pages_and_sparse_memory_does_not_grow():
    if "[madvise]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        pytest.skip("transparent huge pages are not in 'madvise' mode here (off, or on for everything)")
    result = subprocess.run([sys.executable, "-c", _COLLAPSE_PROBE], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    collapsed, before, after = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    (dense_before, sparse_before), (dense_after, sparse_after) = before, after
    assert dense_before["AnonHugePages"] == 0 and collapsed >= 3
    assert dense_after["AnonHugePages"] >= 3 * 2048
    # No RSS grew: collapsing the sparse one (an eighth resident) would have by 1.75 MiB a range.
    assert dense_after["Rss"] == dense_before["Rss"] and sparse_after["Rss"] == sparse_before["Rss"]


class _Recorder:
    """A service that notes when it starts running, as a VIP instance starts its election."""

    name = "recorder"

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    async def run(self, runtime, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.seen.append("service running")
        task_status.started()
        await trio.sleep_forever()

    def reconfigure(self, config) -> None:
        pass


async def test_the_start_up_collection_and_huge_page_move_run_before_any_service_does(monkeypatch):
    # Each stalls the event loop (a full collection: 30 ms of CPU, 140-300 ms at load 16; the
    # move: up to 1.7 s seen under load): once a VIP instance runs, it reads no advert meanwhile.
    seen: list[str] = []

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append(f"collection of generation {info['generation']}")

    monkeypatch.setattr(app_module, "collapse_startup_memory", lambda: seen.append("huge page move"))
    vip = Vip(name="front", interface="eth0", vrid=51, addresses=("10.0.0.100/24",))  # a peer link by default
    app = App(replace(make_config([server("a", 9)]), vip=(vip,)), handle_signals=False, freeze_start_up=True)
    app.services = [_Recorder(seen)]
    gc.disable()  # only the collections Warren asks for
    gc.callbacks.append(on_collection)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(app.serve)
                nursery.cancel_scope.cancel()
    finally:
        gc.callbacks.remove(on_collection)
        gc.unfreeze()
        gc.enable()
    assert seen == ["collection of generation 2", "huge page move", "service running", "collection of generation 1"]
