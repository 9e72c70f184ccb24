"""Admin actions: forms, CSRF tokens, what each action does to the runtime, notices."""

import pytest
import structlog

from proxy.config.model import Backend, Config, Server
from proxy.io.relay import Traffic
from proxy.runtime import AdminState, Connection, KillReason, Runtime
from proxy.stats_ui.admin import (
    Action, AdminRequest, BadRequest, CsrfTokens, Notices, apply_request, parse_form, request_from_form,
)


def runtime() -> Runtime:
    servers = tuple(Server(name=n, address="127.0.0.1", port=5672 + i) for i, n in enumerate("abc"))
    return Runtime(Config(path="<test>", backends=(Backend(name="rabbit", servers=servers),)))


# --- CSRF -----------------------------------------------------------------------------


def test_token_is_valid_for_its_user_in_its_window_and_the_next():
    tokens = CsrfTokens(secret=b"k" * 32, window=1800)
    token = tokens.issue("admin", 1000.0)
    assert tokens.valid(token, "admin", 1000.0)
    assert tokens.valid(token, "admin", 1799.0 + 1800)  # next window
    assert not tokens.valid(token, "admin", 3600.0)  # two windows later


def test_token_is_bound_to_the_user():
    tokens = CsrfTokens(secret=b"k" * 32)
    assert not tokens.valid(tokens.issue("alice", 0.0), "bob", 0.0)


def test_token_is_bound_to_the_process_secret():
    token = CsrfTokens(secret=b"a" * 32).issue("admin", 0.0)
    assert not CsrfTokens(secret=b"b" * 32).valid(token, "admin", 0.0)


def test_default_secret_is_random_per_instance():
    token = CsrfTokens().issue("admin", 0.0)
    assert not CsrfTokens().valid(token, "admin", 0.0)


@pytest.mark.parametrize("token", ["", ".", "0.", "x.abc", "1" * 30 + ".abc", "0.00", "-1.abc",
                                   "\u00b2.x", "\u2460.abc", "0.\u00e9"])
def test_malformed_tokens_are_refused(token):
    assert not CsrfTokens(secret=b"k" * 32).valid(token, "admin", 0.0)


def test_tampered_window_is_refused():
    tokens = CsrfTokens(secret=b"k" * 32, window=10)
    slot, mac = tokens.issue("admin", 0.0).split(".")
    assert not tokens.valid(f"{int(slot) + 1}.{mac}", "admin", 10.0)


# --- forms ----------------------------------------------------------------------------


def test_form_is_parsed_first_value_wins():
    assert parse_form(b"a=1&b=x%2Fy&a=2&c=") == {"a": "1", "b": "x/y", "c": ""}
    assert parse_form(b"") == {}


@pytest.mark.parametrize("body", [b"a=%ff", b"\xff=1", "&".join(f"f{i}=1" for i in range(50)).encode()])
def test_malformed_or_huge_forms_are_refused(body):
    with pytest.raises(BadRequest):
        parse_form(body)


def test_request_from_form():
    form = {"backend": "rabbit", "server": "a", "action": "weight", "weight": "7"}
    assert request_from_form(form) == AdminRequest("rabbit", "a", Action.WEIGHT, 7)
    assert request_from_form({**form, "action": "drain"}) == AdminRequest("rabbit", "a", Action.DRAIN)


@pytest.mark.parametrize("form", [
    {"server": "a", "action": "drain"},
    {"backend": "rabbit", "action": "drain"},
    {"backend": "rabbit", "server": "a", "action": "explode"},
    {"backend": "rabbit", "server": "a", "action": "weight", "weight": "257"},
    {"backend": "rabbit", "server": "a", "action": "weight", "weight": "-1"},
    {"backend": "rabbit", "server": "a", "action": "weight", "weight": "1e3"},
    {"backend": "rabbit", "server": "a", "action": "weight"},
    # Digits to str.isdigit() that int() refuses, and a number int() will not convert.
    {"backend": "rabbit", "server": "a", "action": "weight", "weight": "\u00b2"},
    {"backend": "rabbit", "server": "a", "action": "weight", "weight": "\u2460"},
    {"backend": "rabbit", "server": "a", "action": "weight", "weight": "\u0661"},  # Arabic-Indic one
    {"backend": "rabbit", "server": "a", "action": "weight", "weight": "9" * 5000},
])
def test_invalid_requests_are_refused(form):
    with pytest.raises(BadRequest):
        request_from_form(form)


