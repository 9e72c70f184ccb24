"""One client connection's life: choose and connect a broker, relay, log.

Termination states follow HAProxy's tcplog (two letters): the first says who
or what ended the connection, the second in which phase.

    --  both sides closed normally
    CD  client aborted (reset) while data flowed    SD  the broker did
    cD  client idle / tunnel / client-fin timeout   sD  server idle / server-fin timeout
    SC  no server, or connect refused by the server
    sC  connect timeout                             sQ  queue timeout
    CQ  the client went away while waiting for its turn in a rate limit's start line
    RC  Warren itself is out of descriptors or memory (no socket for the server)
    CR  the client's TLS handshake failed (garbage, plaintext, a refused
        certificate; logged as tls.handshake_failed)
    cR  the client did not complete its TLS handshake in time
    KD  killed by an operator or at the end of the stop grace period
    DD  its server was marked down (shutdown-sessions)
    PD  an unexpected error in Warren ended this one connection (logged as session.failed)
    cR  AMQP: no protocol header within timeout.handshake
    SR  AMQP: the broker refused the connection during the handshake (a Close)
    PR  refused by a Warren limit: a new-connection rate limit (reject, or a queue
        wait beyond timeout.queue), or an AMQP connection limit at Connection.Open
        (the client got 530 NOT_ALLOWED)

On an AMQP frontend a completed Connection.Close / Close-Ok is ``--`` even
though RabbitMQ ends it with a reset, and the log line names the client
(proxy.amqp.tap).

Which server, when to retry, redispatch, queue or give up: the dispatch
machine decides (:mod:`proxy.backends.dispatch`); a session carries its
actions out. It normally has no task of its own: the listener starts it,
and the relays' poller calls it back as each connect completes (or times
out) and as its relay ends (a trio task, a cancel scope and three task
switches per connection cost as much as everything else Warren does for
it). Only a session that must wait in the backend's queue for a server slot
does so in a task of the session nursery, and goes on in callbacks after;
so does one that a source rate limit holds back, or that an AMQP connection
limit refuses (the refusal is a short conversation with both peers). One
held by a frontend's queued rate limit waits in the frontend's start line,
whose one releaser task calls it back (``_release_line``).

TLS (:mod:`proxy.tls.pump`) adds two steps, in poller callbacks too: a TLS
frontend's session starts with the client's handshake; a server reached over
TLS gets its handshake after the connect (and the PROXY header, sent in
clear), and a failed one counts as that connect's failure (retries and
redispatch as for a refused connect). The relay then runs TLS directions.
"""

from __future__ import annotations

import _socket
import errno
import select
import socket
import time
from typing import Any, Awaitable, Callable, Final

import outcome
import structlog
import trio

from ..backends.connect import connect_error, error_name, start_connect
from ..backends.dispatch import Connect, Dispatch, Fail, Queue, Timing
from ..backends.proxy_protocol import SslInfo
from ..backends.proxy_protocol import encode as encode_proxy_header
from ..config.model import FrontendMode, SendProxy
from ..io.pipes import PipePool
from ..io.kernel_relay import KernelLink, Refused, hand_over, start_kernel_relay
from ..io.poller import Poller, Writable, current_poller
from ..io.relay import Ending, Link, Timeouts, Traffic
from ..io.sockmap import Sockmap
from ..amqp.admission import RateGate, StartLine
from ..amqp.inspect import describe_identity
from ..amqp.refuse import refuse
from ..amqp.tap import AmqpConnection, AmqpPolicy
from ..runtime import BackendRuntime, Connection, FrontendRuntime, KillReason, Runtime, ServerRuntime
from ..tls import errors as tls_errors
from ..tls.pump import Handshake, HandshakeFailed, TlsEnd, TlsPeer, tls_ways

log = structlog.get_logger("warren.session")

_ENDINGS = {
    Ending.NORMAL: "--",
    Ending.CLIENT_ABORT: "CD",
    Ending.SERVER_ABORT: "SD",
    Ending.CLIENT_TIMEOUT: "cD",
    Ending.SERVER_TIMEOUT: "sD",
    Ending.HELD: "PR",  # an AMQP connection limit withheld the Open (refused in a task)
}


