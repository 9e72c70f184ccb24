"""Certificates, keys and contexts: what Warren accepts, what it refuses and why."""

from __future__ import annotations

import datetime
import shutil
import ssl
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.config import parse_config
from proxy.config.model import BindTls, ServerTls, TlsVerify
from proxy.tls.contexts import DEFAULT_CIPHERS, SniTable, bind_context, tls13_suites_of
from proxy.tls.files import TlsFileError, load_identity, load_private_key
from proxy.tls.store import TlsConfigError, build_material
from tests.tlsca import KEY_PASSWORD


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_name: str | None = "localhost"):
    """A complete TLS handshake between two SSLObjects in memory; returns (client, server) objects."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(20):
        for index, (obj, out, peer_in) in enumerate(((client, c_out, s_in), (server, s_out, c_in))):
            if not done[index]:
                try:
                    obj.do_handshake()
                    done[index] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done):
            return client, server
    raise AssertionError("handshake did not finish")


def test_a_crt_file_with_chain_and_key_loads_with_its_names_and_expiry(pki):
    identity = load_identity(pki.server.pem)
    assert identity.leaf.dns_names == ("localhost",)
    assert identity.leaf.ip_addresses == ("127.0.0.1",)
    assert identity.leaf.key_type == "EC secp256r1"
    assert identity.chain_length == 2
    assert 360 * 86400 < identity.leaf.seconds_left() < 366 * 86400
    assert load_identity(pki.server_rsa.pem).leaf.key_type == "RSA 2048"


def test_a_key_missing_from_the_crt_file_is_read_from_dot_key(pki, tmp_path):
    shutil.copy(pki.server.cert, tmp_path / "s.pem")
    shutil.copy(pki.server.key, tmp_path / "s.pem.key")
    identity = load_identity(str(tmp_path / "s.pem"))
    assert identity.key_path == str(tmp_path / "s.pem.key")


@pytest.mark.parametrize(
    "case, reason",
    [
        ("mismatch", "private key does not match the certificate"),
        ("expired", "certificate expired on"),
        ("no key", "no private key in the file"),
        ("missing", "cannot read: No such file or directory"),
        ("garbage", "no PEM certificate in the file"),
        ("damaged extension", "a PEM certificate block cannot be parsed"),
    ],
)
def test_unusable_crt_files_are_refused_with_file_and_reason(pki, tmp_path, case, reason):
    path = tmp_path / "crt.pem"
    if case == "mismatch":
        path.write_bytes(open(pki.server.cert, "rb").read() + open(pki.client.key, "rb").read())
    elif case == "expired":
        shutil.copy(pki.expired_server.pem, path)
    elif case == "no key":
        shutil.copy(pki.server.cert, path)
    elif case == "garbage":
        path.write_bytes(b"AMQP\x00\x00\x09\x01")
    elif case == "damaged extension":
        # Found by tests/properties/test_tls_files.py: cryptography parses extensions lazily, so a
        # certificate whose SAN extension is damaged loaded, and reading its names raised ValueError.
        der = ssl.PEM_cert_to_DER_cert(open(pki.server.cert).read())
        damaged = der.replace(bytes.fromhex("0603551d11"), bytes.fromhex("0603551d0f"), 1)
        assert damaged != der
        path.write_bytes(ssl.DER_cert_to_PEM_cert(damaged).encode() + open(pki.server.key, "rb").read())
    with pytest.raises(TlsFileError) as caught:
        load_identity(str(path))
    assert reason in caught.value.reason
    assert caught.value.path.startswith(str(tmp_path))


def test_encrypted_keys_need_the_right_password(pki):
    assert load_identity(pki.encrypted.pem, KEY_PASSWORD).leaf.common_name == "encrypted"
    with pytest.raises(TlsFileError, match="no key_password is set"):
        load_identity(pki.encrypted.pem)
    with pytest.raises(TlsFileError, match="wrong key_password"):
        load_identity(pki.encrypted.pem, "nope")


@pytest.mark.parametrize("key_format", ["pkcs8", "traditional"])
def test_every_wrong_password_is_reported_as_a_wrong_password(key_format):
    # One wrong password in ~256 decrypts to garbage that passes the padding check, and the
    # key's DER parse fails instead: CI once saw "not a valid PEM key" for a wrong password.
    # 3,000 wrong passwords meet that case with near certainty (and take under a second).
    key = ec.generate_private_key(ec.SECP256R1())
    form = {"pkcs8": serialization.PrivateFormat.PKCS8,
            "traditional": serialization.PrivateFormat.TraditionalOpenSSL}[key_format]
    block = key.private_bytes(serialization.Encoding.PEM, form,
                              serialization.BestAvailableEncryption(KEY_PASSWORD.encode()))
    assert load_private_key(block, "k.pem", KEY_PASSWORD).private_numbers() == key.private_numbers()
    reasons = set()
    for attempt in range(3000):
        with pytest.raises(TlsFileError) as caught:
            load_private_key(block, "k.pem", f"wrong-{attempt}")
        reasons.add(caught.value.reason)
    assert reasons == {"cannot decrypt the private key: wrong key_password (or the key is damaged)"}


def test_a_damaged_unencrypted_key_is_not_blamed_on_a_password():
    key = ec.generate_private_key(ec.SECP256R1())
    block = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    lines = block.splitlines()
    lines[1] = lines[1][:10] + (b"A" if lines[1][10:11] != b"A" else b"B") + lines[1][11:]
    with pytest.raises(TlsFileError, match="not a valid PEM key"):
        load_private_key(b"\n".join(lines), "k.pem", None)


def test_defaults_are_tls12_and_13_with_forward_secret_aead_ciphers(pki):
    context = bind_context(BindTls(crt=(pki.server.pem,)), load_identity(pki.server.pem))
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.maximum_version is ssl.TLSVersion.TLSv1_3
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(DEFAULT_CIPHERS.split(":"))
    assert context.verify_mode is ssl.CERT_NONE
    assert not context.options & ssl.OP_NO_TICKET


def test_ciphersuites_and_versions_take_effect(pki):
    settings = BindTls(crt=(pki.server.pem,), ciphersuites="TLS_CHACHA20_POLY1305_SHA256", ssl_min_ver="TLSv1.3",
                       tickets=False)
    context = bind_context(settings, load_identity(pki.server.pem))
    assert tls13_suites_of(context) == ["TLS_CHACHA20_POLY1305_SHA256"]
    client, server = handshake(pki.server_context(), context)
    assert server.version() == "TLSv1.3"
    assert server.cipher()[0] == "TLS_CHACHA20_POLY1305_SHA256"
    assert context.options & ssl.OP_NO_TICKET
    old = pki.server_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        handshake(old, context)


def test_sni_picks_the_certificate_by_name_wildcards_included_default_otherwise(pki):
    default, other = object(), object()
    table = SniTable(default, [(("localhost",), default), (("other.test", "*.other.test"), other)])
    assert table.lookup("other.test") is other
    assert table.lookup("A.Other.Test.") is other
    assert table.lookup("a.b.other.test") is default  # a wildcard covers one label
    assert table.lookup("unknown.example") is default
    assert table.lookup(None) is default


def config_text(pki, tls: str, server_tls: str = "") -> str:
    return f"""
