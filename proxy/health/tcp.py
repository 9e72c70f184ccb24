"""The TCP check, and the connect-and-judge plumbing every check shares.

A check never raises for a network problem: whatever happens becomes a
:class:`CheckResult`.  One `timeout` bounds the whole check (connect and
conversation); when it fires, the code says which phase was waiting
(L4TOUT connecting, L6TOUT/L7TOUT later), as HAProxy reports it.
"""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog
import trio

from proxy.config.model import CheckKind
from proxy.health.results import CheckCode, CheckFailed, CheckResult
from proxy.tls.errors import describe as describe_tls_error

log = structlog.get_logger("warren.health")

# Errors creating a socket are about us, not the server (HAProxy: SOCKERR).
_LOCAL_SOCKET_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

Phase = Callable[[], tuple[CheckCode, str]]


def _connecting() -> tuple[CheckCode, str]:
    return CheckCode.L4TOUT, "TCP connect"


def _handshaking() -> tuple[CheckCode, str]:
    return CheckCode.L6TOUT, "the TLS handshake"


@dataclass(frozen=True, slots=True)
class CheckTls:
    """Reach the server over TLS, as clients do: its context and the name to verify (and send as SNI)."""

    context: ssl.SSLContext
    server_hostname: str | None




def describe_os_error(exc: BaseException) -> str:
    """The OS's words for an error, also when trio wrapped it (BrokenResourceError)."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if not isinstance(cause, OSError):
        return str(exc) or type(exc).__name__
    if cause.errno and cause.errno > 0:  # getaddrinfo's errors are negative EAI_* codes
        return os.strerror(cause.errno)
    return cause.strerror or str(cause)


class CheckRun:
    """One check in progress: its start time, kind and current phase.

    `phase` answers "if the timeout fired now, which code and what were we
    waiting for?"; checks replace it as they advance.
    """

    def __init__(self, kind: CheckKind, timeout: float):
        self.kind = kind
        self.timeout = timeout
        self.started = trio.current_time()
        self.phase: Phase = _connecting

    def result(
        self, code: CheckCode, description: str, details: Mapping[str, str] | None = None
    ) -> CheckResult:
        duration = trio.current_time() - self.started
        return CheckResult(code, duration, description, self.kind, details or {})

    def timed_out(self) -> CheckResult:
        code, waiting_for = self.phase()
        return self.result(code, f"timeout after {round(self.timeout * 1000)}ms waiting for {waiting_for}")

    def failed(self, exc: Exception) -> CheckResult:
        """The result for an exception a check's conversation may raise."""
        if isinstance(exc, CheckFailed):
            return self.result(exc.code, exc.description, exc.details)
        # A reset or broken pipe once connected (trio wraps the OSError).
        return self.result(CheckCode.SOCKERR, describe_os_error(exc))


# What a conversation may raise: its own verdicts (CheckFailed, including the
# AMQP codec's HandshakeError) and stream errors once connected.
CHECK_ERRORS = (CheckFailed, trio.BrokenResourceError, OSError)


async def run_check(
    kind: CheckKind, timeout: float, conversation: Callable[[CheckRun], Awaitable[CheckResult]]
) -> CheckResult:
    """Run `conversation` under `timeout`, turning every failure into a result."""
    run = CheckRun(kind, timeout)
    result: CheckResult | None = None
    with trio.move_on_after(timeout):
        try:
            result = await conversation(run)
        except CHECK_ERRORS as exc:
            result = run.failed(exc)
    if result is None:
        result = run.timed_out()
    log.debug("health.check.done", kind=str(kind), code=str(result.code), description=result.description)
    return result


async def open_check_stream(
    host: str, port: int, proxy_header: bytes | None = None, tls: CheckTls | None = None,
    run: CheckRun | None = None,
) -> trio.abc.Stream:
    """Connect to `host`:`port`, send `proxy_header` if given (in clear, as
    HAProxy does), then complete a TLS handshake with `tls`.

    Raises CheckFailed: L4CON when the server cannot be reached (refused,
    unreachable, name unresolvable), SOCKERR when no socket can be made,
    L6RSP when the TLS handshake fails ("certificate verify failed: hostname
    mismatch"); while it runs, a timeout reports L6TOUT (through `run`).
    The caller owns (and closes) the stream.
    """
    try:
        addresses = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise CheckFailed(CheckCode.L4CON, f"cannot resolve {host}: {describe_os_error(exc)}") from None
    family, socktype, proto, _, sockaddr = addresses[0]
    try:
        sock = trio.socket.socket(family, socktype, proto)
    except OSError as exc:
        code = CheckCode.SOCKERR if exc.errno in _LOCAL_SOCKET_ERRNOS else CheckCode.L4CON
        raise CheckFailed(code, describe_os_error(exc)) from None
    try:
        await sock.connect(sockaddr)
    except OSError as exc:
        sock.close()
        raise CheckFailed(CheckCode.L4CON, describe_os_error(exc)) from None
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    if proxy_header:
        await stream.send_all(proxy_header)
    if tls is None:
        return stream
    if run is not None:
        run.phase = _handshaking
    secure = trio.SSLStream(stream, tls.context, server_hostname=tls.server_hostname)
    try:
        await secure.do_handshake()
    except trio.BrokenResourceError as exc:
        await close_stream(stream)
        if isinstance(exc.__cause__, ssl.SSLError):
            raise CheckFailed(CheckCode.L6RSP, describe_tls_error(exc.__cause__)) from None
        raise CheckFailed(CheckCode.L6RSP, f"TLS handshake failed: {describe_os_error(exc)}") from None
    except BaseException:
        await close_stream(stream)
        raise
    return secure


async def close_stream(stream: trio.abc.AsyncResource) -> None:
    """Close without letting a pending cancellation hide the check's verdict."""
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def check_tcp(
    host: str, port: int, settings: object = None, timeout: float = 2.0, *, proxy_header: bytes | None = None,
    tls: CheckTls | None = None,
) -> CheckResult:
    """Connect, send the PROXY header if any, close: L4OK, L4CON, L4TOUT or SOCKERR.

    `settings` is ignored; it is there so every check has one signature.
    A RabbitMQ node logs nothing for this check, which also proves little.
    """

    async def connect_and_close(run: CheckRun) -> CheckResult:
        stream = await open_check_stream(host, port, proxy_header, tls, run)
        await close_stream(stream)
        if tls is not None:  # HAProxy's check-ssl: the handshake is the check
            return run.result(CheckCode.L6OK, "TLS handshake completed")
        return run.result(CheckCode.L4OK, "TCP connect succeeded")

    return await run_check(CheckKind.TCP, timeout, connect_and_close)
