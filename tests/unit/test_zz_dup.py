"""SCRATCH (not for commit): where does the kernel path duplicate bytes?"""
import socket, struct, zlib
import pytest, trio, structlog
from tests.unit.test_relay_paths import proxied, make_path, close_path, pattern, send_all, IO_BOUND, PATHS
from proxy.io.relay import Ending

CHUNK = 1 << 20

class Checker:
    def __init__(self, name):
        self.name, self.offset, self.first_bad = name, 0, None
        self.cache = (-1, b"")
    def chunk(self, index):
        if self.cache[0] != index:
            self.cache = (index, pattern(index, CHUNK))
        return self.cache[1]
    def feed(self, data):
        if self.first_bad is None:
            view, off, pos = memoryview(data), self.offset, 0
            while pos < len(data):
                index, r = divmod(off + pos, CHUNK)
                n = min(CHUNK - r, len(data) - pos)
                if view[pos:pos + n] != self.chunk(index)[r:r + n]:
                    exp = self.chunk(index)[r:r + n]
                    i = next(k for k in range(n) if view[pos + k] != exp[k])
                    self.first_bad = (off + pos + i, bytes(view[pos + i:pos + i + 24]).hex(), exp[i:i + 24].hex())
                    break
                pos += n
        self.offset += len(data)

@pytest.fixture(params=["handover"] * 6)
def path(request):
    made = make_path(request.param)
    yield made
    close_path(made)

async def test_dup(path):
    total = 1 << 30
    up, down = Checker("client->server"), Checker("server->client")
    got = {}
    async def produce():
        for index in range(total // CHUNK):
            await send_all(link.client, pattern(index, CHUNK))
        link.client.shutdown(socket.SHUT_WR)
    async def echo():
        n = 0
        while data := await link.server.recv(1 << 20):
            up.feed(data); n += len(data)
            await send_all(link.server, data)
        got["up"] = n
        link.server.shutdown(socket.SHUT_WR)
    async def consume():
        n = 0
        while data := await link.client.recv(1 << 20):
            down.feed(data); n += len(data)
        got["down"] = n
    with trio.fail_after(IO_BOUND * 3), structlog.testing.capture_logs() as logs:
        try:
            async with proxied(path) as link:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(produce); nursery.start_soon(echo); nursery.start_soon(consume)
                await link.wait_ending()
        finally:
            print("EVENTS-F", [e for e in logs if e["event"].startswith("relay.kernel")])
    print("COUNTS", got, "traffic", link.traffic.bytes_in, link.traffic.bytes_out, "up_bad", up.first_bad, "down_bad", down.first_bad)
    assert up.first_bad is None and down.first_bad is None and got == {"up": total, "down": total}, (got, up.first_bad, down.first_bad, link.traffic.bytes_in, link.traffic.bytes_out)
