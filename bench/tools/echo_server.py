"""A TCP echo server that holds every connection open: the idle benchmark's backend.

Usage: python -m bench.tools.echo_server PORT
Prints {"event": "listening", "port": PORT} once it accepts; runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"event": "listening", "port": port}), flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
