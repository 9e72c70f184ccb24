"""`warren import` as a command: exit status, files written, and the output really running.

The round trip (import, check, run) runs the imported realistic configuration
in a network namespace of its own, with an `eth0` (a veth) carrying the host's
address, so its binds, its VIP and its unreachable brokers touch nothing
outside the namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import pika
import pytest
import trio

from tests.warrenproc import WarrenProcess, run_cli

DATA = Path(__file__).resolve().parents[1] / "data" / "import"


def test_exit_status_is_0_when_everything_translates_and_the_file_is_private(tmp_path):
    out = tmp_path / "warren.toml"
    done = run_cli("import", str(DATA / "clean-haproxy.cfg"), "--keepalived", str(DATA / "clean-keepalived.conf"),
                   "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "0 approximated, 0 ignored, 0 suspicious" in done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # password hashes inside
    assert run_cli("check", str(out)).returncode == 0


def test_exit_status_is_2_with_a_report_line_per_directive_and_no_secret(tmp_path):
    out = tmp_path / "warren.toml"
    done = run_cli("import", str(DATA / "suspicious-haproxy.cfg"), "--keepalived",
                   str(DATA / "suspicious-keepalived.conf"), "-o", str(out))
    assert done.returncode == 2, done.stderr
    assert f"{DATA / 'suspicious-haproxy.cfg'}:17: suspicious: " in done.stderr
    assert f"{DATA / 'suspicious-keepalived.conf'}:14: suspicious: auth_pass <hidden>" in done.stderr
    assert "hunter22" not in done.stderr and "hunter22" not in out.read_text()
    assert run_cli("check", str(out)).returncode == 0


def test_without_output_file_the_toml_goes_to_stdout():
    done = run_cli("import", str(DATA / "clean-haproxy.cfg"))
    assert done.returncode == 0 and "\n[frontends.amqp]\n" in done.stdout and "translated:" not in done.stdout


@pytest.mark.parametrize("args, where", [
    (["broken-haproxy.cfg"], "broken-haproxy.cfg:6: unterminated"),
    (["clean-haproxy.cfg", "--keepalived", "broken-keepalived.conf"], "broken-keepalived.conf:1:"),
    (["missing.cfg"], "missing.cfg: cannot read: No such file or directory"),
])
def test_exit_status_is_1_with_file_and_line_when_input_cannot_be_read(tmp_path, args, where):
    out = tmp_path / "warren.toml"
    argv = [str(DATA / a) if a.endswith((".cfg", ".conf")) else a for a in args]
    done = run_cli("import", *argv, "-o", str(out))
    assert done.returncode == 1 and where in done.stderr
    assert not out.exists()


# -- the round trip: import, check, run -----------------------------------------------------------

needs_netns = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespace():
    name = f"wimp{os.getpid() % 100000}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot create network namespaces: {error.stderr!r}")
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")  # no dummy module here
        _ip("-n", name, "addr", "add", "10.0.0.11/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth1", "up")
        _ip("-n", name, "link", "set", "eth0", "up")
        yield name
    finally:
        listing = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
        for pid in listing.stdout.split():  # only what this test started runs in there
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def with_test_certificates(pki, tmp_path: Path) -> Path:
    """The realistic haproxy.cfg with its certificate and CA paths pointing at the test PKI's files."""
    text = (DATA / "production-haproxy.cfg").read_text()
    assert "/etc/haproxy/certs/amqp.pem" in text and "/etc/haproxy/ca.pem" in text
    text = text.replace("/etc/haproxy/certs/amqp.pem", pki.server.pem).replace("/etc/haproxy/ca.pem", pki.ca.cert_path)
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return path


