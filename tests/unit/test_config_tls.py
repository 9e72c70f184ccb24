"""The TLS keys of the configuration: HAProxy's names, checked at load with file, line and key."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, parse_config
from proxy.config.model import BindTls, ServerTls, TlsVerify

BASE = """
[frontends.amqps]
bind = "127.0.0.1:5671"
backend = "rabbit"
{frontend}

[backends.rabbit]
{backend}
[[backends.rabbit.servers]]
name = "a"
address = "rabbit-a.internal"
port = 5671
{server_a}
[[backends.rabbit.servers]]
name = "b"
address = "10.0.0.2"
port = 5672
{server_b}
"""


def load(frontend="", backend="", server_a="", server_b=""):
    return parse_config(BASE.format(frontend=frontend, backend=backend, server_a=server_a, server_b=server_b), "w.toml")


def problems(**parts) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(**parts)
    return [str(problem) for problem in caught.value.problems]


def test_a_frontend_terminates_tls_with_haproxy_defaults():
    config = load(frontend='[frontends.amqps.tls]\ncrt = "/etc/warren/amqps.pem"')
    assert config.frontends[0].tls == BindTls(crt=("/etc/warren/amqps.pem",))
    tls = config.frontends[0].tls
    assert (tls.ssl_min_ver, tls.ssl_max_ver, tls.verify, tls.tickets) == ("TLSv1.2", "TLSv1.3", TlsVerify.NONE, True)
    assert config.backends[0].servers[0].tls is None


def test_backend_tls_applies_to_every_server_and_a_server_may_override_or_opt_out():
    config = load(
        backend='tls = { ca_file = "/etc/ca.pem", sni = "rabbit.internal" }',
        server_a='tls = { sni = "rabbit-a.internal", crt = "/etc/client.pem" }',
        server_b="tls = false",
    )
    a, b = config.backends[0].servers
    assert a.tls == ServerTls(ca_file="/etc/ca.pem", sni="rabbit-a.internal", crt="/etc/client.pem")
    assert a.tls.verify is TlsVerify.REQUIRED
    assert b.tls is None
    config = load(server_a='tls = { verify = "none" }')
    assert config.backends[0].servers[0].tls == ServerTls(verify=TlsVerify.NONE)
    assert config.backends[0].servers[1].tls is None


def test_key_password_never_shows_in_a_repr():
    config = load(frontend='[frontends.amqps.tls]\ncrt = "/x.pem"\nkey_password = "hunter2"')
    assert "hunter2" not in repr(config)


@pytest.mark.parametrize(
    "parts, expected",
    [
        (dict(frontend='[frontends.amqps.tls]\nverify = "required"'),
         ['w.toml:5: frontends.amqps.tls.crt: missing required key']),
        (dict(frontend='[frontends.amqps.tls]\ncrt = "/x.pem"\nssl_min_ver = "TLSv1.3"\nssl_max_ver = "TLSv1.2"'),
         ['w.toml:5: frontends.amqps.tls: ssl_min_ver "TLSv1.3" is above ssl_max_ver "TLSv1.2"']),
        (dict(frontend='[frontends.amqps.tls]\ncrt = "/x.pem"\nssl_min_ver = "TLS1.2"'),
         ['w.toml:7: frontends.amqps.tls.ssl_min_ver: expected one of "TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3", '
          'got "TLS1.2"; did you mean "TLSv1.2"?']),
        (dict(frontend='[frontends.amqps.tls]\ncrt = "/x.pem"\nciphers = "NOTHING-AT-ALL"'),
         ['w.toml:7: frontends.amqps.tls.ciphers: no cipher can be selected with "NOTHING-AT-ALL"']),
        (dict(server_a='tls = { verify = "optional" }'),
         ['w.toml:13: backends.rabbit.servers[0].tls.verify: expected one of "none", "required", got "optional"']),
        (dict(server_b='tls = { verify = "none", crl_file = "/crl.pem" }'),
         ['w.toml:18: backends.rabbit.servers[1].tls: crl_file is useless with verify = "none" (server b)']),
        (dict(server_b="tls = true"),
         ['w.toml:18: backends.rabbit.servers[1].tls: expected false or a table (true is the default where the '
          'backend has [tls])']),
        (dict(backend='tls = { snii = "x" }'), ['w.toml:8: backends.rabbit.tls.snii: unknown key; did you mean "sni"?']),
    ],
)
def test_tls_mistakes_are_named_with_line_and_key(parts, expected):
    found = problems(**parts)
    for line in expected:
        assert any(problem.startswith(line) for problem in found), (line, found)


def test_verify_needs_a_ca_file():
    found = problems(frontend='[frontends.amqps.tls]\ncrt = "/x.pem"\nverify = "optional"')
    assert found == ['w.toml:5: frontends.amqps.tls: verify = "optional" needs ca_file (the CAs client certificates '
                     'are checked against)']


def test_ciphersuites_are_tls13_suite_names():
    config = load(frontend='[frontends.amqps.tls]\ncrt = "/x.pem"\nciphersuites = "TLS_AES_256_GCM_SHA384"')
    assert config.frontends[0].tls.ciphersuites == "TLS_AES_256_GCM_SHA384"
    found = problems(frontend='[frontends.amqps.tls]\ncrt = "/x.pem"\nciphersuites = "TLS_AES_256_GCM"')
    assert 'did you mean "TLS_AES_256_GCM_SHA384"?' in found[0]
