"""Reading certificates, keys, CA bundles and CRLs from PEM files.

Everything Warren loads goes through here first, with `cryptography`, so a
problem is reported as the file and the reason an operator can act on
("key does not match the certificate", "expired on 2026-01-02", "wrong
password") instead of OpenSSL's error stack. The SSL contexts are built from
the same files afterwards (:mod:`proxy.tls.contexts`); by then they are known
to be good.

A ``crt`` file is HAProxy's: the certificate, its chain, and the private key
in one PEM file. As HAProxy does, a key missing from it is looked for in
``<file>.key``. A ``crt`` that names a directory means every ``*.pem`` file
in it, in name order.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.S)
_KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"ENCRYPTED PRIVATE KEY"}
MAX_PEM_BYTES = 4 * 1024 * 1024  # a CA bundle is ~200 kB; anything far larger is not one


class TlsFileError(Exception):
    """A file cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What Warren shows and checks of one certificate."""

    path: str
    subject: str  # RFC 4514 string
    common_name: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: datetime.datetime  # aware, UTC
    not_after: datetime.datetime
    key_type: str  # "RSA 2048", "EC secp256r1", "Ed25519"

    @property
    def names(self) -> tuple[str, ...]:
        """Names an SNI lookup may match: the DNS SANs, else the CN (as HAProxy does)."""
        if self.dns_names:
            return self.dns_names
        return (self.common_name,) if self.common_name else ()

    def seconds_left(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return (self.not_after - now).total_seconds()


@dataclass(frozen=True, slots=True)
class Identity:
    """A certificate chain and its key, checked to belong together and valid now.

    ``chain_path`` / ``key_path`` are what OpenSSL loads (``load_cert_chain``);
    they are the same file when the key sits in the crt file.
    """

    chain_path: str
    key_path: str
    leaf: CertificateInfo
    chain_length: int


def read_pem(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except OSError as error:
        raise TlsFileError(path, f"cannot read: {error.strerror}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsFileError(path, f"larger than {MAX_PEM_BYTES // (1024 * 1024)} MiB: not a PEM file")
    return data


def pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """``[(label, whole block)]`` of every PEM block in ``data``."""
    return [(match.group(1), match.group(0)) for match in _PEM_BLOCK.finditer(data)]


def expand_crt(path: str) -> list[str]:
    """A crt entry: the file itself, or every ``*.pem`` of a directory in name order."""
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).iterdir() if p.suffix == ".pem" and p.is_file())
        if not files:
            raise TlsFileError(path, "directory holds no *.pem file")
        return files
    return [path]


def load_identity(path: str, password: str | None = None, *, now: datetime.datetime | None = None) -> Identity:
    """Loads a crt file (chain + key, or key in ``<path>.key``) and checks it.

    Raises TlsFileError: unreadable, no certificate, no key, wrong password,
    key does not match the certificate, certificate not yet valid or expired.
    """
    data = read_pem(path)
    blocks = pem_blocks(data)
    certs = [block for label, block in blocks if label == b"CERTIFICATE"]
    if not certs:
        raise TlsFileError(path, "no PEM certificate in the file")
    key_path, key_block = path, next((block for label, block in blocks if label in _KEY_LABELS), None)
    if key_block is None:
        key_path = path + ".key"
        if not os.path.exists(key_path):
            raise TlsFileError(path, f"no private key in the file, and no {key_path}")
        key_block = next((b for lbl, b in pem_blocks(read_pem(key_path)) if lbl in _KEY_LABELS), None)
        if key_block is None:
            raise TlsFileError(key_path, "no PEM private key in the file")
    key = load_private_key(key_block, key_path, password)
    leaf = parse_certificate(certs[0], path)
    if _public_bytes(key.public_key()) != _public_bytes(leaf_cert_public_key(certs[0], path)):
        raise TlsFileError(key_path, "private key does not match the certificate")
    check_validity(leaf, path, now)
    for block in certs[1:]:
        parse_certificate(block, path)  # every chain element must at least parse
    return Identity(path, key_path, info_of(leaf, path), len(certs))


def is_encrypted_key(block: bytes) -> bool:
    """Whether a PEM key block is password-protected: PKCS#8 (``ENCRYPTED PRIVATE KEY``) or
    OpenSSL's traditional format (a ``Proc-Type: 4,ENCRYPTED`` header)."""
    return block.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") or b"Proc-Type: 4,ENCRYPTED" in block


