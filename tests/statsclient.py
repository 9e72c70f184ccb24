"""A small HTTP client for the stats page tests: h11 on trio, every byte as the test says."""

from __future__ import annotations

import base64
import re
import ssl
from dataclasses import dataclass

import h11
import trio

CREDENTIALS = ("admin", "pw")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def http(address, target="/", method="GET", *, auth=CREDENTIALS, body=b"", headers=(),
               source: str | None = None, tls: ssl.SSLContext | None = None) -> Reply:
    """One request on a fresh connection (from `source`, a local address; over HTTPS with
    the client context `tls`, asking for "localhost"); auth=None sends no Authorization."""
    all_headers = [("host", "stats"), ("connection", "close"), *headers]
    if auth is not None:
        all_headers.append(("authorization", basic(*auth)))
    if body:
        all_headers.append(("content-length", str(len(body))))
    client = h11.Connection(h11.CLIENT)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*address, local_address=source)
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_hostname="localhost", https_compatible=True)
        async with stream:
            data = client.send(h11.Request(method=method, target=target, headers=all_headers))
            if body:
                data += client.send(h11.Data(data=body))
            await stream.send_all(data + client.send(h11.EndOfMessage()))
            response, payload = None, b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    payload += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
    headers_dict = {k.decode().lower(): v.decode() for k, v in response.headers}
    return Reply(response.status_code, headers_dict, payload)


async def raw(address, payload: bytes, *, eof: bool = True, wait: float = 10) -> bytes:
    """Sends raw bytes (then half-closes if `eof`); returns all received until the server closes."""
    received = b""
    with trio.fail_after(wait):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            try:
                await stream.send_all(payload)
                if eof:
                    await stream.send_eof()
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:  # reset after the server's answer
                pass
    return received


def status_of(raw_reply: bytes) -> int | None:
    match = re.match(rb"HTTP/1.1 (\d{3}) ", raw_reply)
    return int(match.group(1)) if match else None


