"""Which way the relays' poller waits, and the trio releases the fast way is trusted on."""

from __future__ import annotations

import re
import time
import tomllib
import traceback
from pathlib import Path

import pytest
import structlog
import trio

from proxy.io import trio_nesting
from proxy.io.poller import current_poller

IO_BOUND = 30  # seconds; every real-time test fails rather than hangs


async def test_a_real_run_serves_relays_from_trios_io_wait():
    # The fast way. A trio upgrade that moved the internals it reads would
    # fall back to the slower one; this test says so instead of a benchmark.
    poller = current_poller()
    await trio.sleep(0)  # the poller's task has started
    assert poller.mode == "nested"


async def test_with_a_mock_clock_the_poller_waits_through_trio(autojump_clock):
    poller = current_poller()
    await trio.sleep(0)
    assert poller.mode == "portable"
    assert trio_nesting.probe() == trio_nesting.TEST_CLOCK


async def test_the_nested_pollers_clock_is_trios_clock():
    # Poller.now reads trio's system clock itself (offset + perf_counter):
    # its readings interleave with trio's own, never out of order.
    poller = current_poller()
    await trio.sleep(0)
    assert poller.mode == "nested"
    first, mine, last = trio.current_time(), poller.now(), trio.current_time()
    assert first <= mine <= last


async def test_with_a_mock_clock_the_pollers_clock_is_the_mock(autojump_clock):
    poller = current_poller()
    await trio.sleep(0)
    before = poller.now()
    await trio.sleep(3600)  # jumps at once
    assert poller.now() == trio.current_time() >= before + 3600


@pytest.mark.parametrize("version", ["0.23.2", "0.36.0", "1.0.0", "0.40.0rc1", "unknown"])
async def test_an_untested_trio_gets_the_portable_way_and_says_which(version):
    reason = trio_nesting.probe(version)
    assert isinstance(reason, str)
    assert f"trio {version} is outside the tested releases 0.24 to below 0.36" == reason


@pytest.mark.parametrize("version", ["0.24.0", "0.30.1", "0.35.0", "0.35.1.dev0"])
async def test_a_tested_trio_gets_the_nested_way(version):
    assert not isinstance(trio_nesting.probe(version), str)


def test_an_untested_trio_is_announced_with_a_warning(monkeypatch):
    monkeypatch.setattr(trio, "__version__", "0.99.0")

    async def main():
        poller = current_poller()
        await trio.sleep(0)
        return poller.mode

    with structlog.testing.capture_logs() as logs:
        assert trio.run(main) == "portable"
    assert {"event": "poller.portable", "log_level": "warning",
            "reason": "trio 0.99.0 is outside the tested releases 0.24 to below 0.36"} in logs


def test_pyproject_caps_trio_at_the_releases_the_nesting_was_tested_with():
    """CI installs the newest trio pyproject allows: that one must be tested."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    (requirement,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("trio")]
    first, end = trio_nesting.TESTED_TRIO
    assert re.sub(r"\s", "", requirement) == f"trio>={first[0]}.{first[1]},<{end[0]}.{end[1]}"


def test_the_installed_trio_is_a_tested_one():
    assert trio_nesting._untested(trio.__version__) is None


def test_a_failure_of_the_poller_in_the_hook_ends_the_run_instead_of_stranding_relays():
    """trio drops an instrument that raises (with a log line); relays would
    then never be served again. A failure of the poller itself (one link's
    failure is that link's alone) must end the run instead, as one in the
    poller's own task would."""

    class ExplodingEpoll:
        def __init__(self, epoll) -> None:
            self._epoll = epoll

        def poll(self, timeout: float = -1) -> list:
            raise RuntimeError("boom in the hook")

        def __getattr__(self, name):
            return getattr(self._epoll, name)

    async def main() -> None:
        poller = current_poller()
        await trio.sleep(0)  # the poller's task installs its hook
        poller._epoll = ExplodingEpoll(poller._epoll)
        await trio.sleep(IO_BOUND)

    started = time.monotonic()
    with pytest.raises(trio.TrioInternalError) as caught:
        trio.run(main)
    assert "boom in the hook" in "".join(traceback.format_exception(caught.value))
    # At once, not when trio's wait (fixed before the hook ran) times out.
    assert time.monotonic() - started < IO_BOUND / 2
