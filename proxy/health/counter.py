"""One server's health counter: HAProxy's rise/fall judgement, sans-I/O.

The counter runs from 0 to ``rise + fall - 1``; the server is UP while it is
at least ``rise``.  A failed check decrements it, and dropping below ``rise``
resets it to 0 (fully DOWN): a server never sits "half down".  A passed check
increments it, and reaching ``rise`` jumps to the top (fully UP).  So from
fully UP it takes ``fall`` consecutive failures to go DOWN, and from fully
DOWN ``rise`` consecutive successes to go UP; a single contrary result while
changing state sends the server straight back.

Initial state (HAProxy 3.1's ``init-state``, of whose four modes Warren's
configuration offers two):

* ``up``   -- HAProxy's default ``up``: UP with the counter at ``rise``, so
  the first failed check marks the server DOWN and the first passed check
  makes it fully UP.
* ``down`` -- HAProxy's ``down``: DOWN with the counter at ``rise - 1``, so
  the *first check decides*: one pass marks the server UP (fully), one
  failure leaves it fully DOWN, from where it needs ``rise`` passes as usual.
  Warren's default for brokers: a proxy that just started sends no client to
  a broker it has not seen answer, yet does not keep a healthy cluster dark
  for ``rise x inter`` after every restart.  ``rise`` exists to damp a
  server that was failing; a fresh start has no failure to damp.

Status strings are exactly HAProxy's stats page: "UP", "DOWN", and while
changing state "UP n/fall" (n = ``counter - rise + 1``: failures still to
absorb, so fully up minus one failure shows "UP 2/3" with fall 3) and
"DOWN n/rise" (n = ``counter``: successes seen so far, "DOWN 1/2").  As in
HAProxy 3.1, a server starting with ``init_state=down`` and ``rise`` 2 shows
"DOWN 1/2" until its first check, and with ``up`` shows "UP 1/3".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from proxy.config.model import InitState


class State(enum.StrEnum):
    UP = "UP"
    DOWN = "DOWN"


@dataclass(frozen=True, slots=True)
class Transition:
    """The server changed state: `new_state` with the status before and after."""

    new_state: State
    old_status: str
    new_status: str

    @property
    def went_up(self) -> bool:
        return self.new_state is State.UP


class CounterState(NamedTuple):
    """What a reload carries over from one counter to the next."""

    counter: int
    is_up: bool
    checked: bool


class HealthCounter:
    """The rise/fall counter of one server. Plain state, no clock, no I/O."""

    def __init__(self, rise: int, fall: int, init_state: InitState = InitState.DOWN):
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        # Invariant: UP exactly while counter >= rise.
        self.counter = rise if init_state is InitState.UP else rise - 1
        self.checked = False  # no check result recorded yet

    @property
    def top(self) -> int:
        """The fully-UP counter value, ``rise + fall - 1``."""
        return self.rise + self.fall - 1

    @property
    def is_up(self) -> bool:
        return self.counter >= self.rise

    @property
    def state(self) -> State:
        return State.UP if self.is_up else State.DOWN

    @property
    def is_fully_up(self) -> bool:
        return self.counter == self.top

    @property
    def is_fully_down(self) -> bool:
        return self.counter == 0

    @property
    def is_changing(self) -> bool:
        """Between the extremes: HAProxy checks such a server at `fastinter`."""
        return not (self.is_fully_up or self.is_fully_down)

    @property
    def status(self) -> str:
        """HAProxy's stats page status: "UP", "UP 2/3", "DOWN 1/2", "DOWN"."""
        if self.is_up:
            if self.is_fully_up:
                return "UP"
            return f"UP {self.counter - self.rise + 1}/{self.fall}"
        if self.is_fully_down:
            return "DOWN"
        return f"DOWN {self.counter}/{self.rise}"

    def record(self, passed: bool) -> Transition | None:
        """Count one check result; return the transition if the state changed."""
        self.checked = True
        was_up, old_status = self.is_up, self.status
        if passed:
            self._count_success()
        else:
            self._count_failure()
        return self._transition(was_up, old_status)

    def force_down(self) -> Transition | None:
        """Mark DOWN at once with the counter at 0 (the broker closed the watch
        connection, or passive observation gave up on the server)."""
        was_up, old_status = self.is_up, self.status
        self.counter = 0
        return self._transition(was_up, old_status)

    def snapshot(self) -> CounterState:
        return CounterState(self.counter, self.is_up, self.checked)

    def restore(self, state: CounterState | tuple[int, bool, bool]) -> None:
        """Carry a verdict over a reload, whose rise/fall may differ.

        The UP/DOWN state is kept; the counter is clamped into this
        counter's range on the same side of `rise` (an UP server stays UP
        even if the new `rise` is above its old counter).
        """
        counter, is_up, checked = state
        counter = max(0, min(counter, self.top))
        if is_up:
            counter = max(counter, self.rise)
        else:
            counter = min(counter, self.rise - 1)
        self.counter, self.checked = counter, checked

    def _count_success(self) -> None:
        if self.counter < self.top:
            self.counter += 1
            if self.counter >= self.rise:
                self.counter = self.top

    def _count_failure(self) -> None:
        if self.counter > 0:
            self.counter -= 1
            if self.counter < self.rise:
                self.counter = 0

    def _transition(self, was_up: bool, old_status: str) -> Transition | None:
        if self.is_up == was_up:
            return None
        return Transition(self.state, old_status, self.status)

    def __repr__(self) -> str:
        return f"HealthCounter(rise={self.rise}, fall={self.fall}, counter={self.counter}, {self.status!r})"
