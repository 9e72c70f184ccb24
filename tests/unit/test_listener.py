"""The listener's acceptor (proxy.frontends.listener._Acceptor) on a real listening socket."""

from __future__ import annotations

import select
import socket
from contextlib import ExitStack
from proxy.frontends.listener import _ACCEPT_BATCH, _ACCEPT_MASK, _Acceptor
from proxy.runtime import FrontendRuntime
from tests.proxyutil import make_config


def _frontend(maxconn: int = 1000) -> FrontendRuntime:
    """A frontend's live state: the acceptor takes its slots against maxconn."""
    return FrontendRuntime(make_config([], maxconn=maxconn).frontends[0])


def _setup(stack: ExitStack, handler=None, maxconn: int = 1000):
    listener = stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=128))
    listener.setblocking(False)
    accepted = []

    def keep(client, peer, frontend):
        stack.callback(client.close)
        accepted.append(peer)
        if handler is not None:
            handler()

    acceptor = _Acceptor(listener, _frontend(maxconn), keep)
    return listener, acceptor, accepted


def _connect(stack: ExitStack, listener: socket.socket) -> None:
    stack.enter_context(socket.create_connection(listener.getsockname()))


def test_the_clients_waiting_are_accepted_in_batches_and_the_last_batch_says_the_queue_is_empty():
    with ExitStack() as stack:
        listener, acceptor, accepted = _setup(stack)
        for _ in range(2 * _ACCEPT_BATCH + 5):
            _connect(stack, listener)
        assert acceptor.serve() is True
        assert len(accepted) == _ACCEPT_BATCH
        assert acceptor.serve() is True
        assert acceptor.serve() is False
        assert len(accepted) == 2 * _ACCEPT_BATCH + 5


def test_a_report_with_no_client_waiting_accepts_nothing():
    with ExitStack() as stack:
        listener, acceptor, accepted = _setup(stack)
        assert acceptor.serve() is False
        assert accepted == []
        _connect(stack, listener)
        assert acceptor.serve() is False
        assert len(accepted) == 1


def test_a_client_queued_while_others_are_accepted_is_accepted_in_the_same_round():
    # The queue's length is asked again once the clients it reported are
    # accepted: a client that arrived meanwhile does not wait for the next
    # wake-up (a storm of reconnecting clients is accepted as fast as before).
    with ExitStack() as stack:
        arrivals = []
        listener, acceptor, accepted = _setup(stack, handler=lambda: arrivals and arrivals.pop()())
        _connect(stack, listener)
        arrivals.append(lambda: _connect(stack, listener))  # while the first is handled
        assert acceptor.serve() is False
        assert len(accepted) == 2


def test_a_client_queued_after_the_backlog_was_found_empty_is_a_new_edge():
    # No accept has to fail with EAGAIN: the next client wakes an
    # edge-triggered epoll again.
    with ExitStack() as stack:
        listener, acceptor, accepted = _setup(stack)
        epoll = stack.enter_context(select.epoll())
        epoll.register(listener.fileno(), _ACCEPT_MASK)
        _connect(stack, listener)
        assert epoll.poll(1) == [(listener.fileno(), select.EPOLLIN)]
        assert acceptor.serve() is False
        assert epoll.poll(0) == []
        _connect(stack, listener)
        assert epoll.poll(1) == [(listener.fileno(), select.EPOLLIN)]
        assert acceptor.serve() is False
        assert len(accepted) == 2


def test_a_full_frontend_pauses_the_acceptor_with_clients_left_waiting():
    with ExitStack() as stack:
        listener, acceptor, accepted = _setup(stack, maxconn=2)
        for _ in range(3):
            _connect(stack, listener)
        assert acceptor.serve() is False
        assert len(accepted) == 2
        assert acceptor.paused.is_set()
