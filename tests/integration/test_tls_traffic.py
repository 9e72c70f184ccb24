"""`warren run` serving AMQPS to a real broker while its certificates rotate and hostile
clients hammer the TLS port: the real traffic never notices, memory comes back to its level."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import threading
import uuid

import pika
import pytest
import trio

from lab import wait_until
from tests.warrenproc import WarrenProcess, json_global, write

pytestmark = pytest.mark.rabbit


def warren_config(node, crt: str, handshake_timeout: str = "1s") -> str:
    return json_global() + f"""
[frontends.amqps]
bind = "127.0.0.1:0"
backend = "rabbit"
maxconn = 5000
[frontends.amqps.tls]
crt = "{crt}"
handshake_timeout = "{handshake_timeout}"

[backends.rabbit]
[[backends.rabbit.servers]]
name = "a"
address = "127.0.0.1"
port = {node.spec.amqp_port}
"""


class Publisher(threading.Thread):
    """One long-lived AMQPS connection publishing with confirms until stopped; counts confirms."""

    def __init__(self, address, pki):
        super().__init__(daemon=True)
        self.address, self.pki = address, pki
        self.confirmed = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.connected = threading.Event()

    def run(self) -> None:
        context = ssl.create_default_context(cafile=self.pki.ca.cert_path)
        params = pika.ConnectionParameters(
            host=self.address[0], port=self.address[1], heartbeat=30, connection_attempts=1, socket_timeout=10,
            ssl_options=pika.SSLOptions(context, server_hostname="localhost"),
        )
        try:
            connection = pika.BlockingConnection(params)
            channel = connection.channel()
            channel.confirm_delivery()
            queue = f"warren-tls-pub-{uuid.uuid4().hex}"
            channel.queue_declare(queue, auto_delete=True, arguments={"x-max-length": 100})
            self.connected.set()
            while not self.stopping.is_set():
                channel.basic_publish("", queue, b"m" * 512)
                self.confirmed += 1
            connection.close()
        except BaseException as error:  # reported by the test
            self.error = error
            self.connected.set()


def presented_cn(address, pki) -> str:
    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    context.check_hostname = False
    with socket.create_connection(address, timeout=10) as raw, context.wrap_socket(raw) as tls:
        return dict(rdn[0] for rdn in tls.getpeercert()["subject"])["commonName"]


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def confirmed_more(publisher: Publisher, than: int) -> None:
    await wait_until(lambda: publisher.confirmed > than + 20 or publisher.error, timeout=20, what="publishes confirmed")
    assert publisher.error is None, publisher.error


async def start_with_traffic(nursery, warren: WarrenProcess, pki) -> tuple[tuple[str, int], Publisher]:
    """Warren started, one AMQPS publisher through it with confirms flowing."""
    await warren.start(nursery)
    address = warren.front("amqps")
    publisher = Publisher(address, pki)
    publisher.start()
    await trio.to_thread.run_sync(publisher.connected.wait)
    await confirmed_more(publisher, 0)
    return address, publisher


async def test_certificate_rotation_under_amqps_traffic(healthy_cluster, pki, tmp_path):
    live = tmp_path / "amqps.pem"
    shutil.copy(pki.server.pem, live)
    config = write(tmp_path / "warren.toml", warren_config(healthy_cluster[0], str(live)))
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, WarrenProcess(config) as warren:
            address, publisher = await start_with_traffic(nursery, warren, pki)
            assert await trio.to_thread.run_sync(presented_cn, address, pki) == "server"

            live.write_bytes(open(pki.server_rsa.cert, "rb").read() + open(pki.server.key, "rb").read())
            warren.signal(signal.SIGHUP)
            failed = await warren.wait_for("config.reload_failed")
            assert any("private key does not match the certificate" in error for error in failed["errors"])
            assert await trio.to_thread.run_sync(presented_cn, address, pki) == "server"
            await confirmed_more(publisher, publisher.confirmed)

            shutil.copy(pki.server_rsa.pem, live)
            warren.signal(signal.SIGHUP)
            await warren.wait_for("config.reloaded")
            assert await trio.to_thread.run_sync(presented_cn, address, pki) == "server-rsa"
            await confirmed_more(publisher, publisher.confirmed)  # the established connection kept its set

            publisher.stopping.set()
            await trio.to_thread.run_sync(publisher.join, 20)
            assert publisher.error is None
            assert await warren.stop() == 0
            nursery.cancel_scope.cancel()


def hostile_round(address, hello: bytes, incomplete: int) -> None:
    """Plaintext AMQP, HTTP, random bytes, a ClientHello then silence, and `incomplete`
    half-sent handshakes held open until Warren closes them (its handshake timeout)."""
    for payload in (b"AMQP\x00\x00\x09\x01", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(2048), hello):
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(payload)
            while sock.recv(65536):
                pass
    socks = []
    try:
        for _ in range(incomplete):
            sock = socket.create_connection(address, timeout=10)
            sock.sendall(hello[: len(hello) // 2])
            socks.append(sock)
        for sock in socks:
            while sock.recv(65536):
                pass  # until Warren closes it
    finally:
        for sock in socks:
            sock.close()


async def test_hostile_input_on_the_amqps_port_while_real_traffic_flows(healthy_cluster, pki, tmp_path):
    config = write(tmp_path / "warren.toml", warren_config(healthy_cluster[0], pki.server.pem))
    hello = pki.client_hello()
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery, WarrenProcess(config) as warren:
            address, publisher = await start_with_traffic(nursery, warren, pki)
            pid = warren.process.pid
            level = rss_kib(pid)
            for _ in range(2):
                before = publisher.confirmed
                await trio.to_thread.run_sync(hostile_round, address, hello, 1000)
                await confirmed_more(publisher, before)
            # Memory comes back to its level (Warren trims after waves of closed connections).
            await wait_until(lambda: rss_kib(pid) < level + 8192, timeout=30, what=f"RSS back near {level} KiB")
            assert warren.process.returncode is None
            failures = [e for e in warren.events if e.get("event") == "tls.handshake_failed"]
            assert len(failures) >= 2 * 1004
            publisher.stopping.set()
            await trio.to_thread.run_sync(publisher.join, 20)
            assert publisher.error is None
            assert await warren.stop() == 0
            nursery.cancel_scope.cancel()
