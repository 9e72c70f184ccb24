"""The watch: one long-lived AMQP connection that learns of a broker's end at once.

A periodic check learns that a broker went away only at its next run.  A
broker stopping gracefully sends Connection.Close 320 (CONNECTION_FORCED)
on every open connection, and a killed broker's kernel closes its sockets,
so an idle connection kept open with heartbeats hears of both immediately;
a hung broker shows as silence, caught after two heartbeat intervals (the
AMQP 0-9-1 rule, spec 4.2.7: a peer silent for two intervals is dead).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import trio

from proxy.config.model import AmqpCheck, CheckKind
from proxy.health.amqp import READ_SIZE, flush, flush_quietly, handshake_phase, next_amqp_event
from proxy.health.amqp_client import NEED_DATA, HandshakeClient, Opened, ServerClosed
from proxy.health.amqp_wire import HandshakeError
from proxy.health.results import CheckCode, CheckFailed, CheckResult
from proxy.health.tcp import (
    CHECK_ERRORS, CheckRun, CheckTls, close_stream, describe_os_error, open_check_stream,
)

log = structlog.get_logger("warren.health")


class WatchOpenFailed(Exception):
    """The watch connection could not be opened; `result` says why.

    Raised before ``task_status.started()``, so ``nursery.start`` re-raises
    it to whoever started the watch.
    """

    def __init__(self, result: CheckResult):
        super().__init__(result.short(), result.description)
        self.result = result


def heartbeat_seconds(settings: AmqpCheck) -> int:
    """The heartbeat to ask for: AMQP counts whole seconds, and 0 would mean none."""
    return max(1, round(settings.heartbeat))


async def watch_amqp(
    host: str,
    port: int,
    settings: AmqpCheck,
    on_lost: Callable[[CheckResult], None],
    *,
    proxy_header: bytes | None = None,
    tls: CheckTls | None = None,
    open_timeout: float = 5.0,
    close_timeout: float = 1.0,
    task_status: trio.TaskStatus[Opened] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold one AMQP connection open to `host`:`port` until the broker goes away.

    Calls ``task_status.started(opened)`` once Connection.Open-Ok arrived
    (connect plus handshake bounded by `open_timeout`; failing that, raises
    :class:`WatchOpenFailed` instead).  Then sends a heartbeat every half
    interval and waits.  When the broker closes the connection (L7STS with
    its reply code, e.g. "L7STS/320"), the socket ends (L4CON) or is reset
    (SOCKERR), the broker breaks protocol (L6RSP/L7RSP), or nothing arrives
    for two heartbeat intervals (L7TOUT), calls ``on_lost(result)`` exactly
    once and returns.  `result.duration` is how long the broker had been
    silent when the loss was noticed; ``details["open_for"]`` how long the
    connection lived, in seconds.

    Cancelled, it closes politely (Close/Close-Ok, at most `close_timeout`)
    and then the socket, without calling `on_lost`.
    """
    heartbeat = heartbeat_seconds(settings)
    client = HandshakeClient(
        settings.user, settings.password, settings.vhost, heartbeat=heartbeat, watch=True
    )
    stream, opened = await _open(host, port, client, proxy_header, tls, open_timeout)
    result: CheckResult | None = None
    try:
        log.info("health.watch.opened", host=host, port=port, heartbeat=heartbeat)
        task_status.started(opened)
        result = await _wait_for_loss(stream, client, heartbeat)
    finally:
        if result is None:  # cancelled: close politely
            await _close_politely(stream, client, close_timeout)
        await close_stream(stream)
    log.info(
        "health.watch.lost", host=host, port=port, code=str(result.code), description=result.description
    )
    on_lost(result)


