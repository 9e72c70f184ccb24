"""A slowloris attacker for the stats page tests, run as its own process.

    python -m tests.slowloris HOST PORT --sources 300 --per-source 1 --seconds 12

Holds `sources * per_source` connections, each from its own loopback source
address (127.0.1.0 onwards; `--sources 1` uses 127.0.0.1), sending a request
head one header line per second and never finishing it. A connection the
server closes is opened again after `--reconnect-delay`, as an aggressive
attacker's loop does. Prints "ready" once every connection has been opened
once, and at the end one JSON line of counts.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys

import trio


def source_address(index: int, sources: int) -> str:
    if sources == 1:
        return "127.0.0.1"
    return str(ipaddress.IPv4Address("127.0.1.0") + index)


async def attacker(host: str, port: int, source: str, args, counts: dict, opened: trio.Semaphore) -> None:
    first = True
    while True:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            await sock.bind((source, 0))
            await sock.connect((host, port))
            counts["connects"] += 1
            if first:
                first = False
                opened.release()
            await sock.send(b"GET / HTTP/1.1\r\nHost: stats\r\n")
            while True:
                with trio.move_on_after(1.0):
                    if not await sock.recv(4096):  # closed (evicted, or 408 then closed)
                        counts["closed"] += 1
                        break
                    continue
                await sock.send(b"X-Slow: 1\r\n")
        except OSError:
            counts["errors"] += 1
            if first:
                first = False
                opened.release()
        finally:
            sock.close()
        await trio.sleep(args.reconnect_delay)


async def main(args) -> None:
    counts = {"connects": 0, "closed": 0, "errors": 0}
    total = args.sources * args.per_source
    opened = trio.Semaphore(0, max_value=total)
    with trio.move_on_after(args.seconds):
        async with trio.open_nursery() as nursery:
            for index in range(args.sources):
                source = source_address(index, args.sources)
                for _ in range(args.per_source):
                    nursery.start_soon(attacker, args.host, args.port, source, args, counts, opened)
            for _ in range(total):
                await opened.acquire()
            print("ready", flush=True)
    print(json.dumps(counts), flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.slowloris")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--sources", type=int, default=300)
    parser.add_argument("--per-source", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--reconnect-delay", type=float, default=0.01)
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse(sys.argv[1:]))
