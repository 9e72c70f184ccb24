"""Check intervals follow the server's state; passive observation acts at error-limit."""

import random

import pytest

from proxy.config.model import Health, InitState, OnError
from proxy.health.counter import HealthCounter
from proxy.health.schedule import ErrorObserver, base_interval, next_delay

HEALTH = Health(inter=2.0, fastinter=0.5, downinter=5.0, rise=2, fall=3)


def counter_after(results: str, init: InitState = InitState.DOWN) -> HealthCounter:
    counter = HealthCounter(2, 3, init)
    for result in results:
        counter.record(result == "P")
    return counter


@pytest.mark.parametrize("init", [InitState.UP, InitState.DOWN])
def test_first_check_runs_immediately(init):
    assert next_delay(HealthCounter(2, 3, init), HEALTH, random.Random(1)) == 0.0


@pytest.mark.parametrize(
    "results, expected",
    [
        ("P", 2.0),  # fully up: inter
        ("PF", 0.5),  # going down: fastinter
        ("PFF", 0.5),
        ("F", 5.0),  # fully down: downinter
        ("FP", 0.5),  # going up: fastinter
        ("PFFF", 5.0),
    ],
)
def test_interval_follows_state(results, expected):
    assert next_delay(counter_after(results), HEALTH, random.Random(1)) == expected


@pytest.mark.parametrize("results", ["P", "PF", "F"])
def test_unset_fastinter_and_downinter_mean_inter(results):
    health = Health(inter=3.0)
    assert next_delay(counter_after(results), health, random.Random(1)) == 3.0


@pytest.mark.parametrize("results", ["P", "F", "PF"])
def test_fast_forces_fastinter(results):
    assert base_interval(counter_after(results), HEALTH, fast=True) == 0.5


def test_spread_stays_within_bounds_and_varies():
    health = Health(inter=2.0, spread=0.25)
    rng = random.Random(42)
    counter = counter_after("P")
    delays = [next_delay(counter, health, rng) for _ in range(2000)]
    assert all(1.5 <= d <= 2.5 for d in delays)
    assert min(delays) < 1.6 and max(delays) > 2.4  # both sides of inter are used
    assert len(set(delays)) > 1000


def test_spread_is_reproducible_with_a_seed():
    health = Health(inter=2.0, spread=0.5)
    counter = counter_after("P")
    first = [next_delay(counter, health, random.Random(7)) for _ in range(3)]
    assert first == [next_delay(counter, health, random.Random(7)) for _ in range(3)]


def test_no_spread_leaves_rng_untouched():
    rng = random.Random(3)
    state = rng.getstate()
    assert next_delay(counter_after("P"), Health(inter=2.0), rng) == 2.0
    assert rng.getstate() == state


def test_observer_acts_on_the_error_limit_th_consecutive_error():
    observer = ErrorObserver(3, OnError.FASTINTER)
    assert [observer.record_connect_error() for _ in range(3)] == [None, None, OnError.FASTINTER]
    # the count starts again after acting, as HAProxy resets consecutive_errors
    assert [observer.record_connect_error() for _ in range(3)] == [None, None, OnError.FASTINTER]
    assert observer.actions_taken == 2


def test_a_successful_connection_resets_the_count():
    observer = ErrorObserver(3, OnError.MARK_DOWN)
    observer.record_connect_error()
    observer.record_connect_error()
    observer.record_connect_ok()
    assert [observer.record_connect_error() for _ in range(3)] == [None, None, OnError.MARK_DOWN]


def test_observer_with_on_error_none_only_counts():
    observer = ErrorObserver(2, OnError.NONE)
    assert [observer.record_connect_error() for _ in range(4)] == [None] * 4
    assert observer.actions_taken == 0


def test_default_error_limit_is_haproxys_ten():
    health = Health()
    observer = ErrorObserver(health.error_limit, health.on_error)
    actions = [observer.record_connect_error() for _ in range(10)]
    assert actions == [None] * 9 + [OnError.FASTINTER]


def test_observer_rejects_a_limit_below_one():
    with pytest.raises(ValueError):
        ErrorObserver(0, OnError.FASTINTER)