def load_private_key(block: bytes, path: str, password: str | None):
    secret = password.encode() if password is not None else None
    try:
        return serialization.load_pem_private_key(block, password=secret)
    except TypeError:
        if secret is None:
            raise TlsFileError(path, "the private key is encrypted and no key_password is set") from None
        raise TlsFileError(path, "the private key is not encrypted, but a key_password is set") from None
    except ValueError:
        if secret is not None and is_encrypted_key(block):
            # A wrong password usually fails the padding check ("Incorrect password"), but one
            # in ~256 decrypts to garbage with valid padding, and then the DER parse fails:
            # both are a wrong password (or a damaged file) for the operator.
            raise TlsFileError(path, "cannot decrypt the private key: wrong key_password "
                               "(or the key is damaged)") from None
        raise TlsFileError(path, "cannot load the private key: not a valid PEM key") from None
    except Exception:  # cryptography raises UnsupportedAlgorithm and others
        raise TlsFileError(path, "cannot load the private key: unsupported key type") from None


def parse_certificate(block: bytes, path: str) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(block)
        # cryptography parses the names and extensions only when they are read: read them
        # now, so that a damaged certificate is refused here, with its file.
        cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), list(cert.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise TlsFileError(path, "a PEM certificate block cannot be parsed") from None
    return cert


def leaf_cert_public_key(block: bytes, path: str):
    try:
        return parse_certificate(block, path).public_key()
    except Exception:
        raise TlsFileError(path, "the certificate's public key type is not supported") from None


def _public_bytes(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_validity(cert: x509.Certificate, path: str, now: datetime.datetime | None = None) -> None:
    """Raises TlsFileError for a certificate expired or not valid yet."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise TlsFileError(path, f"certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if cert.not_valid_before_utc > now:
        raise TlsFileError(path, f"certificate not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")


def info_of(cert: x509.Certificate, path: str) -> CertificateInfo:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(names.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in names.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertificateInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        common_name=str(cns[0].value) if cns else None,
        dns_names=dns,
        ip_addresses=ips,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key_type=_key_type(cert),
    )


def _key_type(cert: x509.Certificate) -> str:
    try:
        key = cert.public_key()
    except Exception:
        return "unknown"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def load_ca_bundle(path: str) -> list[CertificateInfo]:
    """Every certificate of a CA bundle; raises TlsFileError if it has none or one is broken."""
    certs = [block for label, block in pem_blocks(read_pem(path)) if label == b"CERTIFICATE"]
    if not certs:
        raise TlsFileError(path, "no PEM certificate in the CA bundle")
    return [info_of(parse_certificate(block, path), path) for block in certs]


def load_crl(path: str, now: datetime.datetime | None = None) -> datetime.datetime | None:
    """Checks a CRL file (PEM); returns its nextUpdate (None if it has none).

    A CRL past its nextUpdate makes OpenSSL fail every verification it
    takes part in ("CRL has expired"), so it is refused at load.
    """
    blocks = [block for label, block in pem_blocks(read_pem(path)) if label == b"X509 CRL"]
    if not blocks:
        raise TlsFileError(path, "no PEM CRL (-----BEGIN X509 CRL-----) in the file")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    earliest = None
    for block in blocks:
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError:
            raise TlsFileError(path, "a CRL block cannot be parsed") from None
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now:
            raise TlsFileError(path, f"CRL expired: its next update was due {next_update:%Y-%m-%d %H:%M:%S} UTC")
        if next_update is not None and (earliest is None or next_update < earliest):
            earliest = next_update
    return earliest
