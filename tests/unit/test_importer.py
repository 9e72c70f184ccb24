"""`warren import` as a specification: what each HAProxy / keepalived directive becomes.

The realistic files live in tests/data/import/; small inline configs pin one
behaviour each. Everything here is pure (no file is written, passwords are
"hashed" by a visible stand-in).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import parse_config
from proxy.passwords import hash_password
from proxy.importer import ImportParseError, Status, import_configs
from proxy.importer.haproxy import parse_haproxy, split_words
from proxy.importer.keepalived import parse_keepalived

DATA = Path(__file__).resolve().parents[1] / "data" / "import"


def fake_hash(password: str) -> str:
    # A real scrypt hash (the loader refuses a malformed one), cheap and deterministic for comparisons.
    return hash_password(password, n=16, r=1, p=1, salt=b"importer-test-16")


def run(haproxy: str, keepalived: str | None = None):
    return import_configs((haproxy, "haproxy.cfg"),
                          (keepalived, "keepalived.conf") if keepalived is not None else None,
                          hash_password=fake_hash, runtime_dir="/run/test")


def data(name: str) -> tuple[str, str]:
    return (DATA / name).read_text(), name


def entries_at(result, path: str, line: int) -> list:
    return [entry for entry in result.entries if entry.path == path and entry.line == line]


def statuses_at(result, path: str, line: int) -> set[Status]:
    return {entry.status for entry in entries_at(result, path, line)}


def document(result) -> dict:
    return tomllib.loads(result.toml)


def production():
    return import_configs(data("production-haproxy.cfg"), data("production-keepalived.conf"),
                          hash_password=fake_hash, runtime_dir="/run/test")


# -- the realistic files ------------------------------------------------------------------------


def test_every_line_of_the_realistic_files_is_accounted_for_in_the_report():
    result = production()
    for name in ("production-haproxy.cfg", "production-keepalived.conf"):
        text = (DATA / name).read_text().splitlines()
        directive_lines = {n for n, raw in enumerate(text, 1)
                           if raw.strip() and not raw.strip().startswith(("#", "!", "}"))}
        reported = {entry.line for entry in result.entries if entry.path == name}
        assert directive_lines - reported == set(), name


def test_the_realistic_import_is_a_valid_configuration_with_its_sources_named():
    result = production()
    assert result.problems == ()
    config = parse_config(result.toml, "warren.toml")
    assert [f.name for f in config.frontends] == ["amqp", "amqp-tls", "management"]
    assert {b.name for b in config.backends} == {"rabbitmq", "management"}
    for source in ("production-haproxy.cfg:43: frontend amqp", "production-haproxy.cfg:52: backend rabbitmq",
                   "production-haproxy.cfg:60: server rmq1", "production-keepalived.conf:23: vrrp_instance VI_AMQP"):
        assert f"# {source}" in result.toml


def test_a_file_with_approximations_exits_2_and_a_clean_one_exits_0():
    assert production().exit_status == 2
    clean = import_configs(data("clean-haproxy.cfg"), data("clean-keepalived.conf"), hash_password=fake_hash)
    assert [str(e) for e in clean.entries if e.status is not Status.TRANSLATED] == []
    assert clean.exit_status == 0


def test_backend_settings_servers_and_health_are_translated():
    doc = document(production())
    backend = doc["backends"]["rabbitmq"]
    assert backend["balance"] == "leastconn" and backend["retries"] == 3 and backend["redispatch"] is True
    assert backend["timeout"] == {"connect": "5s", "queue": "10s", "server": "3h", "tunnel": "1h",
                                  "server_fin": "30s"}
    assert backend["health"] == {
        "kinds": ["amqp"], "inter": "2s", "fastinter": "500ms", "downinter": "5s", "rise": 2, "fall": 3,
        "slowstart": "30s", "on_marked_down": "shutdown-sessions", "timeout": "2s", "spread": 0.05,
    }
    servers = {s["name"]: s for s in backend["servers"]}
    assert servers["rmq1"] == {"name": "rmq1", "address": "10.0.1.11", "port": 5672, "weight": 100,
                               "maxconn": 4000, "send_proxy": "v2", "tls": False}  # the backend has [tls]
    assert servers["rmq3"]["address"] == "rabbit3.internal"
    assert servers["rmq-dr"]["backup"] is True and servers["rmq-dr"]["send_proxy"] == "v1"
    assert servers["rmq-old"]["weight"] == 0  # disabled: no new connections
    management = doc["backends"]["management"]
    assert management["health"]["kinds"] == ["http"] and management["health"]["inter"] == "5s"
    assert all(s["http_port"] == 15672 for s in management["servers"])


def test_frontends_global_resolvers_and_stats_are_translated():
    doc = document(production())
    amqp = doc["frontends"]["amqp"]
    assert amqp == {"bind": ["10.0.0.100:5672"], "backend": "rabbitmq", "maxconn": 10000, "backlog": 2048,
                    "timeout": {"client": "3h", "client_fin": "30s"}}
    assert doc["frontends"]["management"]["maxconn"] == 20000  # the global maxconn, per frontend
    assert doc["global"] == {"log_format": "json", "control_socket": "/run/test/warren.sock", "grace": "30s"}
    assert doc["resolvers"] == {"nameservers": ["10.0.0.2:53", "10.0.0.3:53"], "timeout": "1s", "interval": "10s"}
    stats = doc["stats"]
    assert stats["bind"] == ["*:8404"] and stats["uri"] == "/haproxy" and stats["realm"] == "Haproxy Statistics"
    assert stats["refresh"] == "10s" and stats["admin"] is True and stats["hide_version"] is True
    assert stats["users"] == {"admin": fake_hash("s3cr3t-Stats-Pass"), "viewer": fake_hash("an0ther-Pass")}


def test_the_vip_is_translated_from_keepalived():
    vip = document(production())["vip"]["VI_AMQP"]
    assert vip == {
        "interface": "eth0", "vrid": 51, "priority": 150, "advert_interval": "1s", "preempt": False,
        "preempt_delay": "10s", "source": "10.0.0.11", "peers": ["10.0.0.12"], "addresses": ["10.0.0.100/24"],
        "track": "rabbitmq", "weight": 60,
        "notify": {"master": "/usr/local/bin/vip-notify master", "backup": "/usr/local/bin/vip-notify backup",
                   "fault": "/usr/local/bin/vip-notify fault"},
        "garp": {"repeat_after": "5s", "burst": 3, "refresh_burst": 2, "refresh": "1m"},
    }


def test_what_warren_cannot_do_is_reported_with_the_reason():
    result = production()
    cfg = "production-haproxy.cfg"
    assert statuses_at(result, cfg, 10) == {Status.IGNORED}  # daemon
    assert "one process" in entries_at(result, cfg, 11)[0].note  # nbproc
    assert "systemd" in entries_at(result, cfg, 5)[0].note  # chroot
    assert statuses_at(result, cfg, 20) == {Status.IGNORED}  # tune.ssl.default-dh-param
    assert statuses_at(result, cfg, 64) >= {Status.APPROXIMATED}  # disabled
    assert statuses_at(result, "production-keepalived.conf", 44) == {Status.IGNORED}  # chk_disk, not HAProxy
    assert statuses_at(result, "production-keepalived.conf", 48) == {Status.IGNORED}  # track_interface eth1


def test_secrets_never_appear_in_the_report_or_the_output():
    result = production()
    report = "\n".join(str(entry) for entry in result.entries)
    for secret in ("s3cr3t-Stats-Pass", "an0ther-Pass", "kA1v3pw"):
        assert secret not in report and secret not in result.toml
    assert "stats auth admin:<hidden>" in report and "auth_pass <hidden>" in report


# -- suspicious values --------------------------------------------------------------------------


def suspicious():
    return import_configs(data("suspicious-haproxy.cfg"), data("suspicious-keepalived.conf"),
                          hash_password=fake_hash)


@pytest.mark.parametrize("path, line, words", [
    ("suspicious-haproxy.cfg", 7, "cut after 30s"),  # timeout client shorter than the AMQP heartbeat
    ("suspicious-haproxy.cfg", 8, "cut after 30s"),  # timeout server
    ("suspicious-haproxy.cfg", 11, "mode http in front of AMQP"),
    ("suspicious-haproxy.cfg", 13, "far below its servers' total maxconn 2000"),
    ("suspicious-haproxy.cfg", 17, "inter 2000s is 33m20s"),
    ("suspicious-haproxy.cfg", 18, "inter 2000s is 33m20s"),
    ("suspicious-keepalived.conf", 14, "clear-text password"),
    ("suspicious-keepalived.conf", 20, "150 - weight 20 = 130"),
])  # fmt: skip
def test_each_migration_trap_is_flagged_with_its_line(path, line, words):
    flagged = [e for e in entries_at(suspicious(), path, line) if e.status is Status.SUSPICIOUS]
    assert flagged and words in flagged[0].note


def test_suspicious_values_are_still_translated_as_written():
    result = suspicious()
    assert result.exit_status == 2 and result.problems == ()
    doc = document(result)
    assert doc["backends"]["rabbit"]["health"]["inter"] == "33m20s"
    assert doc["frontends"]["amqp"]["maxconn"] == 100


def test_a_weight_that_moves_the_vip_and_interval_in_milliseconds_are_not_suspicious():
    result = import_configs(data("clean-haproxy.cfg"), data("clean-keepalived.conf"), hash_password=fake_hash)
    assert not [e for e in result.entries if e.status is Status.SUSPICIOUS]


# -- small cases ---------------------------------------------------------------------------------

MINIMAL = """
defaults
    mode tcp
