"""Services and their supervision: a crashing part restarts, the proxy goes on.

A *service* is a capability that runs beside the proxy: DNS names, health
checks, the stats page, the control socket, the floating IP. Its shape is
trio's ``serve`` convention (see :class:`Service`). The app runs each one
under a :class:`Supervisor`:

- A failure while starting for the first time that is a
  :class:`~proxy.errors.StartupError` (a port that cannot be bound, a missing
  capability) fails Warren's start, as an operator expects of a bad setting.
- Any other exception, at any time, is a *crash*: it is logged once, with its
  traceback, as ``service.crashed``, counted, and the service is started
  again after a delay (:class:`RestartPolicy`: bounded, exponential, reset
  after a healthy period). Its tasks end with it (they live in its
  nursery); relaying and the other services go on.
- A method the app calls from outside the service's tasks
  (``reconfigure``, ``stopping``) that raises is a crash of that service too
  (:meth:`Supervisor.call`).

The restart policy is plain Python with time passed in; the supervisor is
the thin trio shell around it. Every supervisor registers in a
:class:`Supervisors` table, whose :meth:`Supervisors.statistics` snapshot
the stats page and ``/metrics`` show.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import trio

from .errors import StartupError

if TYPE_CHECKING:
    from .config.model import Config
    from .runtime import Runtime

log = structlog.get_logger("warren.supervisor")


class Service(Protocol):
    """A capability that runs beside the proxy.

    - ``name``: a short stable name (``health``, ``dns``, ``stats``,
      ``control``, ``vip``) used in logs, the stats page and metrics.
    - ``run(runtime, *, task_status)``: serves until cancelled; calls
      ``task_status.started()`` once it is really ready (sockets bound, first
      lookups done). It receives the live model, nothing of the app. It may
      be called again after it raised: every run starts from the current
      configuration and keeps only state meant to outlive a crash (DNS
      answers, login failure counts).
    - ``reconfigure(config)``: a reload. It is called whether or not the
      service is running at that moment (it may be waiting to restart), so
      it records ``config`` first and acts on running tasks only if there
      are any.
    - optionally ``async stopping()``: awaited (shielded, bounded) when a
      stop begins, before the listeners close; the floating IP is handed
      over first so clients go to the peer, not to a closed port.
    """

    name: str

    async def run(self, runtime: Runtime, *, task_status: trio.TaskStatus[None]) -> None: ...

    def reconfigure(self, config: Config) -> None: ...


# -- the restart policy (sans-I/O) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How long to wait before starting a crashed service again.

    The first restart waits ``initial`` seconds, each further one ``factor``
    times longer, never more than ``maximum``. A service that ran at least
    ``healthy_after`` seconds before crashing starts the series again: a
    rare crash restarts at once, a crash loop settles to one attempt every
    ``maximum`` seconds (and one log line each).
    """

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0
    healthy_after: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("need 0 < initial <= maximum")
        if self.factor < 1 or self.healthy_after < 0:
            raise ValueError("need factor >= 1 and healthy_after >= 0")

    def delay(self, streak: int) -> float:
        """The wait before restart number ``streak`` (1 = the first after a healthy run)."""
        return min(self.maximum, self.initial * self.factor ** min(streak - 1, 64))


class Backoff:
    """One service's crash streak under a :class:`RestartPolicy`; times are passed in."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.streak = 0

    def crashed(self, started: float, now: float) -> float:
        """A run that began at ``started`` crashed at ``now``: the delay before the next one."""
        if now - started >= self.policy.healthy_after:
            self.streak = 0
        self.streak += 1
        return self.policy.delay(self.streak)


# -- the shell ---------------------------------------------------------------------------


class ServiceState(enum.StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"  # crashed; waiting for its restart delay
    STOPPED = "STOPPED"


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """A supervised service as the stats page shows it.

    ``last_crash`` is seconds ago (None: never); ``last_error`` the
    exception's type only (messages may carry anything; the log has the
    traceback); ``restart_in`` seconds until the next start while
    RESTARTING.
    """

    name: str
    state: str
    crashes: int
    restarts: int
    last_crash: float | None
    last_error: str | None
    restart_in: float | None


class ServiceExited(RuntimeError):
    """A service's run() returned although nothing cancelled it."""


Target = Callable[..., Awaitable[None]]  # async (*, task_status) -> None


