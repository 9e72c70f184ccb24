"""Health checks over TLS against small local TLS servers: each certificate problem is its own result."""

from __future__ import annotations

import ssl

import pytest
import trio

from proxy.config.model import HttpCheck
from proxy.health.http import check_http
from proxy.health.results import CheckCode
from proxy.health.tcp import CheckTls, check_tcp


async def serve_tls(certificate: str | None, *, task_status=trio.TASK_STATUS_IGNORED, answer: bytes = b""):
    """Accepts on 127.0.0.1 (TLS with `certificate`, or plain TCP), writes `answer`, closes."""
    context = None
    if certificate:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate)

    async def handler(stream):
        try:
            if context is not None:
                stream = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
            if answer:
                await stream.receive_some(65536)
                await stream.send_all(answer)
            else:
                await stream.receive_some(10)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


def client_tls(pki, name: str = "localhost") -> CheckTls:
    return CheckTls(ssl.create_default_context(cafile=pki.ca.cert_path), name)


@pytest.mark.parametrize(
    "certificate, name, description",
    [
        ("wrong_host", "localhost", "certificate verify failed: hostname mismatch"),
        ("untrusted_server", "localhost", "certificate verify failed: self-signed certificate in certificate chain"),
        ("expired_server", "localhost", "certificate verify failed: certificate has expired"),
        ("server", "127.0.0.1", None),
    ],
)
async def test_a_tls_check_names_the_certificate_problem(pki, certificate, name, description):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_tls, getattr(pki, certificate).pem)
            result = await check_tcp("127.0.0.1", port, None, 2.0, tls=client_tls(pki, name))
            nursery.cancel_scope.cancel()
    if description is None:
        assert (result.code, result.description) == (CheckCode.L6OK, "TLS handshake completed")
    else:
        assert result.code is CheckCode.L6RSP
        assert result.description == description
        assert result.short().startswith("L6RSP in ")


async def test_a_plaintext_server_behind_a_tls_check_is_a_handshake_failure(pki):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_tls, None)
            result = await check_tcp("127.0.0.1", port, None, 2.0, tls=client_tls(pki))
            nursery.cancel_scope.cancel()
    assert result.code is CheckCode.L6RSP
    assert result.description.startswith("TLS handshake failed")


async def test_a_silent_tls_server_times_out_in_the_handshake(pki):
    with trio.fail_after(10):
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts (the kernel does), never answers
        result = await check_tcp("127.0.0.1", listener.getsockname()[1], None, 0.3, tls=client_tls(pki))
        listener.close()
    assert result.code is CheckCode.L6TOUT
    assert result.description == "timeout after 300ms waiting for the TLS handshake"


async def test_the_http_check_speaks_https(pki):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{\"status\":\"ok\"}"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(lambda task_status: serve_tls(pki.server.pem, answer=answer,
                                                                      task_status=task_status))
            result = await check_http("127.0.0.1", port, HttpCheck(), 2.0, tls=client_tls(pki))
            nursery.cancel_scope.cancel()
    assert result.code is CheckCode.L7OK
    assert result.details["status"] == "200"
