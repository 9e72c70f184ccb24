"""Properties of the stats server's parsers: request heads, targets and query strings,
Authorization headers, forms, weights and CSRF tokens.

Everything an HTTP client sends is outside input. Whatever the bytes, the
server answers with well-formed HTTP responses (never a 500, never an error
in the log) and closes; the site answers every request below 500; every
parser returns its value or its own refusal.
"""

from __future__ import annotations

import base64
import urllib.parse

import h11
import structlog
import trio
import trio.testing
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.config.model import Backend, BindAddress, Config, Server, Stats
from proxy.runtime import Runtime
from proxy.stats_ui import admin
from proxy.stats_ui.admin import BadRequest, CsrfTokens, Notices
from proxy.stats_ui.auth import Authenticator, Challenge, Denied, FailureLimiter, Granted, Pending, parse_basic
from proxy.stats_ui.server import Limits, Request, Response, serve_connection
from proxy.stats_ui.site import StatsSite

LIMITS = Limits(max_header_bytes=2048, max_body_bytes=1024)
# What a refusal may be: h11's hints (400, 431, 501, 505), ours (408, 413, 431).
REFUSALS = {400, 408, 413, 431, 501, 505}


def run(async_fn, *args):
    """One example in its own trio run, on a clock that jumps over idle waits."""
    return trio.run(async_fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


async def echo(request: Request) -> Response:
    # Touch what handlers read: the path and query split of the target.
    return Response(200, f"{request.method} {request.path} {request.query} {len(request.body)}".encode())


async def exchange(chunks: list[bytes], handler=echo) -> bytes:
    server_side, client = trio.testing.memory_stream_pair()
    received = b""
    with trio.fail_after(600):  # virtual seconds
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server_side, handler, LIMITS, "192.0.2.1:4000")
            try:
                for chunk in chunks:
                    await client.send_all(chunk)
                await client.send_eof()
            except trio.BrokenResourceError:  # the server refused and stopped reading: fine
                pass
            while data := await client.receive_some(65536):
                received += data
    return received


def responses(raw: bytes) -> list[int]:
    """The status codes in what the server sent, which must be valid HTTP/1.1 responses."""
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(raw)
    parser.receive_data(b"")
    statuses = []
    while True:
        event = _next(parser)
        if isinstance(event, h11.Response):
            statuses.append(event.status_code)
        elif isinstance(event, h11.EndOfMessage):
            if parser.our_state is h11.MUST_CLOSE or parser.their_state is h11.MUST_CLOSE:
                break
            try:
                parser.start_next_cycle()
            except h11.LocalProtocolError:
                break
            parser.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            parser.send(h11.EndOfMessage())
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
    return statuses


def _next(parser: h11.Connection):
    try:
        return parser.next_event()
    except h11.RemoteProtocolError:  # the server closed where our pretend request waited: no more answers
        return h11.ConnectionClosed()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# --- request heads on the wire ---------------------------------------------------------

token = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789!#$%&'*+.^_`|~"), min_size=1, max_size=12)
header_value = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").strip(b" \t"))
targets = st.one_of(
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60),
    st.sampled_from(["/", "/;csv", "/;json", "/metrics", "*", "http://[::1/", "http://x/?a&b", "https://[/",
                     "/?norefresh", "/?" + "&".join("abcdefghij"), "//", "/%00", "/?notice=%ff"]),
)
methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "OPTIONS", "CONNECT", "TRACE", "BREW"]) | token


@st.composite
def requests(draw) -> bytes:
    method, target = draw(methods), draw(targets)
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1", b"HTTX/1.1"]))
    headers = [(b"host", b"stats")] if draw(st.booleans()) else []
    headers += [(n.encode(), v) for n, v in draw(st.lists(st.tuples(token, header_value), max_size=5))]
    body = draw(st.binary(max_size=80))
    framing = draw(st.sampled_from(["length", "chunked", "both", "none", "wrong-length"]))
    if framing in ("length", "both"):
        headers.append((b"content-length", str(len(body)).encode()))
    if framing == "wrong-length":
        headers.append((b"content-length", str(len(body) + draw(st.integers(-5, 5))).encode()))
    if framing in ("chunked", "both"):
        headers.append((b"transfer-encoding", b"chunked"))
        body = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    head = method.encode() + b" " + target.encode() + b" " + version + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


@given(st.lists(requests(), min_size=1, max_size=3), st.lists(st.integers(0, 10_000), max_size=8))
# h11 switched protocols after the 200 to CONNECT, refused to send its body,
# and the client got nothing but an error in the log.
@example([b"CONNECT 0 HTTP/1.1\r\nhost: stats\r\ncontent-length: 0\r\n\r\n"], [])
def test_any_requests_get_well_formed_answers_never_a_500(pipelined, cuts):
    with structlog.testing.capture_logs() as logs:
        raw = run(exchange, split(b"".join(pipelined), cuts))
    statuses = responses(raw)
    assert statuses, raw[:200]
    assert all(status == 200 or status in REFUSALS for status in statuses), statuses
    assert not [event for event in logs if event["log_level"] in ("error", "critical")], logs


