"""Processes the harness starts: spawning, readiness, memory, cleanup by PID.

Every process is spawned in its own session (so a terminal's Ctrl-C reaches
only the driver, which then stops them in order), with RLIMIT_NOFILE raised to
the hard limit (8,000 proxied connections need 16,000 descriptors in the
proxy), and its output in a log file. Each is registered until it has been
reaped; `stop_all()` (also run at interpreter exit) ends whatever is left,
by PID, never by name. If this process is killed outright (SIGKILL: pytest's
timeout, an OOM kill), the devcluster reaper SIGKILLs their process groups
(each is its session's leader), as it does the RabbitMQ nodes.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Iterator, Sequence

from proxy.devcluster import forget, free_ports, reap_if_we_die

__all__ = [
    "Managed", "ProcessFailed", "cpu_seconds", "free_ports", "raise_nofile_limit", "read_event",
    "rss_kb", "send_line", "spawn", "stop_all", "tool_missing", "wait_listening",
]

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


class ProcessFailed(RuntimeError):
    """A process did not start, exited early or reported an error."""


def raise_nofile_limit() -> int:
    """Raises this process's soft RLIMIT_NOFILE to its hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def tool_missing(*names: str) -> str | None:
    """A skip reason naming the first executable not on PATH, or None."""
    for name in names:
        if shutil.which(name) is None:
            return f"{name} is not installed"
    return None


class Managed:
    """One spawned process; `stop()` ends it by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, popen: subprocess.Popen, log_path: Path | None):
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self._pending = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def read_line(self, deadline: float) -> str | None:
        """The next line of the child's stdout (pipe_stdio), or None at EOF or
        once time.monotonic() passes `deadline`."""
        stream = self.popen.stdout
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([stream], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode(errors="replace")

    def raise_if_exited(self, what: str = "") -> None:
        if not self.alive():
            raise ProcessFailed(f"{self.name} exited with {self.popen.returncode} {what}\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit status."""
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(10)
        finally:
            if self in _live and self.popen.returncode is not None:
                forget(self.pid)  # reaped: nothing left for the reaper
            _live.discard(self)
            for stream in (self.popen.stdin, self.popen.stdout):
                if stream is not None:
                    stream.close()
        return self.popen.returncode

    def __enter__(self) -> Managed:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Managed {self.name} pid={self.pid}>"


_live: set[Managed] = set()


def _child_setup() -> None:  # runs in the child between fork and exec
    raise_nofile_limit()


def spawn(name: str, argv: Sequence[str], *, log_path: Path | None, cwd: Path | None = None,
          env: dict[str, str] | None = None, pipe_stdio: bool = False) -> Managed:
    """Starts `argv` in a new session with the raised fd limit.

    Output goes to `log_path` (stderr always; stdout too unless `pipe_stdio`,
    which gives the caller stdin/stdout pipes for a JSON-lines protocol:
    read_event / send_line)."""
    log: IO | int = subprocess.DEVNULL
    if log_path is not None:
        log = open(log_path, "ab")
    try:
        popen = subprocess.Popen(
            list(argv), cwd=cwd, env=env, start_new_session=True, preexec_fn=_child_setup,
            stdin=subprocess.PIPE if pipe_stdio else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdio else log, stderr=log,
            bufsize=0 if pipe_stdio else -1,
        )
    except OSError as error:
        raise ProcessFailed(f"{name}: cannot start {argv[0]}: {error}") from error
    finally:
        if log_path is not None:
            log.close()
    reap_if_we_die(popen.pid)  # its own session: its PID is its process group
    managed = Managed(name, popen, log_path)
    _live.add(managed)
    return managed


def stop_all() -> None:
    """Stops every process spawned here and not stopped yet (by PID)."""
    for managed in list(_live):
        managed.stop(timeout=5.0)


atexit.register(stop_all)


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == _LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(port: int, process: Managed | None, timeout: float = 20.0) -> None:
    """Waits until something listens on `port` (read from /proc/net/tcp*, so
    no connection is made), while `process` stays alive."""
    deadline = time.monotonic() + timeout
    while port not in _listening_ports():
        if process is not None:
            process.raise_if_exited(f"before listening on port {port}")
        if time.monotonic() > deadline:
            raise ProcessFailed(f"nothing listens on port {port} after {timeout}s"
                                + (f"\n{process.log_tail()}" if process else ""))
        time.sleep(0.05)


def _descendants(pid: int) -> Iterator[int]:
    yield pid
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return
    for tid in tasks:
        try:
            kids = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for kid in kids:
            yield from _descendants(int(kid))


def _proc_files(pid: int, name: str) -> Iterator[str]:
    """/proc/P/`name` of `pid` and each of its descendants still alive."""
    for each in set(_descendants(pid)):
        try:
            yield Path(f"/proc/{each}/{name}").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue


def rss_kb(pid: int) -> int:
    """VmRSS in kB of `pid` plus all its descendants (HAProxy may fork)."""
    total = 0
    for status in _proc_files(pid, "status"):
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy so far (every core; user,
    system, interrupts and softirq included, idle and iowait not): what the
    kernel does on a process's behalf in workers and softirq counts here."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by `pid` (all its threads) and
    its descendants: /proc/PID/stat fields utime and stime."""
    ticks = 0
    for stat in _proc_files(pid, "stat"):
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def read_event(process: Managed, want: str | tuple[str, ...], timeout: float) -> dict:
    """Reads JSON lines from a pipe_stdio process until one has event == want
    (or one of `want`, a tuple).

    An {"event": "error"} line, EOF or the deadline raise ProcessFailed."""
    deadline = time.monotonic() + timeout
    while True:
        line = process.read_line(deadline)
        if line is None:
            if process.alive():
                raise ProcessFailed(f"{process.name}: no {want!r} after {timeout}s\n{process.log_tail()}")
            raise ProcessFailed(f"{process.name} exited ({process.popen.returncode}) before {want!r}\n"
                                f"{process.log_tail()}")
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "error":
            raise ProcessFailed(f"{process.name}: {event.get('message')}")
        if event.get("event") == want or (isinstance(want, tuple) and event.get("event") in want):
            return event


def send_line(process: Managed, message: dict | str) -> None:
    """Writes one line to a pipe_stdio process's stdin: ``message`` as JSON,
    or a plain command word as it is (tools that read "status", "stop")."""
    line = message if isinstance(message, str) else json.dumps(message)
    try:
        process.popen.stdin.write(line.encode() + b"\n")
        process.popen.stdin.flush()
    except BrokenPipeError as error:
        raise ProcessFailed(f"{process.name} exited ({process.popen.poll()})\n{process.log_tail()}") from error
