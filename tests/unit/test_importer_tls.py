"""`warren import` of HAProxy's TLS: bind and server ssl options and their global defaults.

Each test pins what one directive becomes in Warren's `tls` tables (or why
it does not), and that the output stays a configuration Warren loads.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import parse_config
from proxy.config.model import TlsVerify
from proxy.importer import Status
from tests.unit.test_importer import document, entries_at, run, statuses_at

BACKEND = """
backend be
    server s1 10.0.0.1:5672 check
"""


def frontend(bind_options: str, extra: str = "", head: str = "") -> str:
    """A config whose line 2 (3 with a one-line head...) is the TLS bind; ``head`` goes first (global...)."""
    return f"{head}frontend fe\n    bind 10.0.0.5:5671 {bind_options}\n    default_backend be\n{extra}" + BACKEND


def bind_line(text: str) -> int:
    return next(n for n, raw in enumerate(text.splitlines(), 1) if raw.strip().startswith("bind 10.0.0.5:5671"))


def config(result):
    assert result.problems == ()
    return parse_config(result.toml, "warren.toml")


# -- listening: bind ... ssl -------------------------------------------------------------------


def test_a_tls_bind_becomes_the_frontend_tls_table_and_a_clean_one_exits_0():
    text = frontend("ssl crt /etc/haproxy/amqp.pem crt /etc/haproxy/legacy.pem verify required "
                    "ca-file /etc/haproxy/clients.pem crl-file /etc/haproxy/clients.crl")
    result = run(text)
    assert document(result)["frontends"]["fe"]["tls"] == {
        "crt": ["/etc/haproxy/amqp.pem", "/etc/haproxy/legacy.pem"], "verify": "required",
        "ca_file": "/etc/haproxy/clients.pem", "crl_file": "/etc/haproxy/clients.crl"}
    tls = config(result).frontends[0].tls
    assert tls.verify is TlsVerify.REQUIRED and tls.crt == ("/etc/haproxy/amqp.pem", "/etc/haproxy/legacy.pem")
    assert result.exit_status == 0, [str(e) for e in result.entries if e.status is not Status.TRANSLATED]


def test_relative_paths_are_read_under_crt_base_and_ca_base():
    head = "global\n    crt-base /etc/ssl/private\n    ca-base /etc/ssl/certs\n"
    result = run(frontend("ssl crt amqp.pem verify optional ca-file ca.pem crl-file ca.crl", head=head))
    tls = document(result)["frontends"]["fe"]["tls"]
    assert tls["crt"] == "/etc/ssl/private/amqp.pem"
    assert (tls["ca_file"], tls["crl_file"]) == ("/etc/ssl/certs/ca.pem", "/etc/ssl/certs/ca.crl")
    assert statuses_at(result, "haproxy.cfg", 2) == statuses_at(result, "haproxy.cfg", 3) == {Status.TRANSLATED}


def test_plaintext_and_tls_binds_of_one_section_become_two_frontends_sharing_the_backend():
    text = ("frontend amqp\n    bind 10.0.0.5:5672\n    bind 10.0.0.5:5671 ssl crt /c.pem\n    maxconn 500\n"
            "    default_backend be\n" + BACKEND)
    result = run(text)
    frontends = document(result)["frontends"]
    assert frontends["amqp"]["bind"] == ["10.0.0.5:5672"] and "tls" not in frontends["amqp"]
    assert frontends["amqp-tls"]["bind"] == ["10.0.0.5:5671"] and frontends["amqp-tls"]["tls"] == {"crt": "/c.pem"}
    assert frontends["amqp"]["backend"] == frontends["amqp-tls"]["backend"] == "be"
    assert statuses_at(result, "haproxy.cfg", 4) == {Status.APPROXIMATED}  # maxconn: now per listener
    assert [f.name for f in config(result).frontends] == ["amqp", "amqp-tls"]


def test_a_section_named_like_a_split_tls_frontend_keeps_its_name_and_the_split_gets_a_free_one():
    # The split of "amqp" would be "amqp-tls", which another section is called: that section keeps its
    # name (the operator's), the split becomes "amqp-tls-2", and the report says so.
    text = ("frontend amqp\n    bind 10.0.0.5:5672\n    bind 10.0.0.5:5671 ssl crt /c.pem\n    default_backend be\n"
            "frontend amqp-tls\n    bind 10.0.0.6:5671 ssl crt /d.pem\n    default_backend be\n" + BACKEND)
    result = run(text)
    frontends = document(result)["frontends"]
    assert frontends["amqp-tls"]["tls"] == {"crt": "/d.pem"} and frontends["amqp-tls"]["bind"] == ["10.0.0.6:5671"]
    assert frontends["amqp-tls-2"]["tls"] == {"crt": "/c.pem"} and frontends["amqp-tls-2"]["bind"] == ["10.0.0.5:5671"]
    assert [f.name for f in config(result).frontends] == ["amqp", "amqp-tls-2", "amqp-tls"]
    assert any('"amqp-tls" is taken by another section: written "amqp-tls-2"' in e.note
               for e in entries_at(result, "haproxy.cfg", 1))


def test_sections_whose_names_warren_writes_alike_get_distinct_names():
    text = ("frontend a?b\n    bind 10.0.0.5:5672\n    default_backend b!e\n"
            "frontend a-b\n    bind 10.0.0.6:5672\n    default_backend b?e\n"
            "backend b!e\n    server s 10.0.0.1:5672\nbackend b?e\n    server s 10.0.0.2:5672\n")
    result = run(text)
    frontends, backends = document(result)["frontends"], document(result)["backends"]
    assert {name: table["backend"] for name, table in frontends.items()} == {"a-b-2": "b-e", "a-b": "b-e-2"}
    assert backends["b-e"]["servers"][0]["address"] == "10.0.0.1"
    assert backends["b-e-2"]["servers"][0]["address"] == "10.0.0.2"
    assert any('written "b-e-2"' in e.note for e in entries_at(result, "haproxy.cfg", 9))


def test_tls_binds_with_different_options_become_one_frontend_each_and_equal_ones_share():
    text = ("frontend fe\n    bind 10.0.0.5:5671 ssl crt /a.pem\n    bind 10.0.0.6:5671 ssl crt /a.pem\n"
            "    bind 10.0.0.7:5671 ssl crt /b.pem\n    default_backend be\n" + BACKEND)
    frontends = document(run(text))["frontends"]
    assert frontends["fe"]["bind"] == ["10.0.0.5:5671", "10.0.0.6:5671"]
    assert frontends["fe-tls"]["bind"] == ["10.0.0.7:5671"] and frontends["fe-tls"]["tls"]["crt"] == "/b.pem"


@pytest.mark.parametrize("options, reason", [
    ("ssl", "no certificate"),
    ("ssl crt-list /etc/haproxy/crt-list.txt", "no certificate"),
    ("ssl crt /c.pem verify required", "without ca-file"),
    ("ssl crt /c.pem crl-file /r.crl", "crl-file without ca-file"),
    ("ssl crt /c.pem ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.2", "no protocol version"),
])  # fmt: skip
def test_a_tls_bind_warren_cannot_serve_as_written_is_left_out_never_bound_in_clear(options, reason):
    text = frontend(options, head="frontend plain\n    bind *:5672\n    default_backend be\n")
    result = run(text)
    assert "10.0.0.5:5671" not in result.toml and "fe" not in document(result)["frontends"]
    assert "the frontend is left out" in entries_at(result, "haproxy.cfg", bind_line(text) - 1)[0].note
    left_out = [e for e in entries_at(result, "haproxy.cfg", bind_line(text)) if "left out" in e.note]
    assert left_out and left_out[0].status is Status.IGNORED and reason in left_out[0].note
    assert result.problems == () and result.exit_status == 2


def test_a_crt_list_beside_a_crt_is_reported_and_the_crt_served():
    text = frontend("ssl crt /c.pem crt-list /etc/haproxy/list.txt")
    result = run(text)
    assert document(result)["frontends"]["fe"]["tls"] == {"crt": "/c.pem"}
    notes = [e for e in entries_at(result, "haproxy.cfg", bind_line(text)) if "crt-list" in e.note]
    assert notes[0].status is Status.IGNORED and "list their certificates" in notes[0].note
    assert result.exit_status == 2  # not read: the operator must look


def test_global_bind_defaults_apply_and_a_bind_overrides_them():
    head = ("global\n    ssl-default-bind-ciphers ECDHE-ECDSA-AES128-GCM-SHA256\n"
            "    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256\n"
            "    ssl-default-bind-options ssl-min-ver TLSv1.3 no-tls-tickets\n")
    result = run(frontend("ssl crt /c.pem ciphers ECDHE-RSA-AES256-GCM-SHA384", head=head))
    assert document(result)["frontends"]["fe"]["tls"] == {
        "crt": "/c.pem", "ciphers": "ECDHE-RSA-AES256-GCM-SHA384", "ciphersuites": "TLS_AES_128_GCM_SHA256",
        "ssl_min_ver": "TLSv1.3", "ssl_max_ver": "TLSv1.3", "tickets": False}
    for line in (2, 3, 4):
        assert statuses_at(result, "haproxy.cfg", line) == {Status.TRANSLATED}, line
    config(result)


def test_global_tls_defaults_without_any_tls_listener_or_server_are_reported_unused():
    head = "global\n    ssl-default-bind-ciphers ECDHE-ECDSA-AES128-GCM-SHA256\n    ssl-default-server-options no-sslv3\n"
    result = run(head + "frontend fe\n    bind *:5672\n    default_backend be\n" + BACKEND)
    assert "no TLS listener" in entries_at(result, "haproxy.cfg", 2)[0].note
    assert "no TLS server" in entries_at(result, "haproxy.cfg", 3)[0].note


@pytest.mark.parametrize("options, expected, status", [
    ("ssl-min-ver TLSv1.3", ("TLSv1.3", "TLSv1.3"), Status.TRANSLATED),
    ("ssl-max-ver TLSv1.2", ("TLSv1.2", "TLSv1.2"), Status.TRANSLATED),
    ("no-tlsv13", ("TLSv1.2", "TLSv1.2"), Status.TRANSLATED),
    ("no-tlsv12", ("TLSv1.3", "TLSv1.3"), Status.TRANSLATED),
    ("force-tlsv12", ("TLSv1.2", "TLSv1.2"), Status.TRANSLATED),
    ("no-sslv3 no-tlsv10 no-tlsv11", None, Status.TRANSLATED),  # Warren's defaults already
    ("ssl-min-ver TLSv1.0", ("TLSv1.0", "TLSv1.3"), Status.SUSPICIOUS),
    ("ssl-min-ver SSLv3", ("TLSv1.0", "TLSv1.3"), Status.APPROXIMATED),
])  # fmt: skip
def test_protocol_versions(options, expected, status):
    text = frontend(f"ssl crt /c.pem {options}")
    result = run(text)
    tls = document(result)["frontends"]["fe"]["tls"]
    assert (tls.get("ssl_min_ver"), tls.get("ssl_max_ver")) == (expected or (None, None))
    assert status in statuses_at(result, "haproxy.cfg", bind_line(text))
    config(result)


@pytest.mark.parametrize("options, key", [
    ("ciphers NO-SUCH-CIPHER", "ciphers"),
    ("ciphersuites TLS_NO_SUCH_SUITE", "ciphersuites"),
])
def test_a_cipher_list_openssl_refuses_is_reported_and_the_defaults_kept(options, key):
    text = frontend(f"ssl crt /c.pem {options}")
    result = run(text)
    assert key not in document(result)["frontends"]["fe"]["tls"]
    assert Status.IGNORED in statuses_at(result, "haproxy.cfg", bind_line(text))
    config(result)


@pytest.mark.parametrize("option, status, words", [
    ("alpn amqp,h2", Status.IGNORED, "ALPN"),
    ("strict-sni", Status.APPROXIMATED, "first certificate"),
    ("curves X25519:P-256", Status.IGNORED, "groups"),
    ("ca-ignore-err all", Status.IGNORED, "refuses"),
    ("generate-certificates", Status.IGNORED, "forge"),
    ("prefer-client-ciphers", Status.IGNORED, "not configurable"),
])  # fmt: skip
def test_tls_options_without_an_equivalent_are_reported_with_the_reason(option, status, words):
    text = frontend(f"ssl crt /c.pem {option}")
    result = run(text)
    notes = [e for e in entries_at(result, "haproxy.cfg", bind_line(text)) if e.note.startswith(option)]
    assert notes and notes[0].status is status and words in notes[0].note
    assert document(result)["frontends"]["fe"]["tls"] == {"crt": "/c.pem"}


def test_no_tls_tickets_and_the_handshake_timeout():
    text = frontend("ssl crt /c.pem no-tls-tickets", extra="    timeout client-hs 2500ms\n")
    result = run(text)
    assert document(result)["frontends"]["fe"]["tls"] == {"crt": "/c.pem", "tickets": False,
                                                         "handshake_timeout": "2.5s"}
    assert statuses_at(result, "haproxy.cfg", 4) == {Status.TRANSLATED}


def test_ssl_options_on_a_bind_without_ssl_are_reported_unused():
    text = "frontend fe\n    bind *:5672 crt /c.pem\n    default_backend be\n" + BACKEND
    result = run(text)
    assert "tls" not in document(result)["frontends"]["fe"]
    assert any("no ssl" in e.note and e.status is Status.IGNORED for e in entries_at(result, "haproxy.cfg", 2))


def test_the_stats_page_over_https():
    text = ("frontend fe\n    bind *:5672\n    default_backend be\n" + BACKEND
            + "listen stats\n    bind *:8404 ssl crt /stats.pem\n    bind *:8405\n    stats enable\n"
              "    stats auth admin:pw\n")
    result = run(text)
    stats = document(result)["stats"]
    assert stats["tls"] == {"crt": "/stats.pem"} and stats["bind"] == ["*:8405", "*:8404"]
    assert Status.APPROXIMATED in statuses_at(result, "haproxy.cfg", 9)  # the clear bind: HTTPS too
    assert config(result).stats.tls.crt == ("/stats.pem",)


# -- towards brokers: server ... ssl ------------------------------------------------------------


def backend(servers: str, head: str = "", options: str = "") -> str:
    return f"{head}frontend fe\n    bind *:5672\n    default_backend be\nbackend be\n{options}{servers}"


def test_tls_servers_share_the_backend_tls_table_and_keep_their_own_names():
    text = backend("    default-server check ssl verify required ca-file /ca.pem crt /warren.pem\n"
                   "    server a 10.0.1.1:5671 sni str(rmq-a.internal)\n"
                   "    server b 10.0.1.2:5671 verifyhost rmq-b.internal\n"
                   "    server plain 10.0.1.3:5672 no-ssl\n")
    result = run(text)
    be = document(result)["backends"]["be"]
    assert be["tls"] == {"verify": "required", "ca_file": "/ca.pem", "crt": "/warren.pem"}
    servers = {s["name"]: s for s in be["servers"]}
    assert servers["a"]["tls"] == {"sni": "rmq-a.internal"} and servers["b"]["tls"] == {"sni": "rmq-b.internal"}
    assert servers["plain"]["tls"] is False
    loaded = {s.name: s for s in config(result).backends[0].servers}
    assert loaded["a"].tls.sni == "rmq-a.internal" and loaded["a"].tls.crt == "/warren.pem"
    assert loaded["plain"].tls is None
    assert result.exit_status == 0, [str(e) for e in result.entries if e.status is not Status.TRANSLATED]


def test_servers_that_share_nothing_get_their_own_tables():
    text = backend("    server a 10.0.1.1:5671 ssl verify none\n"
                   "    server b 10.0.1.2:5671 ssl ca-file @system-ca sni str(b.example)\n")
    result = run(text)
    be = document(result)["backends"]["be"]
    assert "tls" not in be
    assert [s["tls"] for s in be["servers"]] == [{"verify": "none"}, {"sni": "b.example"}]
    loaded = config(result).backends[0].servers
    assert loaded[0].tls.verify is TlsVerify.NONE and loaded[1].tls.ca_file is None  # the system's store


def test_a_verified_server_without_sni_is_warned_that_warren_also_checks_its_name():
    text = backend("    server a 10.0.1.1:5671 check ssl verify required ca-file /ca.pem\n")
    result = run(text)
    notes = [e for e in entries_at(result, "haproxy.cfg", 5) if e.status is Status.APPROXIMATED]
    assert notes and "10.0.1.1" in notes[0].note and "tls.sni" in notes[0].note


def test_an_sni_taken_from_the_connection_cannot_be_followed():
    text = backend("    server a 10.0.1.1:5671 ssl verify required ca-file /ca.pem sni ssl_fc_sni\n")
    result = run(text)
    assert "sni" not in document(result)["backends"]["be"]["tls"]
    assert Status.APPROXIMATED in statuses_at(result, "haproxy.cfg", 5)


def test_global_server_defaults_and_ssl_server_verify():
    head = ("global\n    ssl-server-verify none\n    ssl-default-server-ciphers ECDHE-RSA-AES128-GCM-SHA256\n"
            "    ssl-default-server-options ssl-min-ver TLSv1.3\n")
    result = run(backend("    server a 10.0.1.1:5671 ssl\n", head=head))
    assert document(result)["backends"]["be"]["tls"] == {
        "verify": "none", "ciphers": "ECDHE-RSA-AES128-GCM-SHA256", "ssl_min_ver": "TLSv1.3", "ssl_max_ver": "TLSv1.3"}
    for line in (2, 3, 4):
        assert statuses_at(result, "haproxy.cfg", line) == {Status.TRANSLATED}, line
    config(result)


def test_tls_options_on_a_server_without_ssl_are_reported_unused():
    result = run(backend("    server a 10.0.1.1:5672 verify required ca-file /ca.pem\n"))
    assert "tls" not in document(result)["backends"]["be"]
    assert {e.status for e in entries_at(result, "haproxy.cfg", 5) if "no ssl" in e.note} == {Status.IGNORED}


def test_send_proxy_v2_ssl_cn_is_warrens_send_proxy_v2():
    result = run(backend("    server a 10.0.1.1:5672 send-proxy-v2-ssl-cn\n"))
    assert document(result)["backends"]["be"]["servers"][0]["send_proxy"] == "v2"
    assert statuses_at(result, "haproxy.cfg", 5) == {Status.TRANSLATED}


def test_check_ssl_on_a_plaintext_server_checks_the_management_api_over_https():
    text = backend("    server m 10.0.1.1:15672 check check-ssl port 15671\n",
                   options="    option httpchk GET /api/health/checks/alarms\n")
    result = run(text)
    assert document(result)["backends"]["be"]["health"]["http"]["tls"] is True
    assert config(result).backends[0].health.http.tls is True


def test_check_ssl_on_a_tls_server_is_what_warren_does_anyway():
    result = run(backend("    server a 10.0.1.1:5671 check ssl check-ssl verify none alpn h2\n"))
    notes = entries_at(result, "haproxy.cfg", 5)
    assert any("checks use the server's TLS" in e.note and e.status is Status.TRANSLATED for e in notes)
    assert any(e.note.startswith("a: alpn h2") and e.status is Status.IGNORED for e in notes)


# -- whatever the mix, the output loads -----------------------------------------------------------

TLS_BIND_OPTIONS = ["crt /c.pem", "crt /d.pem", "verify required", "verify optional", "ca-file /ca.pem",
                    "crl-file /r.crl", "ssl-min-ver TLSv1.0", "ssl-max-ver TLSv1.2", "no-tlsv13", "force-tlsv12",
                    "ciphers BOGUS", "ciphersuites TLS_AES_128_GCM_SHA256", "alpn h2", "no-tls-tickets",
                    "crt-list /l.txt", "strict-sni", "ssl-min-ver SSLv3"]
TLS_SERVER_OPTIONS = ["ssl", "no-ssl", "verify none", "verify required", "ca-file /ca.pem", "crl-file /r.crl",
                      "sni str(x.example)", "sni ssl_fc_sni", "verifyhost y.example", "crt /w.pem", "check-ssl",
                      "ssl-max-ver TLSv1.2", "no-tlsv12", "ciphers BOGUS", "send-proxy-v2-ssl"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(TLS_BIND_OPTIONS), max_size=6),
       st.lists(st.lists(st.sampled_from(TLS_SERVER_OPTIONS), max_size=6), min_size=1, max_size=3))
def test_any_mix_of_tls_options_imports_to_a_valid_configuration(bind, servers):
    lines = "".join(f"    server s{i} 10.0.1.{i + 1}:5671 check {' '.join(options)}\n"
                    for i, options in enumerate(servers))
    text = f"frontend fe\n    bind *:5672\n    bind *:5671 ssl {' '.join(bind)}\n    default_backend be\n"
    result = run(text + "backend be\n" + lines)
    assert result.problems == ()
    reported = {entry.line for entry in result.entries}
    assert all(n in reported for n, raw in enumerate((text + "backend be\n" + lines).splitlines(), 1))
