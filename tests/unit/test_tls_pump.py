"""The TLS pump (proxy.tls.pump) on real sockets: what a TLS direction hands
the other side, write by write.

The client is an ``ssl.SSLObject`` driven by the test, so it decides how its
records are cut and which of them share a TCP segment (pika, for one, sends
each AMQP frame of a publish as its own record, back to back). The broker's
side is a ``SOCK_SEQPACKET`` socket pair, which keeps the boundary of every
write the relay makes: one packet received is one write by the relay.
"""

from __future__ import annotations

import fcntl
import gc
import socket
import ssl
import struct
import termios
import weakref
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from lab import wait_until
from proxy.io.poller import current_poller
from proxy.io.relay import Ending, Link, Timeouts, Traffic
from proxy.tls.pump import Handshake, TlsEnd, tls_ways
from tests.proxyutil import socket_pair

IO_BOUND = 30  # seconds: every test fails rather than hangs


class TlsClient:
    """A TLS client on a trio socket whose records the test cuts by hand."""

    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                await self.flush()
                data = await self.sock.recv(65536)
                assert data, "the proxy closed during the handshake"
                self.incoming.write(data)
            else:
                await self.flush()
                return

    async def send_part(self, size: int) -> None:
        """The first `size` bytes of what is queued, alone (the rest stays queued)."""
        data = self.outgoing.read()
        await self.sock.send(data[:size])
        self.outgoing.write(data[size:])

    def record(self, plaintext: bytes) -> None:
        """Queue `plaintext` as one record (or more above 16 KiB); sent by ``flush``."""
        self.obj.write(plaintext)

    def close_notify(self) -> None:
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # our close_notify is queued; the proxy's may follow

    async def flush(self) -> None:
        """Everything queued, in one send: the records share a segment."""
        data = self.outgoing.read()
        while data:
            data = data[await self.sock.send(data):]

    async def receive(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            try:
                data += self.obj.read(size - len(data))
            except ssl.SSLWantReadError:
                chunk = await self.sock.recv(65536)
                assert chunk, f"EOF after {len(data)} of {size} bytes"
                self.incoming.write(chunk)
        return bytes(data)


async def packets(sock: trio.socket.SocketType, total: int) -> list[bytes]:
    """Packets from the broker's side until `total` bytes came: one per relay write."""
    got: list[bytes] = []
    while sum(map(len, got)) < total:
        packet = await sock.recv(1 << 20)
        assert packet, f"EOF after {sum(map(len, got))} of {total} bytes"
        got.append(packet)
    return got


@dataclass
class Relayed:
    """A TLS client relayed to a plain broker side, and the relay's outcome."""

    client: TlsClient
    server: trio.socket.SocketType  # the broker's side: one packet per relay write
    link: Link
    proxy_client: trio.socket.SocketType  # the relay's socket on the client's side
    ended: trio.Event = field(default_factory=trio.Event)
    ending: Ending | None = None


@asynccontextmanager
async def relayed_tls(pki):
    """A TLS client through a handshake (a ``Handshake`` link) and a relay with
    TLS directions to the broker's side, as a TLS frontend's session runs them."""
    client_sock, proxy_client = await socket_pair()
    proxy_server, server = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server.pem)
        poller = current_poller()
        end = TlsEnd(proxy_client.fileno(), context, server_side=True)
        shaken, results = trio.Event(), []

        def report(result) -> None:
            results.append(result)
            shaken.set()

        Handshake(end, poller, poller.now() + IO_BOUND, report, report).start()
        client = TlsClient(client_sock, pki.server_context())
        await client.handshake()
        await shaken.wait()
        assert results == [None]
        relayed: Relayed

        def ended(result) -> None:
            relayed.ending = result.unwrap()
            relayed.ended.set()

        # The relay owns both proxy-side sockets and closes them when stopped.
        link = Link(proxy_client, proxy_server, Traffic(), Timeouts(), None, poller, True, ended,
                    tls_ways((end, None)))
        relayed = Relayed(client, server, link, proxy_client)
        try:
            yield relayed
        finally:
            link.stop()
    finally:
        for sock in (client_sock, proxy_client, proxy_server, server):
            sock.close()


async def test_tls_records_that_arrive_together_reach_a_plain_broker_in_one_write(pki):
    """Three records in one segment (pika's method, header and body frames of
    a publish) are decrypted in one wake-up and written together: one
    segment to the broker, not three."""
    with trio.fail_after(IO_BOUND):
        async with relayed_tls(pki) as relayed:
            frames = [b"method-frame" * 3, b"header-frame" * 2, b"b" * 1024]
            for frame in frames:
                relayed.client.record(frame)
            await relayed.client.flush()
            assert await packets(relayed.server, sum(map(len, frames))) == [b"".join(frames)]


