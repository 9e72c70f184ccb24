"""Refusing a client at Connection.Open the way a broker would (the thin trio part).

When a connection limit withholds a client's Connection.Open, both sockets
come back from the relay and this module ends the connection politely on
both sides, at once and within :data:`REFUSE_TIMEOUT`:

- the client gets Connection.Close 530 NOT_ALLOWED with the limit's text
  (its library reports it as an error), Warren reads its Close-Ok, closes;
- the broker gets the rest of the Open, then Warren closes the connection
  the way the health check does, Close / Close-Ok. RabbitMQ logs a TCP close
  after Tune-Ok as "client unexpectedly closed TCP connection" and a Close
  before Open as a handshake error, so the clean way is a brief open.
"""

from __future__ import annotations

import _socket
import socket

import trio

from ..health.amqp_methods import (
    ConnectionClose,
    ConnectionCloseOk,
    ConnectionOpen,
    ConnectionOpenOk,
    ReplyCode,
    decode_method,
)
from ..health.amqp_wire import FRAME_METHOD, FrameBuffer, HandshakeError

REFUSE_TIMEOUT = 5.0
_CLOSE_TO_BROKER = "Warren: connection refused by a connection limit"


async def refuse(client: _socket.socket, server: _socket.socket, to_server: bytes, text: str) -> None:
    """Ends both sides as described above; closes both sockets whatever happens."""
    client_sock, server_sock = _trio_socket(client), _trio_socket(server)
    try:
        with trio.move_on_after(REFUSE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_refuse_client, client_sock, text)
                nursery.start_soon(_close_broker, server_sock, to_server)
    finally:
        client_sock.close()
        server_sock.close()


def _trio_socket(sock: _socket.socket) -> trio.socket.SocketType:
    """trio's wrapper for `sock`, which may be a bare _socket.socket (the
    listener accepts those: no socket.socket per client); it takes the fd over."""
    if not isinstance(sock, socket.socket):
        sock = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    return trio.socket.from_stdlib_socket(sock)


async def _refuse_client(sock: trio.socket.SocketType, text: str) -> None:
    close = ConnectionClose(ReplyCode.NOT_ALLOWED, text[:255], ConnectionOpen.CLASS_ID, ConnectionOpen.METHOD_ID)
    try:
        await sock.send(close.frame())
        await _await_method(sock, (ConnectionCloseOk, ConnectionClose))
    except (OSError, HandshakeError):
        pass  # the client went away: nothing more to say to it


async def _close_broker(sock: trio.socket.SocketType, to_server: bytes) -> None:
    try:
        if to_server:
            await sock.send(to_server)
        reply = await _await_method(sock, (ConnectionOpenOk, ConnectionClose))
        if isinstance(reply, ConnectionOpenOk):
            await sock.send(ConnectionClose(ReplyCode.REPLY_SUCCESS, _CLOSE_TO_BROKER).frame())
            await _await_method(sock, (ConnectionCloseOk, ConnectionClose))
        elif isinstance(reply, ConnectionClose):
            await sock.send(ConnectionCloseOk().frame())
    except (OSError, HandshakeError):
        pass


async def _await_method(sock: trio.socket.SocketType, wanted: tuple[type, ...]):
    """Reads frames until a method of `wanted` type (returned) or EOF (None)."""
    frames = FrameBuffer()
    while True:
        data = await sock.recv(16384)
        if not data:
            return None
        frames.feed(data)
        while (frame := frames.next_frame()) is not None:
            if frame.type == FRAME_METHOD and frame.channel == 0:
                method = decode_method(frame.payload)
                if isinstance(method, wanted):
                    return method