class Sessions:
    """Runs client sessions for all frontends; holds what they share."""

    def __init__(self, runtime: Runtime, pipes: PipePool | None, log_connections: bool = True,
                 sockmap: Sockmap | None = None):  # fmt: skip
        self.runtime = runtime
        self.pipes = pipes
        self.sockmap = sockmap  # the kernel path, where in use
        self.log_connections = log_connections
        self.live: set[Connection] = set()
        self._closed = 0
        self.drained = trio.Event()  # set (and replaced) whenever live becomes empty
        self.nursery: trio.Nursery | None = None  # for sessions that continue in a task
        self.poller: Poller | None = None  # the run's relay poller, from the first client on
        # frontend name -> (its config, its backend's config, relay timeouts)
        self._relay_timeouts: dict[str, tuple[object, object, Timeouts]] = {}
        self._amqp_policies: dict[str, tuple[object, object, AmqpPolicy]] = {}

    def kill_all(self, reason: KillReason) -> None:
        for conn in list(self.live):
            conn.kill(reason)

    def start(self, client: _socket.socket, peer: tuple, frontend: FrontendRuntime) -> None:
        """Serves an accepted client (non-blocking) that holds a frontend
        slot; always closes it and releases the slot in the end. Never raises."""
        try:
            poller = self.poller
            if poller is None:
                poller = self.poller = current_poller()
            session = _Session(self, client, peer, frontend, poller)
        except Exception:  # a bug: this client only, never the listener
            log.exception("session.failed", client=_addr(peer))
            client.close()
            frontend.release_slot()
            return
        session.begin()

    def timeouts(self, frontend: FrontendRuntime, backend: BackendRuntime) -> Timeouts:
        """The relay timeouts for this frontend and backend, made once per config."""
        fconfig, bconfig = frontend.config, backend.config
        cached = self._relay_timeouts.get(fconfig.name)
        if cached is None or cached[0] is not fconfig or cached[1] is not bconfig:
            client = fconfig.timeout.client
            assert not isinstance(client, str), "a TCP frontend's: seconds or None (build_frontend)"
            timeouts = Timeouts(
                client=client,
                client_fin=fconfig.timeout.client_fin,
                server=bconfig.timeout.server,
                tunnel=bconfig.timeout.tunnel,
                server_fin=bconfig.timeout.server_fin,
            )
            cached = self._relay_timeouts[fconfig.name] = (fconfig, bconfig, timeouts)
        return cached[2]

    def amqp_policy(self, frontend: FrontendRuntime, backend: BackendRuntime) -> AmqpPolicy:
        """The AMQP timeouts by phase for this frontend and backend, made once per config."""
        fconfig, bconfig = frontend.config, backend.config
        cached = self._amqp_policies.get(fconfig.name)
        if cached is None or cached[0] is not fconfig or cached[1] is not bconfig:
            cached = self._amqp_policies[fconfig.name] = (fconfig, bconfig, AmqpPolicy(fconfig, bconfig))
        return cached[2]

    def closed_total(self) -> int:
        """Sessions ended since start (proxy.memory trims after waves of them)."""
        return self._closed

    def ended(self, conn: Connection) -> None:
        self._closed += 1
        self.live.discard(conn)
        if not self.live:
            self.drained.set()
            self.drained = trio.Event()