async def test_a_close_notify_in_the_segment_of_the_last_records_ends_the_direction_after_them(pki):
    """Records and the close_notify after them, in one segment: the bytes go
    out first (in one write), then the end, as a half-close; the other
    direction keeps flowing until it ends too."""
    with trio.fail_after(IO_BOUND):
        async with relayed_tls(pki) as relayed:
            relayed.client.record(b"last words, ")
            relayed.client.record(b"then goodbye")
            relayed.client.close_notify()
            await relayed.client.flush()
            assert await packets(relayed.server, 24) == [b"last words, then goodbye"]
            assert await relayed.server.recv(1 << 20) == b""  # the half-close
            await relayed.server.send(b"the broker's reply")
            assert await relayed.client.receive(18) == b"the broker's reply"
            relayed.server.shutdown(socket.SHUT_WR)
            await relayed.ended.wait()
            assert relayed.ending is Ending.NORMAL


async def test_more_records_than_one_buffer_holds_arrive_whole_and_in_order(pki):
    """A burst larger than the scratch buffer is written in buffer-sized
    pieces, nothing lost or reordered, the last piece without waiting for
    another event."""
    with trio.fail_after(IO_BOUND):
        async with relayed_tls(pki) as relayed:
            burst = b"".join(i.to_bytes(4, "big") for i in range(60_000))  # 240 kB, ~15 records
            relayed.client.record(burst)
            await relayed.client.flush()
            assert b"".join(await packets(relayed.server, len(burst))) == burst


def queued(sock: trio.socket.SocketType) -> int:
    """Bytes in the socket's receive queue (SIOCINQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


async def test_a_record_cut_across_two_segments_is_relayed_once_its_end_arrives(pki):
    """The first part of a record, read and held by OpenSSL, then the rest as
    a new segment: the plaintext goes out whole, on that segment's event."""
    with trio.fail_after(IO_BOUND):
        async with relayed_tls(pki) as relayed:
            relayed.client.record(b"r" * 4000)
            await relayed.client.send_part(1500)
            await wait_until(lambda: queued(relayed.proxy_client) == 0, timeout=IO_BOUND, what="the first part read")
            await relayed.client.flush()
            assert await packets(relayed.server, 4000) == [b"r" * 4000]


async def test_a_record_only_partly_taken_when_the_buffer_filled_follows_without_another_event(pki):
    """Records that overrun the 64 KiB buffer by part of a record: OpenSSL
    keeps that part decrypted (nothing left in the socket or the BIO), and
    it is written right after the full buffer, not on the next event (none
    would come: the client waits for an answer)."""
    with trio.fail_after(IO_BOUND):
        async with relayed_tls(pki) as relayed:
            head, tail = b"h" * 1000, b"".join(i.to_bytes(4, "big") for i in range(4 * 4096))  # 4 full records
            relayed.client.record(head)
            relayed.client.record(tail)
            await relayed.client.flush()
            assert b"".join(await packets(relayed.server, len(head) + len(tail))) == head + tail


async def test_a_completed_handshake_lets_go_of_its_connection_before_its_deadline(pki):
    """The poller's timer heap keeps a handshake link until its deadline (an
    entry leaves only when due); once complete, the link must not keep the
    connection's callbacks (a session) and its TLS object alive that long."""
    client_sock, proxy_client = await socket_pair()
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server.pem)
        poller = current_poller()
        end = TlsEnd(proxy_client.fileno(), context, server_side=True)
        shaken = trio.Event()

        class Owner:  # stands for the session the callbacks are bound to
            def done(self, result) -> None:
                assert result is None
                shaken.set()

        owner = Owner()
        handshake = Handshake(end, poller, poller.now() + IO_BOUND, owner.done, owner.done)
        handshake.start()
        await TlsClient(client_sock, pki.server_context()).handshake()
        with trio.fail_after(IO_BOUND):
            await shaken.wait()
        assert any(entry[2] is handshake for entry in poller._timers)  # still due later
        poller.forget(proxy_client.fileno())
        gone_owner, gone_tls = weakref.ref(owner), weakref.ref(end.ssl)
        del owner, end
        gc.collect()
        assert gone_owner() is None and gone_tls() is None
    finally:
        client_sock.close()
        proxy_client.close()
