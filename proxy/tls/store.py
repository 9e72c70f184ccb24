"""The TLS material of one configuration: every context Warren serves or connects with.

:func:`build_material` reads every certificate, key, CA bundle and CRL the
configuration names, checks them (:mod:`proxy.tls.files`) and builds the
SSL contexts, all or nothing: a problem anywhere raises
:class:`TlsConfigError` listing every problem with its configuration key,
file and reason. Warren builds it at start and again on every SIGHUP (files
are re-read even when the configuration did not change), and swaps it in
only when complete, so an invalid new set never replaces a working one.
Connections keep the context they started with; only new ones see a new set.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass, field

from ..config.model import BindTls, Config, ServerTls, TlsVerify
from .contexts import ContextError, SniTable, bind_context, server_context
from .files import CertificateInfo, Identity, TlsFileError, expand_crt, load_ca_bundle, load_crl, load_identity

Path = tuple[str | int, ...]
EXPIRY_WARNING_DAYS = 30


class TlsConfigError(Exception):
    """The configuration's TLS files cannot all be used; ``issues`` lists ``(key path, message)``."""

    def __init__(self, issues: list[tuple[Path, str]]):
        self.issues = issues
        super().__init__("; ".join(message for _, message in issues))


@dataclass(frozen=True, slots=True)
class CertificateUse:
    """A certificate Warren presents, and where: for expiry metrics and `warren check`."""

    where: str  # "frontend amqps", "stats", "server rabbit/rmq-a"
    info: CertificateInfo


@dataclass(frozen=True, slots=True)
class BindSet:
    """A listening side's contexts: the default one (its sni_callback picks among the others)."""

    settings: BindTls
    sni: SniTable
    certificates: tuple[CertificateInfo, ...]

    @property
    def context(self) -> ssl.SSLContext:
        return self.sni.default


@dataclass(slots=True)
class TlsMaterial:
    frontends: dict[str, BindSet] = field(default_factory=dict)
    stats: BindSet | None = None
    servers: dict[tuple[str, str], ssl.SSLContext] = field(default_factory=dict)
    certificates: list[CertificateUse] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)  # "backend/server" reached with verify none
    loaded_at: float = 0.0

    def server(self, backend: str, server: str) -> ssl.SSLContext | None:
        return self.servers.get((backend, server))

    def expiring(self, days: int = EXPIRY_WARNING_DAYS, now: datetime.datetime | None = None) -> list[CertificateUse]:
        limit = days * 86400.0
        return [use for use in self.certificates if use.info.seconds_left(now) < limit]


def build_material(config: Config, *, now: datetime.datetime | None = None) -> TlsMaterial:
    """Everything TLS for `config`, or TlsConfigError with every problem."""
    builder = _Builder(now)
    for frontend in config.frontends:
        if frontend.tls is not None:
            built = builder.bind_set(frontend.tls, ("frontends", frontend.name, "tls"), f"frontend {frontend.name}")
            if built is not None:
                builder.material.frontends[frontend.name] = built
    if config.stats is not None and config.stats.tls is not None:
        builder.material.stats = builder.bind_set(config.stats.tls, ("stats", "tls"), "stats")
    for backend in config.backends:
        for index, server in enumerate(backend.servers):
            if server.tls is not None:
                at = ("backends", backend.name, "servers", index, "tls")
                context = builder.server_context(server.tls, at, f"server {backend.name}/{server.name}")
                if context is not None:
                    builder.material.servers[(backend.name, server.name)] = context
                if server.tls.verify is TlsVerify.NONE:
                    builder.material.unverified.append(f"{backend.name}/{server.name}")
    if builder.issues:
        raise TlsConfigError(builder.issues)
    return builder.material


class _Builder:
    def __init__(self, now: datetime.datetime | None):
        self.now = now
        self.issues: list[tuple[Path, str]] = []
        self.material = TlsMaterial()
        self._server_contexts: dict[ServerTls, ssl.SSLContext] = {}
        self._checked: dict[str, str | None] = {}  # CA/CRL path -> problem (each read once)

    def problem(self, at: Path, error: Exception) -> None:
        self.issues.append((at, str(error)))

    def bind_set(self, settings: BindTls, at: Path, where: str) -> BindSet | None:
        ok = self._verify_files(settings.ca_file, settings.crl_file, at)
        identities: list[tuple[Path, Identity]] = []
        for index, entry in enumerate(settings.crt):
            entry_at = at + ("crt",) + ((index,) if len(settings.crt) > 1 else ())
            try:
                for path in expand_crt(entry):
                    identities.append((entry_at, load_identity(path, settings.key_password, now=self.now)))
            except TlsFileError as error:
                self.problem(entry_at, error)
                ok = False
        if not ok:
            return None
        contexts = []
        for entry_at, identity in identities:
            try:
                contexts.append((identity, bind_context(settings, identity, settings.key_password)))
            except (ssl.SSLError, ContextError, OSError) as error:
                self.problem(entry_at, TlsFileError(identity.chain_path, _openssl_reason(error)))
                return None
        table = SniTable(contexts[0][1], [(identity.leaf.names, ctx) for identity, ctx in contexts])
        for _, context in contexts:
            context.sni_callback = table.callback
        for identity, _ in contexts:
            self.material.certificates.append(CertificateUse(where, identity.leaf))
        return BindSet(settings, table, tuple(identity.leaf for identity, _ in contexts))

    def server_context(self, settings: ServerTls, at: Path, where: str) -> ssl.SSLContext | None:
        if not self._verify_files(settings.ca_file, settings.crl_file, at):
            return None
        identity = None
        if settings.crt is not None:
            try:
                identity = load_identity(settings.crt, settings.key_password, now=self.now)
            except TlsFileError as error:
                self.problem(at + ("crt",), error)
                return None
            self.material.certificates.append(CertificateUse(where, identity.leaf))
        cached = self._server_contexts.get(settings)  # servers with the same settings share one
        if cached is not None:
            return cached
        try:
            context = server_context(settings, identity, settings.key_password)
        except (ssl.SSLError, ContextError, OSError) as error:
            self.problem(at, TlsFileError(settings.crt or settings.ca_file or "", _openssl_reason(error)))
            return None
        self._server_contexts[settings] = context
        return context

    def _verify_files(self, ca_file: str | None, crl_file: str | None, at: Path) -> bool:
        ok = True
        for key, path, check in (("ca_file", ca_file, load_ca_bundle), ("crl_file", crl_file, load_crl)):
            if path is None:
                continue
            if path not in self._checked:
                try:
                    check(path) if check is load_ca_bundle else check(path, self.now)
                    self._checked[path] = None
                except TlsFileError as error:
                    self._checked[path] = str(error)
            if self._checked[path] is not None:
                self.issues.append((at + (key,), self._checked[path]))
                ok = False
        return ok


def _openssl_reason(error: Exception) -> str:
    if isinstance(error, ssl.SSLError):
        return f"OpenSSL refused it: {error.reason or error}".replace("_", " ").lower()
    return str(error)
