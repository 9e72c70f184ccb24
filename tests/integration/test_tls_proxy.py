"""TLS through Warren in-process, against small local backends: termination, SNI, mutual TLS,
PROXY v2 TLVs, re-encryption to TLS backends, and hostile input on a TLS port."""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import replace

import pytest
import trio

from proxy.backends.proxy_protocol import parse as parse_proxy_header
from proxy.config.model import BindTls, SendProxy, ServerTls, TlsVerify
from lab import wait_until
from tests.proxyutil import front, make_config, read_line, serve_named, server, start_warren


def tls_frontend(config, tls: BindTls):
    return replace(config, frontends=(replace(config.frontends[0], tls=tls),))


def client_context(pki, certificate=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    if certificate is not None:
        context.load_cert_chain(certificate.pem)
    return context


async def open_tls(app, context, name="localhost") -> trio.SSLStream:
    host, port = front(app)
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, context, server_hostname=name, https_compatible=True)
    await stream.do_handshake()
    return stream


async def echo_once(stream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    data = b""
    while len(data) < len(payload):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


async def start(nursery, pki, tls: BindTls, **server_kw):
    port = await nursery.start(serve_named, "rmq-a")
    config = tls_frontend(make_config([server("rmq-a", port, **server_kw)]), tls)
    return await start_warren(nursery, config)


async def test_a_tls_client_reaches_a_plaintext_backend_and_back(pki):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, pki, BindTls(crt=(pki.server.pem,)))
            stream = await open_tls(app, client_context(pki))
            assert await read_line(stream) == "rmq-a"
            payload = os.urandom(300_000)  # several records, both ways
            assert await echo_once(stream, payload) == payload
            stats = app.runtime.statistics().frontends[0].tls
            assert stats.handshakes == 1 and stats.in_use == (("TLSv1.3", 1),)
            await stream.aclose()
            await wait_until(lambda: not app.sessions.live, timeout=5, what="the session ended")
            assert app.runtime.statistics().frontends[0].tls.in_use == ()
            assert app.runtime.server("be", "rmq-a").bytes_totals()[0] == len(payload)
            nursery.cancel_scope.cancel()


async def test_sni_chooses_the_certificate_and_unknown_names_get_the_default(pki):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, pki, BindTls(crt=(pki.server.pem, pki.other_host.pem)))
            for name, expected in (("mq.other.test", "other-host"), ("localhost", "server")):
                stream = await open_tls(app, client_context(pki), name)
                subject = dict(rdn[0] for rdn in stream.getpeercert()["subject"])
                assert subject["commonName"] == expected
                await stream.aclose()
            context = client_context(pki)
            context.check_hostname = False
            stream = await open_tls(app, context, "nobody.example")
            assert dict(rdn[0] for rdn in stream.getpeercert()["subject"])["commonName"] == "server"
            await stream.aclose()
            nursery.cancel_scope.cancel()


def mutual(pki, verify=TlsVerify.REQUIRED, crl=False) -> BindTls:
    return BindTls(crt=(pki.server.pem,), ca_file=pki.ca.cert_path, verify=verify,
                   crl_file=pki.crl if crl else None)


async def refused(app, context) -> bool:
    """True if the proxy refuses the client (in TLS 1.3 the refusal arrives after the client's Finished)."""
    try:
        stream = await open_tls(app, context)
        data = await stream.receive_some(100)
        await stream.aclose()
        return data == b""
    except (trio.BrokenResourceError, ssl.SSLError):
        return True


async def test_mutual_tls_accepts_good_clients_and_refuses_missing_expired_untrusted_revoked(pki):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, pki, mutual(pki, crl=True))
            stream = await open_tls(app, client_context(pki, pki.client))
            assert await read_line(stream) == "rmq-a"
            await stream.aclose()
            for certificate in (None, pki.expired_client, pki.untrusted_client, pki.revoked_client):
                assert await refused(app, client_context(pki, certificate)), certificate
            tls = app.runtime.statistics().frontends[0].tls
            await wait_until(lambda: app.runtime.statistics().frontends[0].tls.failed == 4, timeout=5, what="4 failures")
            tls = app.runtime.statistics().frontends[0].tls
            assert tls.client_certificates == 1 and tls.recent_subjects == ("app-publisher",)
            reasons = dict(tls.failures)
            assert reasons.get("certificate_verify_failed", 0) >= 2, reasons
            assert sum(reasons.values()) == 4
            nursery.cancel_scope.cancel()


async def test_optional_verification_lets_clients_without_certificate_in(pki):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, pki, mutual(pki, TlsVerify.OPTIONAL))
            stream = await open_tls(app, client_context(pki))
            assert await read_line(stream) == "rmq-a"
            await stream.aclose()
            assert await refused(app, client_context(pki, pki.untrusted_client))
            nursery.cancel_scope.cancel()


async def serve_proxy_reader(*, task_status=trio.TASK_STATUS_IGNORED):
    """A backend that reads the PROXY header and answers with what its SSL TLV says."""

    async def handler(stream):
        data = b""
        while (parsed := parse_proxy_header(data)) is None:
            data += await stream.receive_some(4096)
        header, _ = parsed
        ssl_info = header.ssl
        await stream.send_all(f"{ssl_info.version}|{ssl_info.cn}|{ssl_info.client_flags}|{ssl_info.verify}\n".encode())
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


