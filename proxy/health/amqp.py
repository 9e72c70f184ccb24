"""The AMQP check: a full, polite AMQP 0-9-1 handshake against a broker.

The widely copied check (send the protocol header, expect Connection.Start,
hang up) makes RabbitMQ log "client unexpectedly closed TCP connection" on
every run.  This one logs in, opens the vhost and closes with
Connection.Close / Close-Ok, so the broker logs only its ordinary
connection lines, and it proves the credentials and the vhost work.
The check passes only once the broker acknowledged the Close.
"""

from __future__ import annotations

import trio

from proxy.config.model import AmqpCheck, CheckKind
from proxy.health.amqp_client import (
    NEED_DATA,
    ClientState,
    Closed,
    Event,
    HandshakeClient,
    Opened,
    describe_server,
)
from proxy.health.amqp_wire import HandshakeError
from proxy.health.results import CheckCode, CheckResult
from proxy.health.tcp import CheckRun, CheckTls, close_stream, open_check_stream, run_check

READ_SIZE = 65536

_WAITING_FOR = {
    ClientState.AWAIT_START: (CheckCode.L6TOUT, "Connection.Start"),
    ClientState.AWAIT_TUNE: (CheckCode.L7TOUT, "Connection.Tune"),
    ClientState.AWAIT_OPEN_OK: (CheckCode.L7TOUT, "Connection.Open-Ok"),
    ClientState.AWAIT_CLOSE_OK: (CheckCode.L7TOUT, "Connection.Close-Ok"),
}


def handshake_phase(client: HandshakeClient) -> tuple[CheckCode, str]:
    """What a timeout means at the client's current step (no Start yet: L6TOUT)."""
    return _WAITING_FOR.get(client.state, (CheckCode.L7TOUT, "the broker"))


async def flush(stream: trio.abc.SendStream, client: HandshakeClient) -> None:
    data = client.bytes_to_send()
    if data:
        await stream.send_all(data)


async def next_amqp_event(stream: trio.abc.Stream, client: HandshakeClient) -> Event:
    """Exchange bytes until the client reports its next event.

    Sends what the client queued (before and after), so a Close-Ok the
    client owes the broker goes out even when this raises HandshakeError.
    Raises HandshakeError, trio.BrokenResourceError.
    """
    while True:
        await flush(stream, client)
        try:
            event = client.next_event()
        except HandshakeError:
            await flush_quietly(stream, client)
            raise
        await flush(stream, client)
        if event is not NEED_DATA:
            return event
        client.receive_data(await stream.receive_some(READ_SIZE))


async def flush_quietly(stream: trio.abc.SendStream, client: HandshakeClient) -> None:
    """Best-effort send of what is queued (a Close-Ok) while giving up anyway."""
    try:
        await flush(stream, client)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def check_amqp(
    host: str, port: int, settings: AmqpCheck, timeout: float, *, proxy_header: bytes | None = None,
    tls: CheckTls | None = None,
) -> CheckResult:
    """Log in, open `settings.vhost`, close politely: L7OK with the broker's
    product, version and cluster_name in `details`.

    Failures: L4CON/L4TOUT/SOCKERR (TCP), L6RSP/L6TOUT (TLS handshake, with
    `tls`), L6TOUT (no Connection.Start),
    L6RSP (not AMQP 0-9-1: foreign bytes, the broker's own header, broken
    frames), L7RSP (wrong method), L7STS (Connection.Close instead of going
    on: 403 bad credentials, 530 vhost, 320 broker stopping), L7TOUT.
    Never raises for network errors.
    """

    async def converse(run: CheckRun) -> CheckResult:
        client = HandshakeClient(settings.user, settings.password, settings.vhost)
        stream = await open_check_stream(host, port, proxy_header, tls, run)
        run.phase = lambda: handshake_phase(client)
        try:
            opened = await next_amqp_event(stream, client)
            assert isinstance(opened, Opened)
            details = describe_server(opened.server_properties)
            closed = await next_amqp_event(stream, client)
            assert isinstance(closed, Closed)
        finally:
            await close_stream(stream)
        return run.result(CheckCode.L7OK, _describe(details), details)

    return await run_check(CheckKind.AMQP, timeout, converse)


def _describe(details: dict[str, str]) -> str:
    product = " ".join(details[key] for key in ("product", "version") if key in details)
    return f"AMQP handshake completed ({product})" if product else "AMQP handshake completed"