backend be
    server s1 10.0.0.1:5672 check
"""


def frontend(extra: str) -> str:
    return f"frontend fe\n    bind 127.0.0.1:5670\n    default_backend be\n{extra}\n" + MINIMAL


@pytest.mark.parametrize("balance, expected, status", [
    ("roundrobin", "roundrobin", Status.TRANSLATED), ("leastconn", "leastconn", Status.TRANSLATED),
    ("first", "first", Status.TRANSLATED), ("source", "source", Status.TRANSLATED),
    ("static-rr", "roundrobin", Status.APPROXIMATED), ("uri", "roundrobin", Status.APPROXIMATED),
])  # fmt: skip
def test_balance_algorithms(balance, expected, status):
    result = run(frontend("") + f"    balance {balance}\n")
    assert document(result)["backends"]["be"]["balance"] == expected
    line = len(frontend("").splitlines()) + 1
    assert statuses_at(result, "haproxy.cfg", line) == {status}


@pytest.mark.parametrize("bind, expected", [
    (":5672", "*:5672"), ("*:5672", "*:5672"), ("0.0.0.0:5672", "*:5672"), (":::5672", "[::]:5672"),
    ("ipv6@:5672", "[::]:5672"), ("10.1.2.3:5672", "10.1.2.3:5672"), ("[fd00::1]:5672", "[fd00::1]:5672"),
])  # fmt: skip
def test_bind_addresses(bind, expected):
    text = f"frontend fe\n    bind {bind}\n    default_backend be\n" + MINIMAL
    assert document(run(text))["frontends"]["fe"]["bind"] == [expected]


def test_a_comma_separated_bind_gives_several_addresses_and_a_unix_socket_is_reported():
    text = "frontend fe\n    bind 10.0.0.1:5672,10.0.0.2:5672\n    bind unix@/run/x.sock\n    default_backend be\n"
    result = run(text + MINIMAL)
    assert document(result)["frontends"]["fe"]["bind"] == ["10.0.0.1:5672", "10.0.0.2:5672"]
    assert statuses_at(result, "haproxy.cfg", 3) == {Status.IGNORED}


def test_servers_without_check_are_not_checked_and_without_port_default_to_amqp():
    text = "backend be\n    server a 10.0.0.1:5672 check\n    server b 10.0.0.2\n"
    result = run("frontend fe\n    bind *:5670\n    default_backend be\n" + text)
    servers = document(result)["backends"]["be"]["servers"]
    assert servers[1] == {"name": "b", "address": "10.0.0.2", "port": 5672, "check": False}
    assert Status.APPROXIMATED in statuses_at(result, "haproxy.cfg", 6)


def test_per_server_check_settings_that_differ_use_the_most_common_and_report_the_rest():
    text = ("backend be\n    server a 10.0.0.1:5672 check inter 3s\n    server b 10.0.0.2:5672 check inter 3s\n"
            "    server c 10.0.0.3:5672 check inter 9s\n")
    result = run("frontend fe\n    bind *:5670\n    default_backend be\n" + text)
    assert document(result)["backends"]["be"]["health"]["inter"] == "3s"
    assert Status.APPROXIMATED in statuses_at(result, "haproxy.cfg", 7)


def test_server_names_warren_refuses_are_rewritten_and_reported():
    result = run("frontend fe\n    bind *:5670\n    default_backend be\nbackend be\n    server rmq:1 10.0.0.1:5672\n")
    assert document(result)["backends"]["be"]["servers"][0]["name"] == "rmq-1"
    assert 'written "rmq-1"' in entries_at(result, "haproxy.cfg", 5)[0].note


def test_redispatch_follows_haproxy_whose_default_is_off():
    assert document(run(frontend("")))["backends"]["be"]["redispatch"] is False
    text = frontend("") + "    option redispatch\n"
    assert document(run(text))["backends"]["be"]["redispatch"] is True


def test_a_stats_page_without_login_gets_a_random_password_nobody_knows():
    text = MINIMAL + "listen stats\n    bind *:8404\n    stats enable\n"
    result = run("frontend fe\n    bind *:5670\n    default_backend be\n" + text)
    [user] = document(result)["stats"]["users"].items()
    assert user[0] == "admin" and user[1].startswith("scrypt$16$1$1$")
    assert any("warren hash-password" in e.note for e in result.entries)


def test_keepalived_sub_second_interval_multicast_and_generic_notify():
    keepalived = """
