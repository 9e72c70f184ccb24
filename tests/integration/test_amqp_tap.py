"""The AMQP tap on fake brokers: byte-exact pass-through, the handshake timeout,
heartbeat-aware idle limits, clean closes vs aborts, rate limits (no RabbitMQ needed)."""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import struct

import pytest
import structlog
import trio

from proxy.config.model import FrontendMode, FrontendTimeouts, RateAction, RateLimit
from proxy.health.amqp_methods import (
    ConnectionClose,
    ConnectionCloseOk,
    ConnectionOpen,
    ConnectionOpenOk,
    ConnectionStart,
    ConnectionStartOk,
    ConnectionTune,
    ConnectionTuneOk,
)
from proxy.health.amqp_wire import HEARTBEAT_FRAME, PROTOCOL_HEADER, FrameBuffer
from lab import wait_until
from proxy.runtime import KillReason
from tests.proxyutil import front, make_config, serve_named, server, start_warren


def amqp_config(port: int, *, queue: float = 5.0, **frontend_changes):
    config = make_config([server("fake", port)], queue=queue)
    frontend = dataclasses.replace(config.frontends[0], mode=FrontendMode.AMQP, **frontend_changes)
    return dataclasses.replace(config, frontends=(frontend,))


def closed_lines(logs):
    return [line for line in logs if line["event"] == "connection.closed"]


# After the handshake: the user-space path (splice/copy, the tap's tails), or
# the kernel's socket map from the first quiet round on ("handover").
after_the_handshake = pytest.mark.parametrize("relay", ["splice", "handover"])


async def on_its_path(app, relay: str) -> None:
    """The connection just opened is on `relay`'s path (the kernel's: in the map)."""
    pairs = 1 if relay == "handover" else 0
    sockmap = app.relay.sockmap
    await wait_until(lambda: (sockmap.pairs if sockmap is not None else 0) == pairs, timeout=10, interval=0.005)


async def wait_for_closed(logs, count=1, timeout=20):
    with trio.fail_after(timeout):
        while len(closed_lines(logs)) < count:
            await trio.sleep(0.01)
    return closed_lines(logs)


async def recv_exactly(stream, size):
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


@pytest.mark.parametrize(
    "first",
    [b"AMQP\x00\x01\x00\x00", b"AMQP\x03\x01\x00\x00", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\xa5"],
    ids=["amqp-1.0", "amqp-sasl", "http", "tls"],
)
async def test_clients_that_do_not_speak_0_9_1_pass_byte_exact(first):
    payload = first + os.urandom(300_000)  # bulk too: past the tap, splice may take over
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "echo")
            app = await start_warren(nursery, amqp_config(port))
            stream = await trio.open_tcp_stream(*front(app))
            assert await recv_exactly(stream, 5) == b"echo\n"

            async def send():
                await stream.send_all(payload)

            nursery.start_soon(send)
            assert await recv_exactly(stream, len(payload)) == payload
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_silent_client_is_closed_after_the_handshake_timeout_cR():
    timeouts = FrontendTimeouts(client="heartbeat", handshake=0.5)
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(fake_broker, FakeBroker())
            app = await start_warren(nursery, amqp_config(port, timeout=timeouts))
            started = trio.current_time()
            stream = await trio.open_tcp_stream(*front(app))
            assert await stream.receive_some(100) == b""  # closed by Warren
            assert trio.current_time() - started >= 0.45
            (line,) = await wait_for_closed(logs)
            assert line["termination"] == "cR"
            assert line["reason"] == "no AMQP protocol header within 0.5s"
            nursery.cancel_scope.cancel()


async def test_a_client_that_sent_its_header_is_not_cut_by_the_handshake_timeout():
    timeouts = FrontendTimeouts(client="heartbeat", handshake=0.3)
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(fake_broker, FakeBroker())
            app = await start_warren(nursery, amqp_config(port, timeout=timeouts))
            client = AmqpClient(await trio.open_tcp_stream(*front(app)), heartbeat=0)
            await client.handshake()
            await trio.sleep(1.0)  # idle, no heartbeat, no fallback: never cut
            assert not closed_lines(logs)
            await client.close()
            (line,) = await wait_for_closed(logs)
            assert line["termination"] == "--"
            nursery.cancel_scope.cancel()


