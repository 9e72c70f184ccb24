"""Specification of the configuration loader: what loads, and how every mistake is reported."""

from __future__ import annotations

import random
from pathlib import Path
from textwrap import dedent

import pytest

from proxy.config import (
    Balance,
    BindAddress,
    CheckKind,
    ConfigError,
    Health,
    InitState,
    Problem,
    RelayPath,
    SendProxy,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
)
from proxy.config.locate import key_lines, locate

ROOT = Path(__file__).resolve().parents[2]
FILE = "conf/warren.toml"

SERVERS = """\
[backends.rabbit]
servers = [{ name = "r1", address = "127.0.0.1", port = 5672 }]
"""
ONE_SERVER = 'servers = [{ name = "s", address = "h", port = 1 }]'


def problems(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        parse_config(dedent(text), FILE)
    return caught.value.problems


def only_problem(text: str) -> Problem:
    (problem,) = problems(text)
    return problem


# --- every kind of mistake names the key path and the line -------------------------


def test_an_out_of_range_port_in_a_multiline_inline_array_names_element_and_line():
    problem = only_problem(
        """\
        [backends.rabbit]
        servers = [
          { name = "r1", address = "10.0.0.11", port = 5672 },
          { name = "r2", address = "10.0.0.12", port = 5672 },
          { name = "r3", address = "10.0.0.13", port = 70000 },
        ]
        """
    )
    assert str(problem) == "conf/warren.toml:5: backends.rabbit.servers[2].port: expected 1-65535, got 70000"


def test_an_unknown_key_is_named_and_the_closest_valid_key_suggested():
    problem = only_problem(
        SERVERS
        + """\
        [frontends.amqp]
        bind = "127.0.0.1:5670"
        backend = "rabbit"
        maxcon = 10
        """
    )
    assert (problem.key, problem.line) == ("frontends.amqp.maxcon", 6)
    assert problem.message == 'unknown key; did you mean "maxconn"?'


def test_an_unknown_key_without_a_close_match_gets_no_suggestion():
    problem = only_problem(SERVERS + "[global]\ncolour = 'blue'\n")
    assert (problem.key, problem.line, problem.message) == ("global.colour", 4, "unknown key")


def test_a_wrong_type_says_what_was_expected_and_what_was_found():
    problem = only_problem(SERVERS + 'retries = "3"\n')
    assert (problem.key, problem.line) == ("backends.rabbit.retries", 3)
    assert problem.message == 'expected integer, got string "3"'


def test_booleans_are_not_integers():
    problem = only_problem(SERVERS + "retries = true\n")
    assert (problem.key, problem.line, problem.message) == (
        "backends.rabbit.retries",
        3,
        "expected integer, got boolean true",
    )


def test_a_duplicate_server_name_points_at_the_second_server():
    problem = only_problem(
        """\
        [[backends.rabbit.servers]]
        name = "r1"
        address = "10.0.0.11"
        port = 5672

        [[backends.rabbit.servers]]
        name = "r1"
        address = "10.0.0.12"
        port = 5672
        """
    )
    assert (problem.key, problem.line) == ("backends.rabbit.servers[1].name", 7)
    assert problem.message == 'duplicate server name "r1" (already used by backends.rabbit.servers[0])'


def test_a_frontend_naming_an_undefined_backend_is_a_dangling_reference():
    problem = only_problem(SERVERS + '[frontends.amqp]\nbind = "*:5670"\nbackend = "rabit"\n')
    assert (problem.key, problem.line) == ("frontends.amqp.backend", 5)
    assert problem.message == 'dangling backend reference: no backend named "rabit"; did you mean "rabbit"?'


def test_two_frontends_on_one_address_are_a_duplicate_bind():
    problem = only_problem(
        SERVERS
        + """\
        [frontends.a]
        bind = "127.0.0.1:5670"
        backend = "rabbit"
        [frontends.b]
        bind = ["127.0.0.1:5671", "127.0.0.1:5670"]
        backend = "rabbit"
        """
    )
    assert (problem.key, problem.line) == ("frontends.b.bind[1]", 7)
    assert problem.message == "duplicate bind: 127.0.0.1:5670 is already bound by frontends.a.bind"


def test_the_stats_page_cannot_share_a_frontend_address_even_via_a_wildcard():
    problem = only_problem(
        SERVERS
        + """\
        [frontends.a]
        bind = "*:8080"
        backend = "rabbit"
        [stats]
        bind = "127.0.0.1:8080"
        users = { admin = "pw" }
        """
    )
    assert (problem.key, problem.line) == ("stats.bind", 7)
    assert "overlaps 0.0.0.0:8080 bound by frontends.a.bind" in problem.message


@pytest.mark.parametrize(
    "first, second",
    [("127.0.0.1:5670", "127.0.0.1:5671"), ("*:5670", "[::]:5670"), ("127.0.0.1:0", "127.0.0.1:0")],
)
def test_listeners_that_do_not_overlap_are_fine(first, second):
    config = parse_config(
        SERVERS
        + f'[frontends.a]\nbind = "{first}"\nbackend = "rabbit"\n'
        + f'[frontends.b]\nbind = "{second}"\nbackend = "rabbit"\n',
        FILE,
    )
    assert len(config.frontends) == 2


def test_a_bad_duration_names_the_key_and_explains_the_syntax():
    problem = only_problem(SERVERS + '[backends.rabbit.timeout]\nconnect = "10"\n')
    assert (problem.key, problem.line) == ("backends.rabbit.timeout.connect", 4)
    assert problem.message.startswith('missing unit in "10": write "10ms" or "10s"')


@pytest.mark.parametrize(
    "bind, message",
    [
        (":5670", '":5670" is ambiguous: write "*:5670" for all IPv4 addresses or "[::]:5670"'),
        ("rabbit.example:5670", '"rabbit.example" in "rabbit.example:5670" is not an IP address'),
        ("127.0.0.1", 'missing port in "127.0.0.1"'),
        ("::1", 'write IPv6 listening addresses in brackets with a port, e.g. "[::1]:5670"'),
        ("127.0.0.1:99999", 'expected port 0-65535 in "127.0.0.1:99999", got 99999'),
        ("[127.0.0.1]:5670", "brackets are for IPv6 addresses only"),
    ],
)
def test_a_bad_bind_address_is_explained(bind, message):
    problem = only_problem(SERVERS + f'[frontends.a]\nbackend = "rabbit"\nbind = "{bind}"\n')
    assert (problem.key, problem.line) == ("frontends.a.bind", 5)
    assert problem.message.startswith(message)


@pytest.mark.parametrize("address", ["10.0.0.300", "rabbit_1.local", "-rabbit", "rabbit..local", "[::1]", "h:5672"])
def test_a_server_address_must_be_an_ip_literal_or_a_dns_hostname(address):
    problem = only_problem(f'[backends.b]\nservers = [{{ name = "s", address = "{address}", port = 1 }}]\n')
    assert (problem.key, problem.line) == ("backends.b.servers[0].address", 2)


def test_a_toml_syntax_error_reports_the_line_tomllib_names():
    problem = only_problem(SERVERS + "[frontends.a]\nbind = \n")
    assert (problem.key, problem.line) == ("", 4)
    assert str(problem) == "conf/warren.toml:4: invalid TOML: Invalid value (at line 4, column 8)"


def test_a_syntax_error_at_the_end_of_the_document_points_at_the_last_line():
    problem = only_problem(SERVERS + "tags = [1,\n")
    assert problem.line == 3
    assert problem.message == "invalid TOML: Invalid value (at end of document)"


def test_a_missing_file_cannot_be_read(tmp_path):
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert [str(p) for p in caught.value.problems] == [f"{missing}: cannot read: No such file or directory"]


def test_a_file_that_is_not_utf8_cannot_be_read(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[global]\n# caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "cannot read: not UTF-8 text" in str(caught.value)


def test_a_missing_required_key_points_at_its_table():
    problem = only_problem(
        """\
        [backends.rabbit]
        retries = 2

        [[backends.rabbit.servers]]
        name = "r1"
        address = "10.0.0.11"
        """
    )
    assert (problem.key, problem.line, problem.message) == (
        "backends.rabbit.servers[0].port",
        4,
        "missing required key",
    )


def test_all_problems_in_a_file_are_reported_at_once_in_file_order():
    found = problems(
        """\
        [global]
        log_level = "verbose"
        [frontends.amqp]
        bind = "*:5670"
        backend = "rabbit"
        backlog = 0
        [backends.rabbit]
        balance = "round-robin"
        [[backends.rabbit.servers]]
        name = "r1"
        address = "10.0.0.11"
        port = 0
        """
    )
    assert [(p.line, p.key) for p in found] == [
        (2, "global.log_level"),
        (6, "frontends.amqp.backlog"),
        (8, "backends.rabbit.balance"),
        (12, "backends.rabbit.servers[0].port"),
    ]
    assert 'did you mean "roundrobin"?' in found[2].message
    assert str(ConfigError(found)).count("\n") == 3


def test_the_file_name_and_an_unknown_line_are_left_out_of_the_message_as_documented():
    assert str(Problem("f.toml", "a.b", None, "boom")) == "f.toml: a.b: boom"
    assert str(Problem("f.toml", "", 3, "boom")) == "f.toml:3: boom"


# --- ranges and types, section by section -------------------------------------------


@pytest.mark.parametrize(
    "snippet, key, message",
    [
        ("[frontends.f]\nbind='*:1'\nbackend='rabbit'\nmaxconn=0", "frontends.f.maxconn", "expected at least 1, got 0"),
        ("[frontends.f]\nbind='*:1'\nbackend='rabbit'\nbacklog=65536", "frontends.f.backlog", "expected 1-65535, got 65536"),
        (f"[backends.b]\n{ONE_SERVER}\nretries = 101", "backends.b.retries", "expected 0-100, got 101"),
        (f"[backends.b]\n{ONE_SERVER}\nredispatch = 1", "backends.b.redispatch", "expected boolean, got integer 1"),
        ("[backends.rabbit.health]\nrise = 0", "backends.rabbit.health.rise", "expected at least 1, got 0"),
        ("[backends.rabbit.health]\nfall = 0", "backends.rabbit.health.fall", "expected at least 1, got 0"),
        ("[backends.rabbit.health]\nspread = 0.6", "backends.rabbit.health.spread", "expected 0-0.5, got 0.6"),
        ("[backends.rabbit.health]\nerror_limit = 0", "backends.rabbit.health.error_limit", "expected at least 1, got 0"),
        ("[backends.rabbit.health]\ninter = 0", "backends.rabbit.health.inter", "expected a duration above 0"),
        ("[backends.rabbit.health]\ntimeout = '0s'", "backends.rabbit.health.timeout", "expected a duration above 0"),
        ("[backends.rabbit.health]\nkinds = ['tcp', 'ping']", "backends.rabbit.health.kinds[1]", 'expected one of "tcp"'),
        ("[backends.rabbit.health]\nkinds = ['tcp', 'tcp']", "backends.rabbit.health.kinds[1]", 'duplicate "tcp"'),
        ("[backends.rabbit.health]\ninit_state = 'maybe'", "backends.rabbit.health.init_state", 'expected one of "up"'),
        ("[backends.rabbit.health.http]\nexpect = [200, 600]", "backends.rabbit.health.http.expect[1]", "expected 100-599"),
        ("[backends.rabbit.health.http]\npath = 'health'", "backends.rabbit.health.http.path", 'starting with "/"'),
        ("[backends.rabbit.health.amqp]\nheartbeat = '500ms'", "backends.rabbit.health.amqp.heartbeat", "whole seconds"),
        ("[global]\nlog_format = 'xml'", "global.log_format", 'expected one of "console", "json", got "xml"'),
        ("[global]\ngrace = -1", "global.grace", "a duration cannot be negative, got -1"),
        ("[global]\ncontrol_socket = ''", "global.control_socket", "expected a non-empty string"),
        ("[global]\nrelay = 'sockmap'", "global.relay", 'expected one of "auto", "kernel", "splice", "copy", got "sockmap"'),
        ("[frontends.f]\nbind='*:1'\nbackend='rabbit'\nbulk='yes'", "frontends.f.bulk", 'expected boolean, got string "yes"'),
        ("[resolvers]\nnameservers = ['dns.example']", "resolvers.nameservers[0]", "is not an IP address"),
        ("[resolvers]\ninterval = 1.5", "resolvers.interval", "expected duration"),
        ("[stats]\nbind = '*:80'\nusers = { 'a:b' = 'pw' }", 'stats.users."a:b"', 'invalid user name "a:b"'),
        ("[stats]\nbind = '*:80'\nusers = {}", "stats.users", "expected at least one entry"),
        ("[stats]\nbind = '*:80'\nusers = { a = 'pw' }\nuri = 'stats'", "stats.uri", 'starting with "/"'),
        ("[stats]\nbind = []\nusers = { a = 'pw' }", "stats.bind", "expected a string or a non-empty array"),
        ("[stats]\nbind = '*:80'", "stats.users", "missing required key"),
        ("[stats]\nbind = '*:80'\nusers = { a = 'scrypt$xyz' }", "stats.users.a", "malformed password hash"),
        ("[stats]\nbind = '*:80'\nusers = { a = 'scrypt$2$1$1$AAAA$BBBB' }", "stats.users.a", "salt or key too short"),
        ("[stats]\nbind = '*:80'\nusers = { alice = 'pw' }\nadmins = ['alcie']", "stats.admins[0]",
         'no user "alcie" in stats.users; did you mean "alice"?'),
        ("[stats]\nbind = '*:80'\nusers = { a = 'pw' }\nadmins = 'a'", "stats.admins", "expected array"),
        ("[frontends.'bad name']\nbind='*:1'\nbackend='rabbit'", 'frontends."bad name"', 'invalid name "bad name"'),
        ("[backends.b]\nservers = []", "backends.b.servers", "expected at least one server"),
        ("[backends.b]\nretries = 1", "backends.b.servers", "missing required key"),
        ("[backends.b]\nservers = 'r1'", "backends.b.servers", 'expected array of tables, got string "r1"'),
        ("frontends = 3", "frontends", "expected table, got integer 3"),
    ],
)
def test_each_value_is_checked_for_type_and_range(snippet, key, message):
    # Top-level keys must come before the first table header.
    text = SERVERS + snippet if snippet.startswith("[") else snippet + "\n" + SERVERS
    problem = only_problem(text + "\n")
    assert problem.key == key
    assert message in problem.message
    assert problem.line is not None


def test_server_weight_maxconn_and_ports_have_their_ranges():
    found = problems(
        """\
        [backends.b]
        servers = [{ name = "s", address = "h", port = 1, weight = 257, maxconn = -1, check_port = 0, http_port = 65536 }]
        """
    )
    assert [(p.key, p.message) for p in found] == [
        ("backends.b.servers[0].weight", "expected 0-256, got 257"),
        ("backends.b.servers[0].maxconn", "expected at least 0, got -1"),
        ("backends.b.servers[0].check_port", "expected 1-65535, got 0"),
        ("backends.b.servers[0].http_port", "expected 1-65535, got 65536"),
    ]


# --- what a valid file becomes ---------------------------------------------------------


def test_defaults_come_from_the_model_when_keys_are_absent():
    config = parse_config(SERVERS, FILE)
    backend = config.backend("rabbit")
    assert config.path == FILE
    assert config.frontends == () and config.stats is None
    assert config.global_.log_level == "info" and config.global_.grace == 30.0
    assert config.resolvers.nameservers == ()
    assert backend.balance is Balance.ROUNDROBIN and backend.retries == 3 and backend.redispatch
    assert backend.timeout.connect == 5.0 and backend.timeout.tunnel is None
    assert backend.health == Health()
    assert backend.server("r1").weight == 1 and backend.server("r1").check_port is None


def test_a_full_file_builds_every_section():
    config = parse_config(
        dedent(
            """\
            [global]
            log_format = "json"
            log_level = "debug"
            grace = "1m30s"
            control_socket = "/run/warren.sock"
            relay = "splice"

            [resolvers]
            nameservers = ["10.0.0.2", "[::1]:5353"]
            interval = "1m"

            [frontends.amqp]
            bind = ["*:5670", "[::]:5670", "[::1]:5671"]
            backend = "rabbit"
            timeout = { client = "3h", client_fin = 0 }
            bulk = true

            [backends.rabbit]
            balance = "leastconn"
            timeout.tunnel = "1d"
            timeout.queue = 500
            health.kinds = ["amqp", "watch", "http"]
            health.fastinter = "500ms"
            health.init_state = "up"
            health.http = { expect = [200, 204], port = 15673 }
            servers = [
                { name = "r1", address = "rabbit1.example.", port = 5672, send_proxy = "v2", weight = 0 },
                { name = "r2", address = "::1", port = 5672, backup = true, check = false },
            ]

            [stats]
            bind = "127.0.0.1:8404"
            users = { admin = "secret", viewer = "scrypt$16$1$1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5" }
            refresh = 0
            admin = true
            """
        ),
        FILE,
    )
    assert config.global_.grace == 90.0 and config.global_.control_socket == "/run/warren.sock"
    assert config.global_.relay is RelayPath.SPLICE
    assert config.resolvers.nameservers == (BindAddress("10.0.0.2", 53), BindAddress("::1", 5353))
    assert config.resolvers.interval == 60.0
    (frontend,) = config.frontends
    assert frontend.binds == (BindAddress("0.0.0.0", 5670), BindAddress("::", 5670), BindAddress("::1", 5671))
    assert frontend.timeout.client == 3 * 3600 and frontend.timeout.client_fin is None
    assert frontend.bulk
    backend = config.backend("rabbit")
    assert backend.timeout.tunnel == 86400 and backend.timeout.queue == 0.5
    assert backend.health.kinds == (CheckKind.AMQP, CheckKind.WATCH, CheckKind.HTTP)
    assert backend.health.fastinter == 0.5 and backend.health.init_state is InitState.UP
    assert backend.health.http.expect == (200, 204) and backend.health.http.port == 15673
    assert backend.server("r1").send_proxy is SendProxy.V2 and backend.server("r1").weight == 0
    assert backend.server("r2").backup and not backend.server("r2").check
    assert config.stats is not None
    assert config.stats.users == (("admin", "secret"),
                                  ("viewer", "scrypt$16$1$1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5"))
    assert config.stats.refresh is None and config.stats.admin and config.stats.uri == "/"
    assert config.stats.admins is None  # every user may act, as before roles existed, with a warning:
    assert [w.split(": warning: ")[1].split(":")[0] for w in config.warnings] == ["stats.users.admin", "stats.admin"]


STATS = """\
[stats]
bind = "127.0.0.1:8404"
users = { alice = "scrypt$16$1$1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5", bob = "clear" }
"""


@pytest.mark.parametrize("extra, admin, admins", [
    ("", False, None),  # no admin actions at all, as before
    ("admin = true", True, None),  # every user may act, as before (with a warning)
    ('admins = ["alice"]', True, ("alice",)),  # listing admins turns the actions on for them
    ('admins = []', True, ()),  # everyone reads only
    ('admin = false\nadmins = ["alice"]', False, ("alice",)),  # a switch that turns them off for all
])
def test_roles_from_admin_and_admins(extra, admin, admins):
    config = parse_config(FRONTEND + SERVERS + STATS + extra, FILE)
    assert (config.stats.admin, config.stats.admins) == (admin, admins)


def test_a_clear_text_password_is_valid_with_a_warning_naming_its_line():
    config = parse_config(FRONTEND + SERVERS + STATS + 'admins = ["alice"]', FILE)
    assert config.warnings == (f"{FILE}:8: warning: stats.users.bob: password stored in clear text: whoever can "
                               "read this file can log in; store a hash made by `warren hash-password` instead",)


FRONTEND = """\
[frontends.amqp]
bind = "127.0.0.1:5670"
backend = "rabbit"
"""


def test_load_config_reads_a_file_and_keeps_its_path(tmp_path):
    path = tmp_path / "warren.toml"
    path.write_text(FRONTEND + SERVERS)
    assert load_config(path).path == str(path)
    assert load_config(str(path)).backend("rabbit").server("r1").port == 5672


@pytest.mark.parametrize("text", ["", "\n# written by half\n", SERVERS, '[global]\nlog_level = "debug"\n'])
def test_a_file_without_a_frontend_is_refused(tmp_path, text):
    # An empty or half-written file (a tool that does not write atomically)
    # reloaded on SIGHUP would close every front port.
    path = tmp_path / "warren.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [(p.key, p.line) for p in caught.value.problems] == [("frontends", None)]
    assert str(caught.value) == (f"{path}: frontends: no frontend: Warren would accept no clients "
                                 "(define at least one [frontends.<name>] with bind and backend)")


def test_a_missing_frontend_is_reported_with_the_other_problems(tmp_path):
    path = tmp_path / "warren.toml"
    path.write_text(SERVERS.replace("5672", "70000"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert sorted(p.key for p in caught.value.problems) == ["backends.rabbit.servers[0].port", "frontends"]


def test_the_haproxy_classic_example_matches_the_haproxy_cfg_it_replaces():
    config = load_config(ROOT / "conf/examples/haproxy-classic.toml")
    (frontend,) = config.frontends
    assert frontend.binds == (BindAddress("0.0.0.0", 5670),)
    assert frontend.maxconn == 10000 and frontend.timeout.client == 60.0
    backend = config.backend(frontend.backend)
    assert backend.balance is Balance.ROUNDROBIN
    assert backend.timeout.connect == 10.0 and backend.timeout.server == 60.0
    assert [(s.name, s.address, s.port) for s in backend.servers] == [
        ("rabbit1", "10.0.0.11", 5672),
        ("rabbit2", "10.0.0.12", 5672),
        ("rabbit3", "10.0.0.13", 5672),
    ]
    health = backend.health
    assert (health.kinds, health.inter, health.rise, health.fall) == ((CheckKind.TCP,), 2.0, 2, 3)
    assert config.stats is not None
    assert config.stats.binds == (BindAddress("0.0.0.0", 80),)
    assert config.stats.uri == "/haproxy" and config.stats.refresh == 30.0
    assert config.stats.users == (("admin", "123456"),)


SHIPPED = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("conf/*.toml"), *ROOT.glob("conf/examples/*.toml")])


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_configuration_file_loads(name):
    load_config(ROOT / name)


# --- durations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("100us", 0.0001),
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("3h", 10800.0),
        ("1d", 86400.0),
        ("0s", 0.0),
        (2000, 2.0),
        (0, 0.0),
    ],
)
def test_durations_parse_to_seconds(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value, message",
    [
        ("10", 'missing unit in "10"'),
        ("-1s", "cannot be negative"),
        (-5, "cannot be negative"),
        ("2 s", "expected a duration such as"),
        ("2sec", "expected a duration such as"),
        ("s", "expected a duration such as"),
        ("", "expected a duration such as"),
        (1.5, "expected a duration such as"),
        (True, "expected a duration such as"),
    ],
)
def test_bad_durations_are_refused_with_a_reason(value, message):
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@pytest.mark.parametrize(
    "seconds, text",
    [(2.0, "2s"), (0.5, "500ms"), (90.0, "1m30s"), (1.5, "1.5s"), (0.0001, "100us"), (0, "0s"), (86400 + 61, "1d1m1s")],
)
def test_durations_format_the_way_operators_write_them(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


def test_an_off_duration_formats_as_off_and_a_negative_one_is_refused():
    assert format_duration(None) == "off"
    with pytest.raises(ValueError):
        format_duration(-1.0)


@pytest.mark.parametrize("key", ["client", "client_fin"])
def test_zero_turns_an_optional_timeout_off(key):
    text = SERVERS + f'[frontends.f]\nbind = "*:1"\nbackend = "rabbit"\ntimeout.{key} = "0s"\n'
    assert getattr(parse_config(text, FILE).frontends[0].timeout, key) is None


# --- locating keys in the text ------------------------------------------------------------

LOCATE_SAMPLE = """\
# a comment with [brackets] and key = value
[global]
log_level = "info"  # trailing [comment]

[backends."eu.rabbit"]
timeout.connect = "1s"
health = { inter = 1000, http = { port = 1 } }
servers = [
  { name = "a", address = "h", port = 1 },   # servers[0]
  # a comment line inside the array
  { name = "b",
    address = "h", port = 2 },
]
tags = ["x]", 'y[', \"\"\"
multi ] line
\"\"\"]

[[backends.b.servers]]
name = "a"

[[backends.b.servers]]
name = "b"

[backends.b.servers.extra]
deep = 1
"""


@pytest.mark.parametrize(
    "path, line",
    [
        (("global",), 2),
        (("global", "log_level"), 3),
        (("backends", "eu.rabbit"), 5),
        (("backends", "eu.rabbit", "timeout", "connect"), 6),
        (("backends", "eu.rabbit", "timeout"), 6),
        (("backends", "eu.rabbit", "health", "http", "port"), 7),
        (("backends", "eu.rabbit", "servers"), 8),
        (("backends", "eu.rabbit", "servers", 0, "port"), 9),
        (("backends", "eu.rabbit", "servers", 1), 11),
        (("backends", "eu.rabbit", "servers", 1, "port"), 12),
        (("backends", "eu.rabbit", "tags", 2), 14),
        (("backends", "b", "servers", 0), 18),
        (("backends", "b", "servers", 1, "name"), 22),
        (("backends", "b", "servers", 1, "extra", "deep"), 25),
        (("backends", "eu.rabbit", "servers", 1, "weight"), 11),  # absent: its server
        (("backends", "b", "retries"), 18),  # absent: the first line naming backends.b
        (("stats", "bind"), None),
        ((), None),
    ],
)
def test_locate_finds_the_line_of_a_key_path_or_its_nearest_enclosing_key(path, line):
    assert locate(LOCATE_SAMPLE, path) == line


def test_locate_sees_keys_after_multiline_strings_on_their_real_line():
    assert key_lines(LOCATE_SAMPLE)[("backends", "b", "servers")] == 18


@pytest.mark.parametrize("seed", range(200))
def test_locate_never_raises_on_garbage(seed):
    rng = random.Random(seed)
    alphabet = '[]{}=,."\'#\n \\abc1'
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(80)))
    result = locate(text, ("a", 0, "b"))
    assert result is None or 1 <= result <= text.count("\n") + 1


def test_locate_on_truncated_input_keeps_what_it_found():
    assert locate('[a]\nb = [ { c = 1 },\n  { c = "unterminated', ("a", "b", 1, "c")) == 3
