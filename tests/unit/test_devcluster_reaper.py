"""proxy.devcluster's reaper: when the process that started them dies, it
kills the process groups it was told about, and only those, even when a
group's PGID has been handed out again to another program."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from lab import wait_until_blocking
from proxy.devcluster._reaper import is_registered_leader, reap_at_end_of_input, start_time

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie is dead, waiting for its parent to reap it


@pytest.fixture
def leaders() -> Iterator[list[subprocess.Popen]]:
    """Starts sleepers, each leading a process group of its own (as the nodes
    and the benchmarks' programs do); kills those still running afterwards."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def group_leader(started: list[subprocess.Popen]) -> subprocess.Popen:
    process = subprocess.Popen(["sleep", "600"], start_new_session=True)
    started.append(process)
    return process


def reap_in_background(lines: list[str]) -> threading.Thread:
    # In a thread: the reaper waits for the groups it killed to end, and the
    # groups are our children, which end only once this test reaps them.
    thread = threading.Thread(target=reap_at_end_of_input, args=(lines,), kwargs={"wait": 10.0})
    thread.start()
    return thread


def test_a_leader_is_the_registered_one_only_while_that_process_holds_its_pid(leaders):
    leader = group_leader(leaders)
    started = start_time(leader.pid)
    assert started is not None
    assert is_registered_leader(leader.pid, started)
    assert not is_registered_leader(leader.pid, started - 1)  # another process that had this PID before
    leader.kill()
    leader.wait()
    assert not is_registered_leader(leader.pid, started)


def test_the_reaper_kills_the_registered_groups_and_removes_their_directories(leaders, tmp_path):
    registered, forgotten = group_leader(leaders), group_leader(leaders)
    directory = tmp_path / "node"
    directory.mkdir()
    thread = reap_in_background([
        f"+{registered.pid} {start_time(registered.pid)} {directory}\n",
        f"+{forgotten.pid} {start_time(forgotten.pid)} \n",
        f"-{forgotten.pid}\n",
    ])
    try:
        assert registered.wait(timeout=10) == -signal.SIGKILL
    finally:
        thread.join()
    assert forgotten.poll() is None
    assert not directory.exists()


def test_the_reaper_spares_a_group_whose_leader_is_not_the_registered_process(leaders, tmp_path):
    # What the reaper finds when a registered group ended unannounced and the
    # kernel gave its PID to a process that made a group of its own.
    newcomer, registered = group_leader(leaders), group_leader(leaders)
    directory = tmp_path / "node"
    directory.mkdir()
    thread = reap_in_background([
        f"+{newcomer.pid} {start_time(newcomer.pid) - 1} {directory}\n",  # the group that ended
        f"+{registered.pid} {start_time(registered.pid)} \n",
    ])
    try:
        assert registered.wait(timeout=10) == -signal.SIGKILL
    finally:
        thread.join()
    assert newcomer.poll() is None
    assert not directory.exists()  # the ended group's directory is ours all the same


# A starter in miniature: registers a group that ends without being
# unregistered, and a long-lived one (a node's stand-in, with a directory);
# says their PIDs, then waits to be killed, or told to forget the first.
STARTER = """
import subprocess, sys
from pathlib import Path
from proxy.devcluster import forget, reap_if_we_die
ended = subprocess.Popen([sys.executable, "-c", ""], start_new_session=True)
reap_if_we_die(ended.pid)
ended.wait()
sentinel = subprocess.Popen(["sleep", "600"], start_new_session=True)
reap_if_we_die(sentinel.pid, Path(sys.argv[1]))
print(ended.pid, sentinel.pid, flush=True)
if sys.stdin.readline() == "forget\\n":
    forget(ended.pid)
"""


def start_group_with_pid(pid: int, attempts: int = 20) -> subprocess.Popen | None:
    """A sleeper leading a new group whose PGID is `pid`, got by setting the
    kernel's last handed-out PID just below it; None if another process took
    `pid` first."""
    for _ in range(attempts):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        process = subprocess.Popen(["sleep", "600"], start_new_session=True)
        if process.pid == pid:
            return process
        process.kill()
        process.wait()
        if start_time(pid) is not None:
            return None
    return None


def test_a_pgid_handed_out_again_is_not_killed_when_the_starter_dies(tmp_path):
    ns_last_pid = Path("/proc/sys/kernel/ns_last_pid")
    try:
        ns_last_pid.write_text(ns_last_pid.read_text())
    except OSError as error:
        pytest.skip(f"cannot choose the next PID (/proc/sys/kernel/ns_last_pid: {error.strerror})")
    directory = tmp_path / "node"
    directory.mkdir()
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(directory)], cwd=REPO,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    newcomer = sentinel = None
    try:
        ended, sentinel = map(int, starter.stdout.readline().split())  # bounded by the test's timeout
        newcomer = start_group_with_pid(ended)
        if newcomer is None:
            starter.communicate("forget\n", timeout=10)  # its reaper then kills only the sentinel
            pytest.skip(f"another process took PID {ended} before the test could")
        starter.kill()
        starter.wait()
        wait_until_blocking(lambda: not directory.exists(), timeout=30, what="the reaper done")
        assert not alive(sentinel)
        assert newcomer.poll() is None
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
        if newcomer is not None:
            if newcomer.poll() is None:
                newcomer.kill()
            newcomer.wait()
        if sentinel is not None and alive(sentinel):
            os.kill(sentinel, signal.SIGKILL)  # a process our starter started
