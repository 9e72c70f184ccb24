"""Rate-limited log events: the first of each interval in full, the rest summed up once."""

import structlog

from proxy.lograte import MAX_TRACKED_CLIENTS, Rate, RateLimitedLog


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(burst=2, interval=10.0):
    clock = Clock()
    logger = structlog.get_logger("test")
    return RateLimitedLog(logger, {"x.refused": Rate(burst, interval)}, clock=clock), clock


def test_the_first_events_are_logged_in_full_the_rest_summed_up_per_interval():
    log, clock = make()
    with structlog.testing.capture_logs() as logs:
        for i in range(10):
            log.warning("x.refused", client=f"10.0.0.{i % 3}", n=i)
        log.flush()  # the interval is not over: no summary yet
        clock.now = 10.0
        log.flush()
        log.flush()
    assert [e.get("n") for e in logs[:2]] == [0, 1]
    summary = logs[2]
    assert len(logs) == 3 and summary["event"] == "x.refused" and summary["log_level"] == "warning"
    assert (summary["summary"], summary["suppressed"], summary["clients"]) == (True, 8, 3)
    assert summary["top_client"] in ("10.0.0.0", "10.0.0.1", "10.0.0.2") and summary["top_client_events"] == 3


def test_a_new_interval_logs_in_full_again_after_its_summary():
    log, clock = make(burst=1)
    with structlog.testing.capture_logs() as logs:
        log.info("x.refused", n=1)
        log.info("x.refused", n=2)
        clock.now = 11.0
        log.info("x.refused", n=3)  # flushes the summary of the first interval first
    assert [(e.get("n"), e.get("suppressed")) for e in logs] == [(1, None), (None, 1), (3, None)]


def test_an_interval_without_excess_has_no_summary():
    log, clock = make(burst=5)
    with structlog.testing.capture_logs() as logs:
        log.info("x.refused")
        clock.now = 20.0
        log.flush()
    assert len(logs) == 1


def test_other_events_pass_through():
    log, _ = make(burst=0)
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            log.info("x.other", a=1)
    assert len(logs) == 5


def test_a_spray_of_clients_costs_bounded_memory():
    log, clock = make(burst=0)
    with structlog.testing.capture_logs() as logs:
        for i in range(MAX_TRACKED_CLIENTS * 3):
            log.warning("x.refused", client=f"2001:db8::{i:x}")
        clock.now = 10.0
        log.flush()
    assert logs[0]["suppressed"] == MAX_TRACKED_CLIENTS * 3
    assert logs[0]["clients"] == MAX_TRACKED_CLIENTS + 1 and logs[0]["top_client"] == "other"
