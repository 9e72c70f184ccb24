"""Opening a server connection (proxy.backends.connect): what start_connect reports."""

from __future__ import annotations

import errno
import socket
from contextlib import closing
from proxy.backends.connect import start_connect
from proxy.runtime import Runtime, ServerRuntime
from proxy.config.model import Server
from tests.proxyutil import dead_port, make_config, unanswered_port


def _server(port: int, address: str = "127.0.0.1") -> ServerRuntime:
    """A server of a live model at `address`:`port` (start_connect reads its addresses and port)."""
    return Runtime(make_config([Server(name="s", address=address, port=port)])).server("be", "s")


def test_a_connect_to_a_listening_local_server_is_reported_done_at_once():
    # The loopback handshake completes inside connect(): no wait in the poller.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock, failure = start_connect(_server(listener.getsockname()[1]))
        with closing(sock):
            assert failure == 0
            assert sock.getpeername() == listener.getsockname()
            accepted, _ = listener.accept()
            accepted.close()


def test_a_connect_to_a_local_ipv6_server_is_reported_done_at_once():
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as listener:
        sock, failure = start_connect(_server(listener.getsockname()[1], "::1"))
        with closing(sock):
            assert failure == 0
            assert sock.getpeername()[:2] == listener.getsockname()[:2]


def test_a_refused_local_connect_is_reported_refused_at_once():
    sock, failure = start_connect(_server(dead_port()))
    with closing(sock):
        assert failure == errno.ECONNREFUSED


def test_a_connect_still_in_progress_is_reported_in_progress():
    # A listener whose accept queue is full drops the SYN: the handshake is
    # not over when connect() returns, and the second connect() says EALREADY.
    with unanswered_port() as port:
        sock, failure = start_connect(_server(port))
        with closing(sock):
            assert failure == errno.EINPROGRESS
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
