"""Properties of the TLS file loader (proxy/tls/files.py): whatever bytes sit in
a crt, key, CA or CRL file, loading it gives the certificate facts or a
TlsFileError naming the file and the reason; never another exception.

The files are arbitrary bytes, PEM blocks with random bodies, and real
certificates, keys and CRLs (made once here) damaged byte by byte, so the
DER parsers of `cryptography` see almost-valid input, not only base64 noise.
"""

from __future__ import annotations

import atexit
import base64
import datetime
import os
import shutil
import tempfile

from hypothesis import example, given
from hypothesis import strategies as st

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from proxy.tls.files import TlsFileError, load_ca_bundle, load_crl, load_identity

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone.utc)
DIRECTORY = tempfile.mkdtemp(prefix="warren-tls-props-")
atexit.register(shutil.rmtree, DIRECTORY, True)


def _material() -> dict[str, bytes]:
    """DER of one certificate (with SANs), its key and a CRL; PEM labels as keys."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "amqp.example.com")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("amqp.example.com")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crl = (x509.CertificateRevocationListBuilder().issuer_name(name).last_update(NOW)
           .next_update(NOW + datetime.timedelta(days=7)).sign(key, hashes.SHA256()))
    return {
        "CERTIFICATE": cert.public_bytes(serialization.Encoding.DER),
        "PRIVATE KEY": key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()),
        "ENCRYPTED PRIVATE KEY": key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                   serialization.BestAvailableEncryption(b"secret")),
        "X509 CRL": crl.public_bytes(serialization.Encoding.DER),
    }


MATERIAL = _material()
LABELS = [*MATERIAL, "RSA PRIVATE KEY", "EC PRIVATE KEY", "TRUSTED CERTIFICATE", "X"]


def pem(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN %s-----\n%s-----END %s-----\n" % (label.encode(), body, label.encode())


@st.composite
def damaged(draw, der: bytes) -> bytes:
    """`der` with a few bytes changed, removed or inserted, or cut short."""
    data = bytearray(der)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        how = draw(st.sampled_from(["flip", "set", "cut", "drop", "insert"]))
        if not data or how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "set":
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0x81, 0x82, 0xFF]))
        elif how == "cut":
            del data[at:]
        else:
            del data[at]
    return bytes(data)


@st.composite
def blocks(draw) -> bytes:
    label = draw(st.sampled_from(LABELS))
    source = MATERIAL.get(label, MATERIAL["CERTIFICATE"])
    der = draw(st.one_of(st.just(source), damaged(source), st.binary(max_size=300)))
    return pem(label, der)


pem_files = st.one_of(
    st.binary(max_size=600),
    st.lists(st.one_of(blocks(), st.binary(max_size=40)), min_size=1, max_size=4).map(b"".join),
)
passwords = st.sampled_from([None, "secret", "wrong"])


def written(name: str, data: bytes) -> str:
    path = os.path.join(DIRECTORY, name)
    with open(path, "wb") as file:
        file.write(data)
    return path


def refused_with_a_reason(error: TlsFileError, *paths: str) -> None:
    assert error.path in paths and error.reason and "\n" not in error.reason


# A certificate whose extensions do not parse (one byte of the SAN's OID): cryptography parses
# extensions lazily, so the certificate itself loads.
_SAN_OID = bytes.fromhex("0603551d11")
_BROKEN_EXTENSION = MATERIAL["CERTIFICATE"].replace(_SAN_OID, bytes.fromhex("0603551d0f"), 1)


@example(data=pem("CERTIFICATE", _BROKEN_EXTENSION) + pem("PRIVATE KEY", MATERIAL["PRIVATE KEY"]),
         key=None, password=None)
@given(data=pem_files, key=st.none() | pem_files, password=passwords)
def test_any_crt_file_loads_or_names_the_file_and_the_reason(data, key, password):
    path = written("crt.pem", data)
    key_path = path + ".key"
    if key is None:
        if os.path.exists(key_path):
            os.unlink(key_path)
    else:
        written("crt.pem.key", key)
    try:
        identity = load_identity(path, password, now=NOW)
    except TlsFileError as error:
        refused_with_a_reason(error, path, key_path)
    else:
        assert identity.leaf.not_after > NOW and identity.chain_length >= 1


@example(data=pem("CERTIFICATE", _BROKEN_EXTENSION))
@given(data=pem_files)
def test_any_ca_bundle_loads_or_names_the_file_and_the_reason(data):
    path = written("ca.pem", data)
    try:
        certificates = load_ca_bundle(path)
    except TlsFileError as error:
        refused_with_a_reason(error, path)
    else:
        assert certificates and all(info.path == path for info in certificates)


@given(data=pem_files)
def test_any_crl_file_loads_or_names_the_file_and_the_reason(data):
    path = written("crl.pem", data)
    try:
        next_update = load_crl(path, now=NOW)
    except TlsFileError as error:
        refused_with_a_reason(error, path)
    else:
        assert next_update is None or next_update >= NOW


def test_the_undamaged_material_loads():
    """The strategies start from files that load (else the properties test only refusals)."""
    path = written("good.pem", pem("CERTIFICATE", MATERIAL["CERTIFICATE"]) + pem("PRIVATE KEY",
                                                                                    MATERIAL["PRIVATE KEY"]))
    assert load_identity(path, now=NOW).leaf.dns_names == ("amqp.example.com",)
    assert len(load_ca_bundle(path)) == 1
    assert load_crl(written("good-crl.pem", pem("X509 CRL", MATERIAL["X509 CRL"])), now=NOW) is not None
