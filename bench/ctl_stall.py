"""How long one `warren ctl` line stalls Warren's event loop.

    python -m bench.ctl_stall [--servers 3 200] [--rounds 5]

Starts the control service in-process on a runtime with N servers, sends
hostile lines of the longest allowed length, and measures the longest gap a
task that wakes every millisecond sees while each line is answered (the
time every relay, health check and listener waits). Prints one row per
line and server count, the worst of `rounds`.

Run it from another checkout (`cd /work/main && python /path/to/bench/ctl_stall.py`)
to measure that checkout's code: it imports `proxy` from the current directory.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
from types import SimpleNamespace

sys.path.insert(0, os.getcwd())

import structlog  # noqa: E402
import trio  # noqa: E402

from proxy.config.model import Backend, Config, Global, Server  # noqa: E402
from proxy.runtime import Runtime  # noqa: E402
from proxy.stats_ui.commands import MAX_LINE  # noqa: E402
from proxy.stats_ui.control import ControlService  # noqa: E402


def hostile_lines() -> dict[str, str]:
    def fill(unit: str) -> str:
        return (unit * (MAX_LINE // len(unit)))[:MAX_LINE]

    return {
        "show stat x409": fill("show stat;"),
        "show stat x16": "show stat;" * 16,  # the most a line may now hold
        "unknown x2048": fill("x;"),
        "set weight x141": fill("set server rabbit/s0 weight 1;"),
        "one quoted word": '"' + "a" * (MAX_LINE - 2) + '"',
        "escapes": fill("\\a"),
    }


def runtime(servers: int) -> Runtime:
    members = tuple(Server(name=f"s{i}", address="127.0.0.1", port=10000 + i) for i in range(servers))
    return Runtime(Config(path="<bench>", backends=(Backend(name="rabbit", servers=members),)))


async def worst_stall(path: str, line: str) -> float:
    """The longest event-loop gap while `line` is sent and answered."""
    worst = 0.0
    done = trio.Event()

    async def watch() -> None:
        nonlocal worst
        while not done.is_set():
            before = trio.current_time()
            await trio.sleep(0.001)
            worst = max(worst, trio.current_time() - before - 0.001)

    async def ask() -> None:
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(line.encode() + b"\n")
            while await stream.receive_some(65536):
                pass
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        nursery.start_soon(ask)
    return worst


async def main(args) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    print(f"{'line':18s} {'servers':>7s} {'worst stall':>12s}")
    with tempfile.TemporaryDirectory() as directory:
        for servers in args.servers:
            path = os.path.join(directory, f"ctl{servers}.sock")
            config = Config(path="<bench>", global_=Global(control_socket=path))
            service = ControlService(config)
            live = runtime(servers)
            # Older checkouts hand services the App, newer ones the runtime.
            given = SimpleNamespace(runtime=live) if "app" in inspect.signature(service.run).parameters else live
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run, given)
                for name, line in hostile_lines().items():
                    stalls = [await worst_stall(path, line) for _ in range(args.rounds)]
                    print(f"{name:18s} {servers:7d} {max(stalls) * 1000:9.1f} ms", flush=True)
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.ctl_stall")
    parser.add_argument("--servers", type=int, nargs="+", default=[3, 200])
    parser.add_argument("--rounds", type=int, default=5)
    trio.run(main, parser.parse_args())