class _Session(Link):
    """One client connection, from accept to close: the shell of its
    dispatch, and once connected the relay's link itself (one object per
    connection, and the relay's outcome comes straight to ``ended``).

    It runs in callbacks: ``begin`` (from the listener) starts the dispatch,
    ``_connect_done`` (from the poller) feeds it a connect's outcome,
    ``ended`` (from the poller) ends the session. ``_carry_out`` does what
    the dispatch asks; only a wait in the backend's queue takes a task
    (``_queued``). Callbacks never raise: a failure ends this session only
    (``PD``).
    """

    __slots__ = (
        "sessions", "client", "frontend", "conn", "backend", "dispatch",
        "server_sock", "waiter", "done", "kernel", "client_tls", "server_tls", "peer", "header",
        "line", "queued_at",
    )  # fmt: skip

    def __init__(
        self, sessions: Sessions, client: _socket.socket, peer: tuple, frontend: FrontendRuntime, poller: Poller
    ) -> None:
        # The relay's half (Link.__init__) runs once connected (_relay).
        self.ways = None  # not relaying (yet): Link.stop() does nothing
        self.poller = poller  # the run's relay poller (Link.__init__ sets the same)
        self.sessions = sessions
        self.client = client
        self.frontend = frontend
        self.conn = Connection(sessions.runtime.new_connection_id(), peer[:2], frontend.config.name, Traffic())
        self.backend: BackendRuntime | None = None
        self.dispatch: Dispatch | None = None
        self.server_sock: _socket.socket | None = None
        self.waiter: Writable | Handshake | None = None
        self.done = False
        self.kernel: KernelLink | None = None  # the kernel's relay, on that path
        self.header = 0  # bytes of a PROXY header written to the server
        self.client_tls: TlsEnd | None = None
        self.server_tls: TlsEnd | None = None
        self.peer: TlsPeer | None = None  # the client's TLS session, once established
        self.line: StartLine | None = None  # the rate limit's start line it waits in
        self.queued_at = 0.0  # when it lined up

    def begin(self) -> None:
        self.sessions.live.add(self.conn)
        material = self.sessions.runtime.tls
        bind = material.frontends.get(self.conn.frontend) if material is not None else None
        if bind is not None:
            self._begin_handshake(bind)
        else:
            self._dispatch()

    def _dispatch(self) -> None:
        conn = self.conn
        try:
            backend = self.backend = self.sessions.runtime.backends[self.frontend.config.backend]
            conn.backend = backend
            backend.total_sessions += 1
            dispatch = self.dispatch = Dispatch(backend, conn)
            gate = self.frontend.gate
            if gate is not None and not self._admitted(gate, backend):
                return
            self._carry_out(dispatch.start(self.poller.now()))
        except Exception as error:
            self._crashed(error)

    def _admitted(self, gate: RateGate, backend: BackendRuntime) -> bool:
        """The frontend's rate limits (`gate`): go on now (True), later or never."""
        now = self.poller.now()
        answer = gate.admit(self.conn.client[0], now, backend.config.timeout.queue)
        if answer.wait is None:
            self._end("PR", answer.limit)
            return False
        if answer.hold > 0:
            self._start_task(self._held_back, answer.hold)
            return False
        return gate.line is None or self._line_up(gate.line, now)

    def _line_up(self, line: StartLine, now: float) -> bool:
        """Into the frontend's start line: go on now (True), or wait in it
        until its releaser lets this session go (:func:`_release_line`)."""
        if line.enter(self, now):
            return True
        self.line, self.queued_at = line, now
        self.conn.interrupt = self._leave_line
        if not line.driven:
            line.driven = True
            self._start_task(_release_line, line, self.poller)
        return False

    def _leave_line(self) -> None:
        """Killed while waiting in the start line."""
        line = self.line
        assert line is not None  # the interrupt while it waits in one
        line.withdraw(self)
        self.line = None
        self._end(self._killed(), self.conn.kill_note)

    def gave_up_waiting(self) -> bool:
        """Asked by the start line's releaser at this session's turn: True
        (and the session ended, ``CQ``) when the client went away while it
        waited, so that no broker gets a connection for nobody and the
        turn goes to the next client. A reset always counts; a FIN only on
        an AMQP frontend (AMQP clients never half-close, so a FIN is a
        client that closed), while a TCP client that half-closed may still
        want its answer, and goes on."""
        gone = _client_gone(self.client, amqp=self.frontend.config.mode is FrontendMode.AMQP)
        if gone:
            self.line = None
            dispatch = self.dispatch
            assert dispatch is not None  # it lined up after its dispatch began
            dispatch.timing.queue += self.poller.now() - self.queued_at
            self._end("CQ", "client closed while waiting in the start line")
        return gone

    def go_on(self, now: float) -> None:
        """The start line's releaser lets this session go on now. Never raises."""
        self.line = None
        self.conn.interrupt = None
        try:
            dispatch = self.dispatch
            assert dispatch is not None  # it lined up after its dispatch began
            dispatch.timing.queue += now - self.queued_at
            self._carry_out(dispatch.start(now))
        except Exception as error:
            self._crashed(error)

    # -- carrying out the dispatch's actions -----------------------------------------------

    def _carry_out(self, action) -> None:
        """Does what the dispatch asks until something must be waited for
        (a connect in progress, the queue), the relay starts or the session ends."""
        dispatch = self.dispatch
        assert dispatch is not None  # its actions come from it
        while True:
            kind = type(action)
            if kind is Connect:
                try:
                    sock, failure = start_connect(action.server)
                except OSError as error:
                    action = dispatch.no_socket(self.poller.now(), error_name(error.errno or 0))
                    continue
                self.server_sock = sock
                if failure == errno.EINPROGRESS:
                    self.waiter = self.poller.when_writable(
                        sock.fileno(), action.deadline, self._connect_done, self.fail
                    )
                    self.conn.interrupt = self._interrupt_connect
                    return
                if not failure:
                    self._connected()
                    return
                self._drop_server_socket()
                action = dispatch.connect_refused(self.poller.now(), error_name(failure))
            elif kind is Queue:
                self._start_task(self._queued, action)
                return
            else:
                self._failed(action)
                return

    def _connect_done(self, reported: int) -> None:
        """The poller's report on the connect in progress: its epoll events,
        0 when its deadline passed."""
        self.waiter = None
        self.conn.interrupt = None
        try:
            sock, dispatch = self.server_sock, self.dispatch
            assert sock is not None and dispatch is not None  # the connect it waited for
            failure = connect_error(sock, reported) if reported else 0
            if reported and not failure:
                self._connected()
                return
            self._drop_server_socket()
            now = self.poller.now()
            if reported:
                self._carry_out(dispatch.connect_refused(now, error_name(failure)))
            else:
                self._carry_out(dispatch.connect_timed_out(now))
        except Exception as error:
            self._crashed(error)

    def _connected(self) -> None:
        dispatch, sock = self.dispatch, self.server_sock
        assert dispatch is not None and sock is not None  # its connect completed
        context = self._server_context()
        if context is None:
            dispatch.connected(self.poller.now())
        written = 0
        if dispatch.server.config.send_proxy is not SendProxy.NONE:
            refused, written = _send_proxy_header(self.client, sock, dispatch.server, self.conn, self.peer)
            if refused is not None:
                self._end(*refused)
                return
        if context is not None:
            self._begin_server_handshake(context)
        else:
            self._relay(written)

    # -- TLS -------------------------------------------------------------------------------

    def _begin_handshake(self, bind) -> None:
        """The client's TLS handshake, with the certificate set in force now (SIGHUP swaps it)."""
        try:
            end = self.client_tls = TlsEnd(self.client.fileno(), bind.context, server_side=True)
            deadline = self.poller.now() + bind.settings.handshake_timeout
            self.waiter = Handshake(end, self.poller, deadline, self._client_handshake_done, self.fail)
            self.conn.interrupt = self._interrupt_connect
            self.waiter.start()
        except Exception as error:
            self._crashed(error)

    def _handshake_over(self) -> None:
        """A Handshake link reported: nothing to wait for or interrupt any more."""
        self.waiter = None
        self.conn.interrupt = None

    def _client_handshake_done(self, failed: HandshakeFailed | None) -> None:
        self._handshake_over()
        try:
            if failed is not None:
                self.frontend.tls.failed(failed.key)
                log.info("tls.handshake_failed", conn=self.conn.id, client=_addr(self.conn.client),
                         frontend=self.frontend.name, reason=failed.description)
                self._end("cR" if failed.key == tls_errors.TIMEOUT else "CR", failed.description)
                return
            end = self.client_tls
            assert end is not None  # its handshake reported
            peer = self.peer = end.peer()
            self.frontend.tls.established(peer.version, peer.reused, peer.subject if peer.certificate else None)
        except Exception as error:
            self._crashed(error)
            return
        self._dispatch()

    def _server_context(self):
        material = self.sessions.runtime.tls
        if material is None or not material.servers:  # no server reached over TLS: the common case
            return None
        backend, dispatch = self.backend, self.dispatch
        assert backend is not None and dispatch is not None  # connected
        return material.server(backend.name, dispatch.server.name)

    def _begin_server_handshake(self, context) -> None:
        """TLS with the broker, verifying it; the connect's time includes it."""
        backend, dispatch, sock = self.backend, self.dispatch, self.server_sock
        assert backend is not None and dispatch is not None and sock is not None  # connected
        config = dispatch.server.config
        name = (config.tls.sni if config.tls is not None else None) or config.address
        end = self.server_tls = TlsEnd(sock.fileno(), context, server_side=False, server_hostname=name)
        deadline = self.poller.now() + backend.config.timeout.connect
        self.waiter = Handshake(end, self.poller, deadline, self._server_handshake_done, self.fail)
        self.conn.interrupt = self._interrupt_connect
        self.waiter.start()

    def _server_handshake_done(self, failed: HandshakeFailed | None) -> None:
        self._handshake_over()
        try:
            backend, dispatch = self.backend, self.dispatch
            assert backend is not None and dispatch is not None  # connected
            now = self.poller.now()
            if failed is None:
                dispatch.connected(now)
                self._relay()
                return
            log.warning("tls.server_handshake_failed", conn=self.conn.id, backend=backend.name,
                        server=dispatch.server.name, reason=failed.description)
            self.server_tls = None
            self._drop_server_socket()
            self._carry_out(dispatch.connect_refused(now, failed.description))
        except Exception as error:
            self._crashed(error)

    def _relay(self, written: int = 0) -> None:
        """Both sockets go to the relay, which owns and closes them: the
        kernel's where it is in use (unless the frontend carries bulk
        streams), else this session as the splice or copy relay's link. A
        connection for the kernel starts as the latter too and moves to the
        kernel after ``[global] kernel_after`` quiet rounds (``promote``):
        the map's entry costs more than a short connection's whole relay. A
        pair the kernel refuses (a client gone already, a full map) stays
        on splice/copy; a pair in the map never leaves it. `written`: bytes
        already sent to the server (a PROXY header), ahead of anything relayed."""
        sessions, client, sock, backend = self.sessions, self.client, self.server_sock, self.backend
        assert sock is not None and backend is not None  # connected
        self.server_sock = None
        frontend = self.frontend
        amqp = frontend.config.mode is FrontendMode.AMQP
        tls = self.client_tls is not None or self.server_tls is not None
        # An AMQP frontend's connection starts on splice/copy, whose reads
        # the AMQP tap sees, and its quiet rounds are counted once the
        # handshake is over (proxy.amqp.tap). TLS is decrypted in user
        # space: never the kernel's relay.
        kernel_after = 0
        if sessions.sockmap is not None and not frontend.config.bulk and not tls:
            kernel_after = sessions.runtime.config.global_.kernel_after
            if amqp:  # counted from the end of the handshake: "at once" is its first quiet round
                kernel_after = max(kernel_after, 1)
            elif not kernel_after:
                try:
                    kernel = self.kernel = start_kernel_relay(
                        client, sock, sessions.sockmap, sessions.timeouts(frontend, backend),
                        written=(0, written), notify=self._kernel_ended,
                    )  # fmt: skip
                except Refused as refused:
                    log.debug("relay.kernel_refused", conn=self.conn.id, reason=str(refused))
                else:
                    self.conn.traffic = kernel.traffic
                    self.conn.interrupt = kernel.interrupt
                    return
        timeouts = self._amqp_timeouts(backend) if amqp else sessions.timeouts(frontend, backend)
        ways = tls_ways((self.client_tls, self.server_tls)) if tls else None
        try:
            Link.__init__(
                self, client, sock, self.conn.traffic, timeouts, sessions.pipes, self.poller, True, self.fail, ways,
            )  # fmt: skip
        except BaseException:
            self.ways = None
            _close(self.poller, sock)
            raise
        self.conn.interrupt = self.interrupt
        self.header = written
        if self.conn.amqp is not None:
            self.conn.amqp.attach(self, kernel_after)  # the trial starts after the handshake
        elif kernel_after:
            self.trial = kernel_after

    def promote(self) -> None:
        """The connection proved long-lived (``trial`` quiet rounds): the
        kernel relays it from now on, unless the kernel refuses the pair.
        An AMQP connection's tails so far go with it (``handed_over``)."""
        tails = (self.ways[0].tail, self.ways[1].tail)
        sockmap = self.sessions.sockmap
        assert sockmap is not None  # a trial is set only where the kernel path is in use (_relay)
        kernel = hand_over(self, sockmap, self._kernel_ended, (0, self.header))
        if kernel is None:
            log.debug("relay.kernel_refused", conn=self.conn.id, reason="hand-over refused")
            return
        if self.conn.amqp is not None:
            self.conn.amqp.handed_over(tails)
        self.kernel = kernel
        self.conn.traffic = kernel.traffic
        self.conn.interrupt = kernel.interrupt

    def _amqp_timeouts(self, backend: BackendRuntime) -> Timeouts:
        """An AMQP frontend's connection gets its AMQP state, and the relay's first timeouts."""
        policy = self.sessions.amqp_policy(self.frontend, backend)
        self.conn.amqp = AmqpConnection(policy, backend)
        return policy.before_header

    def ended(self, ending: Ending | None) -> None:
        """The relay's outcome (None: interrupted by a kill)."""
        if self.notify is None:
            return  # ended already
        conn = self.conn
        if conn.amqp is not None:
            conn.amqp.finish(self)  # its tails, before the directions go
        if conn.kill_note is not None and self.ways is not None:
            _drain(self.socks)  # a polite kill: FIN both ways, no reset
        self.stop()
        if ending is None:
            self._end(self._killed(), conn.kill_note)
        elif conn.amqp is None:
            self._end(_ENDINGS[ending], None)
        elif ending is Ending.HELD and (self.client_tls is not None or self.server_tls is not None):
            # The refusal speaks AMQP on the raw sockets: over TLS the limit
            # is enforced by closing both sides instead of a 530 reply.
            self._end("PR", f"{conn.amqp.inspector.refusal} (closed: no 530 reply over TLS)")
        elif ending is Ending.HELD:  # the sockets are ours again: refuse in a task
            self._start_task(self._refuse)
        else:
            self._end(*conn.amqp.ending(ending, _ENDINGS[ending]))

    def fail(self, error: Exception) -> None:
        """The poller's call when serving this session (its connect wait or
        its relay) raised unexpectedly."""
        self._crashed(error)

    def _kernel_ended(self, result: outcome.Outcome) -> None:
        """The kernel relay's outcome: an Ending, None (a kill) or an error
        (a failure here ends this session only: PD)."""
        conn, kernel = self.conn, self.kernel
        try:
            assert kernel is not None  # its relay reported
            if conn.amqp is not None:
                conn.amqp.finish_kernel(kernel.pair)  # its tails, before the pair's slots go
            ending = result.unwrap()
            if ending is None and conn.kill_note is not None:
                _drain(kernel.socks)  # a polite kill: FIN both ways, no reset
            kernel.stop()
            if ending is None:
                termination, reason = self._killed(), conn.kill_note
            elif conn.amqp is not None:
                termination, reason = conn.amqp.ending(ending, _ENDINGS[ending])
            else:
                termination, reason = _ENDINGS[ending], None
        except Exception as error:
            self._crashed(error)
            return
        self._end(termination, reason)

    def _interrupt_connect(self) -> None:
        if self.waiter is not None:
            self.waiter.cancel()
            self.waiter = None
        self._end(self._killed(), None)

    # -- waiting in the queue ----------------------------------------------------------------

    def _start_task(self, async_fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        nursery = self.sessions.nursery
        assert nursery is not None, "the App sets Sessions.nursery before accepting"
        nursery.start_soon(async_fn, *args)

    async def _queued(self, action: Queue) -> None:
        """Waits in the backend's queue while the dispatch says so, then goes
        on in callbacks. A kill ends the wait (its termination); so does the
        end of the stop grace period (a cancellation)."""
        conn, dispatch, backend = self.conn, self.dispatch, self.backend
        next_action: Connect | Queue | Fail = action
        try:
            assert dispatch is not None and backend is not None  # its dispatch queued it
            while type(next_action) is Queue:
                with trio.CancelScope() as scope:
                    conn.interrupt = scope.cancel
                    woken = await backend.wait_in_queue(next_action.until)
                conn.interrupt = None
                if scope.cancelled_caught:
                    self._end(self._killed(), None)
                    return
                now = self.poller.now()
                next_action = dispatch.slot_freed(now) if woken else dispatch.queue_expired(now)
            self._carry_out(next_action)
        except trio.Cancelled:  # the stop grace period is over
            self._end(KillReason.KILLED.value + "D", None)
            raise
        except Exception as error:  # one connection's failure never stops the others
            self._crashed(error)

    async def _held_back(self, delay: float) -> None:
        """A source rate limit's queue (or a frontend limit's, without a start
        line): this client's turn comes `delay` seconds from now (reserved in
        the token bucket); then it lines up in the frontend's start line, if
        any, or goes on in callbacks."""
        conn = self.conn
        try:
            with trio.CancelScope() as scope:
                conn.interrupt = scope.cancel
                await trio.sleep(delay)
            conn.interrupt = None
            if scope.cancelled_caught:
                self._end(self._killed(), conn.kill_note)
                return
            dispatch = self.dispatch
            assert dispatch is not None  # held back after its dispatch began
            dispatch.timing.queue += delay
            now = self.poller.now()
            gate = self.frontend.gate  # None if a reload removed the limit meanwhile
            if gate is None or gate.line is None or self._line_up(gate.line, now):
                self._carry_out(dispatch.start(now))
        except trio.Cancelled:  # the stop grace period is over
            self._end(KillReason.KILLED.value + "D", None)
            raise
        except Exception as error:
            self._crashed(error)

    async def _refuse(self) -> None:
        """An AMQP connection limit withheld the client's Open (proxy.amqp.refuse)."""
        amqp = self.conn.amqp
        termination, reason = "PR", amqp.inspector.refusal
        try:
            with trio.CancelScope() as scope:
                self.conn.interrupt = scope.cancel
                await refuse(self.client, self.socks[1], amqp.to_server, reason)
            if scope.cancelled_caught:
                termination, reason = self._killed(), self.conn.kill_note
        except trio.Cancelled:
            termination = KillReason.KILLED.value + "D"
            raise
        except Exception as error:
            log.error("session.failed", conn=self.conn.id, client=_addr(self.conn.client), exc_info=error)
            termination, reason = "PD", f"internal error: {error!r}"
        finally:
            self._end(termination, reason)

    # -- the end ---------------------------------------------------------------------

    def _killed(self) -> str:
        return (self.conn.kill_reason or KillReason.KILLED).value + "D"

    def _failed(self, failure: Fail) -> None:
        if failure.server is None and failure.code == "SC":
            backend = self.backend
            assert backend is not None  # set with the dispatch
            log.warning(
                "backend.no_server", backend=backend.name, client=_addr(self.conn.client),
                servers=len(backend.servers),
            )  # fmt: skip
        self._end(failure.code, failure.reason)

    def _crashed(self, error: Exception) -> None:
        log.error("session.failed", conn=self.conn.id, client=_addr(self.conn.client), exc_info=error)
        self.stop()  # the relay, if it runs
        if self.kernel is not None:
            self.kernel.stop()
        self._end("PD", f"internal error: {error!r}")

    def _drop_server_socket(self) -> None:
        sock, self.server_sock = self.server_sock, None
        if sock is not None:
            _close(self.poller, sock)

    def _end(self, termination: str, reason: str | None) -> None:
        """Closes what is left, frees the slots and logs; once. No checkpoint.
        The slots are freed even if closing or detaching raises (a bug):
        the caller hears of it, the frontend keeps its capacity."""
        if self.done:
            return
        self.done = True
        conn = self.conn
        conn.interrupt = None
        try:
            if conn.amqp is not None:
                conn.amqp.finish(None)  # uncounts, if nothing did yet
            if self.waiter is not None:
                self.waiter.cancel()
            if self.server_sock is not None:
                self._drop_server_socket()
            _close(self.poller, self.client)  # already closed if the relay had it
            if conn.server is not None:
                conn.server.detach(conn)
            if self.peer is not None:
                self.frontend.tls.closed(self.peer.version)
        finally:
            self.sessions.ended(conn)
            self.frontend.release_slot()
        if self.sessions.log_connections:
            self._log_closed(termination, reason)

    def _log_closed(self, termination: str, reason: str | None) -> None:
        conn = self.conn
        timing = self.dispatch.timing if self.dispatch is not None else _NO_TIMING
        fields = dict(
            conn=conn.id,
            client=_addr(conn.client),
            frontend=conn.frontend,
            backend=conn.backend.name if conn.backend else None,
            server=conn.server.name if conn.server else None,
            tw_ms=round(timing.queue * 1000),
            tc_ms=round(timing.connect * 1000),
            tt_ms=round((time.monotonic() - conn.started) * 1000),
            bytes_in=conn.traffic.bytes_in,
            bytes_out=conn.traffic.bytes_out,
            termination=termination,
            retries=timing.retries,
            redispatched=timing.redispatched,
        )
        if reason:
            fields["reason"] = reason
        if conn.amqp is not None:
            fields.update(describe_identity(conn.amqp.identity))
        peer = self.peer
        if peer is not None:
            fields["tls_version"] = peer.version
            fields["tls_cipher"] = peer.cipher
            if peer.certificate:
                fields["client_cn"] = peer.common_name
                if peer.dns_names:
                    fields["client_dns"] = list(peer.dns_names)
        log.info("connection.closed", **fields)


def _send_proxy_header(
    client: _socket.socket, server_sock: _socket.socket, server: ServerRuntime, conn: Connection,
    peer: TlsPeer | None = None,
) -> tuple[tuple[str, str] | None, int]:
    """Sends the PROXY header `server` wants (its ``send_proxy`` is not
    NONE), before any relayed byte (and before the pair enters a socket
    map); returns ((termination, reason) if that failed, else None; bytes
    written). A freshly connected socket's buffer always takes the header (a
    few hundred bytes) at once. A client that came over TLS (`peer`) is
    described in v2's SSL TLV, as HAProxy's send-proxy-v2-ssl-cn does."""
    version = server.config.send_proxy
    try:
        local = client.getsockname()[:2]
    except OSError:  # the client is already gone
        return ("CC", "client closed while connecting"), 0
    ssl_info = None
    if peer is not None:
        ssl_info = SslInfo(
            peer.version, peer.cipher, peer.common_name if peer.certificate else None,
            cert_in_connection=peer.certificate and not peer.reused, cert_in_session=peer.certificate,
        )
    header = encode_proxy_header(version.value, conn.client, local, ssl_info)
    try:
        sent = server_sock.send(header)
    except OSError as error:
        return ("SD", f"sending the PROXY header failed: {error.strerror}"), 0
    if sent != len(header):
        return ("SD", "sending the PROXY header failed: the socket took only part of it"), sent
    return None, sent


def _drain(socks) -> None:
    """Reads and drops what the kernel holds for each socket, so that closing
    sends a FIN rather than a reset (close() resets when unread bytes remain)."""
    for sock in socks:
        for _ in range(16):
            try:
                if not sock.recv(65536, socket.MSG_DONTWAIT):
                    break
            except OSError:  # EAGAIN (drained), or the connection is already gone
                break


_RESET: Final = select.POLLERR | select.POLLHUP


def _client_gone(client: _socket.socket, *, amqp: bool) -> bool:
    """Whether `client` reset (or, with `amqp`, closed) its connection: one
    poll(2) with no wait, nothing read."""
    poll = select.poll()
    poll.register(client, select.POLLRDHUP)
    ready = poll.poll(0)
    events = ready[0][1] if ready else 0
    return bool(events & _RESET or (amqp and events & select.POLLRDHUP))


def _close(poller: Poller, sock: _socket.socket) -> None:
    """Closes a socket the relay did not (the poller may still know its fd)."""
    fd = sock.fileno()
    if fd != -1:
        poller.drop(fd)
        sock.close()


_NO_TIMING: Final = Timing()  # a session that failed before its dispatch began


def _addr(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _gave_up(session: Any) -> bool:
    """Asked of each client of a start line at its turn: a session (any
    client with its methods: the line holds what entered it)."""
    return session.gave_up_waiting()


async def _release_line(line: StartLine, poller: Poller) -> None:
    """A frontend's start line's releaser, while anyone waits in it: lets
    the sessions go on in order, each at the moment the line allows, read on
    the clock at that moment (so a stall of the event loop delays them and
    never bunches them). At the end of the stop grace period the sessions
    still waiting end (``KD``)."""
    try:
        while (at := line.next_at()) is not None:
            await trio.sleep_until(at)
            now = poller.now()
            for session in line.due(now, _gave_up):
                session.go_on(now)
    except trio.Cancelled:
        for session in line.drain():
            session.line = None
            session._end(KillReason.KILLED.value + "D", None)
        raise
    finally:
        line.driven = False
