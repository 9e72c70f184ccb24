"""The tests' `warren run` processes (tests/warrenproc.py) run as a service would."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from tests.proxyutil import dead_port
from tests.warrenproc import WarrenProcess, one_server_config, write


def autogroup(pid: int | str) -> str | None:
    """The kernel's scheduling autogroup of ``pid``: ``/autogroup-N``, or "" for
    none (the root group, where init and every process whose session was not
    made by setsid since boot run, as a CI runner's may), or None without
    CONFIG_SCHED_AUTOGROUP."""
    try:
        fields = Path(f"/proc/{pid}/autogroup").read_text().split()
    except OSError:
        return None
    return fields[0] if fields else ""


async def test_a_warren_started_by_the_tests_has_a_session_and_a_scheduling_group_of_its_own(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            path = write(tmp_path / "w.toml", one_server_config(dead_port()))
            async with WarrenProcess(path) as warren:
                await warren.start(nursery)
                pid = warren.process.pid
                assert os.getsid(pid) == pid != os.getsid(0)
                if autogroup("self") is not None:
                    assert autogroup(pid) != autogroup("self")
                assert await warren.stop() == 0
            nursery.cancel_scope.cancel()
