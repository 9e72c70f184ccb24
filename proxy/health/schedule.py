"""When to check next, and what real traffic says about a server: sans-I/O.

Intervals follow HAProxy (`srv_getinter` in its check.c): `inter` while a
server is fully UP, `downinter` while it is fully DOWN, `fastinter` while it
is changing state (and whenever passive observation asked for it).  Unset
`fastinter`/`downinter` fall back to `inter`.  The delay counts from the end
of the previous check, as in HAProxy, so a hung broker costs about
``fall x (timeout + interval)`` to detect.

Warren departs from HAProxy on the very first check: it runs at once
(delay 0) instead of being spread over the first interval, because with
``init-state down`` nothing is served until a first check passes.
"""

from __future__ import annotations

import random

from proxy.config.model import Health, OnError
from proxy.health.counter import HealthCounter


def base_interval(counter: HealthCounter, health: Health, *, fast: bool = False) -> float:
    """The interval before spread: inter / fastinter / downinter by state."""
    if counter.is_fully_up and not fast:
        return health.inter
    if counter.is_fully_down and not fast:
        return health.downinter if health.downinter is not None else health.inter
    return health.fastinter if health.fastinter is not None else health.inter


def next_delay(
    counter: HealthCounter, health: Health, rng: random.Random, *, fast: bool = False
) -> float:
    """Seconds to wait before the next check of the server `counter` judges.

    0 before the first check.  Otherwise the state's interval (see
    :func:`base_interval`; `fast=True` forces `fastinter`, the passive
    observer's FASTINTER action) scaled by a uniform random factor in
    ``[1 - spread, 1 + spread]`` so checks of many servers drift apart.
    """
    if not counter.checked:
        return 0.0
    interval = base_interval(counter, health, fast=fast)
    if health.spread <= 0:
        return interval
    return interval * (1.0 + rng.uniform(-health.spread, health.spread))


class ErrorObserver:
    """Passive health from real traffic: HAProxy's `observe layer4` + `error-limit`.

    Counts consecutive failed connections from clients' sessions to a server.
    When the count reaches `error_limit`, returns the configured action and
    starts counting again (as HAProxy resets `consecutive_errors` after acting):

    * FASTINTER: check the server at `fastinter` from now on until the
      health counter settles;
    * MARK_DOWN: mark the server DOWN at once (``HealthCounter.force_down``);
    * NONE: observe only (the count is still kept, for statistics).

    Any successful connection resets the count.
    """

    def __init__(self, error_limit: int, on_error: OnError):
        if error_limit < 1:
            raise ValueError("error_limit must be at least 1")
        self.error_limit = error_limit
        self.on_error = on_error
        self.consecutive_errors = 0
        self.actions_taken = 0

    def record_connect_error(self) -> OnError | None:
        """One real connection to the server failed; maybe act."""
        self.consecutive_errors += 1
        if self.consecutive_errors < self.error_limit:
            return None
        self.consecutive_errors = 0
        if self.on_error is OnError.NONE:
            return None
        self.actions_taken += 1
        return self.on_error

    def record_connect_ok(self) -> None:
        """One real connection succeeded: the failures were not consecutive."""
        self.consecutive_errors = 0
