"""COUNT AMQP clients that reconnect as soon as they lose their connection.

Usage: python -m bench.tools.storm_client HOST PORT COUNT --nodes A,B [--deadline S]

Each client opens a connection and channel 1 through HOST:PORT (a minimal
handshake, bench.amqpwire, so the clients cost little CPU) and notes which
node answered. Protocol, JSON lines:

  out {"event": "connected", "count": N, "per_node": {...}, "seconds": ...}
  in  {"killing": NODE}           -- the driver is about to kill NODE
  out {"event": "armed"}          -- then the driver kills it
  out {"event": "recovered", "at": T, "lost": L, "attempts": A, "per_node": {...}, "peak_rate": R}
      once every client again has a working connection and none is on NODE
      (T is time.monotonic(), the same clock as the driver's on Linux; the
      condition cannot hold before the kill, as NODE had clients; R is the most
      handshakes completed in any one second after the kill: the surviving
      brokers' peak rate of new connections, as the clients saw it; "reconnected_at"
      lists those moments)
  in  {"command": "wait_balanced", "tolerance": F, "deadline": S}
  out {"event": "balanced", "at": T, "per_node": {...}}  -- every node within F of an even
      share (and one client), or {"event": "unbalanced", "per_node": {...}} after S seconds
  in  {"command": "quit"}         -- or EOF: close everything
  out {"event": "closed"}

A lost client retries at once, then every RETRY_DELAY (with jitter, no
backoff) until the deadline; {"event": "error"} reports a deadline missed.
The connections are bench.tools.amqp_load's (`keep_open`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from bench.amqpwire import ClientHandshake, connection_close, node_in
from bench.tools.amqp_load import emit, keep_open

RETRY_DELAY = 0.1


def retry_soon(_failures: int) -> float:
    """A storm client tries again about every RETRY_DELAY, with no backoff:
    the harshest storm a broker (and a rate limit) can meet."""
    return RETRY_DELAY * (0.5 + random.random())


def most_within(times: list[float], window: float = 1.0) -> int:
    """The most of `times` within any `window` seconds (a sliding window)."""
    times, peak, first = sorted(times), 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        peak = max(peak, last - first + 1)
    return peak


class Storm:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.nodes: list[str] = args.nodes
        self.on_node: list[str | None] = [None] * args.count
        self.per_node = {name: 0 for name in self.nodes}
        self.per_node["?"] = 0
        self.writers: list[asyncio.StreamWriter | None] = [None] * args.count
        self.killed: str | None = None
        self.lost = 0
        self.attempts = 0
        self.changed = asyncio.Event()
        self.stopping = False
        self.reconnected_at: list[float] = []  # handshakes completed after the kill

    @property
    def ready(self) -> int:
        return sum(self.per_node.values())

    def _set(self, index: int, node: str | None) -> None:
        old = self.on_node[index]
        if old is not None:
            self.per_node[old] -= 1
        if node is not None:
            self.per_node[node] += 1
        self.on_node[index] = node
        self.changed.set()

    def peak_rate(self, window: float = 1.0) -> int:
        """The most reconnections completed within any `window` seconds."""
        return most_within(self.reconnected_at, window)

    async def client(self, index: int, gate: asyncio.Semaphore) -> None:
        """Client `index`: connected through the proxy, again as soon as it loses its connection."""

        def opened(handshake: ClientHandshake, writer: asyncio.StreamWriter) -> None:
            self.attempts += 1
            self.writers[index] = writer
            self._set(index, node_in(handshake.greeting, self.nodes) or "?")
            if self.killed is not None:
                self.reconnected_at.append(time.monotonic())

        def lost(_writer: asyncio.StreamWriter) -> None:
            self.writers[index] = None
            if self.stopping:
                return
            if self.on_node[index] == self.killed:
                self.lost += 1
            self._set(index, None)

        def failed(_error: BaseException) -> None:
            self.attempts += 1

        await keep_open(self.args.host, self.args.port, opened=opened, lost=lost, failed=failed, retry=retry_soon,
                        stopping=lambda: self.stopping, first_gate=gate)

    async def wait_for(self, condition, deadline: float) -> bool:
        while not condition():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                return condition()
        return True

    def balanced(self, tolerance: float) -> bool:
        """Every client connected and every node within `tolerance` of an even share (and one client)."""
        if self.ready != self.args.count:
            return False
        share = self.args.count / len(self.nodes)
        return all(self.per_node[name] <= share + max(1.0, tolerance * share) for name in self.nodes)

    def counts(self) -> dict[str, int]:
        return {name: n for name, n in self.per_node.items() if n}

    def close_all(self) -> None:
        self.stopping = True
        for index, writer in enumerate(self.writers):
            if writer is not None:
                try:
                    writer.write(connection_close())
                except (ConnectionError, OSError, RuntimeError):
                    pass
                writer.close()
                self.writers[index] = None


async def read_command(stdin: asyncio.StreamReader) -> dict:
    line = await stdin.readline()
    return json.loads(line) if line.strip() else {"command": "quit"}


async def main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    storm = Storm(args)
    gate = asyncio.Semaphore(args.concurrency)
    began = time.monotonic()
    tasks = [asyncio.create_task(storm.client(i, gate)) for i in range(args.count)]
    status = 0
    if not await storm.wait_for(lambda: storm.ready == args.count, began + args.deadline):
        emit("error", message=f"only {storm.ready} of {args.count} connected after {args.deadline}s")
        status = 1
    else:
        emit("connected", count=args.count, per_node=storm.counts(), seconds=round(time.monotonic() - began, 3))
        command = await read_command(stdin)
        if "killing" in command:
            storm.killed = command["killing"]
            storm.attempts = 0
            emit("armed")
            deadline = time.monotonic() + args.deadline
            done = await storm.wait_for(
                lambda: storm.ready == args.count and storm.per_node.get(storm.killed, 0) == 0, deadline)
            if done:
                emit("recovered", at=time.monotonic(), lost=storm.lost, attempts=storm.attempts,
                     per_node=storm.counts(), peak_rate=storm.peak_rate(),
                     reconnected_at=[round(at, 4) for at in storm.reconnected_at])
            else:
                emit("error", message=f"not recovered after {args.deadline}s: {storm.ready} of "
                                      f"{args.count} connected, per node {storm.counts()}")
                status = 1
            command = await read_command(stdin)
            while command.get("command") == "wait_balanced":
                deadline = time.monotonic() + float(command["deadline"])
                tolerance = float(command["tolerance"])
                if await storm.wait_for(lambda: storm.balanced(tolerance), deadline):
                    emit("balanced", at=time.monotonic(), per_node=storm.counts())
                else:
                    emit("unbalanced", per_node=storm.counts())
                command = await read_command(stdin)
    storm.close_all()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    emit("closed")
    return status


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="storm_client")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--nodes", type=lambda s: s.split(","), required=True)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--deadline", type=float, default=60.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
