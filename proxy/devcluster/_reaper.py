"""Nodes (and the benchmarks' proxies and clients) that die with the process
that started them, however it ends.

A node runs in its own session (a terminal's Ctrl-C reaches only us, and we
stop it gracefully). If the starting process is killed outright (SIGKILL:
pytest's timeout killing a benchmark run, an OOM kill), nothing stops its
nodes and they run on, holding ports and names. PR_SET_PDEATHSIG does not
cover it: the signal follows the death of the *thread* that forked (the
benchmarks start nodes from a helper thread that ends long before them), the
setuid to the ``rabbitmq`` user clears it, and it reaches only the shell
wrapper, not the Erlang VM below it.

So each process that starts nodes has one reaper: a small Python child in a
session of its own, reading a pipe whose write end only the starting process
holds (os.pipe() is close-on-exec, so no other child inherits it). The
kernel closes that end however the process ends; at end of file the reaper
SIGKILLs every process group still registered and removes its directory,
if it has one. A process stopped in the ordinary way is unregistered.

A registration names the group's leader by its PID and its start time. The
kernel hands a PID out again once its process is gone (after at most
/proc/sys/kernel/pid_max others: 32768 by default), so a group that ended
without being unregistered (its starter killed between reaping it and
saying so, a node whose wrapper exited by itself) leaves a PGID that may
belong to another program's group by the time the reaper reads end of
file: the reaper kills a group only while its leader is still the process
that was registered.

Nodes register here (devcluster), and so does every process the benchmarks
spawn in a session of its own (bench.procs.spawn: Warren, HAProxy,
keepalived, the load clients), since they hold the same ports and names.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

# The reaper runs this file as a script (isolated: -I), so it imports the
# standard library only.

STOP_WAIT = 10.0  # how long the reaper waits for killed groups before removing directories


def start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (field 22 of
    /proc/PID/stat), or None if no process has that PID. A zombie still has
    one: it holds its PID until reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rpartition(")")[2].split()[19])  # field 3 (state) is the first after the name


def is_registered_leader(pgid: int, started: int) -> bool:
    """True if the process whose PID is ``pgid`` is still the group leader
    that was registered, started at ``started``: only then is group
    ``pgid`` the registered group and not one a later process made with
    the reused PID."""
    return start_time(pgid) == started


def reap_at_end_of_input(lines: Iterable[str], wait: float = STOP_WAIT) -> None:
    """The reaper's whole life: reads "+PGID STARTED DIR" (register; DIR may
    be empty) and "-PGID" (forget) lines until end of input, then SIGKILLs
    every registered group whose leader is still the registered process,
    waits up to ``wait`` seconds for them to end, and removes every
    registered directory.

    A group whose leader is gone is left alone. It may be ours, outliving
    its leader, but it may as well be a group that another process made
    after the kernel gave it the leader's PID again; nothing in /proc tells
    the two apart, and killing another program is worse than leaving one
    of ours. In ours the leader is the member that lives longest: a node's
    wrapper waits for its VM, and each benchmark program leads its own
    group."""
    groups: dict[int, tuple[int, str]] = {}
    for line in lines:
        if line.startswith("+"):
            pgid, started, directory = line[1:].rstrip("\n").split(" ", 2)
            groups[int(pgid)] = (int(started), directory)
        else:
            groups.pop(int(line[1:]), None)
    # Checked, then killed: the PID could change hands in between only if the
    # leader ended, was reaped and the kernel's PID counter came round again.
    killed = [pgid for pgid, (started, _) in groups.items() if is_registered_leader(pgid, started)]
    for pgid in killed:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    for pgid in killed:
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    for _, directory in groups.values():
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


_lock = threading.Lock()
_owner: tuple[int, int] | None = None  # (our PID, write end of the reaper's pipe)


def _pipe() -> int:
    """The write end of this process's reaper pipe (started on first use, again after a fork)."""
    global _owner
    with _lock:
        if _owner is None or _owner[0] != os.getpid():
            read, write = os.pipe()
            try:
                subprocess.Popen(
                    [sys.executable, "-I", __file__], stdin=read, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True,
                )
            finally:
                os.close(read)
            _owner = (os.getpid(), write)
        return _owner[1]


def reap_if_we_die(pgid: int, directory: Path | None = None) -> None:
    """Have process group ``pgid`` SIGKILLed (and ``directory``, if any,
    removed) if this process ends first.

    ``pgid`` must be the PID of the group's leader, a child of ours not yet
    waited for (so that PID is certainly still that process when its start
    time is read here); raises ProcessLookupError if no process has it."""
    started = start_time(pgid)
    if started is None:
        raise ProcessLookupError(f"no process {pgid} to register")
    os.write(_pipe(), f"+{pgid} {started} {directory or ''}\n".encode())


def forget(pgid: int) -> None:
    """``pgid`` ended in the ordinary way: nothing to reap."""
    os.write(_pipe(), f"-{pgid}\n".encode())


if __name__ == "__main__":
    reap_at_end_of_input(sys.stdin)
