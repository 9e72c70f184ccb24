"""Basic auth for the stats surfaces: hashes, verdicts, caching, rate limiting."""

import base64
import io

import pytest
import structlog

from proxy import passwords
from proxy.stats_ui import auth
from proxy.stats_ui.auth import (
    Authenticator, Challenge, Denied, FailureLimiter, Granted, Pending, Throttled,
    hash_password, parse_basic, parse_hash, verify_password,
)

# Cheap parameters keep the suite fast; the format and code path are the same.
FAST = dict(n=2**4, r=1, p=1)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_hash_has_the_documented_format_and_verifies():
    stored = hash_password("s3cret", **FAST)
    scheme, n, r, p, salt, key = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16", "1", "1")
    assert len(parse_hash(stored).salt) == 16 and len(parse_hash(stored).key) == 32
    assert verify_password("s3cret", stored)
    assert not verify_password("s3cret ", stored)
    assert not verify_password("", stored)


def test_default_parameters_are_the_interactive_scrypt_ones():
    stored = hash_password("x")
    assert stored.startswith("scrypt$16384$8$1$")
    assert verify_password("x", stored)


def test_two_hashes_of_one_password_differ_by_salt():
    assert hash_password("same", **FAST) != hash_password("same", **FAST)


def test_clear_text_passwords_compare_exactly():
    assert verify_password("admin", "admin")
    assert not verify_password("admin2", "admin")
    assert not verify_password("Admin", "admin")


@pytest.mark.parametrize("stored", [
    "scrypt$16$1$1$c2FsdHNhbHQ",  # missing key
    "scrypt$15$1$1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5",  # n not a power of two
    "scrypt$16$99$1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5",  # r out of range
    "scrypt$16$1$1$!!!$a2V5a2V5a2V5a2V5a2V5a2V5",  # bad base64
    f"scrypt${2**24}$8$1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5",  # n too costly
])
def test_malformed_hashes_never_match(stored):
    with pytest.raises(ValueError):
        parse_hash(stored)
    assert not verify_password("anything", stored)


@pytest.mark.parametrize("header, expected", [
    (basic("admin", "pw"), ("admin", "pw")),
    (basic("admin", "p:w:x"), ("admin", "p:w:x")),  # RFC 7617: the user ends at the first colon
    (basic("ünïcode", "pässword"), ("ünïcode", "pässword")),
    ("basic " + base64.b64encode(b"a:b").decode(), ("a", "b")),  # scheme is case-insensitive
    ("Bearer abc", None),
    ("Basic", None),
    ("Basic !!!notbase64", None),
    ("Basic " + base64.b64encode(b"no-colon").decode(), None),
    ("Basic " + base64.b64encode(b"\xff\xfe:x").decode(), None),  # not UTF-8
    ("Basic \u00e9", None),  # a non-ASCII byte in the header (decoded as latin-1)
    ("Basic YWRtaW46\u00e9", None),
])
def test_parse_basic(header, expected):
    assert parse_basic(header) == expected


def test_missing_header_is_a_challenge_not_a_failure():
    authenticator = Authenticator([("admin", "pw")], limiter=FailureLimiter(max_failures=1))
    assert authenticator.check(None, "c", 0.0) == Challenge()
    assert authenticator.check("", "c", 0.0) == Challenge()
    assert authenticator.limiter.retry_after("c", 0.0) is None


def test_right_credentials_are_granted_wrong_ones_denied_and_logged():
    authenticator = Authenticator([("admin", "pw")])
    assert authenticator.check(basic("admin", "pw"), "127.0.0.1:5", 0.0) == Granted("admin")
    with structlog.testing.capture_logs() as logs:
        assert authenticator.check(basic("admin", "nope"), "127.0.0.1:6", 0.0) == Denied("admin")
    assert logs == [{
        "event": "stats.login_failed", "log_level": "warning", "client": "127.0.0.1:6",
        "user": "admin", "reason": "bad password", "blocked": False,
    }]


