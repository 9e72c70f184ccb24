"""AMQP connections held open and AMQP connections churned, through a proxy.

Usage: python -m bench.tools.amqp_load HOST PORT [--hold N] [--churn RATE]

--hold N: N connections, each with channel 1 open (the minimal handshake of
bench.amqpwire: heartbeats off, little CPU), held idle. A connection that
ends (its broker was killed, the proxy closed it) is opened again at once,
then, like a real client library, after a delay that doubles from
RETRY_DELAY to MAX_RETRY_DELAY (full jitter) until it succeeds: thousands
of clients retrying every 0.2 s would keep an overloaded broker down.

--churn RATE: RATE new connections a second, started on a fixed schedule
whatever the others do (at most MAX_IN_FLIGHT at once; a start that finds
them all busy is counted as skipped): handshake, channel open, then a polite
Connection.Close answered by Close-Ok, and the socket closed.

JSON lines. Out: {"event": "ready", "held": N} once all N are held (or
{"event": "error"} after --deadline). In: "status" -> {"event": "status",
"held", "target", "reconnects", "churned", "churn_failed", "churn_skipped",
"errors": {kind: count}}; "stop" (or EOF) -> closes everything, then a last
"status" and {"event": "closed"}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from typing import Callable

from bench.amqpwire import (
    CONNECTION_CLOSE_OK, ClientHandshake, FrameReader, ProtocolError, connection_close, method_of,
)

RETRY_DELAY = 0.2
MAX_RETRY_DELAY = 5.0
TIMEOUT = 10.0
MAX_IN_FLIGHT = 500
FAILURES = (ConnectionError, OSError, ProtocolError, asyncio.TimeoutError, asyncio.IncompleteReadError, EOFError)


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def open_amqp(host: str, port: int, handshake: ClientHandshake | None = None,
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ClientHandshake]:
    """A connection through `handshake` (default: channel 1 open) and the
    handshake (the broker's greeting); raises one of FAILURES otherwise (and
    closes it)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        handshake = handshake or ClientHandshake()
        writer.write(handshake.start())
        while not handshake.ready:
            data = await reader.read(65536)
            if not data:
                raise EOFError("closed during the handshake")
            writer.write(handshake.received(data))
        return reader, writer, handshake
    except BaseException:
        writer.close()
        raise


def backoff(failures: int) -> float:
    """A client library's wait before its next attempt: doubling from
    RETRY_DELAY to MAX_RETRY_DELAY, full jitter."""
    return min(MAX_RETRY_DELAY, RETRY_DELAY * 2 ** (failures - 1)) * random.random()


async def keep_open(host: str, port: int, *, opened: Callable[[ClientHandshake, asyncio.StreamWriter], None],
                    lost: Callable[[asyncio.StreamWriter], None], failed: Callable[[BaseException], None],
                    retry: Callable[[int], float] = backoff, stopping: Callable[[], bool],
                    first_gate: asyncio.Semaphore | None = None) -> None:
    """Keeps one AMQP connection (channel 1 open) through host:port until `stopping()`.

    A connection that ends is opened again at once; a failed attempt
    (`failed(error)`) is tried again after `retry(failures in a row)`
    seconds. `opened` hears of each connection, `lost` of its end (the
    writer then closed). The first attempts wait for `first_gate`, so that
    thousands of clients ramp up instead of all handshaking at once.
    """
    first, failures = True, 0
    while not stopping():
        try:
            async with first_gate if first and first_gate is not None else contextlib.nullcontext():
                reader, writer, handshake = await asyncio.wait_for(open_amqp(host, port), TIMEOUT)
        except FAILURES as error:
            failed(error)
            failures += 1
            await asyncio.sleep(retry(failures))
            continue
        first, failures = False, 0
        opened(handshake, writer)
        try:
            while await reader.read(65536):  # heartbeats are off: nothing should come
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            lost(writer)


