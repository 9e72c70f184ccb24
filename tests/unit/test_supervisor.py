"""Supervision: the restart policy (pure) and the supervisor shell under trio's mock clock."""

import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs

from proxy.errors import StartupError
from proxy.supervisor import Backoff, RestartPolicy, ServiceExited, ServiceState, Supervisor, Supervisors

# -- the policy ------------------------------------------------------------------------------


def test_delays_grow_exponentially_up_to_the_maximum():
    policy = RestartPolicy(initial=0.5, factor=2, maximum=30)
    assert [policy.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.delay(10_000) == 30  # no overflow on a very long streak


def test_a_long_healthy_run_starts_the_series_again():
    backoff = Backoff(RestartPolicy(initial=1, factor=3, maximum=100, healthy_after=60))
    assert backoff.crashed(started=0, now=5) == 1
    assert backoff.crashed(started=6, now=7) == 3
    assert backoff.crashed(started=10, now=69.9) == 9  # just short of healthy: the streak goes on
    assert backoff.crashed(started=80, now=140) == 1  # healthy for 60 s: back to the first delay
    assert backoff.streak == 1


@pytest.mark.parametrize("settings", [
    dict(initial=0), dict(initial=5, maximum=1), dict(factor=0.5), dict(healthy_after=-1),
])
def test_a_nonsensical_policy_is_refused(settings):
    with pytest.raises(ValueError):
        RestartPolicy(**settings)


# -- the shell -------------------------------------------------------------------------------


class Flaky:
    """A service that starts, then crashes (after `crash_after` s) in each of the `crashes` first runs."""

    def __init__(self, crashes: int, crash_after: float = 1.0, *, error: Exception | None = None,
                 before_started: bool = False) -> None:
        self.crashes, self.crash_after = crashes, crash_after
        self.error = error or ValueError("injected")
        self.before_started = before_started
        self.starts: list[float] = []

    async def __call__(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.starts.append(trio.current_time())
        crashing = len(self.starts) <= self.crashes
        if crashing and self.before_started:
            raise self.error
        async with trio.open_nursery() as nursery:  # crashes arrive wrapped, as from a real service
            task_status.started()
            if crashing:
                await trio.sleep(self.crash_after)
                nursery.start_soon(self._fail)
            await trio.sleep_forever()

    async def _fail(self) -> None:
        raise self.error


def crashes_logged(logs):
    return [entry for entry in logs if entry["event"] == "service.crashed"]


async def test_a_crash_is_logged_once_counted_and_the_service_restarted_with_backoff(autojump_clock):
    flaky = Flaky(crashes=3)
    supervisor = Supervisor("health", flaky, policy=RestartPolicy(initial=0.5, factor=2, maximum=30))
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            await trio.sleep(100)
            stats = supervisor.statistics()
            nursery.cancel_scope.cancel()
    # Crashes at 1, 2.5, 4.5; restarts 0.5, 1, 2 s after each.
    assert flaky.starts == [0, 1.5, 3.5, 6.5]
    assert (stats.state, stats.crashes, stats.restarts, stats.last_error) == ("RUNNING", 3, 3, "ValueError")
    crashed = crashes_logged(logs)
    assert [(e["service"], e["crashes"], e["restart_in"]) for e in crashed] == [
        ("health", 1, 0.5), ("health", 2, 1.0), ("health", 3, 2.0)]
    assert all(isinstance(e["exc_info"], BaseException) for e in crashed)  # the traceback goes with it
    assert [e["event"] for e in logs].count("service.restarted") == 3
    assert supervisor.state is ServiceState.STOPPED


async def test_while_waiting_to_restart_the_stats_say_when(autojump_clock):
    supervisor = Supervisor("dns", Flaky(crashes=1, crash_after=2), policy=RestartPolicy(initial=4, maximum=4))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(3)
        stats = supervisor.statistics()
        nursery.cancel_scope.cancel()
    assert (stats.state, stats.crashes, stats.restarts) == ("RESTARTING", 1, 0)
    assert stats.restart_in == pytest.approx(3) and stats.last_crash == pytest.approx(1)


async def test_siblings_of_a_crashing_service_go_on(autojump_clock):
    ticks = []

    async def sibling():
        while True:
            ticks.append(trio.current_time())
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sibling)
        await nursery.start(Supervisor("stats", Flaky(crashes=5, crash_after=0.1)).run)
        await trio.sleep(10.5)
        nursery.cancel_scope.cancel()
    assert len(ticks) == 11


async def test_a_startup_error_at_the_first_start_fails_the_start(autojump_clock):
    supervisor = Supervisor("stats", Flaky(crashes=1, error=StartupError("cannot bind"), before_started=True))
    with capture_logs() as logs, pytest.raises(StartupError, match="cannot bind"):
        await supervisor.run()
    assert crashes_logged(logs) == []


async def test_a_startup_error_later_is_a_crash_like_any_other(autojump_clock):
    attempts = []

    async def binds_once(*, task_status=trio.TASK_STATUS_IGNORED):
        attempts.append(trio.current_time())
        if len(attempts) == 2:
            raise StartupError("stats: cannot listen on 127.0.0.1:8404: Address already in use")
        task_status.started()
        if len(attempts) == 1:
            await trio.sleep(1)
            raise ValueError("first crash")
        await trio.sleep_forever()

    supervisor = Supervisor("stats", binds_once, policy=RestartPolicy(initial=1, factor=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(10)
        stats = supervisor.statistics()
        nursery.cancel_scope.cancel()
    assert attempts == [0, 2, 4]
    assert (stats.state, stats.crashes, stats.last_error) == ("RUNNING", 2, "StartupError")


async def test_an_unexpected_failure_while_starting_lets_the_proxy_start(autojump_clock):
    flaky = Flaky(crashes=1, error=KeyError("bug"), before_started=True)
    supervisor = Supervisor("vip", flaky, policy=RestartPolicy(initial=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)  # reported started although the service is not
        assert supervisor.state is ServiceState.RESTARTING and trio.current_time() == 0
        await trio.sleep(3)
        assert supervisor.state is ServiceState.RUNNING
        nursery.cancel_scope.cancel()
    assert flaky.starts == [0, 2]


async def test_a_service_that_returns_by_itself_is_restarted(autojump_clock):
    runs = []

    async def returns(*, task_status=trio.TASK_STATUS_IGNORED):
        runs.append(trio.current_time())
        task_status.started()
        await trio.sleep(1 if len(runs) == 1 else float("inf"))

    supervisor = Supervisor("control", returns, policy=RestartPolicy(initial=1))
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    assert runs == [0, 2]
    [crash] = crashes_logged(logs)
    assert isinstance(crash["exc_info"], ServiceExited) and crash["error"] == "ServiceExited"


async def test_a_failing_method_called_from_outside_restarts_the_service(autojump_clock):
    class Service:
        def __init__(self):
            self.runs = 0
            self.config = None

        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            self.runs += 1
            task_status.started()
            await trio.sleep_forever()

        def reconfigure(self, config):
            self.config = config  # recorded first, as the Service contract asks
            raise RuntimeError("a bug in reconfigure")

    service = Service()
    supervisor = Supervisor("health", service.run, policy=RestartPolicy(initial=1))
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            assert supervisor.call(service.reconfigure, "new config") is None  # never raises to the app
            await trio.sleep(0.5)
            assert supervisor.state is ServiceState.RESTARTING
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert (service.runs, service.config, supervisor.crashes) == (2, "new config", 1)
    assert [e["error"] for e in crashes_logged(logs)] == ["RuntimeError"]


async def test_a_failing_method_while_the_service_is_down_is_counted_once(autojump_clock):
    supervisor = Supervisor("dns", Flaky(crashes=1, crash_after=0), policy=RestartPolicy(initial=10))

    def broken(config):
        raise RuntimeError("bug")

    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(1)
        supervisor.call(broken, "config")
        assert supervisor.crashes == 2 and supervisor.state is ServiceState.RESTARTING
        await trio.sleep(10)
        assert supervisor.state is ServiceState.RUNNING
        nursery.cancel_scope.cancel()


async def test_an_async_method_failure_is_a_crash_too(autojump_clock):
    supervisor = Supervisor("vip", Flaky(crashes=0))

    async def stopping():
        await trio.sleep(0.1)
        raise OSError("no route")

    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await supervisor.call_async(stopping)
        await trio.testing.wait_all_tasks_blocked()
        assert supervisor.crashes == 1
        nursery.cancel_scope.cancel()


async def test_stopping_is_not_a_crash(autojump_clock):
    supervisor = Supervisor("stats", Flaky(crashes=0))
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            nursery.cancel_scope.cancel()
    assert supervisor.crashes == 0 and crashes_logged(logs) == []
    assert supervisor.state is ServiceState.STOPPED


async def test_a_crash_during_cancellation_is_logged_and_the_cancellation_goes_on(autojump_clock):
    async def fails_on_the_way_out(*, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            raise ValueError("cleanup bug")

    supervisor = Supervisor("vip", fails_on_the_way_out)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            nursery.cancel_scope.cancel()
    assert [e["error"] for e in crashes_logged(logs)] == ["ValueError"]


async def test_the_registry_lists_every_supervisor_in_start_order(autojump_clock):
    registry = Supervisors()
    names = ["dns", "health", "stats"]
    supervisors = [Supervisor(name, Flaky(crashes=0), registry=registry) for name in names]
    async with trio.open_nursery() as nursery:
        for supervisor in supervisors:
            await nursery.start(supervisor.run)
        assert [(s.name, s.state) for s in registry.statistics()] == [(n, "RUNNING") for n in names]
        registry.remove(supervisors[1])
        registry.remove(Supervisor("stats", Flaky(0)))  # another one of that name: not removed
        assert [s.name for s in registry.statistics()] == ["dns", "stats"]
        assert registry["stats"] is supervisors[2]
        nursery.cancel_scope.cancel()
