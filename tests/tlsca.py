"""A test certificate authority made with `cryptography` (a pytest plugin: fixture `pki`).

`pki` (session) holds a CA and everything the TLS tests present or refuse,
made once per session in one directory that the `rabbitmq` user can read
(brokers started by the harness load them too):

- `server` (ECDSA P-256) and `server_rsa` (RSA 2048) for localhost / 127.0.0.1;
- `other_host` (SNI tests: `other.test`), `wrong_host` (`wrong.example`),
  `expired_server`;
- `client`, `expired_client`, `untrusted_client` (another CA), `revoked_client`
  and `crl` revoking it;
- `encrypted` (key protected with the password `s3cret`).

Each issued certificate has `pem` (chain and key in one file, HAProxy's crt),
`cert` and `key` (separate files, as RabbitMQ wants them).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)
KEY_PASSWORD = "s3cret"


@dataclass(frozen=True)
class Issued:
    name: str
    pem: str  # certificate + chain + key
    cert: str
    key: str
    certificate: x509.Certificate


class TestCA:
    __test__ = False  # not a test class for pytest

    def __init__(self, directory: Path, name: str = "Warren Test CA"):
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY).not_valid_after(now + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        slug = name.lower().replace(" ", "-")
        self.cert_path = str(self._write(f"{slug}.pem", _cert_pem(self.certificate)))

    def issue(self, name: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), rsa_bits: int = 0,
              client: bool = False, valid_days: float = 365, expired: bool = False,
              password: str | None = None) -> Issued:
        key = rsa.generate_private_key(65537, rsa_bits) if rsa_bits else ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - 30 * DAY, now - DAY) if expired else (now - DAY, now + valid_days * DAY)
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                      else serialization.NoEncryption())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        cert_pem = _cert_pem(certificate)
        return Issued(
            name,
            pem=str(self._write(f"{name}.pem", cert_pem + _cert_pem(self.certificate) + key_pem)),
            cert=str(self._write(f"{name}.crt", cert_pem)),
            key=str(self._write(f"{name}.key", key_pem)),
            certificate=certificate,
        )

    def crl(self, revoked: list[Issued], name: str = "crl.pem") -> str:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - DAY).next_update(now + 30 * DAY)
        )
        for issued in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(issued.certificate.serial_number).revocation_date(now - DAY).build()
            )
        crl = builder.sign(self.key, hashes.SHA256())
        return str(self._write(name, crl.public_bytes(serialization.Encoding.PEM)))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        os.chmod(path, 0o644)  # brokers (the rabbitmq user) read them too; test material only
        return path


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


class TestPKI:
    """Everything the TLS tests use, made once (see the module docstring)."""

    __test__ = False

    def __init__(self, directory: Path):
        self.dir = directory
        self.ca = TestCA(directory)
        self.other_ca = TestCA(directory, "Other Test CA")
        local = dict(dns=("localhost",), ips=("127.0.0.1",))
        self.server = self.ca.issue("server", **local)
        self.server_rsa = self.ca.issue("server-rsa", rsa_bits=2048, **local)
        self.other_host = self.ca.issue("other-host", dns=("other.test", "*.other.test"))
        self.wrong_host = self.ca.issue("wrong-host", dns=("wrong.example",))
        self.expired_server = self.ca.issue("expired-server", expired=True, **local)
        self.untrusted_server = self.other_ca.issue("untrusted-server", **local)
        self.client = self.ca.issue("app-publisher", client=True)
        self.expired_client = self.ca.issue("expired-client", client=True, expired=True)
        self.untrusted_client = self.other_ca.issue("untrusted-client", client=True)
        self.revoked_client = self.ca.issue("revoked-client", client=True)
        self.encrypted = self.ca.issue("encrypted", password=KEY_PASSWORD, **local)
        self.crl = self.ca.crl([self.revoked_client])

    def client_hello(self) -> bytes:
        """The first flight of a real TLS client (a ClientHello), made in memory."""
        import ssl

        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.server_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return outgoing.read()

    def server_context(self, **kw):
        """An ssl context trusting the test CA (a client's view)."""
        import ssl

        context = ssl.create_default_context(cafile=self.ca.cert_path)
        for key, value in kw.items():
            setattr(context, key, value)
        return context


@pytest.fixture(scope="session")
def pki() -> TestPKI:
    directory = Path(tempfile.mkdtemp(prefix="warren-pki-"))
    directory.chmod(0o755)  # mkdtemp makes 0700; the rabbitmq user must enter
    try:
        yield TestPKI(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
