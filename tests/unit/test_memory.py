"""proxy.memory.trim_after_waves: when Warren gives freed memory back (trio's mock clock)."""

from __future__ import annotations

import trio

from proxy.memory import trim_after_waves


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