async def _open(
    host: str, port: int, client: HandshakeClient, proxy_header: bytes | None, tls: CheckTls | None, timeout: float
) -> tuple[trio.abc.Stream, Opened]:
    run = CheckRun(CheckKind.WATCH, timeout)
    with trio.move_on_after(timeout):
        try:
            stream = await open_check_stream(host, port, proxy_header, tls, run)
        except CHECK_ERRORS as exc:
            raise WatchOpenFailed(run.failed(exc)) from None
        run.phase = lambda: handshake_phase(client)
        try:
            opened = await next_amqp_event(stream, client)
            assert isinstance(opened, Opened)
            return stream, opened
        except CHECK_ERRORS as exc:
            await close_stream(stream)
            raise WatchOpenFailed(run.failed(exc)) from None
        except BaseException:
            await close_stream(stream)
            raise
    raise WatchOpenFailed(run.timed_out())


async def _wait_for_loss(stream: trio.abc.Stream, client: HandshakeClient, heartbeat: int) -> CheckResult:
    """Read, and heartbeat every half interval, until the connection is lost; say how."""
    opened_at = last_heard = trio.current_time()
    next_beat = opened_at + heartbeat / 2
    while True:
        now, silence_limit = trio.current_time(), last_heard + 2 * heartbeat
        if now >= silence_limit:
            return _lost(None, opened_at, last_heard, silent_for=2 * heartbeat)
        try:
            if now >= next_beat:
                next_beat = now + heartbeat / 2
                # A send stuck behind a hung broker's full window is silence too.
                with trio.move_on_at(silence_limit):
                    client.send_heartbeat()
                    await flush(stream, client)
                continue
            data = None
            with trio.move_on_at(min(next_beat, silence_limit)):
                data = await stream.receive_some(READ_SIZE)
            if data is None:
                continue
            last_heard = trio.current_time()
            closed = await _absorb(stream, client, data, heartbeat)
        except CHECK_ERRORS as exc:
            return _lost(exc, opened_at, last_heard)
        if closed is not None:
            return _lost(closed, opened_at, last_heard)


async def _absorb(
    stream: trio.abc.Stream, client: HandshakeClient, data: bytes, heartbeat: int
) -> ServerClosed | None:
    """Feed `data` (b"" at EOF) to the client; the broker's Close if it sent one.

    Raises HandshakeError on EOF or garbage.  The Close-Ok owed for a Close
    is sent at best effort and bounded: RabbitMQ 3.10 stopping on SIGTERM
    resets the socket right after its Close 320, and the verdict is the Close.
    """
    client.receive_data(data)
    event = client.next_event()
    if event is NEED_DATA:
        return None
    with trio.move_on_after(heartbeat):
        await flush_quietly(stream, client)
    if isinstance(event, ServerClosed):
        return event
    raise HandshakeError(CheckCode.L7RSP, f"unexpected {type(event).__name__} on the watch connection")


def _lost(
    cause: ServerClosed | Exception | None, opened_at: float, last_heard: float, *, silent_for: float = 0.0
) -> CheckResult:
    now = trio.current_time()
    details = {"open_for": f"{now - opened_at:.3f}"}
    if isinstance(cause, ServerClosed):
        code = CheckCode.L7STS
        description = f"broker closed the connection: {cause.reply_code} {cause.reply_text}"
        details["status"] = str(cause.reply_code)
    elif isinstance(cause, CheckFailed):
        code, description = cause.code, cause.description
        details.update(cause.details)
    elif cause is not None:
        code, description = CheckCode.SOCKERR, describe_os_error(cause)
    else:
        code, description = CheckCode.L7TOUT, f"no heartbeat or data from the broker for {silent_for:g}s"
    return CheckResult(code, now - last_heard, description.rstrip(), CheckKind.WATCH, details)


async def _close_politely(stream: trio.abc.Stream, client: HandshakeClient, timeout: float) -> None:
    """Connection.Close and wait for Close-Ok, shielded but bounded (we are being cancelled)."""
    if not client.close("Warren watch closing"):
        return
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        try:
            await next_amqp_event(stream, client)
        except CHECK_ERRORS:
            pass