[frontends.amqps]
bind = "127.0.0.1:0"
backend = "rabbit"
[frontends.amqps.tls]
{tls}

[backends.rabbit]
{server_tls}
[[backends.rabbit.servers]]
name = "a"
address = "127.0.0.1"
port = 5671
"""


def test_material_serves_sni_and_verifies_clients_in_real_handshakes(pki):
    text = config_text(
        pki, f'crt = ["{pki.server.pem}", "{pki.other_host.pem}"]\nca_file = "{pki.ca.cert_path}"\nverify = "optional"'
    )
    material = build_material(parse_config(text, "w.toml"))
    context = material.frontends["amqps"].context
    client, server = handshake(pki.server_context(), context, "x.other.test")
    assert client.getpeercert()["subject"] == ((("commonName", "other-host"),),)
    client_ctx = pki.server_context()
    client_ctx.load_cert_chain(pki.client.pem)
    client, server = handshake(client_ctx, context)
    assert dict(x[0] for x in server.getpeercert()["subject"])["commonName"] == "app-publisher"
    assert [use.where for use in material.certificates] == ["frontend amqps", "frontend amqps"]


def test_material_lists_every_problem_with_its_key(pki, tmp_path):
    text = config_text(
        pki,
        f'crt = ["{pki.server.pem}", "{pki.expired_server.pem}", "{tmp_path}/none.pem"]\n'
        f'ca_file = "{pki.server.key}"\nverify = "required"',
        f'tls = {{ ca_file = "{pki.ca.cert_path}", crt = "{pki.encrypted.pem}" }}',
    )
    with pytest.raises(TlsConfigError) as caught:
        build_material(parse_config(text, "w.toml"))
    found = {at: message for at, message in caught.value.issues}
    assert "no PEM certificate in the CA bundle" in found[("frontends", "amqps", "tls", "ca_file")]
    assert "certificate expired" in found[("frontends", "amqps", "tls", "crt", 1)]
    assert "No such file" in found[("frontends", "amqps", "tls", "crt", 2)]
    assert "no key_password" in found[("backends", "rabbit", "servers", 0, "tls", "crt")]


def test_client_side_verifies_by_default_and_records_explicit_opt_outs(pki):
    text = config_text(pki, f'crt = "{pki.server.pem}"', f'tls = {{ ca_file = "{pki.ca.cert_path}" }}')
    config = parse_config(text, "w.toml")
    assert config.backends[0].servers[0].tls == ServerTls(ca_file=pki.ca.cert_path)
    material = build_material(config)
    context = material.server("rabbit", "a")
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert material.unverified == []
    unverified = replace(config.backends[0].servers[0], tls=ServerTls(verify=TlsVerify.NONE))
    config = replace(config, backends=(replace(config.backends[0], servers=(unverified,)),))
    assert build_material(config).unverified == ["rabbit/a"]


def test_certificates_close_to_expiry_are_listed(pki):
    material = build_material(parse_config(config_text(pki, f'crt = "{pki.server.pem}"'), "w.toml"))
    assert material.expiring() == []
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=340)
    assert [use.info.common_name for use in material.expiring(now=later)] == ["server"]


def test_a_revoked_client_is_refused_with_a_crl(pki):
    text = config_text(
        pki, f'crt = "{pki.server.pem}"\nca_file = "{pki.ca.cert_path}"\ncrl_file = "{pki.crl}"\nverify = "required"'
    )
    context = build_material(parse_config(text, "w.toml")).frontends["amqps"].context
    good = pki.server_context()
    good.load_cert_chain(pki.client.pem)
    handshake(good, context)
    revoked = pki.server_context()
    revoked.load_cert_chain(pki.revoked_client.pem)
    with pytest.raises(ssl.SSLError):
        client, server = handshake(revoked, context)
        client.write(b"x")  # TLS 1.3: the client learns of the refusal on its first read
        server.read(1)
