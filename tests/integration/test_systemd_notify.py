"""`warren run` under a test-owned NOTIFY_SOCKET, as systemd would see it (Type=notify, WatchdogSec=)."""

from __future__ import annotations

import os
import signal
import socket
import time

import trio

from proxy.sdnotify import monotonic_usec
from tests.proxyutil import dead_port
from tests.warrenproc import WarrenProcess, one_server_config, write



class NotifySocket:
    """The datagram socket systemd would own; `messages` are the parsed datagrams so far."""

    def __init__(self, path: str) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []

    async def bind(self) -> None:
        await self.sock.bind(self.path)

    async def next(self, key: str, timeout: float = 20) -> dict[str, str]:
        """The next datagram carrying ``key``; earlier ones are kept in `messages`."""
        with trio.fail_after(timeout):
            while True:
                data = await self.sock.recv(4096)
                fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
                self.messages.append((time.monotonic(), fields))
                if key in fields:
                    return fields


async def notified_warren(tmp_path, watchdog_usec: int) -> tuple[NotifySocket, WarrenProcess]:
    """A notify socket owned by the test, and a Warren (not started yet) told to use it."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    await notify.bind()
    warren = WarrenProcess(write(tmp_path / "warren.toml", one_server_config(dead_port())))
    warren.env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(watchdog_usec)}
    return notify, warren


async def test_ready_reloading_watchdog_and_stopping_reach_the_notify_socket(tmp_path):
    notify, warren = await notified_warren(tmp_path, 200_000)
    with trio.fail_after(60):
        async with warren, trio.open_nursery() as nursery:
            nursery.start_soon(warren.start, nursery)
            ready = await notify.next("READY")
            # READY=1 comes once listeners are bound and services started: the front port answers now.
            await warren.wait_for("warren.started")
            with socket.create_connection(warren.front("fe"), timeout=5):
                pass
            assert ready["STATUS"].startswith("servers up 1/1")  # unchecked: counts as up
            assert "sessions 0" in ready["STATUS"]
            assert not any("READY" in fields for _, fields in notify.messages[:-1])

            pings = [await notify.next("WATCHDOG") for _ in range(3)]
            assert all(p["WATCHDOG"] == "1" for p in pings)

            warren.signal(signal.SIGHUP)
            reloading = await notify.next("RELOADING")
            assert abs(int(reloading["MONOTONIC_USEC"]) - monotonic_usec()) < 10_000_000  # CLOCK_MONOTONIC, in us
            await notify.next("READY")
            await warren.wait_for("config.reloaded")

            status: list[int] = []
            exited = trio.Event()

            async def stop() -> None:
                status.append(await warren.stop())  # one SIGTERM
                exited.set()

            nursery.start_soon(stop)
            await notify.next("STOPPING")
            await exited.wait()
            assert status == [0]
            nursery.cancel_scope.cancel()


async def test_a_stopped_event_loop_stops_the_watchdog_pings(tmp_path):
    notify, warren = await notified_warren(tmp_path, 100_000)
    with trio.fail_after(60):
        async with warren, trio.open_nursery() as nursery:
            nursery.start_soon(warren.start, nursery)
            await notify.next("READY")
            await notify.next("WATCHDOG")
            warren.signal(signal.SIGSTOP)
            try:
                with trio.move_on_after(1.0):
                    await notify.next("WATCHDOG")  # may still find one sent just before the stop
                    frozen = await notify.next("WATCHDOG", timeout=60)
                    raise AssertionError(f"a ping while the process was stopped: {frozen}")
            finally:
                warren.signal(signal.SIGCONT)
            await notify.next("WATCHDOG", timeout=10)  # and they resume with the loop
            nursery.cancel_scope.cancel()


async def test_without_a_notify_socket_nothing_is_sent_and_warren_runs(tmp_path):
    config = write(tmp_path / "warren.toml", one_server_config(dead_port()))
    environment = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    with trio.fail_after(60):
        async with WarrenProcess(config) as warren, trio.open_nursery() as nursery:
            warren.env = environment
            await warren.start(nursery)
            assert await warren.stop() == 0
            assert not [e for e in warren.events if e.get("event") == "systemd.notify_failed"]
            nursery.cancel_scope.cancel()
