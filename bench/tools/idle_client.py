"""Opens COUNT connections, proves each one end to end, then holds them idle.

Usage: python -m bench.tools.idle_client HOST PORT COUNT [--concurrency N] [--timeout S] [--tls]

With --tls every connection is a TLS client (the certificate is not
verified: the proxy's memory is measured, not the client's trust).

Each connection sends 5 bytes and waits for their echo, so it is a real
proxied connection (the proxy connected to the backend and relayed both
ways), not one waiting in a listen backlog. Prints
{"event": "established", "count": COUNT, "seconds": ...} once all are up
(or {"event": "error", ...} if any failed), then holds them until a line or
EOF arrives on stdin, closes them all and prints {"event": "closed"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time

PING = b"ping\n"


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def open_one(host: str, port: int, gate: asyncio.Semaphore, timeout: float, tls: ssl.SSLContext | None):
    async with gate:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=tls), timeout)
        writer.write(PING)
        echoed = await asyncio.wait_for(reader.readexactly(len(PING)), timeout)
        if echoed != PING:
            raise ConnectionError(f"echo mismatch: {echoed!r}")
        return writer


async def main(args: argparse.Namespace) -> int:
    began = time.monotonic()
    gate = asyncio.Semaphore(args.concurrency)
    tls = None
    if args.tls:
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    outcomes = await asyncio.gather(
        *(open_one(args.host, args.port, gate, args.timeout, tls) for _ in range(args.count)),
        return_exceptions=True,
    )
    writers = [o for o in outcomes if not isinstance(o, BaseException)]
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        emit("error", message=f"{len(failures)} of {args.count} connections failed, "
                              f"first: {failures[0]!r}")
    else:
        emit("established", count=len(writers), seconds=round(time.monotonic() - began, 3))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for writer in writers:
        writer.close()
    emit("closed")
    return 1 if failures else 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="idle_client")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--tls", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