# -- a scripted broker and client --------------------------------------------------------


class FakeBroker:
    """Speaks the broker's side of the handshake; then heartbeats, and answers
    Close with Close-Ok followed by a reset, as RabbitMQ does."""

    def __init__(self, heartbeat=0, send_heartbeats=True, close_first=None):
        self.heartbeat = heartbeat
        self.send_heartbeats = send_heartbeats
        self.close_first = close_first  # (code, text): the broker closes once open


async def fake_broker(broker: FakeBroker, *, task_status=trio.TASK_STATUS_IGNORED):
    async def handler(stream: trio.SocketStream):
        frames = FrameBuffer()
        try:
            await recv_exactly(stream, 8)
            await stream.send_all(ConnectionStart().frame())
            await next_method(stream, frames)  # Start-Ok
            await stream.send_all(ConnectionTune(2047, 131072, broker.heartbeat).frame())
            await next_method(stream, frames)  # Tune-Ok
            await next_method(stream, frames)  # Open
            await stream.send_all(ConnectionOpenOk().frame())
            async with trio.open_nursery() as nursery:
                if broker.heartbeat and broker.send_heartbeats:
                    nursery.start_soon(beat, stream, broker.heartbeat / 2)
                if broker.close_first:
                    await stream.send_all(ConnectionClose(*broker.close_first).frame())
                    await next_method(stream, frames)  # Close-Ok
                else:
                    await next_method(stream, frames)  # Close
                    await stream.send_all(ConnectionCloseOk().frame())
                reset(stream)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, OSError):
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


