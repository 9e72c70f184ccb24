"""bench.syns.SynWatch: when connections reach a loopback listener, by the kernel's stamps."""

from __future__ import annotations

import socket
import time

import pytest

from bench.syns import SynWatch
from lab import wait_until_blocking


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_each_connection_to_the_port_is_stamped_when_it_arrived_not_when_read():
    with listener() as watched, listener() as other:
        try:
            watch = SynWatch(watched.getsockname()[1])
        except PermissionError:
            pytest.skip("a packet socket needs root or CAP_NET_RAW")
        clients, moments = [], []
        with watch:
            for _ in range(3):
                before = time.time()
                client = socket.create_connection(watched.getsockname(), timeout=5)
                moments.append((before, time.time()))
                client.sendall(b"AMQP\x00\x00\x09\x01")  # data, and its ACKs: not SYNs
                clients.append(client)
                clients.append(socket.create_connection(other.getsockname(), timeout=5))  # another port
            read_after = moments[-1][1] + 0.3
            wait_until_blocking(lambda: time.time() > read_after, timeout=5, what="0.3 s past the connects")
            stamps = watch.stamps()
            assert watch.stamps() == []  # each is handed out once
        for client in clients:
            client.close()
    assert len(stamps) == 3, (stamps, moments)
    for stamp, (before, after) in zip(sorted(stamps), moments):
        # inside connect(), not at the read 0.3 s later
        assert before - 0.001 <= stamp <= after + 0.001, (stamps, moments)