vrrp_instance front {
    interface lan0
    virtual_router_id 7
    advert_int 0.1
    virtual_ipaddress {
        192.0.2.10/24
        fd00::10/64
    }
    notify "/usr/local/bin/hook"
}
"""
    result = run(frontend(""), keepalived)
    vip = document(result)["vip"]["front"]
    assert vip["advert_interval"] == "100ms" and vip["addresses"] == ["192.0.2.10/24"]
    assert vip["notify"] == {"master": "/usr/local/bin/hook", "backup": "/usr/local/bin/hook",
                             "fault": "/usr/local/bin/hook"}
    assert any("second [vip]" in e.note for e in entries_at(result, "keepalived.conf", 8))


def test_vrrp_instances_whose_names_collide_become_separate_vips():
    # "VI:1" and "VI;1" are both written "VI-1" in Warren's alphabet, and "front" is given twice:
    # each instance must keep its own [vip.*] table (they used to merge, the last one winning).
    instances = "".join(f"""
vrrp_instance {name} {{
    interface lan0
    virtual_router_id {vrid}
    virtual_ipaddress {{
        192.0.2.{vrid}/24
    }}
}}
""" for name, vrid in (("VI:1", 11), ("VI;1", 12), ("front", 13), ("front", 14)))
    result = run(frontend(""), instances)
    vips = document(result)["vip"]
    assert {name: vip["vrid"] for name, vip in vips.items()} == {
        "VI-1": 11, "VI-1-2": 12, "front": 13, "front-2": 14}
    assert any('"front" is taken by another section: written "front-2"' in e.note
               for e in entries_at(result, "keepalived.conf", 26))
    assert any('name "VI;1" written "VI-1"' in e.note and '"VI-1" is taken by another section: written "VI-1-2"'
               in e.note for e in entries_at(result, "keepalived.conf", 10))


@pytest.mark.parametrize("second", ["backend be", "listen be", "frontend fe", "listen fe"])
def test_a_second_proxy_of_one_name_is_translated_and_flagged_as_haproxy_refuses_it(second):
    # haproxy -c: "backend 'be' has the same name as backend 'be' declared at ...", a fatal error.
    # Nothing may vanish from the output or the report: the second section gets a free name.
    haproxy = ("frontend fe\n    bind 127.0.0.1:5670\n    default_backend be\n"
               "backend be\n    server a 10.0.0.1:5672\n"
               f"{second}\n    bind 127.0.0.1:5671\n"
               + ("    default_backend be\n" if second.startswith("frontend") else "    server b 10.0.0.2:5672\n"))
    result = run(haproxy)
    [flag] = [e for e in entries_at(result, "haproxy.cfg", 6) if e.status == Status.SUSPICIOUS]
    assert f'second proxy named "{second.split()[1]}"' in flag.note
    assert result.exit_status == 2 and Status.TRANSLATED in statuses_at(result, "haproxy.cfg", 8)
    servers = {s["address"] for b in document(result)["backends"].values() for s in b["servers"]}
    assert servers >= {"10.0.0.1"} and ("10.0.0.2" in servers) == (second != "frontend fe")
    assert document(result)["frontends"]["fe"]["backend"] == "be"


def test_two_sections_translated_to_one_table_is_an_importer_bug_not_a_merge():
    from proxy.importer.draft import Draft
    draft = Draft()
    draft.new(("vip", "front"), "keepalived.conf:2")
    with pytest.raises(ValueError, match=r"two sections translated to \[vip.front\]"):
        draft.new(("vip", "front"), "keepalived.conf:9")


def test_an_output_warren_refuses_is_exit_1_with_its_problems():
    result = run("frontend fe\n    bind *:5670\n    default_backend nowhere\n")
    assert result.exit_status == 1
    assert any("nowhere" in problem for problem in result.problems)


# -- parsers ---------------------------------------------------------------------------------


def test_haproxy_words_follow_haproxy_quoting_and_comments():
    assert split_words(r'stats realm Haproxy\ Statistics # comment', "f", 1) == ["stats", "realm",
                                                                               "Haproxy Statistics"]
    assert split_words('log "a b" \'c d\' e\\#f', "f", 1) == ["log", "a b", "c d", "e#f"]


@pytest.mark.parametrize("text, line, words", [
    ("global\n    daemon\n    log \"unterminated\n", 3, "unterminated"),
    ("    maxconn 10\n", 1, "outside of any section"),
])
def test_unreadable_haproxy_names_the_line(text, line, words):
    with pytest.raises(ImportParseError) as raised:
        parse_haproxy(text, "h.cfg")
    assert raised.value.line == line and words in str(raised.value)


def test_each_proxy_section_sees_the_defaults_before_it():
    cfg = parse_haproxy("defaults\n  retries 1\nbackend a\ndefaults\n  retries 2\nbackend b\n", "h.cfg")
    a, b = cfg.of_kind("backend")
    assert a.last("retries").args == ("1",) and b.last("retries").args == ("2",)


@pytest.mark.parametrize("text, line", [
    ("vrrp_instance v {\n  interface eth0\n", 1),
    ("vrrp_instance v {\n}\n}\n", 3),
    ('vrrp_script s {\n  script "x\n}\n', 2),
])
def test_unreadable_keepalived_names_the_line(text, line):
    with pytest.raises(ImportParseError) as raised:
        parse_keepalived(text, "k.conf")
    assert raised.value.line == line


def test_keepalived_blocks_on_one_line_and_across_lines_read_the_same():
    one = parse_keepalived("vrrp_instance v { unicast_peer { 10.0.0.2 10.0.0.3 } }", "k")
    [instance] = one
    [peers] = instance.children
    assert peers.keyword == "unicast_peer" and [c.words for c in peers.children] == [("10.0.0.2", "10.0.0.3")]
    many = parse_keepalived("vrrp_instance v {\n  unicast_peer {\n    10.0.0.2\n    10.0.0.3\n  }\n}\n", "k")
    assert [c.words for c in many[0].children[0].children] == [("10.0.0.2",), ("10.0.0.3",)]


def test_the_broken_example_files_exit_1():
    with pytest.raises(ImportParseError):
        import_configs(data("broken-haproxy.cfg"), None, hash_password=fake_hash)
    with pytest.raises(ImportParseError) as raised:
        import_configs(data("clean-haproxy.cfg"), data("broken-keepalived.conf"), hash_password=fake_hash)
    assert raised.value.path == "broken-keepalived.conf" and raised.value.line == 1


def test_a_control_character_in_a_line_is_escaped_in_the_output_comment():
    # Found by tests/properties/test_importer_input.py: tomlkit refused the section's comment
    # ("backend rabbit\x08"), a traceback instead of a report.
    result = run("frontend fe\n    bind *:5670\n    default_backend be\x08\n"
                 "backend be\x08\n    server s1 10.0.0.1:5672\n")
    assert result.problems == () and "# haproxy.cfg:4: backend be\\x08\n" in result.toml
    assert list(document(result)["backends"]) == ["be-"] and document(result)["frontends"]["fe"]["backend"] == "be-"


def test_an_output_without_any_frontend_is_refused_as_warren_check_would():
    result = run(MINIMAL)
    assert result.exit_status == 1 and any("frontend" in problem for problem in result.problems)


def test_the_output_gets_the_file_checks_of_warren_check(tmp_path):
    import io

    from proxy.importer.command import import_main

    source = tmp_path / "haproxy.cfg"
    source.write_text("frontend fe\n    bind *:5671 ssl crt /nonexistent/amqp.pem\n    default_backend be\n" + MINIMAL)
    out, err = io.StringIO(), io.StringIO()
    assert import_main(str(source), None, None, stdout=out, stderr=err) == 2
    assert "warren import: check: <output>:" in err.getvalue() and "/nonexistent/amqp.pem" in err.getvalue()
    assert "[frontends.fe]" in out.getvalue()


_TEXT = st.text(alphabet=st.sampled_from(list("abc 019:.#\"'\\{}!\n\t-")), max_size=200)


@settings(max_examples=300, deadline=None)
@given(_TEXT)
def test_haproxy_parser_either_parses_or_names_a_line(text):
    try:
        parse_haproxy(text, "h.cfg")
    except ImportParseError as error:
        assert error.line is not None and 1 <= error.line <= max(1, len(text.splitlines()))


@settings(max_examples=300, deadline=None)
@given(_TEXT)
def test_keepalived_parser_either_parses_or_names_a_line(text):
    try:
        parse_keepalived(text, "k.conf")
    except ImportParseError as error:
        assert error.line is not None and 1 <= error.line <= max(1, len(text.splitlines()))


_WORD = st.text(alphabet=st.sampled_from(list("abcxyz019:./-")), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(_WORD, min_size=1, max_size=8))
def test_haproxy_words_written_plainly_read_back_the_same(words):
    assert split_words(" ".join(words), "h.cfg", 1) == words


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([
    "    daemon", "    maxconn 100", "    timeout connect 5s", "    balance leastconn", "    retries 2",
    "    option redispatch", "    server s 10.0.0.9:5672 check inter 3s", "    mode http", "    bind *:5690",
    "    nbproc 2", "    timeout client 10s", "    default_backend be", "    weird directive",
]), max_size=12))
def test_any_mix_of_directives_imports_to_a_valid_configuration(lines):
    text = "frontend fe\n    bind *:5670\n    default_backend be\n" + "\n".join(lines) + "\n" + MINIMAL
    result = run(text)
    assert result.problems == ()
    reported = {entry.line for entry in result.entries}
    assert all(n in reported for n, raw in enumerate(text.splitlines(), 1) if raw.strip())