def reset(stream: trio.SocketStream) -> None:
    """Close with linger 0: the peer gets an RST (RabbitMQ's way)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def beat(stream, interval):
    while True:
        await trio.sleep(interval)
        await stream.send_all(HEARTBEAT_FRAME)


async def next_method(stream, frames: FrameBuffer):
    from proxy.health.amqp_methods import decode_method

    while True:
        frame = frames.next_frame()
        if frame is not None:
            if frame.type == 1:
                return decode_method(frame.payload)
            continue
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError
        frames.feed(data)


class AmqpClient:
    def __init__(self, stream, heartbeat=0):
        self.stream, self.heartbeat, self.frames = stream, heartbeat, FrameBuffer()

    async def handshake(self, vhost="/"):
        await self.stream.send_all(PROTOCOL_HEADER)
        await next_method(self.stream, self.frames)
        await self.stream.send_all(
            ConnectionStartOk({"connection_name": "scripted"}, "PLAIN", b"\x00app\x00pw", "en_US").frame())
        await next_method(self.stream, self.frames)
        await self.stream.send_all(ConnectionTuneOk(2047, 131072, self.heartbeat).frame()
                                   + ConnectionOpen(vhost).frame())
        return await next_method(self.stream, self.frames)

    async def close(self):
        await self.stream.send_all(ConnectionClose(200, "bye").frame())
        assert isinstance(await next_method(self.stream, self.frames), ConnectionCloseOk)
        await self.stream.aclose()


@after_the_handshake
async def test_a_completed_close_ended_by_the_brokers_reset_is_normal(relay):
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(fake_broker, FakeBroker())
            app = await start_warren(nursery, amqp_config(port), relay=relay)
            client = AmqpClient(await trio.open_tcp_stream(*front(app)))
            assert isinstance(await client.handshake(), ConnectionOpenOk)
            await on_its_path(app, relay)
            await client.close()
            (line,) = await wait_for_closed(logs)
            assert line["termination"] == "--" and "reason" not in line
            assert (line["amqp_name"], line["amqp_user"], line["amqp_vhost"]) == ("scripted", "app", "/")
            assert "pw" not in repr(line)
            nursery.cancel_scope.cancel()


@after_the_handshake
async def test_a_broker_close_is_normal_and_says_why(relay):
    broker = FakeBroker(close_first=(320, "CONNECTION_FORCED - broker forced connection closure"))
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(fake_broker, broker)
            app = await start_warren(nursery, amqp_config(port), relay=relay)
            client = AmqpClient(await trio.open_tcp_stream(*front(app)))
            await client.handshake()
            await on_its_path(app, relay)
            assert isinstance(await next_method(client.stream, client.frames), ConnectionClose)
            await client.stream.send_all(ConnectionCloseOk().frame())
            (line,) = await wait_for_closed(logs)
            assert line["termination"] == "--"
            assert line["reason"] == "closed by broker: CONNECTION_FORCED"
            nursery.cancel_scope.cancel()


@after_the_handshake
async def test_a_reset_without_a_close_is_still_a_server_abort(relay):
    async def resetting_broker(*, task_status=trio.TASK_STATUS_IGNORED):
        async def handler(stream):
            frames = FrameBuffer()
            await recv_exactly(stream, 8)
            await stream.send_all(ConnectionStart().frame())
            await next_method(stream, frames)
            await stream.send_all(ConnectionTune(2047, 131072, 0).frame())
            await next_method(stream, frames)
            await next_method(stream, frames)
            await stream.send_all(ConnectionOpenOk().frame())
            await trio.sleep(0.2)
            reset(stream)

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(handler, listeners, handler_nursery=nursery)

    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(resetting_broker)
            app = await start_warren(nursery, amqp_config(port), relay=relay)
            client = AmqpClient(await trio.open_tcp_stream(*front(app)))
            await client.handshake()
            await on_its_path(app, relay)
            (line,) = await wait_for_closed(logs)
            assert line["termination"] == "SD"
            nursery.cancel_scope.cancel()


@after_the_handshake
async def test_a_client_that_stops_sending_heartbeats_is_closed_after_twice_the_interval(relay):
    """The broker keeps sending heartbeats; the client falls silent (as a frozen
    or vanished client does): Warren closes it about 2h later, cD."""
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(fake_broker, FakeBroker(heartbeat=1))
            app = await start_warren(nursery, amqp_config(port, timeout=FrontendTimeouts(client="heartbeat")), relay=relay)
            client = AmqpClient(await trio.open_tcp_stream(*front(app)), heartbeat=1)
            await client.handshake()
            await on_its_path(app, relay)
            opened = trio.current_time()
            (line,) = await wait_for_closed(logs)
            assert line["termination"] == "cD"
            assert 2.5 <= trio.current_time() - opened <= 10
            assert line["amqp_heartbeat"] == 1
            nursery.cancel_scope.cancel()


@after_the_handshake
async def test_a_client_sending_heartbeats_is_never_cut(relay):
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(fake_broker, FakeBroker(heartbeat=1))
            app = await start_warren(nursery, amqp_config(port, timeout=FrontendTimeouts(client="heartbeat")), relay=relay)
            client = AmqpClient(await trio.open_tcp_stream(*front(app)), heartbeat=1)
            await client.handshake()
            await on_its_path(app, relay)
            async with trio.open_nursery() as beats:
                beats.start_soon(beat, client.stream, 0.5)
                await trio.sleep(6)  # six heartbeat intervals
                assert not closed_lines(logs)
                beats.cancel_scope.cancel()
            await client.close()
            nursery.cancel_scope.cancel()


async def test_rate_limit_reject_closes_clients_beyond_the_burst():
    limit = RateLimit(rate=0.5, burst=2, action=RateAction.REJECT)
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "echo")
            app = await start_warren(nursery, amqp_config(port, rate_limit=limit))
            streams = [await trio.open_tcp_stream(*front(app)) for _ in range(3)]
            assert await streams[0].receive_some(5) == b"echo\n"
            assert await streams[1].receive_some(5) == b"echo\n"
            assert await streams[2].receive_some(5) == b""
            (line,) = await wait_for_closed(logs)
            assert (line["termination"], line["reason"]) == ("PR", "rate limit: frontend fe (0.5/s)")
            assert app.runtime.frontends["fe"].gate.rejected == 1
            nursery.cancel_scope.cancel()


async def test_rate_limit_queue_spreads_clients_at_the_rate():
    limit = RateLimit(rate=5, burst=1, action=RateAction.QUEUE)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_named, "echo")
            app = await start_warren(nursery, amqp_config(port, source_rate_limit=limit))
            started = trio.current_time()
            greeted = []
            for _ in range(4):
                stream = await trio.open_tcp_stream(*front(app))
                assert await stream.receive_some(5) == b"echo\n"
                greeted.append(trio.current_time() - started)
            assert greeted[-1] >= 0.55  # 3 waits of 0.2 s, less scheduling slack
            assert app.runtime.frontends["fe"].gate.queued == 3
            nursery.cancel_scope.cancel()


async def test_a_storm_reaches_the_broker_no_faster_than_the_rate_limit():
    """40 clients at once, 20/s with a burst of 2, queued: the broker accepts
    the k-th of them (k >= 2) no sooner than (k + 1 - 2) / 20 s after the
    storm began. Scheduling delays only make accepts later, so this holds on
    a loaded machine; a limiter that let bursts through would break it."""
    rate, burst, count = 20.0, 2, 40
    limit = RateLimit(rate=rate, burst=burst, action=RateAction.QUEUE)
    accepted: list[float] = []

    async def broker(stream):
        accepted.append(trio.current_time())
        await stream.send_all(b"hi\n")
        await stream.receive_some(10)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(functools.partial(trio.serve_listeners, broker, listeners, handler_nursery=nursery))
            app = await start_warren(nursery, amqp_config(port, rate_limit=limit))
            began = trio.current_time()
            greeted = []

            async def client():
                stream = await trio.open_tcp_stream(*front(app))
                assert await stream.receive_some(3) == b"hi\n"
                greeted.append(stream)

            async with trio.open_nursery() as clients:
                for _ in range(count):
                    clients.start_soon(client)
            assert len(greeted) == count == len(accepted)
            for k, at in enumerate(sorted(accepted)):
                if k >= burst:
                    assert at - began >= (k + 1 - burst) / rate - 0.005, (k, at - began)
            assert app.runtime.frontends["fe"].gate.queued == count - burst
            for stream in greeted:
                await stream.aclose()
            nursery.cancel_scope.cancel()



async def behind_a_start_line(nursery, *, rate: float, waiting: int):
    """Warren on an AMQP frontend queued at `rate`/s (burst 1, a 30 s queue
    timeout) in front of an echo server: one client through at once, then
    `waiting` clients in its start line. Returns (app, that first client, those waiting)."""
    port = await nursery.start(serve_named, "echo")
    limit = RateLimit(rate=rate, burst=1, action=RateAction.QUEUE)
    app = await start_warren(nursery, amqp_config(port, queue=30.0, rate_limit=limit))
    first = await trio.open_tcp_stream(*front(app))
    assert await first.receive_some(5) == b"echo\n"
    held = [await trio.open_tcp_stream(*front(app)) for _ in range(waiting)]
    await wait_until(lambda: len(app.runtime.frontends["fe"].gate.line) == waiting, timeout=15)
    return app, first, held


async def test_a_client_killed_in_the_start_line_ends_with_kd_and_the_line_goes_on():
    """One per 4 s, queued: the first client goes at once, three
    wait in the frontend's start line. The second one killed there ends at
    once (KD, its slot freed) and takes no turn: the third goes next."""
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app, _first, waiting = await behind_a_start_line(nursery, rate=0.25, waiting=3)
            fe = app.runtime.frontends["fe"]
            (victim,) = [c for c in app.sessions.live if c.client[1] == waiting[0].socket.getsockname()[1]]
            victim.kill(KillReason.KILLED)
            assert await waiting[0].receive_some(5) == b""
            (line,) = await wait_for_closed(logs)
            assert (line["termination"], line["server"]) == ("KD", None)
            assert len(fe.gate.line) == 2 and fe.current == 3
            assert await waiting[1].receive_some(5) == b"echo\n"  # next in line, about 4 s after the first
            assert len(fe.gate.line) == 1
            nursery.cancel_scope.cancel()


async def test_a_client_that_gave_up_in_the_start_line_ends_cq_at_its_turn_and_the_next_goes():
    """One per 4 s, queued: the first client goes at once, two wait in the
    start line. The first of them closes its socket while it waits: at its
    turn Warren connects to no broker for it (CQ, no server) and the turn
    goes to the next client, which goes on then, not a turn later."""
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            began = trio.current_time()
            app, first, (quitter, patient) = await behind_a_start_line(nursery, rate=0.25, waiting=2)
            await quitter.aclose()  # a FIN: an AMQP client that closed
            assert await patient.receive_some(5) == b"echo\n"
            waited = trio.current_time() - began
            (line,) = await wait_for_closed(logs)
            assert (line["termination"], line["server"]) == ("CQ", None)
            assert line["tw_ms"] >= 2500  # it waited for its turn, about 4 s
            assert 3.0 <= waited < 7.5  # the quitter's turn (4 s after the first), not the next (8 s)
            assert app.runtime.backends["be"].servers["fake"].total_sessions == 2
            await first.aclose()
            await patient.aclose()
            nursery.cancel_scope.cancel()


PIKA_CLIENT = """
import sys, pika
params = pika.ConnectionParameters(host="127.0.0.1", port=int(sys.argv[1]), heartbeat=1, connection_attempts=1)
connection = pika.BlockingConnection(params)
print("open", flush=True)
while True:
    connection.process_data_events(time_limit=0.2)
