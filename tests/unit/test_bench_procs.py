"""bench.procs: the processes a benchmark run starts never outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from bench import procs
from lab import wait_until_blocking

REPO = Path(__file__).resolve().parents[2]

# A benchmark driver in miniature: spawns a long-lived child (a contender's
# stand-in) the way the benchmarks do, says its PID, then waits to be killed.
STARTER = """
import sys
from bench.procs import spawn
child = spawn("contender", [sys.executable, "-c", "import time; time.sleep(600)"], log_path=None)
print(child.pid, flush=True)
sys.stdin.read()
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie is dead, waiting for its reaper (init, here)


def test_spawned_processes_die_with_the_starter_even_when_it_is_sigkilled():
    # What a benchmark run killed by pytest's timeout leaves: no stop(), no atexit.
    starter = subprocess.Popen([sys.executable, "-c", STARTER], cwd=REPO, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(starter.stdout.readline())  # bounded by the test's timeout
        assert alive(child)
        starter.kill()
        starter.wait()
        wait_until_blocking(lambda: not alive(child), timeout=30, what="the spawned process gone")
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)  # a process our starter started


def test_a_process_stopped_in_the_ordinary_way_is_forgotten_by_the_reaper(monkeypatch):
    # Its PID may be reused later: the reaper must not kill whatever holds it then.
    forgotten = []
    monkeypatch.setattr(procs, "forget", forgotten.append)
    process = procs.spawn("short", [sys.executable, "-c", "import time; time.sleep(600)"], log_path=None)
    assert forgotten == []
    process.stop()
    process.stop()
    assert forgotten == [process.pid]
