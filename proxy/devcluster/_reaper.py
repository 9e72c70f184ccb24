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

Nodes register here (devcluster), and so does every process the benchmarks
spawn in a session of its own (bench.procs.spawn: Warren, HAProxy,
keepalived, the load clients), since they hold the same ports and names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

# Lines "+PGID DIR" (register; DIR may be empty) and "-PGID" (forget), then end of file.
_REAPER = r"""
import os, shutil, signal, sys, time
groups = {}
for line in sys.stdin:
    head, _, directory = line.rstrip("\n").partition(" ")
    if head[0] == "+":
        groups[int(head[1:])] = directory
    else:
        groups.pop(int(head[1:]), None)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
deadline = time.monotonic() + 10
for pgid, directory in groups.items():
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
"""

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
                    [sys.executable, "-I", "-c", _REAPER], stdin=read, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True,
                )
            finally:
                os.close(read)
            _owner = (os.getpid(), write)
        return _owner[1]


def reap_if_we_die(pgid: int, directory: Path | None = None) -> None:
    """Have process group ``pgid`` SIGKILLed (and ``directory``, if any,
    removed) if this process ends first."""
    os.write(_pipe(), f"+{pgid} {directory or ''}\n".encode())


def forget(pgid: int) -> None:
    """``pgid`` ended in the ordinary way: nothing to reap."""
    os.write(_pipe(), f"-{pgid}\n".encode())