"""


@after_the_handshake
async def test_a_frozen_real_client_is_closed_after_twice_its_heartbeat(relay):
    """pika negotiates a 1 s heartbeat and is then SIGSTOPped (as a frozen or
    vanished host falls silent without a FIN): Warren closes it after about 2 s."""
    import signal
    import subprocess
    import sys

    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(fake_broker, FakeBroker(heartbeat=1))
            app = await start_warren(nursery, amqp_config(port, timeout=FrontendTimeouts(client="heartbeat")), relay=relay)
            process = subprocess.Popen([sys.executable, "-c", PIKA_CLIENT, str(front(app)[1])],
                                       stdout=subprocess.PIPE, text=True)
            try:
                assert await trio.to_thread.run_sync(process.stdout.readline) == "open\n"
                await on_its_path(app, relay)
                await trio.sleep(3)  # alive: heartbeats both ways
                assert not closed_lines(logs)
                process.send_signal(signal.SIGSTOP)
                stopped = trio.current_time()
                (line,) = await wait_for_closed(logs, timeout=30)
                assert line["termination"] == "cD"
                assert 2.0 <= trio.current_time() - stopped <= 15
            finally:
                process.kill()
                process.wait()
            nursery.cancel_scope.cancel()


async def test_a_connection_limit_answers_530_and_closes_the_broker_side_cleanly():
    from proxy.config.model import ConnectionLimits

    broker = FakeBroker()
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(fake_broker, broker)
            config = amqp_config(port)
            backend = dataclasses.replace(config.backends[0], limits=ConnectionLimits(per_vhost=1))
            app = await start_warren(nursery, dataclasses.replace(config, backends=(backend,)))
            first = AmqpClient(await trio.open_tcp_stream(*front(app)))
            assert isinstance(await first.handshake(), ConnectionOpenOk)
            second = AmqpClient(await trio.open_tcp_stream(*front(app)))
            refusal = await second.handshake()
            assert isinstance(refusal, ConnectionClose)
            assert (refusal.reply_code, refusal.failing_class_id, refusal.failing_method_id) == (530, 10, 40)
            assert refusal.reply_text == "warren: connection limit for vhost / reached (1)"
            await second.stream.send_all(ConnectionCloseOk().frame())
            assert await second.stream.receive_some(100) == b""  # then Warren closes
            (line,) = await wait_for_closed(logs)
            assert (line["termination"], line["reason"]) == ("PR", refusal.reply_text)
            await first.close()
            await wait_for_closed(logs, 2)
            nursery.cancel_scope.cancel()
