"""HAProxy's TLS options (``bind ... ssl``, ``server ... ssl``, ``ssl-default-*``) into Warren's ``tls`` tables.

A bind line's options, after the ``ssl-default-bind-*`` lines of ``global``,
become a ``[frontends.<name>.tls]`` table (:func:`bind_tls`); a server's,
after ``ssl-default-server-*``, ``default-server`` and its own line, a
server ``tls`` table (:func:`server_tls`). Later options override earlier
ones, as in HAProxy. Relative ``crt`` paths are read under ``crt-base``,
``ca-file`` and ``crl-file`` under ``ca-base``.

Nothing is guessed: an option Warren cannot honour is reported (ignored or
approximated, with the reason); a listener whose security would change
(no certificate Warren can read, client verification without its CAs) is
left out and never bound in clear text. Cipher strings and TLS 1.3 suites
are checked with Warren's own validators, so the output always loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.config.durations import format_duration
from proxy.config.schema import Invalid
from proxy.config.sections import cipher_list, tls13_suites

from .haproxy import Line

Option = tuple[Line, str, "str | None"]

# HAProxy's names in order; Warren knows TLSv1.0 and up (SSLv3 is broken: RFC 7568).
VERSIONS = ("SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")
_DEFAULT_LOW, _DEFAULT_HIGH = VERSIONS.index("TLSv1.2"), VERSIONS.index("TLSv1.3")
_NO = {"no-sslv3": 0, "no-tlsv10": 1, "no-tlsv11": 2, "no-tlsv12": 3, "no-tlsv13": 4}
_FORCE = {"force-sslv3": 0, "force-tlsv10": 1, "force-tlsv11": 2, "force-tlsv12": 3, "force-tlsv13": 4}

# TLS options that take a value (bind and server lines, ssl-default-*-options).
VALUED = frozenset({
    "crt", "crt-list", "ca-file", "crl-file", "verify", "ciphers", "ciphersuites", "ssl-min-ver", "ssl-max-ver",
    "alpn", "npn", "curves", "ecdhe", "sigalgs", "client-sigalgs", "ca-sign-file", "ca-sign-pass",
    "ca-verify-file", "ca-ignore-err", "crt-ignore-err", "tls-ticket-keys", "sni", "verifyhost", "check-sni",
    "check-alpn", "ocsp-update",
})  # fmt: skip
_COMMON_FLAGS = frozenset({*_NO, *_FORCE})
BIND_WORDS = frozenset({
    *VALUED, *_COMMON_FLAGS, "ssl", "strict-sni", "no-tls-tickets", "tls-tickets", "prefer-client-ciphers",
    "no-prefer-client-ciphers", "generate-certificates", "allow-0rtt", "no-ca-names", "no-alpn",
})  # fmt: skip
SERVER_WORDS = frozenset({
    *VALUED, *_COMMON_FLAGS, "ssl", "no-ssl", "check-ssl", "no-check-ssl", "no-ssl-reuse", "ssl-reuse",
    "no-tls-tickets", "tls-tickets", "allow-0rtt", "no-alpn",
})  # fmt: skip

_NO_ALPN = "Warren announces no ALPN protocol; AMQP clients do not ask for one"
_BIND_IGNORED = {
    "alpn": _NO_ALPN, "npn": _NO_ALPN, "no-alpn": _NO_ALPN,
    "curves": "OpenSSL's default key-exchange groups are used (X25519, P-256, ...)",
    "ecdhe": "OpenSSL's default key-exchange groups are used (X25519, P-256, ...)",
    "sigalgs": "OpenSSL's default signature algorithms are used",
    "client-sigalgs": "OpenSSL's default signature algorithms are used",
    "prefer-client-ciphers": "the cipher preference order is not configurable in Warren",
    "no-prefer-client-ciphers": "the cipher preference order is not configurable in Warren",
    "generate-certificates": "Warren does not forge certificates",
    "ca-sign-file": "Warren does not forge certificates",
    "ca-sign-pass": "Warren does not forge certificates",
    "allow-0rtt": "no TLS 1.3 early data (0-RTT) in Warren",
    "no-ca-names": "Warren sends the CA names of ca_file to clients",
    "ca-verify-file": "client chains are completed from ca_file only",
    "ca-ignore-err": "Warren refuses every client certificate that fails verification",
    "crt-ignore-err": "Warren refuses every client certificate that fails verification",
    "tls-ticket-keys": "Warren makes and rotates its own ticket keys",
    "ocsp-update": "no OCSP stapling in Warren",
}
_SERVER_IGNORED = {
    "alpn": _NO_ALPN, "check-alpn": _NO_ALPN, "npn": _NO_ALPN, "no-alpn": _NO_ALPN,
    "curves": "OpenSSL's default key-exchange groups are used",
    "sigalgs": "OpenSSL's default signature algorithms are used",
    "client-sigalgs": "OpenSSL's default signature algorithms are used",
    "no-ssl-reuse": "session reuse towards brokers is not configurable in Warren",
    "ssl-reuse": "session reuse towards brokers is not configurable in Warren",
    "no-tls-tickets": "session reuse towards brokers is not configurable in Warren",
    "tls-tickets": "session reuse towards brokers is not configurable in Warren",
    "allow-0rtt": "no TLS 1.3 early data (0-RTT) in Warren",
}
SYSTEM_CA = "@system-ca"


@dataclass
class TlsGlobals:
    """What ``global`` says about TLS: path bases, server verification default, default options."""

    crt_base: str = ""
    ca_base: str = ""
    server_verify: tuple[str, Line] | None = None  # ssl-server-verify
    bind: list[Option] = field(default_factory=list)  # ssl-default-bind-* as options
    server: list[Option] = field(default_factory=list)  # ssl-default-server-* as options

    def crt(self, path: str) -> str:
        return _under(self.crt_base, path)

    def ca(self, path: str) -> str:
        return _under(self.ca_base, path)


def _under(base: str, path: str) -> str:
    return f"{base.rstrip('/')}/{path}" if base and not path.startswith("/") else path


def options(line: Line, words: tuple[str, ...] | list[str], valued: frozenset[str] = VALUED) -> list[Option]:
    """``words`` as (line, option, value) triples, the ``valued`` options taking the next word."""
    result: list[Option] = []
    rest = list(words)
    while rest:
        word = rest.pop(0)
        value = rest.pop(0) if word in valued and rest else None
        result.append((line, word, value))
    return result


def read_global(globals_: TlsGlobals, notes, line: Line) -> bool:
    """One ``global`` TLS line into ``globals_``; False when it is not one this module reads."""
    keyword, value = line.keyword, line.arg()
    if keyword == "crt-base" and value:
        globals_.crt_base = value
        notes.translated(line.number, line.words, f"relative crt paths are read under {value}")
    elif keyword == "ca-base" and value:
        globals_.ca_base = value
        notes.translated(line.number, line.words, f"relative ca-file and crl-file paths are read under {value}")
    elif keyword == "ssl-server-verify" and value in ("none", "required"):
        globals_.server_verify = (value, line)
    elif keyword in ("ssl-default-bind-ciphers", "ssl-default-server-ciphers") and value:
        _defaults(globals_, keyword).append((line, "ciphers", value))
    elif keyword in ("ssl-default-bind-ciphersuites", "ssl-default-server-ciphersuites") and value:
        _defaults(globals_, keyword).append((line, "ciphersuites", value))
    elif keyword in ("ssl-default-bind-options", "ssl-default-server-options"):
        _defaults(globals_, keyword).extend(options(line, line.args))
    else:
        return False
    return True


def _defaults(globals_: TlsGlobals, keyword: str) -> list[Option]:
    return globals_.bind if "-bind-" in keyword else globals_.server


class _Settings:
    """The Warren keys one list of options amounts to, with a report entry per option."""

    def __init__(self, notes, key: str):
        self.notes, self.key = notes, key  # key: "frontends.amqps.tls" (for the report)
        self.values: dict = {}
        self.low, self.high = _DEFAULT_LOW, _DEFAULT_HIGH
        self.version_lines: list[Line] = []

    def note(self, status: str, line: Line, text: str) -> None:
        getattr(self.notes, status)(line.number, line.words, text)

    def common(self, line: Line, word: str, value: str | None) -> bool:
        """Ciphers, suites and protocol versions (the same on both sides); False for other words."""
        shown = f"{word} {value}" if value is not None else word
        if word in ("ciphers", "ciphersuites") and value is not None:
            check = cipher_list if word == "ciphers" else tls13_suites
            try:
                self.values[word] = check(value)
            except Invalid as error:
                self.note("ignored", line, f"{shown}: {error}; Warren's default {word} are used")
                self.values.pop(word, None)
            else:
                self.note("translated", line, f"{self.key}.{word}")
        elif word in ("ssl-min-ver", "ssl-max-ver") and value in VERSIONS:
            if word == "ssl-min-ver":
                self.low = VERSIONS.index(value)
            else:
                self.high = VERSIONS.index(value)
            self._versions(line, shown)
        elif word in _NO:
            index = _NO[word]
            if self.low == index:
                self.low += 1
            if self.high == index:
                self.high -= 1
            self._versions(line, shown)
        elif word in _FORCE:
            self.low = self.high = _FORCE[word]
            self._versions(line, shown)
        else:
            return False
        return True

    def _versions(self, line: Line, shown: str) -> None:
        self.version_lines.append(line)
        self.note("translated", line, f"{shown}: {self.key}.ssl_min_ver / ssl_max_ver")

    def finish_versions(self) -> bool:
        """Writes the protocol range; False (reported) when no version Warren speaks is left."""
        if not self.version_lines:
            return True
        last = self.version_lines[-1]
        low = max(self.low, 1)
        if self.low == 0:
            self.note("approximated", last, "SSLv3 is broken (RFC 7568) and not offered: the lowest version is TLSv1.0")
        if low > self.high:
            self.note("ignored", last, f"no protocol version Warren speaks is left ({VERSIONS[self.low]} to "
                      f"{VERSIONS[self.high]})")
            return False
        if (low, self.high) != (_DEFAULT_LOW, _DEFAULT_HIGH):
            self.values["ssl_min_ver"], self.values["ssl_max_ver"] = VERSIONS[low], VERSIONS[self.high]
        if low < _DEFAULT_LOW:
            self.note("suspicious", last, f"{VERSIONS[low]} is allowed: TLS 1.0 and 1.1 are deprecated (RFC 8996) "
                      "and refused by current clients' defaults; raise ssl-min-ver unless a known client needs them")
        return True


def bind_tls(globals_: TlsGlobals, notes, line: Line, own: list[Option], key: str,
             handshake: tuple[float, Line] | None) -> dict | None:
    """A ``bind ... ssl`` line as a ``tls`` table; None (reported) when it must be left out."""
    settings = _Settings(notes, key)
    crt: list[str] = []
    crt_lists: list[Option] = []
    for option_line, word, value in [*globals_.bind, *own]:
        shown = f"{word} {value}" if value is not None else word
        if settings.common(option_line, word, value):
            continue
        if word == "ssl":
            settings.note("translated", option_line, f"TLS terminated by Warren ({key})")
        elif word == "crt" and value is not None:
            crt.append(globals_.crt(value))
            settings.note("translated", option_line, f"{key}.crt: PEM file(s) with chain and key (a key missing from "
                          "the file is read from <file>.key, as HAProxy does); a directory is read for *.pem")
        elif word == "crt-list":
            crt_lists.append((option_line, word, value))
        elif word in ("ca-file", "crl-file") and value is not None:
            if value == SYSTEM_CA:
                settings.note("ignored", option_line, f"{shown}: client certificates are checked against a CA "
                              "bundle file; name it")
                continue
            name = word.replace("-", "_")
            settings.values[name] = globals_.ca(value)
            settings.note("translated", option_line, f"{key}.{name}")
        elif word == "verify" and value in ("none", "optional", "required"):
            settings.values["verify"] = value
            settings.note("translated", option_line, f'{key}.verify = "{value}"')
        elif word == "no-tls-tickets":
            settings.values["tickets"] = False
            settings.note("translated", option_line, f"{key}.tickets = false")
        elif word == "tls-tickets":
            settings.values.pop("tickets", None)
            settings.note("translated", option_line, "session tickets are on by default")
        elif word == "strict-sni":
            settings.note("approximated", option_line, "strict-sni: Warren presents the first certificate when none "
                          "matches the name a client asks for, where HAProxy refused the handshake")
        elif word in _BIND_IGNORED:
            settings.note("ignored", option_line, f"{shown}: {_BIND_IGNORED[word]}")
        else:
            settings.note("ignored", option_line, f"{shown}: TLS option not supported by Warren")
    for option_line, word, value in crt_lists:
        settings.note("ignored", option_line, f"{word} {value}: crt-list files are not read; list their "
                      f"certificates in {key}.crt (Warren chooses among them by SNI from their names); per-certificate "
                      "options and SNI filters have no equivalent")
    reason = None
    if not crt:
        reason = "no certificate Warren can read (crt)"
    elif settings.values.get("verify", "none") != "none" and "ca_file" not in settings.values:
        reason = f'verify {settings.values["verify"]} without ca-file (the CAs client certificates must chain to)'
    elif "crl_file" in settings.values and "ca_file" not in settings.values:
        reason = "crl-file without ca-file"
    elif not settings.finish_versions():
        reason = "no protocol version left"
    if reason is not None:
        notes.ignored(line.number, line.words, f"a TLS listener with {reason}: left out; it is never bound in "
                      "clear text")
        return None
    settings.values["crt"] = crt if len(crt) > 1 else crt[0]
    if handshake is not None:
        seconds, handshake_line = handshake
        settings.values["handshake_timeout"] = format_duration(seconds)
        notes.translated(handshake_line.number, handshake_line.words, f"{key}.handshake_timeout")
    return settings.values


def server_tls(globals_: TlsGlobals, notes, server: str, address: str, own: list[Option],
               backend: str) -> tuple[dict | None, list[Option]]:
    """A server's TLS options (defaults first) as a ``tls`` table, or None for a plaintext server.

    Also returns the ``check-ssl``/``check-sni`` options, which the health translation decides on.
    """
    every = [*globals_.server, *own]
    enabled = False
    for _, word, _ in every:
        if word in ("ssl", "no-ssl"):
            enabled = word == "ssl"
    checks = [option for option in every if option[1] in ("check-ssl", "no-check-ssl", "check-sni")]
    if not enabled:
        explicit = any(word == "no-ssl" for _, word, _ in every)  # TLS defaults this server turns off
        for option_line, word, value in own:  # unused global defaults are reported once, as such
            shown = f"{word} {value}" if value is not None else word
            if word == "no-ssl":
                notes.translated(option_line.number, option_line.words, f"{server}: reached in clear")
            elif word in ("check-ssl", "no-check-ssl", "check-sni"):
                continue
            elif explicit:
                notes.translated(option_line.number, option_line.words,
                                 f"{server}: {shown}: not for this server, reached in clear (no-ssl)")
            else:
                notes.ignored(option_line.number, option_line.words,
                              f"{server}: {shown}: unused, the server is reached in clear (no ssl)")
        return None, checks
    key = f"backends.{backend}.servers.{server}.tls"
    settings = _Settings(notes, key)
    sni: tuple[str, Line] | None = None
    ssl_line: Line | None = None
    verifyhost: tuple[str, Line] | None = None
    if globals_.server_verify is not None:
        verify, verify_line = globals_.server_verify
        settings.values["verify"] = verify
        notes.translated(verify_line.number, verify_line.words, f'servers\' tls.verify = "{verify}" unless they set '
                         "their own")
    for option_line, word, value in every:
        shown = f"{word} {value}" if value is not None else word
        if word in ("check-ssl", "no-check-ssl", "check-sni") or settings.common(option_line, word, value):
            continue
        if word == "ssl":
            ssl_line = option_line
            settings.note("translated", option_line, f"{server}: reached over TLS ({key})")
        elif word == "no-ssl":
            settings.note("translated", option_line, f"{server}: TLS turned off, then on again by a later ssl")
        elif word == "verify" and value in ("none", "required"):
            settings.values["verify"] = value
            settings.note("translated", option_line, f'{key}.verify = "{value}"' + (
                " (Warren logs a warning at every start: the broker's certificate is not checked)"
                if value == "none" else ""))
        elif word in ("ca-file", "crl-file") and value is not None:
            name = word.replace("-", "_")
            if value == SYSTEM_CA:
                settings.values.pop(name, None)
                settings.note("translated", option_line, f"{key}: no ca_file, the system's trust store is used")
            else:
                settings.values[name] = globals_.ca(value)
                settings.note("translated", option_line, f"{key}.{name}")
        elif word == "crt" and value is not None:
            settings.values["crt"] = globals_.crt(value)
            settings.note("translated", option_line, f"{key}.crt: the client certificate shown to the broker")
        elif word == "sni" and value is not None:
            literal = _literal(value)
            if literal is None:
                settings.note("approximated", option_line, f"{server}: {shown}: Warren sends a fixed name, not one "
                              "taken from the connection; the name checked is the server's tls.sni or address")
            else:
                sni = (literal, option_line)
        elif word == "verifyhost" and value is not None:
            verifyhost = (value, option_line)
        elif word in _SERVER_IGNORED:
            settings.note("ignored", option_line, f"{server}: {shown}: {_SERVER_IGNORED[word]}")
        else:
            settings.note("ignored", option_line, f"{server}: {shown}: TLS option not supported by Warren")
    _name_checked(settings, server, address, sni, verifyhost, ssl_line)
    if not settings.finish_versions():
        settings.values.pop("ssl_min_ver", None)
        settings.values.pop("ssl_max_ver", None)
    if "crl_file" in settings.values and settings.values.get("verify") == "none":
        settings.values.pop("crl_file")
    return settings.values, checks


def _name_checked(settings: _Settings, server: str, address: str, sni: tuple[str, Line] | None,
                  verifyhost: tuple[str, Line] | None, ssl_line: Line | None) -> None:
    """Warren sends and checks one name (``tls.sni``); HAProxy has ``sni`` (sent) and ``verifyhost`` (checked)."""
    key = settings.key
    if verifyhost is not None:
        name, line = verifyhost
        settings.values["sni"] = name
        if sni is not None and sni[0] != name:
            settings.note("approximated", sni[1], f"{server}: Warren sends and checks one name: tls.sni = \"{name}\" "
                          f"(verifyhost) is sent as SNI instead of \"{sni[0]}\"")
        settings.note("translated", line, f'{key}.sni = "{name}": the name the certificate must carry')
    elif sni is not None:
        name, line = sni
        settings.values["sni"] = name
        settings.note("translated", line, f'{key}.sni = "{name}": sent, and checked against the certificate')
    elif settings.values.get("verify", "required") == "required" and ssl_line is not None:
        settings.note("approximated", ssl_line, f"{server}: HAProxy checked only the certificate's chain here (no sni "
                      f"or verifyhost); Warren also checks that it names the server's address ({address}): make sure "
                      "it is among the certificate's names, or set tls.sni to the name it carries")


def _literal(expression: str) -> str | None:
    """The name in ``str(name)``; None for any other sample expression (``ssl_fc_sni``, ``req.hdr(host)``...)."""
    if expression.startswith("str(") and expression.endswith(")"):
        return expression[4:-1] or None
    return None
