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
"""

from __future__ import annotations

import socket
import time

import structlog
import trio

from ..backends.connect import ConnectFailed, Timing, connect_to_backend
from ..backends.proxy_protocol import encode as encode_proxy_header
from ..config.model import SendProxy
from ..runtime import BackendRuntime, Connection, FrontendRuntime, KillReason, Runtime
from .pipes import PipePool
from .poller import current_poller
from .relay import Ending, Timeouts, Traffic, relay

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
        # frontend name -> (its config, its backend's config, relay timeouts)
        self._relay_timeouts: dict[str, tuple[object, object, Timeouts]] = {}

    def kill_all(self, reason: KillReason) -> None:
        for conn in list(self.live):
            conn.kill(reason)

    async def handle(
        self, client: socket.socket, peer: tuple, frontend: FrontendRuntime, slot: object
    ) -> None:
        """Serves one accepted client; always closes it and frees its frontend slot."""
        started = time.monotonic()
        conn = Connection(self.runtime.new_connection_id(), peer[:2], frontend.name, Traffic())
        frontend.current += 1
        frontend.total_sessions += 1
        frontend.max_sessions = max(frontend.max_sessions, frontend.current)
        self.live.add(conn)
        timing = Timing()
        termination = "--"
        reason = None
        sockets = [client]  # closed at the end unless the relay closed them
        try:
            with trio.CancelScope() as scope:
                conn.cancel_scope = scope
                termination, reason = await self._serve(client, frontend, conn, timing, sockets)
            if scope.cancelled_caught:
                termination = (conn.kill_reason or KillReason.KILLED).value + "D"
        except* trio.Cancelled:  # the stop grace period is over (a nursery may group it)
            termination = KillReason.KILLED.value + "D"
            raise
        except* Exception as group:  # one connection's failure never stops the others
            termination, reason = "PD", f"internal error: {group.exceptions[0]!r}"
            log.error("session.failed", conn=conn.id, client=_addr(conn.client), exc_info=group)
        finally:  # no checkpoint in here: nothing can interrupt it
            for sock in sockets:
                _close(sock)
            if conn.server is not None:
                conn.server.detach(conn)
            self.live.discard(conn)
            if not self.live:
                self.drained.set()
                self.drained = trio.Event()
            frontend.current -= 1
            frontend.limiter.release_on_behalf_of(slot)
            if self.log_connections:
                self._log_closed(conn, timing, termination, reason, started)

    async def _serve(self, client, frontend, conn, timing, sockets):
        """Returns (termination, reason); adds the server socket to `sockets`."""
        backend = self.runtime.backends[frontend.config.backend]
        conn.backend = backend
        backend.total_sessions += 1
        try:
            server_sock, server = await connect_to_backend(backend, conn, timing)
        except ConnectFailed as failure:
            if failure.code == "SC" and failure.server is None:
                log.warning(
                    "backend.no_server", backend=backend.name, client=_addr(conn.client),
                    servers=len(backend.servers),
                )
            return failure.code, failure.reason
        sockets.append(server_sock)
        config = server.config
        if config.send_proxy is not SendProxy.NONE:
            try:
                local = client.getsockname()[:2]
            except OSError:  # the client is already gone
                return "CC", "client closed while connecting"
            header = encode_proxy_header(config.send_proxy.value, conn.client, local)
            try:
                await _send_all(server_sock, header)
            except OSError as error:
                return "SD", f"sending the PROXY header failed: {error.strerror}"
        timeouts = self._timeouts(frontend, backend)
        # The relay owns (and closes) both sockets from here on.
        ending = await relay(client, server_sock, conn.traffic, timeouts, pipes=self.pipes, owned=True)
        return _ENDINGS[ending], None

    def _timeouts(self, frontend: FrontendRuntime, backend: BackendRuntime) -> Timeouts:
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

    def _log_closed(self, conn, timing, termination, reason, started) -> None:
        total = time.monotonic() - started
        fields = dict(
            conn=conn.id,
            client=_addr(conn.client),
            frontend=conn.frontend,
            backend=conn.backend.name if conn.backend else None,
            server=conn.server.name if conn.server else None,
            tw_ms=round(timing.queue * 1000),
            tc_ms=round(timing.connect * 1000),
            tt_ms=round(total * 1000),
            bytes_in=conn.traffic.bytes_in,
            bytes_out=conn.traffic.bytes_out,
            termination=termination,
            retries=timing.retries,
            redispatched=timing.redispatched,
        )
        if reason:
            fields["reason"] = reason
        log.info("connection.closed", **fields)


async def _send_all(sock: socket.socket, data: bytes) -> None:
    """Sends on a non-blocking socket (the PROXY header: it fits in a fresh
    socket's buffer, so the wait is there for form's sake)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


def _close(sock: socket.socket) -> None:
    """Closes a socket the relay did not (the poller may still know its fd)."""
    fd = sock.fileno()
    if fd != -1:
        current_poller().drop(fd)
        sock.close()


def _addr(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
