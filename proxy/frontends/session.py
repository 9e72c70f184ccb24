"""One client connection's life: choose and connect a broker, relay, log.

Termination states follow HAProxy's tcplog (two letters): the first says who
or what ended the connection, the second in which phase.

    --  both sides closed normally
    CD  client aborted (reset) while data flowed    SD  the broker did
    cD  client idle / tunnel / client-fin timeout   sD  server idle / server-fin timeout
    SC  no server, or connect refused by the server
    sC  connect timeout                             sQ  queue timeout
    RC  Warren itself is out of descriptors or memory (no socket for the server)
    KD  killed by an operator or at the end of the stop grace period
    DD  its server was marked down (shutdown-sessions)
    PD  an unexpected error in Warren ended this one connection (logged as session.failed)

A session normally has no task of its own: the listener starts it, and the
relays' poller calls it back as its connect completes and as its relay ends
(a trio task, a cancel scope and three task switches per connection cost as
much as everything else Warren does for it). Only a session that must wait
in a slower way, queueing for a server slot or retrying a failed connect,
continues in a task of the session nursery.
"""

from __future__ import annotations

import errno
import socket
import time

import outcome
import structlog
import trio

from ..backends.connect import (
    ConnectFailed,
    Timing,
    connect_outcome,
    connect_to_backend,
    note_failure,
    start_connect,
    try_acquire,
)
from ..backends.proxy_protocol import encode as encode_proxy_header
from ..config.model import SendProxy
from ..io.pipes import PipePool
from ..io.poller import Writable, current_poller
from ..io.relay import Ending, Timeouts, Traffic, relay, start_relay
from ..runtime import BackendRuntime, Connection, FrontendRuntime, KillReason, Runtime, ServerRuntime

log = structlog.get_logger("warren.session")

_ENDINGS = {
    Ending.NORMAL: "--",
    Ending.CLIENT_ABORT: "CD",
    Ending.SERVER_ABORT: "SD",
    Ending.CLIENT_TIMEOUT: "cD",
    Ending.SERVER_TIMEOUT: "sD",
}


class Sessions:
    """Runs client sessions for all frontends; holds what they share."""

    def __init__(self, runtime: Runtime, pipes: PipePool | None, log_connections: bool = True):
        self.runtime = runtime
        self.pipes = pipes
        self.log_connections = log_connections
        self.live: set[Connection] = set()
        self.drained = trio.Event()  # set (and replaced) whenever live becomes empty
        self.nursery: trio.Nursery | None = None  # for sessions that continue in a task
        # frontend name -> (its config, its backend's config, relay timeouts)
        self._relay_timeouts: dict[str, tuple[object, object, Timeouts]] = {}

    def kill_all(self, reason: KillReason) -> None:
        for conn in list(self.live):
            conn.kill(reason)

    def start(self, client: socket.socket, peer: tuple, frontend: FrontendRuntime, slot: object) -> None:
        """Serves an accepted client (non-blocking); always closes it and
        frees its frontend slot in the end. Never raises."""
        try:
            session = _Session(self, client, peer, frontend, slot)
        except Exception:  # a bug: this client only, never the listener
            log.exception("session.failed", client=_addr(peer))
            client.close()
            frontend.limiter.release_on_behalf_of(slot)
            return
        session.begin()

    def timeouts(self, frontend: FrontendRuntime, backend: BackendRuntime) -> Timeouts:
        """The relay timeouts for this frontend and backend, made once per config."""
        fconfig, bconfig = frontend.config, backend.config
        cached = self._relay_timeouts.get(frontend.name)
        if cached is None or cached[0] is not fconfig or cached[1] is not bconfig:
            timeouts = Timeouts(
                client=fconfig.timeout.client,
                client_fin=fconfig.timeout.client_fin,
                server=bconfig.timeout.server,
                tunnel=bconfig.timeout.tunnel,
                server_fin=bconfig.timeout.server_fin,
            )
            cached = self._relay_timeouts[frontend.name] = (fconfig, bconfig, timeouts)
        return cached[2]

    def ended(self, conn: Connection) -> None:
        self.live.discard(conn)
        if not self.live:
            self.drained.set()
            self.drained = trio.Event()