def test_hashed_passwords_need_a_thread_clear_ones_do_not():
    authenticator = Authenticator([("hashed", hash_password("pw", **FAST)), ("clear", "pw")])
    hashed = authenticator.begin(basic("hashed", "pw"), "c", 0.0)
    clear = authenticator.begin(basic("clear", "pw"), "c", 0.0)
    assert isinstance(hashed, Pending) and hashed.expensive
    assert isinstance(clear, Pending) and not clear.expensive
    assert authenticator.finish(hashed, hashed.verify(), "c", 0.0) == Granted("hashed")


def test_unknown_user_is_verified_against_a_decoy_of_the_same_cost():
    """Timing must not tell whether a user exists: an unknown name still pays scrypt."""
    stored = hash_password("pw", **FAST)
    authenticator = Authenticator([("admin", stored)])
    pending = authenticator.begin(basic("mallory", "pw"), "c", 0.0)
    assert isinstance(pending, Pending) and not pending.known
    assert pending.expensive
    decoy, real = parse_hash(pending.stored), parse_hash(stored)
    assert (decoy.n, decoy.r, decoy.p, len(decoy.key)) == (real.n, real.r, real.p, len(real.key))
    # Even a "correct" verification cannot let an unknown user in.
    assert authenticator.finish(pending, True, "c", 0.0) == Denied("mallory")


