"""The rise/fall health counter behaves as HAProxy's, including its stats strings."""

import pytest

from proxy.config.model import InitState
from proxy.health.counter import HealthCounter, State

UP, DOWN = InitState.UP, InitState.DOWN


def play(counter: HealthCounter, results: str) -> list[tuple[str, str | None]]:
    """Feed "P"/"F" results; after each, the status and the transition (if any)."""
    seen = []
    for result in results:
        transition = counter.record(result == "P")
        seen.append((counter.status, transition.new_state.value if transition else None))
    return seen


# (rise, fall, init state, results, [(status, transition) after each result])
PATHS = [
    # Fully up (rise 2, fall 3): three failures go down, showing HAProxy's "UP n/fall".
    (2, 3, UP, "PFFF", [("UP", None), ("UP 2/3", None), ("UP 1/3", None), ("DOWN", "DOWN")]),
    # A success while going down restores fully UP at once.
    (2, 3, UP, "PFFP", [("UP", None), ("UP 2/3", None), ("UP 1/3", None), ("UP", None)]),
    # From fully down, rise successes go up, showing "DOWN n/rise".
    (2, 3, UP, "FPP", [("DOWN", "DOWN"), ("DOWN 1/2", None), ("UP", "UP")]),
    # A failure while going up returns to fully DOWN at once.
    (2, 3, UP, "FPFPP", [("DOWN", "DOWN"), ("DOWN 1/2", None), ("DOWN", None), ("DOWN 1/2", None), ("UP", "UP")]),
    # init-state up (HAProxy's default): counter at rise, one failure marks DOWN.
    (2, 3, UP, "F", [("DOWN", "DOWN")]),
    # init-state down: the first check decides, either way.
    (2, 3, DOWN, "P", [("UP", "UP")]),
    (2, 3, DOWN, "F", [("DOWN", None)]),
    # ... and after a first failure, rise successes are needed as usual.
    (2, 3, DOWN, "FPP", [("DOWN", None), ("DOWN 1/2", None), ("UP", "UP")]),
    # Saturation at both ends.
    (2, 3, DOWN, "FFF", [("DOWN", None)] * 3),
    (2, 3, DOWN, "PPPP", [("UP", "UP"), ("UP", None), ("UP", None), ("UP", None)]),
    # Other shapes: rise 3 fall 2.
    (3, 2, DOWN, "PF", [("UP", "UP"), ("UP 1/2", None)]),
    (3, 2, DOWN, "FPPP", [("DOWN", None), ("DOWN 1/3", None), ("DOWN 2/3", None), ("UP", "UP")]),
    (3, 2, UP, "PFF", [("UP", None), ("UP 1/2", None), ("DOWN", "DOWN")]),
    # rise 1 fall 1: every result decides.
    (1, 1, DOWN, "PFPF", [("UP", "UP"), ("DOWN", "DOWN"), ("UP", "UP"), ("DOWN", "DOWN")]),
    (1, 1, UP, "FP", [("DOWN", "DOWN"), ("UP", "UP")]),
    # fall 1 with rise 2: one failure from fully up goes down.
    (2, 1, UP, "PF", [("UP", None), ("DOWN", "DOWN")]),
]


@pytest.mark.parametrize("rise, fall, init, results, expected", PATHS)
def test_counter_follows_haproxy_paths(rise, fall, init, results, expected):
    assert play(HealthCounter(rise, fall, init), results) == expected


@pytest.mark.parametrize(
    "rise, fall, init, status, is_up, counter",
    [
        (2, 3, DOWN, "DOWN 1/2", False, 1),  # as HAProxy 3.1 shows init-state down
        (2, 3, UP, "UP 1/3", True, 2),  # as HAProxy shows a fresh server
        (1, 3, DOWN, "DOWN", False, 0),
        (1, 3, UP, "UP 1/3", True, 1),
    ],
)
def test_initial_state(rise, fall, init, status, is_up, counter):
    health = HealthCounter(rise, fall, init)
    assert (health.status, health.is_up, health.counter, health.checked) == (status, is_up, counter, False)


def test_default_init_state_is_down():
    assert not HealthCounter(2, 3).is_up


def test_transition_carries_old_and_new_status():
    health = HealthCounter(2, 3, UP)
    play(health, "PFF")
    transition = health.record(False)
    assert transition is not None
    assert (transition.new_state, transition.old_status, transition.new_status) == (State.DOWN, "UP 1/3", "DOWN")
    assert not transition.went_up


def test_counter_stays_within_bounds():
    health = HealthCounter(2, 3, UP)
    for result in "PPPPPPFFFFFFFPFPFPPPFFPP" * 4:
        health.record(result == "P")
        assert 0 <= health.counter <= health.rise + health.fall - 1
        assert health.is_up == (health.counter >= health.rise)


@pytest.mark.parametrize(
    "before, expect_transition",
    [("P", True), ("PF", True), ("", False), ("F", False), ("FP", False)],
)
def test_force_down_marks_down_with_counter_zero(before, expect_transition):
    health = HealthCounter(2, 3, DOWN)
    play(health, before)
    old_status = health.status
    transition = health.force_down()
    assert (health.counter, health.status, health.is_up) == (0, "DOWN", False)
    assert (transition is not None) == expect_transition
    if transition:
        assert (transition.new_state, transition.old_status) == (State.DOWN, old_status)


def test_force_down_then_needs_rise_successes():
    health = HealthCounter(2, 3, DOWN)
    play(health, "P")
    health.force_down()
    assert play(health, "PP") == [("DOWN 1/2", None), ("UP", "UP")]


@pytest.mark.parametrize(
    "results, changing, fully_up, fully_down",
    [("", True, False, False), ("P", False, True, False), ("PF", True, False, False), ("F", False, False, True)],
)
def test_is_changing_between_the_extremes(results, changing, fully_up, fully_down):
    health = HealthCounter(2, 3, DOWN)
    play(health, results)
    assert (health.is_changing, health.is_fully_up, health.is_fully_down) == (changing, fully_up, fully_down)


def test_checked_after_first_record():
    health = HealthCounter(2, 3)
    health.force_down()
    assert not health.checked
    health.record(True)
    assert health.checked


@pytest.mark.parametrize("rise, fall", [(0, 3), (2, 0), (-1, 1)])
def test_rejects_rise_or_fall_below_one(rise, fall):
    with pytest.raises(ValueError):
        HealthCounter(rise, fall)


def test_snapshot_and_restore_carry_a_verdict_over():
    old = HealthCounter(2, 3, DOWN)
    play(old, "PF")
    new = HealthCounter(2, 3, DOWN)
    new.restore(old.snapshot())
    assert (new.status, new.checked) == ("UP 2/3", True)


@pytest.mark.parametrize(
    "state, rise, fall, status",
    [
        ((4, True, True), 2, 1, "UP"),  # fully up under rise 2 fall 3; the new range ends at 2
        ((2, True, True), 4, 2, "UP 1/2"),  # an UP server stays UP under a higher rise
        ((3, False, True), 2, 3, "DOWN 1/2"),  # a DOWN server stays DOWN under a lower rise
        ((0, False, False), 3, 3, "DOWN"),
    ],
)
def test_restore_keeps_the_state_under_new_rise_and_fall(state, rise, fall, status):
    counter = HealthCounter(rise, fall, UP)
    counter.restore(state)
    assert (counter.status, counter.is_up, counter.checked) == (status, state[1], state[2])