# --- applying -------------------------------------------------------------------------


@pytest.mark.parametrize("action, state", [
    (Action.DRAIN, AdminState.DRAIN), (Action.MAINT, AdminState.MAINT), (Action.READY, AdminState.READY),
])
def test_state_actions_set_the_admin_state_and_are_logged(action, state):
    rt = runtime()
    rt.server("rabbit", "b").admin = AdminState.MAINT if state is AdminState.READY else AdminState.READY
    with structlog.testing.capture_logs() as logs:
        notice = apply_request(rt, AdminRequest("rabbit", "b", action), 5.0, user="ops", source="http")
    assert rt.server("rabbit", "b").admin is state
    assert rt.server("rabbit", "b").last_change == 5.0
    assert notice == f"rabbit/b: {state.value}"
    assert logs == [{
        "event": "stats.admin_action", "log_level": "info", "user": "ops", "source": "http",
        "backend": "rabbit", "server": "b", "action": action.value, "weight": None,
    }]


def test_weight_action_sets_the_weight():
    rt = runtime()
    apply_request(rt, AdminRequest("rabbit", "a", Action.WEIGHT, 0), 0.0, user="ops", source="ctl")
    assert rt.server("rabbit", "a").weight == 0
    assert not rt.server("rabbit", "a").available  # weight 0 behaves as DRAIN


def test_kill_action_kills_every_session_of_the_server():
    rt = runtime()
    interrupted = []
    conns = [Connection(n, ("10.0.0.1", n), "fe", Traffic()) for n in (1, 2)]
    for conn in conns:
        conn.interrupt = lambda conn=conn: interrupted.append(conn)
    rt.server("rabbit", "c").connections.update(conns)
    notice = apply_request(rt, AdminRequest("rabbit", "c", Action.KILL), 0.0, user="ops", source="http")
    assert [conn.kill_reason for conn in conns] == [KillReason.KILLED, KillReason.KILLED]
    assert sorted(conn.id for conn in interrupted) == [1, 2]
    assert notice == "rabbit/c: 2 session(s) killed"


def test_ready_wakes_clients_queued_on_the_backend():
    rt = runtime()
    backend = rt.backends["rabbit"]
    woken = []
    backend.queue = type("Queue", (), {"unpark_all": lambda self: woken.append(1)})()
    apply_request(rt, AdminRequest("rabbit", "a", Action.READY), 0.0, user="ops", source="http")
    assert woken == [1]


def test_unknown_server_raises_key_error():
    with pytest.raises(KeyError):
        apply_request(runtime(), AdminRequest("rabbit", "zz", Action.DRAIN), 0.0, user="ops", source="http")


# --- notices --------------------------------------------------------------------------


def test_notice_is_shown_once_to_its_user_only():
    notices = Notices()
    key = notices.put("alice", "rabbit/a: DRAIN", 0.0)
    assert notices.take("bob", key, 1.0) is None
    assert notices.take("alice", key, 1.0) == "rabbit/a: DRAIN"
    assert notices.take("alice", key, 1.0) is None
    assert notices.take("alice", "made-up", 1.0) is None


def test_notices_expire_and_are_bounded():
    notices = Notices(capacity=2, ttl=10)
    old = notices.put("u", "old", 0.0)
    assert notices.take("u", old, 11.0) is None
    keys = [notices.put("u", str(i), 0.0) for i in range(3)]
    assert notices.take("u", keys[0], 0.0) is None
    assert notices.take("u", keys[2], 0.0) == "2"