class Load:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.held = 0
        self.reconnects = 0
        self.churned = 0
        self.churn_failed = 0
        self.churn_skipped = 0
        self.in_flight = 0
        self.errors: Counter[str] = Counter()
        self.writers: set[asyncio.StreamWriter] = set()
        self.stopping = False
        self.changed = asyncio.Event()

    def status(self) -> dict:
        return {"held": self.held, "target": self.args.hold, "reconnects": self.reconnects,
                "churned": self.churned, "churn_failed": self.churn_failed,
                "churn_skipped": self.churn_skipped, "errors": dict(self.errors)}

    def _failed(self, error: BaseException) -> None:
        self.errors[type(error).__name__] += 1

    # -- held connections ---------------------------------------------------------------
    async def hold_one(self, gate: asyncio.Semaphore) -> None:
        reopened = False

        def opened(_handshake: ClientHandshake, writer: asyncio.StreamWriter) -> None:
            nonlocal reopened
            self.reconnects += reopened
            reopened = True
            self.held += 1
            self.writers.add(writer)
            self.changed.set()

        def lost(writer: asyncio.StreamWriter) -> None:
            self.held -= 1
            self.writers.discard(writer)

        await keep_open(self.args.host, self.args.port, opened=opened, lost=lost, failed=self._failed,
                        stopping=lambda: self.stopping, first_gate=gate)

    # -- churn ------------------------------------------------------------------------------
    async def churn(self) -> None:
        period = 1.0 / self.args.churn
        next_start = time.monotonic()
        tasks: set[asyncio.Task] = set()
        while not self.stopping:
            if self.in_flight >= MAX_IN_FLIGHT:
                self.churn_skipped += 1
            else:
                task = asyncio.create_task(self.churn_one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_start += period
            await asyncio.sleep(max(0.0, next_start - time.monotonic()))
        await asyncio.gather(*tasks, return_exceptions=True)

    async def churn_one(self) -> None:
        self.in_flight += 1
        try:
            reader, writer, _ = await asyncio.wait_for(open_amqp(self.args.host, self.args.port), TIMEOUT)
            try:
                writer.write(connection_close())
                await asyncio.wait_for(self._close_ok(reader), TIMEOUT)
            finally:
                writer.close()
            self.churned += 1
        except FAILURES as error:
            self.churn_failed += 1
            self._failed(error)
        finally:
            self.in_flight -= 1

    @staticmethod
    async def _close_ok(reader: asyncio.StreamReader) -> None:
        frames = FrameReader()
        while True:
            data = await reader.read(65536)
            if not data:
                raise EOFError("closed before Close-Ok")
            frames.feed(data)
            for kind, _channel, payload in frames.frames():
                if kind == 1 and method_of(payload)[0] == CONNECTION_CLOSE_OK:
                    return

    def close_all(self) -> None:
        self.stopping = True
        for writer in list(self.writers):
            writer.close()


async def main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    load = Load(args)
    gate = asyncio.Semaphore(args.concurrency)
    tasks = [asyncio.create_task(load.hold_one(gate)) for _ in range(args.hold)]
    deadline = time.monotonic() + args.deadline
    while load.held < args.hold and time.monotonic() < deadline:
        load.changed.clear()
        try:
            await asyncio.wait_for(load.changed.wait(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pass
    status = 0
    if load.held < args.hold:
        emit("error", message=f"only {load.held} of {args.hold} held after {args.deadline}s", **load.status())
        status = 1
    else:
        emit("ready", held=load.held)
    if args.churn > 0:
        tasks.append(asyncio.create_task(load.churn()))
    while line := await stdin.readline():
        if line.strip() == b"status":
            emit("status", **load.status())
        elif line.strip() == b"stop":
            break
    load.close_all()
    await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    emit("status", **load.status())
    emit("closed")
    return status


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="amqp_load")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--hold", type=int, default=0)
    parser.add_argument("--churn", type=float, default=0.0, help="new connections a second")
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes at once while first opening")
    parser.add_argument("--deadline", type=float, default=120.0, help="to hold every connection at first")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
