"""A canary of AMQP publishers with confirms: was any confirmed message lost?

    python -m lab.canary --url amqp://guest:guest@HOST:PORT/ --queue Q [--publishers 4]

Each publisher has its own connection and publishes persistent messages
("<publisher>:<seq>") to one quorum queue, one at a time, waiting for the
broker's confirm. An ack makes the message *confirmed*; a nack or a return
makes it *refused*; no answer within --confirm-timeout, or a lost
connection, leaves it *in doubt*, and the publisher drops that connection
and connects again (each try bounded by --connect-timeout), so a connection
black-holed by a partition is left within the confirm timeout whatever the
heartbeats say.

JSON lines on stdout: {"event": "ready"} once every publisher has connected,
then "connected" / "disconnected" per publisher. Lines on stdin: "status"
answers {"event": "status", "publishers": [...]}; "stop" stops publishing,
drains the queue (through the same URL), deletes it and answers {"event":
"done", "confirmed", "refused", "in_doubt", "found", "lost", "duplicates",
"connections"}: "lost" counts confirmed messages the queue did not return,
the figure that must be 0. Runs until "stop" (or stdin closes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass, field

import aio_pika
from pamqp.commands import Basic


REFUSED_RECONNECT = 50  # publishes refused in a row before a publisher connects again


@dataclass
class Publisher:
    index: int
    confirmed: set[int] = field(default_factory=set)
    refused: int = 0
    in_doubt: int = 0
    connections: int = 0
    connected: bool = False
    last_confirm: float = 0.0  # time.time() of the last ack
    last_error: str = ""

    def status(self) -> dict:
        return {"publisher": self.index, "confirmed": len(self.confirmed), "refused": self.refused,
                "in_doubt": self.in_doubt, "connections": self.connections, "connected": self.connected,
                "last_confirm": self.last_confirm, "last_error": self.last_error}


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


class Canary:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.publishers = [Publisher(i) for i in range(args.publishers)]
        self.stopping = asyncio.Event()
        self.all_connected = asyncio.Event()

    async def connect(self) -> aio_pika.abc.AbstractConnection:
        return await aio_pika.connect(self.args.url, timeout=self.args.connect_timeout,
                                      client_properties={"connection_name": "canary"})

    async def declare(self, channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
        return await channel.declare_queue(self.args.queue, durable=True,
                                           arguments={"x-queue-type": "quorum"},
                                           timeout=self.args.confirm_timeout)

    async def publish_forever(self, publisher: Publisher) -> None:
        seq = 0
        while not self.stopping.is_set():
            try:
                connection = await self.connect()
            except Exception as error:  # refused, reset, timed out: try again
                publisher.last_error = repr(error)
                await self._pause(self.args.retry_delay)
                continue
            publisher.connections += 1
            publisher.connected = True
            emit("connected", publisher=publisher.index, connections=publisher.connections)
            if all(p.connections for p in self.publishers):
                self.all_connected.set()
            waiting = False  # a message published and neither confirmed nor refused yet
            try:
                # Bounded like every other step: opening a channel has no
                # timeout of its own and can wait for ever on a broker that
                # is going away.
                channel = await asyncio.wait_for(connection.channel(publisher_confirms=True),
                                                 self.args.connect_timeout)
                await self.declare(channel)
                refused_in_a_row = 0
                while not self.stopping.is_set():
                    if refused_in_a_row >= REFUSED_RECONNECT:
                        # As an application does when its broker keeps refusing:
                        # open a new connection (seen once after a node of the
                        # cluster stopped: one channel's publishes nacked for
                        # good while the other publishers' were confirmed).
                        raise RuntimeError(f"{refused_in_a_row} publishes refused in a row")
                    seq += 1
                    message = aio_pika.Message(f"{publisher.index}:{seq}".encode(),
                                               delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                    waiting = True
                    try:
                        result = await channel.default_exchange.publish(
                            message, routing_key=self.args.queue, timeout=self.args.confirm_timeout)
                    except aio_pika.exceptions.DeliveryError:
                        publisher.refused += 1
                        refused_in_a_row += 1
                    else:
                        if isinstance(result, Basic.Ack):
                            publisher.confirmed.add(seq)
                            publisher.last_confirm = time.time()
                            refused_in_a_row = 0
                        else:  # returned: unroutable
                            publisher.refused += 1
                            refused_in_a_row += 1
                    waiting = False
                    await self._pause(self.args.interval)
            except Exception as error:  # timeout, connection or channel lost
                publisher.in_doubt += waiting  # the broker may or may not have that message
                publisher.last_error = repr(error)
            finally:
                publisher.connected = False
                emit("disconnected", publisher=publisher.index, reason=publisher.last_error)
                await self._close(connection)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _close(self, connection: aio_pika.abc.AbstractConnection) -> None:
        try:
            await asyncio.wait_for(connection.close(), 1.0)
        except Exception:
            pass  # black-holed or gone: the transport is dropped either way

    async def drain(self) -> dict:
        """Every message in the queue, read through the same URL; then the queue is deleted."""
        found: dict[int, set[int]] = {p.index: set() for p in self.publishers}
        duplicates = 0
        deadline = time.monotonic() + self.args.drain_timeout
        while True:
            try:
                connection = await self.connect()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(self.args.retry_delay)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1000)
            queue = await self.declare(channel)
            async with queue.iterator(no_ack=True, timeout=self.args.drain_idle) as messages:
                try:
                    async for message in messages:
                        index, seq = (int(part) for part in message.body.decode().split(":"))
                        if seq in found.setdefault(index, set()):
                            duplicates += 1
                        found[index].add(seq)
                except asyncio.TimeoutError:
                    pass  # idle for drain_idle seconds: the queue is empty
            await queue.delete(if_unused=False, if_empty=False)
        lost = sum(len(p.confirmed - found.get(p.index, set())) for p in self.publishers)
        return {"found": sum(len(s) for s in found.values()), "lost": lost, "duplicates": duplicates}

    def totals(self) -> dict:
        return {
            "confirmed": sum(len(p.confirmed) for p in self.publishers),
            "refused": sum(p.refused for p in self.publishers),
            "in_doubt": sum(p.in_doubt for p in self.publishers),
            "connections": sum(p.connections for p in self.publishers),
        }

    async def serve_commands(self) -> None:
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "status":
                emit("status", publishers=[p.status() for p in self.publishers], **self.totals())
            elif command == "stop":
                break
        self.stopping.set()

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.publish_forever(p)) for p in self.publishers]
        commands = asyncio.create_task(self.serve_commands())
        ready = asyncio.create_task(self.all_connected.wait())
        await asyncio.wait([ready, commands], return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            emit("ready")
        await commands
        await asyncio.gather(*tasks)
        emit("done", **self.totals(), **await self.drain())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lab.canary", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between a confirm and the next publish")
    parser.add_argument("--confirm-timeout", type=float, default=2.0)
    parser.add_argument("--connect-timeout", type=float, default=2.0)
    parser.add_argument("--retry-delay", type=float, default=0.1)
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="to connect for the final drain")
    parser.add_argument("--drain-idle", type=float, default=3.0, help="the queue is empty after this much silence")
    return parser.parse_args(argv)


if __name__ == "__main__":
    # The client libraries log every lost connection with a traceback; the
    # canary reports them itself ("disconnected", last_error).
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("aio_pika").setLevel(logging.CRITICAL)
    asyncio.run(Canary(parse()).run())
