"""Getting one client a server: choose, queue, connect, retry, redispatch.

The connect rules of a backend in one place, as one clock-free state machine
per client connection (sans-I/O, like :mod:`proxy.vip.machine`): every input
takes ``now`` (seconds on the caller's clock) and returns the one action to
carry out next. The session (:mod:`proxy.frontends.session`) is the thin
shell that carries actions out, with a socket, the relays' poller and the
backend's queue, from the poller's callbacks or, to wait in the queue, from
a task; either way it feeds the outcomes back here.

The rules (HAProxy's, TCP mode):

- A server is chosen among the backend's candidates (available active
  servers, else available backups) that have a free slot (below their
  ``maxconn``), by the backend's balancer; the connection is attached to it
  at once, so it holds that slot while it connects.
- No candidate at all: ``SC`` at once ("no server available"), counted in the
  backend's ``no_server``; the shell logs ``backend.no_server``.
- Candidates, but every one at its ``maxconn``: wait in the backend's queue
  (:class:`Queue`) and choose again whenever a slot may have freed, until
  ``timeout.queue`` after the wait began: then ``sQ``, counted in the
  backend's ``queue_timeouts``. Each attempt that has to queue waits at most
  that long.
- A connect gets ``timeout.connect`` (:class:`Connect`'s ``deadline``):
  no answer by then is ``sC``, a refusal or an error ``SC``. Either counts as
  a connect error of that server (``connect_failed()``: its error count and
  passive health) and frees its slot.
- A failed connect is retried up to ``retries`` times, each retry counted in
  the chosen server's ``retries``: on the same server if it is still a
  candidate with a free slot (else on another one, chosen as above); with
  ``redispatch`` the last retry goes to a server that has not failed yet, if
  there is one with a free slot, and is then counted in the last failed
  server's ``redispatches``. When the last attempt fails, its code ends the
  connection.
- No socket could be opened for a connect (Warren is out of descriptors or
  memory): ``RC`` at once, without a retry and without blaming the server.

Termination codes, reasons and counters are the ones HAProxy users read in
tcplog lines and on the stats page (see :mod:`proxy.frontends.session`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

# Actions are NamedTuples: frozen, and one call cheaper to build than frozen
# dataclasses (the machine runs for every proxied connection).


class Connect(NamedTuple):
    """Open a connection to `server` (the client is attached to it already);
    report ``connected``, ``connect_refused`` or, at `deadline`,
    ``connect_timed_out``; ``no_socket`` if no socket can be had."""

    server: Any
    deadline: float


class Queue(NamedTuple):
    """Wait in the backend's queue; report ``slot_freed`` when woken, or
    ``queue_expired`` once `until` has passed."""

    until: float


class Fail(NamedTuple):
    """End the connection with this termination `code` and `reason`;
    `server` is None when there was no server to try at all."""

    code: str
    reason: str
    server: Any


Action = Connect | Queue | Fail

# What Backend.acquire returns besides a server.
FULL = "full"  # every candidate is at its maxconn
NO_SERVER = "no server"  # no candidate at all


class Backend(Protocol):
    """What the machine needs of a backend (proxy.runtime.BackendRuntime)."""

    config: Any  # retries, redispatch, timeout.connect, timeout.queue
    no_server: int
    queue_timeouts: int

    def acquire(self, conn: Any, prefer: Any, exclude: Any) -> Any:
        """A candidate with a free slot, `prefer` if it is one, else one not
        in `exclude` if any, chosen by the balancer, and `conn` attached to
        it; or FULL, or NO_SERVER."""


@dataclass(slots=True)
class Timing:
    """Phase durations in seconds and attempts, for the connection log line."""

    queue: float = 0.0
    connect: float = 0.0
    retries: int = 0
    redispatched: bool = False


class Dispatch:
    """One client connection's way to a server; see the module docstring.

    Inputs are the methods below; each returns the next :data:`Action`
    (``connected`` returns nothing: the connection is the relay's now).
    ``server`` is the server of the running or last attempt; ``timing``
    what the log line reports.
    """

    __slots__ = ("backend", "conn", "config", "timing", "failed", "server", "since", "until")

    def __init__(self, backend: Backend, conn: Any) -> None:
        self.backend = backend
        self.conn = conn
        self.config = backend.config  # one config for the whole dispatch, even across a reload
        self.timing = Timing()
        self.failed: list[Any] = []  # servers whose connect failed, in order
        self.server: Any = None
        self.since = 0.0  # when the running connect, or queue wait, began
        self.until: float | None = None  # the running queue wait's deadline

    # -- inputs ----------------------------------------------------------------------

    def start(self, now: float) -> Action:
        """The client is accepted: choose a server."""
        return self._choose(now)

    def connected(self, now: float) -> None:
        """The connect succeeded: the connection is established."""
        self.timing.connect += now - self.since
        self.server.connect_ok()

    def connect_refused(self, now: float, reason: str) -> Action:
        """The connect failed (refused, unreachable, reset): `reason` names the error."""
        return self._connect_failed(now, "SC", f"connect failed: {reason}")

    def connect_timed_out(self, now: float) -> Action:
        """The connect's deadline passed without an answer."""
        return self._connect_failed(now, "sC", "connect timeout")

    def no_socket(self, now: float, reason: str) -> Fail:
        """No socket could be opened (EMFILE, ENFILE, ENOBUFS, ENOMEM)."""
        server = self.server
        self.timing.connect += now - self.since
        server.detach(self.conn)  # Warren's shortage, not the server's fault: no retry
        return Fail("RC", f"cannot open a socket: {reason}", server)

    def slot_freed(self, now: float) -> Action:
        """Woken in the queue: a slot may have freed, or the servers changed.
        A free slot is taken even if the deadline has just passed."""
        return self._choose(now)

    def queue_expired(self, now: float) -> Fail:
        """The queue wait's deadline passed."""
        self.timing.queue += now - self.since
        self.until = None
        self.backend.queue_timeouts += 1
        return Fail("sQ", "queue timeout: every server at maxconn", None)

    # -- rules -------------------------------------------------------------------------

    def _choose(self, now: float) -> Action:
        failed, config = self.failed, self.config
        attempt = len(failed)
        redispatch = attempt and config.redispatch and attempt == config.retries
        if redispatch:
            server = self.backend.acquire(self.conn, None, failed)
        else:
            server = self.backend.acquire(self.conn, failed[-1] if failed else None, ())
        if server is FULL:
            if self.until is None:
                self.until, self.since = now + config.timeout.queue, now
            elif now >= self.until:
                return self.queue_expired(now)
            return Queue(self.until)
        if server is NO_SERVER:
            self.backend.no_server += 1
            return Fail("SC", "no server available", None)
        if self.until is not None:
            self.timing.queue += now - self.since
            self.until = None
        if attempt:
            timing = self.timing
            timing.retries += 1
            server.retries += 1
            if redispatch and server is not failed[-1]:
                failed[-1].redispatches += 1
                timing.redispatched = True
        self.server, self.since = server, now
        return Connect(server, now + config.timeout.connect)

    def _connect_failed(self, now: float, code: str, reason: str) -> Action:
        server = self.server
        self.timing.connect += now - self.since
        server.detach(self.conn)
        server.connect_failed()
        self.failed.append(server)
        if len(self.failed) > self.config.retries:
            return Fail(code, reason, server)
        return self._choose(now)
