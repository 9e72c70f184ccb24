"""AMQP connection rate: WORKERS clients opening and closing connections for SECONDS.

Usage: python -m bench.tools.amqp_connrate HOST PORT [--workers N] [--seconds S]

Each worker loops: TCP connect, the full AMQP 0-9-1 handshake up to
Connection.Open-Ok (bench.amqpwire, with client properties and a PLAIN login,
as a library sends them), then Connection.Close, Close-Ok, close. Prints one
JSON line: {"event": "done", "handshakes": N, "seconds": S, "errors": E,
"cpu_seconds": C} (C: this process's CPU time over those S seconds, start-up
excluded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from bench.amqpwire import LIBRARY_PROPERTIES, ClientHandshake
from bench.tools.amqp_load import FAILURES, open_amqp


async def one_connection(host: str, port: int) -> None:
    _, writer, _ = await open_amqp(host, port, ClientHandshake(properties=LIBRARY_PROPERTIES, then_close=True))
    writer.close()


async def worker(host: str, port: int, until: float, counts: dict) -> None:
    while time.monotonic() < until:
        try:
            await asyncio.wait_for(one_connection(host, port), 10)
            counts["handshakes"] += 1
        except FAILURES:
            counts["errors"] += 1
            await asyncio.sleep(0.01)


async def main(args: argparse.Namespace) -> None:
    counts = {"handshakes": 0, "errors": 0}
    began, cpu_began = time.monotonic(), time.process_time()
    await asyncio.gather(*(worker(args.host, args.port, began + args.seconds, counts) for _ in range(args.workers)))
    print(json.dumps({"event": "done", **counts, "seconds": round(time.monotonic() - began, 3),
                      "cpu_seconds": round(time.process_time() - cpu_began, 4)}), flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="amqp_connrate")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
