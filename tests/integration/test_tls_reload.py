"""Certificate rotation on SIGHUP: a valid new set serves new connections, an invalid one is refused."""

from __future__ import annotations

import shutil
import signal
import ssl

import trio

from tests.warrenproc import WarrenProcess, json_global, write


def stats_config(crt: str) -> str:
    return json_global() + f"""
[frontends.amqp]
bind = "127.0.0.1:0"
backend = "rabbit"

[backends.rabbit]
servers = [{{ name = "a", address = "127.0.0.1", port = 1 }}]

[stats]
bind = "127.0.0.1:0"
users = {{ admin = "pw" }}
[stats.tls]
crt = "{crt}"
"""


async def presented_certificate(port: int, pki) -> str:
    """The CN of the certificate a new HTTPS connection to the stats page gets."""
    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    context.check_hostname = False
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    try:
        await stream.do_handshake()
        cert = stream.getpeercert()
        return dict(item[0] for item in cert["subject"])["commonName"]
    finally:
        await stream.aclose()


async def test_sighup_rotates_the_certificate_and_refuses_a_broken_one(pki, tmp_path):
    live = tmp_path / "stats.pem"
    shutil.copy(pki.server.pem, live)
    config = write(tmp_path / "warren.toml", stats_config(str(live)))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, WarrenProcess(config) as warren:
            await warren.start(nursery)
            event = await warren.wait_for("stats.listening")
            port = int(event["address"].rsplit(":", 1)[1])
            assert await presented_certificate(port, pki) == "server"

            # A broken set (key of another certificate): refused with file and reason, old one serves.
            live.write_bytes(open(pki.other_host.cert, "rb").read() + open(pki.server.key, "rb").read())
            warren.signal(signal.SIGHUP)
            failed = await warren.wait_for("config.reload_failed")
            assert any(f"{live}: private key does not match the certificate" in e for e in failed["errors"])
            assert "BEGIN" not in str(failed)  # no key material in a log line
            assert await presented_certificate(port, pki) == "server"

            # A valid new set: new connections get it.
            shutil.copy(pki.other_host.pem, live)
            warren.signal(signal.SIGHUP)
            await warren.wait_for("config.reloaded")
            assert await presented_certificate(port, pki) == "other-host"
            assert await warren.stop() == 0
            nursery.cancel_scope.cancel()


async def test_warren_refuses_to_start_with_an_expired_certificate(pki, tmp_path):
    from tests.warrenproc import run_cli

    config = write(tmp_path / "warren.toml", stats_config(pki.expired_server.pem))
    done = await trio.to_thread.run_sync(lambda: run_cli("run", str(config)))
    assert done.returncode == 1
    assert f"stats.tls.crt: {pki.expired_server.pem}: certificate expired on" in done.stderr
    done = await trio.to_thread.run_sync(lambda: run_cli("check", str(config)))
    assert done.returncode == 1 and "configuration is NOT valid" in done.stderr