def test_unknown_user_goes_through_compare_digest(monkeypatch):
    calls = []
    real = passwords.hmac.compare_digest
    monkeypatch.setattr(passwords.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    authenticator = Authenticator([("admin", "pw")])
    assert authenticator.check(basic("nobody", "pw"), "c", 0.0) == Denied("nobody")
    assert len(calls) == 1


def test_successful_verification_is_cached_per_header(monkeypatch):
    authenticator = Authenticator([("admin", hash_password("pw", **FAST))])
    assert authenticator.check(basic("admin", "pw"), "c", 0.0) == Granted("admin")
    monkeypatch.setattr(auth, "verify_password", lambda *a: pytest.fail("verified again"))
    monkeypatch.setattr(Pending, "verify", lambda self: pytest.fail("verified again"))
    assert authenticator.begin(basic("admin", "pw"), "other", 1.0) == Granted("admin")
    # A different header (wrong password) is not a cache hit.
    assert isinstance(authenticator.begin(basic("admin", "px"), "other", 1.0), Pending)


def test_cache_is_bounded():
    authenticator = Authenticator([(f"u{i}", "pw") for i in range(10)], cache_size=3)
    for i in range(10):
        authenticator.check(basic(f"u{i}", "pw"), "c", 0.0)
    assert len(authenticator._cache) == 3


def test_five_failures_within_a_minute_block_the_address():
    authenticator = Authenticator([("admin", "pw")], limiter=FailureLimiter(5, window=60, block=60))
    for second in range(4):
        assert authenticator.check(basic("admin", "x"), "10.0.0.1", float(second)) == Denied("admin")
    with structlog.testing.capture_logs() as logs:
        assert authenticator.check(basic("admin", "x"), "10.0.0.1", 4.0) == Denied("admin")
    assert logs[0]["blocked"] is True
    # Blocked: even the right password is not looked at, and nothing is logged per try.
    verdict = authenticator.check(basic("admin", "pw"), "10.0.0.1", 5.0)
    assert isinstance(verdict, Throttled) and verdict.retry_after == pytest.approx(59.0)
    # Other addresses are unaffected.
    assert authenticator.check(basic("admin", "pw"), "10.0.0.2", 5.0) == Granted("admin")
    # The block ends.
    assert authenticator.check(basic("admin", "pw"), "10.0.0.1", 64.5) == Granted("admin")


def test_failures_spread_beyond_the_window_do_not_block():
    limiter = FailureLimiter(5, window=60, block=60)
    for minute in range(10):
        assert not limiter.record_failure("c", minute * 20.0)
    assert limiter.retry_after("c", 200.0) is None


def test_success_resets_the_failure_count():
    authenticator = Authenticator([("admin", "pw")], limiter=FailureLimiter(3, window=60, block=60))
    for _ in range(2):
        authenticator.check(basic("admin", "x"), "c", 0.0)
    authenticator.check(basic("admin", "pw"), "c", 0.0)
    for _ in range(2):
        authenticator.check(basic("admin", "x"), "c", 0.0)
    assert authenticator.limiter.retry_after("c", 0.0) is None


def test_malformed_headers_count_as_failures():
    authenticator = Authenticator([("admin", "pw")], limiter=FailureLimiter(3, window=60, block=60))
    assert authenticator.check("Basic ???", "c", 0.0) == Denied("")
    assert authenticator.check("Digest x", "c", 0.0) == Denied("")
    assert authenticator.check("Basic \u00e9", "c", 0.0) == Denied("")
    assert isinstance(authenticator.check(basic("admin", "pw"), "c", 0.0), Throttled)


def test_rotating_addresses_meet_the_global_budget():
    # 1,340 guesses a second from rotating loopback addresses, each under
    # the per-address limit: the global budget stops them all.
    authenticator = Authenticator([("admin", "pw")], limiter=FailureLimiter(5, window=60, global_max_failures=10))
    with structlog.testing.capture_logs() as logs:
        for i in range(10):
            assert authenticator.check(basic("admin", "guess"), f"127.0.{i}.1", float(i)) == Denied("admin")
    assert [e["event"] for e in logs].count("stats.login_throttled") == 1
    verdict = authenticator.check(basic("admin", "guess"), "127.0.99.1", 10.0)
    assert isinstance(verdict, Throttled) and verdict.retry_after == pytest.approx(50.0)
    # ... right password or not, until the oldest failure leaves the window.
    assert isinstance(authenticator.check(basic("admin", "pw"), "192.0.2.1", 59.0), Throttled)
    assert authenticator.check(basic("admin", "pw"), "192.0.2.1", 60.0) == Granted("admin")
    # A login verified before (a cached header) is never throttled.
    for i in range(10):
        authenticator.check(basic("admin", "guess"), f"127.1.{i}.1", 61.0)
    assert authenticator.check(basic("admin", "pw"), "192.0.2.1", 62.0) == Granted("admin")


def test_a_blocked_address_does_not_eat_the_global_budget():
    limiter = FailureLimiter(2, window=60, block=60, global_max_failures=3)
    authenticator = Authenticator([("admin", "pw")], limiter=limiter)
    for _ in range(20):
        authenticator.check(basic("admin", "x"), "10.0.0.1", 0.0)
    assert limiter.global_retry_after(0.0) is None


def test_an_ipv6_client_is_its_64():
    limiter = FailureLimiter(2, window=60, block=60)
    limiter.record_failure("2001:db8::1", 0.0)
    assert limiter.record_failure("2001:db8::ffff:2", 1.0)
    assert limiter.retry_after("2001:db8::3", 2.0) == pytest.approx(59.0)
    assert limiter.retry_after("2001:db8:0:1::1", 2.0) is None


def test_limiter_memory_is_bounded():
    limiter = FailureLimiter(5, window=60, block=60, max_clients=100)
    for i in range(1000):
        limiter.record_failure(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter._failures) == 100


class _Pipe(io.StringIO):
    def isatty(self):
        return False


def test_hash_password_main_reads_stdin_when_not_a_tty():
    out, err = io.StringIO(), io.StringIO()
    assert auth.hash_password_main(_Pipe("hunter2\n"), out, err) == 0
    stored = out.getvalue().strip()
    assert stored.startswith("scrypt$") and verify_password("hunter2", stored)
    assert auth.hash_password_main(_Pipe("\n"), io.StringIO(), err) == 1


def test_hash_password_main_asks_twice_on_a_tty(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    answers = iter(["one", "two"])
    monkeypatch.setattr(auth.getpass, "getpass", lambda prompt: next(answers))
    err = io.StringIO()
    assert auth.hash_password_main(Tty(), io.StringIO(), err) == 1
    assert "differ" in err.getvalue()