@needs_netns
@pytest.mark.netns
async def test_the_imported_realistic_configuration_checks_and_runs(tmp_path, namespace, pki):
    out = tmp_path / "warren.toml"
    done = run_cli("import", str(with_test_certificates(pki, tmp_path)), "--keepalived",
                   str(DATA / "production-keepalived.conf"), "-o", str(out), "--runtime-dir", str(tmp_path))
    assert done.returncode == 2, done.stderr  # tcp-check rules, the server name check... are approximated or reported
    check = run_cli("check", str(out))
    assert check.returncode == 0, check.stderr  # the TLS files load, the key matches its certificate
    with trio.fail_after(60):
        async with WarrenProcess(out) as warren:
            warren.prefix = ["ip", "netns", "exec", namespace]
            async with trio.open_nursery() as nursery:
                started = await warren.start(nursery)
                assert set(started["listeners"]) == {"amqp", "amqp-tls", "management"}
                await warren.wait_for("vip.started", instance="VI_AMQP")
                assert (tmp_path / "warren.sock").exists()  # the control socket in the runtime directory
                assert await warren.stop() == 0
                nursery.cancel_scope.cancel()


# -- AMQPS, end to end: terminated, client certificates verified, re-encrypted to a TLS-only broker ------------

TLS_HAPROXY = """
global
    ca-base {ca_dir}
    crt-base {crt_dir}
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-server-options ssl-min-ver TLSv1.2
    log /dev/log local0

defaults
    mode tcp
    option tcplog
    timeout connect 5s
    timeout client-hs 5s

frontend amqps
    bind 127.0.0.1:{front_port} ssl crt {server_pem} verify required ca-file {ca_name}
    default_backend rabbitmq

backend rabbitmq
    option tcp-check
    tcp-check connect
    tcp-check send-binary 414d515000000901
    tcp-check expect binary 4164
    default-server check inter 500ms rise 1 fall 2 ssl verify required ca-file {ca_name} crt {client_name}
    server rmq 127.0.0.1:{broker_port} sni str(localhost)
"""


def _free_port() -> int:
    """A loopback port nobody listens on now (HAProxy's bind has no port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.rabbit
async def test_an_imported_amqps_frontend_serves_a_real_client_through_to_a_tls_only_broker(
        tmp_path, pki, rabbit_node_factory):
    from proxy.devcluster import NodeTls
    from tests.amqputil import round_trip

    node = rabbit_node_factory(tls=NodeTls(pki.ca.cert_path, pki.server.cert, pki.server.key, verify_peer=True))
    ca, client = Path(pki.ca.cert_path), Path(pki.client.pem)
    haproxy = tmp_path / "haproxy.cfg"  # relative names under ca-base / crt-base, as on real hosts
    haproxy.write_text(TLS_HAPROXY.format(ca_dir=ca.parent, crt_dir=client.parent, ca_name=ca.name,
                                          client_name=client.name, server_pem=pki.server.pem,
                                          broker_port=node.spec.amqp_port, front_port=_free_port()))
    out = tmp_path / "warren.toml"
    done = run_cli("import", str(haproxy), "-o", str(out), "--runtime-dir", str(tmp_path))
    assert done.returncode == 2, done.stderr  # the AMQP check replacing tcp-check and the JSON log: approximated
    assert "suspicious" not in done.stderr.split("warren import:")[0]
    check = run_cli("check", str(out))
    assert check.returncode == 0, check.stderr
    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    context.load_cert_chain(pki.client.pem)
    with trio.fail_after(90):
        async with WarrenProcess(out) as warren:
            async with trio.open_nursery() as nursery:
                await warren.start(nursery)
                await warren.wait_for("server.up", server="rmq", timeout=45)  # checked over AMQPS, mutual TLS
                body = await trio.to_thread.run_sync(round_trip, warren.front("amqps"), b"over AMQPS", None, context)
                assert body == b"over AMQPS"
                without = ssl.create_default_context(cafile=pki.ca.cert_path)  # no client certificate
                with pytest.raises(pika.exceptions.AMQPConnectionError):
                    await trio.to_thread.run_sync(round_trip, warren.front("amqps"), b"refused", None, without)
                assert await warren.stop() == 0
                nursery.cancel_scope.cancel()
