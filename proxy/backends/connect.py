"""Opening a connection to a server: the socket calls, non-blocking.

The rules (which server, when to retry, queue, give up) are the dispatch
machine's (:mod:`proxy.backends.dispatch`); the session carries them out
with these two calls and the relays' poller, which waits for the connect to
complete (the socket is registered there once, for the relay to take over).
"""

from __future__ import annotations

import _socket
import errno
import select
import socket
from typing import Final

from ..runtime import ServerRuntime

_INET: Final = int(socket.AF_INET)
_INET6: Final = int(socket.AF_INET6)
_STREAM: Final = int(socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
# A failed connect reports EPOLLERR (and EPOLLHUP) besides EPOLLOUT.
_FAILED: Final = select.EPOLLERR | select.EPOLLHUP


def start_connect(server: ServerRuntime) -> tuple[_socket.socket, int]:
    """A new non-blocking socket and the errno of its ``connect()`` to
    `server`: 0 (connected), EINPROGRESS (wait until writable, then
    :func:`connect_error`) or a failure. Raises OSError when no socket can
    be had (EMFILE, ENFILE, ENOBUFS, ENOMEM).

    A non-blocking ``connect()`` says EINPROGRESS even when the handshake
    completed inside the call, as it does with a server on this host: the
    loopback device delivers the SYN, the SYN-ACK and the ACK in the
    caller's own softirq, and the socket is established (or refused) by the
    time the call returns. So a second ``connect()`` asks at once (0 once
    established, EALREADY while still in progress, the failure if refused):
    one system call, against a wait in the poller (a registration's report,
    a timer entry and a callback) before the relay can start.
    """
    address = server.addresses[0]
    # The C-level socket class: every method C, no Python-level wrapper.
    sock = _socket.socket(_INET6 if ":" in address else _INET, _STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = (address, server.config.port)
        failure = sock.connect_ex(target)
        if failure == errno.EINPROGRESS:
            failure = sock.connect_ex(target)  # CPython reports EISCONN as 0
            if failure == errno.EALREADY:
                failure = errno.EINPROGRESS
        return sock, failure
    except BaseException:
        sock.close()
        raise


def connect_error(sock: _socket.socket, events: int) -> int:
    """The errno of a connect in progress once the poller reported `events`
    for it (0: connected)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events & _FAILED else 0


def error_name(number: int) -> str:
    """"ECONNREFUSED" for errno.ECONNREFUSED: what a log line says."""
    return errno.errorcode.get(number, str(number))
