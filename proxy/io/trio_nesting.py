"""Serving relays from inside trio's I/O wait: the one module that reads trio internals.

Waiting through trio costs, per relay wake-up, trio's ``epoll_wait``, a
re-arm of its one-shot registration (``epoll_ctl``), a task switch and a
second ``epoll_wait`` in the poller: about half of the CPU a relayed
message cost. Instead, right before trio would block in its epoll (every
task has run, none is runnable: trio's ``before_io_wait`` instrument hook),
the poller blocks in its own epoll for as long as trio would have, with
trio's epoll fd registered in it. Relay events are served at once, again and
again, without going through trio; as soon as anything trio waits for is
ready (a socket, a signal, a thread's result) the hook returns and trio's
own wait finds it. When serving made a task runnable, or trio's timeout is
over, the hook cuts trio's pending wait short (its timeout was fixed before
the hook ran).

This needs four things trio does not promise: its runner's run queue
(``runq``, one deque for the whole run), its ``waiting_for_idle`` set, its
epoll I/O manager's fd and its system clock's ``offset`` (the poller reads
the clock as the clock does: ``Poller.now``).
:func:`probe` decides, once per run, whether they can be used:

* the installed trio must lie in :data:`TESTED_TRIO`, the releases this
  module was tested with (pyproject.toml caps trio below the same bound, so
  CI always runs a tested release; a test keeps the two in step);
* the run uses trio's real clock (a test's ``MockClock`` jumps time, so a
  wait in real time would be wrong) and is not in guest mode;
* the internals have the expected shape.

Otherwise the poller takes the portable way, a system task waiting in trio
on the poller's epoll fd (``Poller._run_in_trio``), and says why.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import outcome
import trio

if TYPE_CHECKING:
    from .poller import Poller

# [first, end): trio releases whose internals this module was checked
# against (0.35 runs in CI; the attributes read exist since 0.24).
TESTED_TRIO = ((0, 24), (0, 36))
TEST_CLOCK = "the run has a test's clock"


def probe(version: str | None = None) -> tuple[int, Any] | str:
    """(trio's epoll fd, trio's runner) if relays can be served from trio's
    I/O wait in the current run; else the reason why not (a sentence)."""
    version = trio.__version__ if version is None else version
    reason = _untested(version)
    if reason is not None:
        return reason
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT, SystemClock

        runner = GLOBAL_RUN_CONTEXT.runner
        if type(runner.clock) is not SystemClock:
            return TEST_CLOCK
        float(runner.clock.offset)  # read by the poller (Poller.now)
        if runner.is_guest:
            return "trio runs in guest mode"
        len(runner.runq), len(runner.waiting_for_idle)
        fd = runner.io_manager._epoll.fileno()
    except (ImportError, AttributeError, TypeError) as error:
        return f"trio's internals differ: {error!r}"
    if not isinstance(fd, int):
        return "trio's I/O manager has no epoll fd"
    return fd, runner


def _untested(version: str) -> str | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    first, end = TESTED_TRIO
    if match is None or not first <= (int(match[1]), int(match[2])) < end:
        return f"trio {version} is outside the tested releases {_fmt(first)} to below {_fmt(end)}"
    return None


def _fmt(release: tuple[int, int]) -> str:
    return ".".join(map(str, release))


async def serve_from_io_wait(poller: Poller, trio_fd: int, runner: Any) -> None:
    """Serve `poller`'s links from trio's ``before_io_wait`` hook until
    cancelled; the calling task only holds the hook's lifetime. A failure in
    the hook is raised here (as one in a poller loop would be)."""
    poller.nest(trio_fd, runner.clock.offset)
    hook = _BeforeIoWait(poller, trio_fd, runner, trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(hook)
    try:
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
    finally:
        try:
            trio.lowlevel.remove_instrument(hook)
        except KeyError:
            pass  # removed by its failure


class _BeforeIoWait(trio.abc.Instrument):
    """The trio instrument through which the nested poller serves relays."""

    def __init__(self, poller: Poller, trio_fd: int, runner: Any, task: trio.lowlevel.Task) -> None:
        self._poller = poller
        self._trio_fd = trio_fd
        self._runner = runner
        self._task = task

    def before_io_wait(self, timeout: float) -> None:
        try:
            self._serve_until(timeout)
        except BaseException as exc:
            # trio would log and drop a failing instrument, leaving every
            # relay unserved: fail the poller task instead, as a failure in
            # its own loop would.
            trio.lowlevel.remove_instrument(self)
            trio.lowlevel.reschedule(self._task, outcome.Error(exc))
            cut_trio_wait_short()

    def _serve_until(self, timeout: float) -> None:
        """Serve relays while trio has nothing to do, for up to `timeout` s.

        Returns once trio has work: its epoll has events (its own wait then
        returns at once), a task became runnable, or the timeout is over (in
        the last two cases trio's wait is cut short).
        """
        poller, runner, trio_fd = self._poller, self._runner, self._trio_fd
        now = poller.now()
        if timeout <= 0 or runner.waiting_for_idle:
            # trio is busy (or waits for all tasks to block): one round
            # without blocking, then trio's wait does not block either.
            poller.serve_once(now, now, trio_fd)
            return
        if not poller.serve_until(now + timeout, now, trio_fd, runner.runq):
            cut_trio_wait_short()  # else trio's own wait returns at once


def cut_trio_wait_short() -> None:
    """Make trio's pending epoll wait return at once (its timeout was fixed
    before ``before_io_wait`` ran): a no-op through trio's wake-up socket."""
    trio.lowlevel.current_trio_token().run_sync_soon(_nothing, idempotent=True)


def _nothing() -> None:
    pass