@given(st.binary(max_size=600), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_bytes_get_a_refusal_or_nothing_and_the_connection_ends(data, cuts):
    with structlog.testing.capture_logs() as logs:
        raw = run(exchange, split(data, cuts))
    assert all(status == 200 or status in REFUSALS for status in responses(raw))
    assert not [event for event in logs if event["log_level"] in ("error", "critical")], logs


@given(methods, targets)
@example("GET", "http://[")  # urlsplit() raised: a 500 with a traceback, before authentication
def test_a_target_always_splits_into_a_path_and_a_query(method, target):
    request = Request(method, target, (), b"", "[2001:db8::1]:80")
    assert isinstance(request.path, str) and isinstance(request.query, str)
    assert request.client_host == "2001:db8::1"


# --- the site, request by request -----------------------------------------------------

USERS = (("admin", "pw"), ("viewer", "view"))


def make_site(**settings) -> StatsSite:
    servers = tuple(Server(name=n, address="127.0.0.1", port=5672 + i) for i, n in enumerate("ab"))
    runtime = Runtime(Config(path="<t>", backends=(Backend(name="rabbit", servers=servers),)))
    stats = Stats(binds=(BindAddress("127.0.0.1", 0),), users=USERS, **{"admin": True, **settings})
    return StatsSite(stats, runtime, authenticator=Authenticator(stats.users, limiter=FailureLimiter()),
                     csrf=CsrfTokens(secret=b"k" * 32), notices=Notices(), wall=lambda: 1000.0,
                     monotonic=lambda: 1000.0)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


authorizations = st.one_of(
    st.none(), st.just(basic("admin", "pw")), st.just(basic("viewer", "view")),
    st.builds(basic, st.text(max_size=10), st.text(max_size=10)),
    st.text(max_size=40), st.just("Basic \xe9"), st.just("Basic " + "A" * 400),
)
form_fields = st.dictionaries(
    st.sampled_from(["csrf", "backend", "server", "action", "weight", "norefresh", "x"]),
    st.one_of(st.text(max_size=12), st.sampled_from(["rabbit", "a", "b", "nope", "drain", "maint", "ready",
                                                     "kill", "weight", "0", "256", "257", "\u00b2", "9" * 50])),
    max_size=7,
)
bodies = st.one_of(st.binary(max_size=120), form_fields.map(lambda f: urllib.parse.urlencode(f).encode()))


async def answer(site: StatsSite, request: Request) -> Response:
    return await site.handle(request)


@given(methods, targets, authorizations, bodies, st.sampled_from([None, "application/x-www-form-urlencoded",
                                                                   "text/plain", "multipart/form-data; x=1"]),
       st.booleans())
@example("GET", "http://[::1/", None, b"", None, False)
def test_the_site_answers_every_request_below_500(method, target, authorization, body, content_type, with_token):
    site = make_site()
    headers = [("host", "stats")]
    if authorization is not None:
        headers.append(("authorization", authorization))
    if content_type:
        headers.append(("content-type", content_type))
    if with_token and method == "POST":
        body += b"&csrf=" + site.csrf.issue("admin", 1000.0).encode()
    with structlog.testing.capture_logs() as logs:
        response = run(answer, site, Request(method, target, tuple(headers), body, "192.0.2.9:1234"))
    assert 200 <= response.status < 500, (response.status, response.body[:200])
    assert not [event for event in logs if event["log_level"] in ("error", "critical")], logs


# --- the parsers one by one -------------------------------------------------------------


@given(st.text(max_size=200))
def test_any_authorization_header_parses_to_credentials_or_none(header):
    parsed = parse_basic(header)
    assert parsed is None or (":" not in parsed[0] and isinstance(parsed[1], str))


@given(st.text(max_size=30).filter(lambda user: ":" not in user), st.text(max_size=30))
def test_basic_credentials_round_trip(user, password):
    assert parse_basic(basic(user, password)) == (user, password)


@given(st.one_of(st.none(), st.text(max_size=100)), st.ip_addresses().map(str))
def test_the_authenticator_answers_any_header_with_a_verdict(header, client):
    verdict = Authenticator(USERS).begin(header, client, 0.0)
    assert isinstance(verdict, (Granted, Challenge, Denied, Pending))


@given(st.binary(max_size=300))
def test_any_body_parses_to_a_form_or_bad_request(body):
    try:
        form = admin.parse_form(body)
    except BadRequest:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in form.items())
    assert len(form) <= admin.MAX_FORM_FIELDS


@given(form_fields)
def test_forms_round_trip(fields):
    assert admin.parse_form(urllib.parse.urlencode(fields).encode()) == fields


@given(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=6) | form_fields)
def test_any_form_is_an_admin_request_or_bad_request(form):
    try:
        request = admin.request_from_form(form)
    except BadRequest:
        return
    assert request.backend and request.server
    assert request.weight is None or 0 <= request.weight <= admin.MAX_WEIGHT


@given(st.text(max_size=20))
def test_a_weight_is_0_to_256_or_bad_request(text):
    try:
        weight = admin.parse_weight(text)
    except BadRequest:
        return
    assert 0 <= weight <= admin.MAX_WEIGHT and str(weight) == text.strip().lstrip("0").rjust(1, "0")


@given(st.integers(0, admin.MAX_WEIGHT))
def test_every_weight_in_range_parses(weight):
    assert admin.parse_weight(str(weight)) == weight


@given(st.text(max_size=120), st.text(max_size=10), st.floats(0, 1e12))
def test_any_token_is_valid_or_not_never_an_error(token_text, user, now):
    assert CsrfTokens(secret=b"k" * 32).valid(token_text, user, now) in (True, False)


@given(st.text(max_size=10), st.text(max_size=10), st.floats(0, 1e12), st.floats(0, 1799))
def test_a_token_is_valid_for_its_user_only(user, other, now, later):
    tokens = CsrfTokens(secret=b"k" * 32)
    token_text = tokens.issue(user, now)
    assert tokens.valid(token_text, user, now + later)
    assert not tokens.valid(token_text, other, now) or other == user
