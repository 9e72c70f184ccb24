"""The order in which the benchmark driver measures its contenders (bench.run.round_order)."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest

from bench.run import round_order


@pytest.mark.parametrize("contenders", [("direct", "haproxy", "warren"), ("haproxy", "warren"), ("warren",)])
def test_over_two_rounds_per_contender_each_follows_each_other_and_holds_each_place_equally_often(contenders):
    n = len(contenders)
    orders = [round_order(contenders, r) for r in range(2 * n)]
    assert all(sorted(order) == sorted(contenders) for order in orders)
    follows = Counter(pair for order in orders for pair in pairwise(order))
    assert set(follows) == {(a, b) for a in contenders for b in contenders if a != b}
    assert len(set(follows.values())) <= 1
    places = Counter((place, c) for order in orders for place, c in enumerate(order))
    assert set(places.values()) == {2}


def test_with_a_baseline_warren_and_baseline_each_follow_the_other():
    # The A/B of two Warrens (--baseline): neither always measured after the other.
    contenders = ("direct", "haproxy", "warren", "baseline")
    follows = Counter(pair for r in range(8) for pair in pairwise(round_order(contenders, r)))
    assert follows[("warren", "baseline")] == follows[("baseline", "warren")] > 0
