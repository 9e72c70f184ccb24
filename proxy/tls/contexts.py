"""SSLContext factories: Warren as a TLS server (frontends, stats page) and as a client (brokers).

Defaults are the sound ones of a production load balancer: TLS 1.2 and 1.3
only, forward-secret AEAD ciphers for TLS 1.2 (Mozilla's "intermediate"
list without finite-field DHE, which needs parameters and is slow), OpenSSL's
TLS 1.3 suites, session tickets on, compression and renegotiation off. As a
client Warren verifies the broker's certificate and its name unless told
otherwise.

Python's ``ssl`` module has no way to set the TLS 1.3 suites (OpenSSL's
``SSL_CTX_set_ciphersuites``); :func:`set_ciphersuites` calls it on the
context's ``SSL_CTX`` through ctypes and reads the result back, refusing
when the two disagree, so a layout change in a future Python fails loudly
instead of silently keeping the defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ssl
import sys
from collections.abc import Iterable

from ..config.model import BindTls, ServerTls, TlsVerify
from .files import Identity

# Mozilla intermediate (v5.7) minus DHE: ECDHE + AEAD only.
DEFAULT_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))

_VERSIONS = {
    "TLSv1.0": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_VERIFY_MODES = {
    TlsVerify.NONE: ssl.CERT_NONE,
    TlsVerify.OPTIONAL: ssl.CERT_OPTIONAL,
    TlsVerify.REQUIRED: ssl.CERT_REQUIRED,
}


class ContextError(Exception):
    """OpenSSL refused a setting; the message says which."""


def bind_context(settings: BindTls, identity: Identity, password: str | None = None) -> ssl.SSLContext:
    """A server-side context presenting `identity` (one certificate of a frontend or the stats page)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(context, settings.ssl_min_ver, settings.ssl_max_ver, settings.ciphers, settings.ciphersuites)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    if not settings.tickets:
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    _load_identity(context, identity, password)
    if settings.verify is not TlsVerify.NONE:
        context.verify_mode = _VERIFY_MODES[settings.verify]
        context.load_verify_locations(cafile=settings.ca_file)
        if settings.crl_file:
            _add_crl(context, settings.crl_file)
    return context


def server_context(settings: ServerTls, identity: Identity | None, password: str | None = None) -> ssl.SSLContext:
    """A client-side context for connecting to brokers (and checking them)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _common(context, settings.ssl_min_ver, settings.ssl_max_ver, settings.ciphers, settings.ciphersuites)
    if settings.verify is TlsVerify.NONE:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        if settings.ca_file:
            context.load_verify_locations(cafile=settings.ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if settings.crl_file:
            _add_crl(context, settings.crl_file)
    if identity is not None:
        _load_identity(context, identity, password)
    return context


def _common(context: ssl.SSLContext, low: str, high: str, ciphers: str | None, suites: str | None) -> None:
    context.minimum_version = _VERSIONS[low]
    context.maximum_version = _VERSIONS[high]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # A peer that closes TCP without close_notify is the common case for AMQP
    # clients and RabbitMQ (it resets); treat it as an end, not an attack:
    # AMQP frames carry their own lengths, truncation is detected above us.
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    context.set_ciphers(ciphers or DEFAULT_CIPHERS)
    if suites:
        set_ciphersuites(context, suites)


def _load_identity(context: ssl.SSLContext, identity: Identity, password: str | None) -> None:
    context.load_cert_chain(identity.chain_path, identity.key_path, password=password)


def _add_crl(context: ssl.SSLContext, crl_file: str) -> None:
    # OpenSSL keeps CRLs in the verify store; the flag makes it consult them
    # for the peer's own certificate (HAProxy's crl-file does the same).
    context.load_verify_locations(cafile=crl_file)
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


# --- TLS 1.3 suites through OpenSSL directly ------------------------------------------------


class _PySSLContext(ctypes.Structure):
    # CPython's Modules/_ssl.c: typedef struct { PyObject_HEAD; SSL_CTX *ctx; ... } PySSLContext;
    _fields_ = [("ob_refcnt", ctypes.c_ssize_t), ("ob_type", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


def _libssl() -> ctypes.CDLL:
    import _ssl

    # The library _ssl is linked against is already loaded: CDLL returns that one.
    return ctypes.CDLL(_ssl.__file__)


def set_ciphersuites(context: ssl.SSLContext, suites: str) -> None:
    """``SSL_CTX_set_ciphersuites(ctx, suites)``; raises ContextError if it did not take."""
    if sys.implementation.name != "cpython":
        raise ContextError("ciphersuites needs CPython")
    ssl_ctx = _PySSLContext.from_address(id(context)).ctx
    lib = _libssl()
    setter = lib.SSL_CTX_set_ciphersuites
    setter.argtypes, setter.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int
    if not ssl_ctx or setter(ssl_ctx, suites.encode("ascii")) != 1:
        raise ContextError(f'OpenSSL refused ciphersuites "{suites}"')
    have = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.3"]
    if have != suites.split(":"):
        raise ContextError(f'ciphersuites "{suites}" did not take effect (OpenSSL reports {":".join(have)})')


def tls13_suites_of(context: ssl.SSLContext) -> list[str]:
    return [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.3"]


# --- SNI ---------------------------------------------------------------------------------


class SniTable:
    """Chooses a context by the server name a client asks for (HAProxy's crt-list by names).

    Exact names first, then wildcards (``*.example.com`` matches one label,
    as RFC 6125 section 6.4.3 allows); an unknown or absent name gets the
    default, the first certificate configured.
    """

    def __init__(self, default: ssl.SSLContext, entries: Iterable[tuple[tuple[str, ...], ssl.SSLContext]]):
        self.default = default
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        for names, context in entries:
            for name in names:
                name = name.lower().rstrip(".")
                target = self.wildcard if name.startswith("*.") else self.exact
                target.setdefault(name[2:] if name.startswith("*.") else name, context)

    def lookup(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        found = self.exact.get(name)
        if found is None:
            _, _, parent = name.partition(".")
            found = self.wildcard.get(parent) if parent else None
        return found or self.default

    def callback(self, sslobj, server_name: str | None, initial: ssl.SSLContext) -> None:
        """``SSLContext.sni_callback``: switch the handshake to the matching certificate."""
        chosen = self.lookup(server_name)
        if chosen is not initial:
            sslobj.context = chosen