async def test_the_client_cn_reaches_the_broker_in_the_proxy_v2_ssl_tlv(pki):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_proxy_reader)
            config = make_config([server("reader", port, send_proxy=SendProxy.V2)])
            app = await start_warren(nursery, tls_frontend(config, mutual(pki, TlsVerify.OPTIONAL)))
            stream = await open_tls(app, client_context(pki, pki.client))
            assert await read_line(stream) == "TLSv1.3|app-publisher|7|0"  # SSL | CERT_CONN | CERT_SESS
            stream = await open_tls(app, client_context(pki))
            assert await read_line(stream) == "TLSv1.3|None|1|0"
            nursery.cancel_scope.cancel()


async def serve_tls_echo(certificate: str, *, task_status=trio.TASK_STATUS_IGNORED):
    """A TLS backend: greets with its name, then echoes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate)

    async def handler(tcp):
        stream = trio.SSLStream(tcp, context, server_side=True, https_compatible=True)
        try:
            await stream.send_all(b"tls-backend\n")
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


@pytest.mark.parametrize("client_tls", [False, True])
async def test_warren_re_encrypts_to_tls_backends_and_verifies_them(pki, client_tls):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            good = await nursery.start(serve_tls_echo, pki.server.pem)
            wrong = await nursery.start(serve_tls_echo, pki.wrong_host.pem)
            tls = ServerTls(ca_file=pki.ca.cert_path, sni="localhost")
            config = make_config([server("good", good, tls=tls)], retries=0)
            if client_tls:
                config = tls_frontend(config, BindTls(crt=(pki.server.pem,)))
            app = await start_warren(nursery, config)

            async def connect():
                if client_tls:
                    return await open_tls(app, client_context(pki))
                return await trio.open_tcp_stream(*front(app))

            stream = await connect()
            assert await read_line(stream) == "tls-backend"
            payload = os.urandom(200_000)
            assert await echo_once(stream, payload) == payload
            await stream.aclose()

            # The same server now answering with a certificate for another name: refused.
            app.runtime.server("be", "good").config = replace(app.runtime.server("be", "good").config, port=wrong)
            stream = await connect()
            assert await stream.receive_some(100) == b""
            assert app.runtime.server("be", "good").connect_errors == 1
            nursery.cancel_scope.cancel()


async def hostile(app, payload: bytes | None, *, hold: bool = False) -> bytes:
    """Sends `payload` to the TLS port; returns what came back before the close."""
    sock = trio.socket.socket()
    await sock.connect(front(app))
    if payload:
        await sock.send(payload)
    received = b""
    while True:
        chunk = await sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sock.close()
    return received


async def test_garbage_on_the_tls_port_is_closed_cleanly_while_real_traffic_flows(pki):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, pki, BindTls(crt=(pki.server.pem,), handshake_timeout=0.5))
            busy = await open_tls(app, client_context(pki))
            assert await read_line(busy) == "rmq-a"
            inputs = {
                "plaintext AMQP": b"AMQP\x00\x00\x09\x01",
                "HTTP": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                "random bytes": os.urandom(4096),
                "ClientHello then silence": pki.client_hello(),
                "nothing at all": None,
            }
            for what, payload in inputs.items():
                answer = await hostile(app, payload)
                assert len(answer) < 8192, what  # at most an alert or a ServerHello flight
                assert await echo_once(busy, b"still here") == b"still here", what
            tls = app.runtime.statistics().frontends[0].tls
            assert tls.failed == len(inputs), tls.failures
            reasons = dict(tls.failures)
            assert reasons["handshake_timeout"] == 2  # the silent ones
            assert "http_request" in reasons
            await busy.aclose()
            nursery.cancel_scope.cancel()


async def test_a_thousand_incomplete_handshakes_cost_nothing_once_timed_out(pki):
    count = 1000
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            app = await start(nursery, pki, BindTls(crt=(pki.server.pem,), handshake_timeout=1.0))
            hello = pki.client_hello()
            socks = []
            for _ in range(count):
                sock = socket.create_connection(front(app))
                sock.sendall(hello[: len(hello) // 2])  # half a ClientHello, then nothing
                socks.append(sock)
            busy = await open_tls(app, client_context(pki))
            assert await read_line(busy) == "rmq-a"
            assert await echo_once(busy, b"ping") == b"ping"
            await wait_until(lambda: len(app.sessions.live) == 1, timeout=30, what="the incomplete handshakes closed")
            tls = app.runtime.statistics().frontends[0].tls
            assert dict(tls.failures)["handshake_timeout"] == count
            for sock in socks:
                sock.close()
            assert await echo_once(busy, b"pong") == b"pong"
            await busy.aclose()
            nursery.cancel_scope.cancel()


async def test_a_queued_client_reaches_a_tls_backend_from_the_slow_path(pki):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_tls_echo, pki.server.pem)
            tls = ServerTls(ca_file=pki.ca.cert_path, sni="localhost")
            config = tls_frontend(make_config([server("one", port, tls=tls, maxconn=1)]), BindTls(crt=(pki.server.pem,)))
            app = await start_warren(nursery, config)
            first = await open_tls(app, client_context(pki))
            assert await read_line(first) == "tls-backend"
            second = await open_tls(app, client_context(pki))  # waits in the queue (a task)
            await wait_until(lambda: app.runtime.backends["be"].queue.statistics().tasks_waiting == 1, timeout=5, what="queued")
            await first.aclose()
            assert await read_line(second) == "tls-backend"
            assert await echo_once(second, b"x" * 70_000) == b"x" * 70_000
            await second.aclose()
            nursery.cancel_scope.cancel()