class Supervisor:
    """Runs ``target`` (``async (*, task_status)``) until cancelled, restarting it after crashes.

    :meth:`run` reports started once the first start succeeded, or once it
    crashed with anything but a StartupError (the proxy serves while the
    service waits to restart). A StartupError from the first start
    propagates. Cancelling :meth:`run` stops the service for good.
    """

    def __init__(self, name: str, target: Target, *, policy: RestartPolicy | None = None,
                 registry: Supervisors | None = None) -> None:
        self.name = name
        self._target = target
        self._backoff = Backoff(policy or RestartPolicy())
        self.state = ServiceState.STARTING
        self.crashes = 0
        self.restarts = 0
        self._last_crash: float | None = None
        self._last_error: str | None = None
        self._restart_at: float | None = None
        self._scope: trio.CancelScope | None = None
        self._failure: BaseException | None = None  # raised by call(), outside the target's tasks
        if registry is not None:
            registry.add(self)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        reporter = _Once(task_status)
        try:
            while True:
                began = trio.current_time()
                crash = await self._attempt(reporter)
                reporter.started()  # crashed while starting: the proxy serves meanwhile
                await trio.sleep(self._crashed(crash, began))
                self.restarts += 1
        finally:
            self.state = ServiceState.STOPPED
            self._restart_at = None

    async def _attempt(self, reporter: _Once) -> BaseException:
        """One run of the target; returns what ended it. A StartupError before
        the service ever started, and cancellation, propagate."""
        self.state = ServiceState.STARTING
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                await nursery.start(self._target)
                self.state = ServiceState.RUNNING
                self._restart_at = None
                if self.restarts:
                    log.info("service.restarted", service=self.name, restarts=self.restarts, crashes=self.crashes)
                reporter.started()
        except BaseException as raised:  # sorted below: a crash, a start-up failure, or cancellation
            crash, rest = _split(raised)
            if rest is not None:  # the app is stopping (or interrupted): not ours to handle
                if crash is None:
                    raise
                self._crashed(crash, trio.current_time())
                raise rest from None
            if not reporter.done and _is_startup_error(crash):
                leaves = list(_leaves(crash))
                if len(leaves) == 1:  # as plain as the service raised it
                    raise leaves[0] from None
                raise
            return crash
        finally:
            self._scope = None
        failure, self._failure = self._failure, None
        return failure or ServiceExited(f"service {self.name} ended by itself")

    def call(self, method: Callable[..., Any], *args: Any) -> Any:
        """Calls one of the service's own methods (``reconfigure``); a failure is a crash of the service."""
        try:
            return method(*args)
        except Exception as error:  # noqa: BLE001 - any bug in the service is its crash
            self.restart(error)
            return None

    async def call_async(self, method: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """The same for an async method (``stopping``)."""
        try:
            return await method(*args)
        except Exception as error:  # noqa: BLE001
            self.restart(error)
            return None

    def restart(self, error: BaseException) -> None:
        """``error`` happened outside the service's tasks: restart it as after a crash."""
        if self._scope is not None:
            self._failure = error
            self._scope.cancel()
        else:  # not running (waiting to restart, or stopped): count and log it now
            self._crashed(error, trio.current_time())

    def _crashed(self, error: BaseException, began: float) -> float:
        now = trio.current_time()
        delay = self._backoff.crashed(began, now)
        self.crashes += 1
        self._last_crash = now
        self._last_error = type(_first_leaf(error)).__name__
        self._restart_at = now + delay
        self.state = ServiceState.RESTARTING
        log.error("service.crashed", service=self.name, crashes=self.crashes, restart_in=round(delay, 3),
                  error=self._last_error, exc_info=error)
        return delay

    def statistics(self) -> ServiceStats:
        now = trio.current_time()
        return ServiceStats(
            name=self.name,
            state=self.state.value,
            crashes=self.crashes,
            restarts=self.restarts,
            last_crash=None if self._last_crash is None else now - self._last_crash,
            last_error=self._last_error,
            restart_in=None if self._restart_at is None else max(0.0, self._restart_at - now),
        )


class Supervisors:
    """Every supervised service of the process, in start order (the stats page's table)."""

    def __init__(self) -> None:
        self._supervisors: dict[str, Supervisor] = {}

    def add(self, supervisor: Supervisor) -> None:
        self._supervisors[supervisor.name] = supervisor

    def remove(self, supervisor: Supervisor) -> None:
        if self._supervisors.get(supervisor.name) is supervisor:
            del self._supervisors[supervisor.name]

    def __getitem__(self, name: str) -> Supervisor:
        return self._supervisors[name]

    def statistics(self) -> tuple[ServiceStats, ...]:
        return tuple(supervisor.statistics() for supervisor in self._supervisors.values())


class _Once:
    """Reports a task as started at most once, and knows whether it did."""

    def __init__(self, task_status: Any) -> None:
        self._task_status = task_status
        self.done = False

    def started(self) -> None:
        if not self.done:
            self.done = True
            self._task_status.started()


def _split(raised: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """(the Exceptions in ``raised``, the rest: cancellation, KeyboardInterrupt...)."""
    if isinstance(raised, BaseExceptionGroup):
        return raised.split(Exception)
    if isinstance(raised, Exception):
        return raised, None
    return None, raised


def _is_startup_error(error: BaseException | None) -> bool:
    if isinstance(error, BaseExceptionGroup):
        matched, rest = error.split(StartupError)
        return matched is not None and rest is None
    return isinstance(error, StartupError)


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def _first_leaf(error: BaseException) -> BaseException:
    return next(_leaves(error), error)