class _Session:
    """One client connection, from accept to close.

    The fast path runs in callbacks: ``begin`` (from the listener) picks a
    server and starts a non-blocking connect, ``_connect_done`` (from the
    poller) starts the relay, ``_relay_done`` (from the poller) ends the
    session. ``_continue_in_task`` takes over where waiting is needed.
    Callbacks never raise: a failure ends this session only (``PD``).
    """

    __slots__ = (
        "sessions", "client", "frontend", "slot", "conn", "timing", "started", "backend",
        "server", "server_sock", "waiter", "link", "connect_began", "failure", "done",
    )  # fmt: skip

    def __init__(self, sessions: Sessions, client: socket.socket, peer: tuple,
                 frontend: FrontendRuntime, slot: object) -> None:
        self.sessions = sessions
        self.client = client
        self.frontend = frontend
        self.slot = slot
        self.started = time.monotonic()
        self.conn = Connection(sessions.runtime.new_connection_id(), peer[:2], frontend.name, Traffic())
        self.timing = Timing()
        self.backend: BackendRuntime | None = None
        self.server: ServerRuntime | None = None
        self.server_sock: socket.socket | None = None
        self.waiter: Writable | None = None
        self.link = None
        self.connect_began = 0.0
        self.failure: int = 0  # errno of connect() (EINPROGRESS while it runs)
        self.done = False

    # -- the fast path ------------------------------------------------------------

    def begin(self) -> None:
        frontend, conn = self.frontend, self.conn
        frontend.current += 1
        frontend.total_sessions += 1
        frontend.max_sessions = max(frontend.max_sessions, frontend.current)
        self.sessions.live.add(conn)
        try:
            backend = self.backend = self.sessions.runtime.backends[frontend.config.backend]
            conn.backend = backend
            backend.total_sessions += 1
            server = try_acquire(backend, conn)
            if server is None:  # every server is full: wait in the backend's queue
                self._continue_in_task(None)
                return
            self.server = server
            self.connect_began = time.monotonic()
            self.server_sock, self.failure = start_connect(server)
            if self.failure == errno.EINPROGRESS:
                deadline = trio.current_time() + backend.config.timeout.connect
                self.waiter = current_poller().when_writable(
                    self.server_sock.fileno(), deadline, self._connect_done
                )
                conn.interrupt = self._interrupt_connect
            else:
                self._connect_done(None)
        except ConnectFailed as failure:
            self._failed(failure)
        except Exception as error:
            self._crashed(error)

    def _connect_done(self, events: outcome.Outcome | None) -> None:
        """The connect completed, failed or timed out (`events`: the poller's
        report; None: connect() answered at once)."""
        self.waiter = None
        self.conn.interrupt = None
        try:
            server, sock = self.server, self.server_sock
            assert server is not None and sock is not None
            try:
                connect_outcome(sock, server, self.failure, None if events is None else events.unwrap())
            except ConnectFailed as failure:
                self.timing.connect += time.monotonic() - self.connect_began
                self._drop_server_socket()
                note_failure(server, self.conn, failure)  # raises RC on
                if self.backend.config.retries:
                    self._continue_in_task(failure)
                else:
                    self._end(failure.code, failure.reason)
                return
            self.timing.connect += time.monotonic() - self.connect_began
            server.connect_ok()
            refused = _send_proxy_header(self.client, sock, server, self.conn)
            if refused is not None:
                self._end(*refused)
                return
            self._relay()
        except ConnectFailed as failure:
            self._failed(failure)
        except Exception as error:
            self._crashed(error)

    def _relay(self) -> None:
        """Both sockets go to the relay, which owns (and closes) them."""
        sessions, sock = self.sessions, self.server_sock
        timeouts = sessions.timeouts(self.frontend, self.backend)
        self.server_sock = None
        self.link = start_relay(
            self.client, sock, self.conn.traffic, timeouts,
            pipes=sessions.pipes, owned=True, notify=self._relay_done,
        )  # fmt: skip
        self.conn.interrupt = self.link.interrupt

    def _relay_done(self, result: outcome.Outcome) -> None:
        try:
            self.link.stop()
            ending = result.unwrap()
        except Exception as error:
            self._crashed(error)
            return
        self._end(self._killed() if ending is None else _ENDINGS[ending], None)

    def _interrupt_connect(self) -> None:
        if self.waiter is not None:
            self.waiter.cancel()
            self.waiter = None
        self._end(self._killed(), None)

    # -- the slow path -------------------------------------------------------------

    def _continue_in_task(self, first_failure: ConnectFailed | None) -> None:
        nursery = self.sessions.nursery
        assert nursery is not None, "the App sets Sessions.nursery before accepting"
        nursery.start_soon(self._serve_in_task, first_failure)

    async def _serve_in_task(self, first_failure: ConnectFailed | None) -> None:
        termination, reason = "--", None
        try:
            with trio.CancelScope() as scope:
                self.conn.interrupt = scope.cancel
                termination, reason = await self._connect_and_relay(first_failure)
            if scope.cancelled_caught:
                termination = self._killed()
        except* trio.Cancelled:  # the stop grace period is over (a nursery may group it)
            termination = KillReason.KILLED.value + "D"
            raise
        except* Exception as group:  # one connection's failure never stops the others
            termination, reason = "PD", f"internal error: {group.exceptions[0]!r}"
            log.error("session.failed", conn=self.conn.id, client=_addr(self.conn.client), exc_info=group)
        finally:
            self._end(termination, reason)

    async def _connect_and_relay(self, first_failure: ConnectFailed | None) -> tuple[str, str | None]:
        conn, backend = self.conn, self.backend
        try:
            sock, server = await connect_to_backend(backend, conn, self.timing, first_failure=first_failure)
        except ConnectFailed as failure:
            self._note_no_server(failure)
            return failure.code, failure.reason
        self.server_sock = sock
        refused = _send_proxy_header(self.client, sock, server, conn)
        if refused is not None:
            return refused
        timeouts = self.sessions.timeouts(self.frontend, backend)
        self.server_sock = None  # the relay owns (and closes) both sockets from here on
        ending = await relay(self.client, sock, conn.traffic, timeouts, pipes=self.sessions.pipes, owned=True)
        return _ENDINGS[ending], None

    # -- the end ---------------------------------------------------------------------

    def _killed(self) -> str:
        return (self.conn.kill_reason or KillReason.KILLED).value + "D"

    def _failed(self, failure: ConnectFailed) -> None:
        self._note_no_server(failure)
        self._end(failure.code, failure.reason)

    def _note_no_server(self, failure: ConnectFailed) -> None:
        if failure.code == "SC" and failure.server is None:
            log.warning(
                "backend.no_server", backend=self.backend.name, client=_addr(self.conn.client),
                servers=len(self.backend.servers),
            )  # fmt: skip

    def _crashed(self, error: Exception) -> None:
        log.error("session.failed", conn=self.conn.id, client=_addr(self.conn.client), exc_info=error)
        if self.link is not None:
            self.link.stop()
        self._end("PD", f"internal error: {error!r}")

    def _drop_server_socket(self) -> None:
        sock, self.server_sock = self.server_sock, None
        if sock is not None:
            _close(sock)

    def _end(self, termination: str, reason: str | None) -> None:
        """Closes what is left, frees the slots and logs; once. No checkpoint."""
        if self.done:
            return
        self.done = True
        conn, frontend = self.conn, self.frontend
        conn.interrupt = None
        if self.waiter is not None:
            self.waiter.cancel()
        self._drop_server_socket()
        _close(self.client)  # already closed if the relay had it
        if conn.server is not None:
            conn.server.detach(conn)
        self.sessions.ended(conn)
        frontend.current -= 1
        frontend.limiter.release_on_behalf_of(self.slot)
        if self.sessions.log_connections:
            self._log_closed(termination, reason)

    def _log_closed(self, termination: str, reason: str | None) -> None:
        conn, timing = self.conn, self.timing
        fields = dict(
            conn=conn.id,
            client=_addr(conn.client),
            frontend=conn.frontend,
            backend=conn.backend.name if conn.backend else None,
            server=conn.server.name if conn.server else None,
            tw_ms=round(timing.queue * 1000),
            tc_ms=round(timing.connect * 1000),
            tt_ms=round((time.monotonic() - self.started) * 1000),
            bytes_in=conn.traffic.bytes_in,
            bytes_out=conn.traffic.bytes_out,
            termination=termination,
            retries=timing.retries,
            redispatched=timing.redispatched,
        )
        if reason:
            fields["reason"] = reason
        log.info("connection.closed", **fields)


def _send_proxy_header(
    client: socket.socket, server_sock: socket.socket, server: ServerRuntime, conn: Connection
) -> tuple[str, str] | None:
    """Sends the PROXY header if `server` wants one; (termination, reason)
    if that failed. A freshly connected socket's buffer always takes the
    header (at most a few hundred bytes) at once."""
    version = server.config.send_proxy
    if version is SendProxy.NONE:
        return None
    try:
        local = client.getsockname()[:2]
    except OSError:  # the client is already gone
        return "CC", "client closed while connecting"
    header = encode_proxy_header(version.value, conn.client, local)
    try:
        sent = server_sock.send(header)
    except OSError as error:
        return "SD", f"sending the PROXY header failed: {error.strerror}"
    if sent != len(header):
        return "SD", "sending the PROXY header failed: the socket took only part of it"
    return None


def _close(sock: socket.socket) -> None:
    """Closes a socket the relay did not (the poller may still know its fd)."""
    fd = sock.fileno()
    if fd != -1:
        current_poller().drop(fd)
        sock.close()


def _addr(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
