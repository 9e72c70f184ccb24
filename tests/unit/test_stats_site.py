"""What the stats site answers, request by request (no sockets)."""

import base64
import re

import pytest
import structlog

from proxy.config.model import Backend, BindAddress, Config, Server, Stats
from proxy.runtime import AdminState, Runtime
from proxy.stats_ui.admin import CsrfTokens, Notices
from proxy.stats_ui.auth import Authenticator, FailureLimiter, hash_password
from proxy.stats_ui.server import Request
from proxy.stats_ui.site import StatsSite

USERS = (("admin", "pw"), ("viewer", hash_password("view", n=16, r=1, p=1)))


def basic(user="admin", password="pw"):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_site(**settings) -> StatsSite:
    servers = tuple(Server(name=n, address="127.0.0.1", port=5672 + i) for i, n in enumerate("ab"))
    runtime = Runtime(Config(path="<t>", backends=(Backend(name="rabbit", servers=servers),)))
    stats = Stats(binds=(BindAddress("127.0.0.1", 0),), users=USERS, **{"admin": True, **settings})
    return StatsSite(stats, runtime, authenticator=Authenticator(stats.users, limiter=FailureLimiter()),
                     csrf=CsrfTokens(), notices=Notices())


def request(target="/", method="GET", auth=basic(), body=b"", content_type=None, client="127.0.0.1:1000"):
    headers = [("host", "stats")]
    if auth:
        headers.append(("authorization", auth))
    if content_type:
        headers.append(("content-type", content_type))
    return Request(method, target, tuple(headers), body, client)


def header(response, name):
    return dict(response.headers).get(name)


PATHS = ["/", "/;csv", "/;json", "/metrics", "/nope"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("auth", [None, basic("admin", "wrong"), basic("nobody", "pw"), "Basic %%%"])
async def test_every_path_needs_credentials(path, auth):
    response = await make_site().handle(request(path, auth=auth))
    assert response.status == 401
    assert header(response, "www-authenticate") == 'Basic realm="Warren statistics", charset="UTF-8"'


async def test_post_needs_credentials_too():
    response = await make_site().handle(request("/", "POST", auth=None, body=b"x=1",
                                                content_type="application/x-www-form-urlencoded"))
    assert response.status == 401


@pytest.mark.parametrize("path, content_type, start", [
    ("/", "text/html; charset=utf-8", b"<!DOCTYPE html>"),
    ("/;csv", "text/csv; charset=utf-8", b"# pxname,svname,"),
    ("/;json", "application/json", b"{"),
    ("/metrics", "text/plain; version=0.0.4; charset=utf-8", b"# HELP "),
])
async def test_credentials_open_every_route(path, content_type, start):
    response = await make_site().handle(request(path))
    assert response.status == 200
    assert response.content_type == content_type
    assert response.body.startswith(start)
    assert header(response, "cache-control") == "no-store"


async def test_hashed_password_is_verified_in_a_thread():
    site = make_site()
    assert (await site.handle(request("/;csv", auth=basic("viewer", "view")))).status == 200
    assert (await site.handle(request("/;csv", auth=basic("viewer", "nope")))).status == 401


async def test_metrics_without_auth_when_configured_and_only_them():
    site = make_site(metrics_auth=False)
    assert (await site.handle(request("/metrics", auth=None))).status == 200
    assert (await site.handle(request("/;csv", auth=None))).status == 401


async def test_exports_follow_the_stats_uri():
    site = make_site(uri="/haproxy")
    assert (await site.handle(request("/haproxy;csv"))).status == 200
    assert (await site.handle(request("/haproxy"))).status == 200
    assert (await site.handle(request("/;csv"))).status == 404
    assert (await site.handle(request("/haproxy;csv?x=1"))).status == 200


async def test_absolute_form_targets_are_understood():
    assert (await make_site().handle(request("http://stats:8404/;csv"))).status == 200


async def test_unknown_paths_and_methods():
    site = make_site()
    assert (await site.handle(request("/favicon.ico"))).status == 404
    response = await site.handle(request("/;csv", "PUT"))
    assert response.status == 405 and header(response, "allow") == "GET, HEAD"
    response = await site.handle(request("/", "DELETE"))
    assert response.status == 405 and header(response, "allow") == "GET, HEAD, POST"


async def test_page_forbids_scripts_and_framing():
    response = await make_site().handle(request("/"))
    assert "default-src 'none'" in header(response, "content-security-policy")
    assert header(response, "x-frame-options") == "DENY"
    assert header(response, "server").startswith("Warren/")
    hidden = await make_site(hide_version=True).handle(request("/"))
    assert header(hidden, "server") == "Warren"


async def test_five_failed_logins_give_429_for_that_address():
    site = make_site()
    for _ in range(5):
        assert (await site.handle(request("/", auth=basic("admin", "x"), client="10.1.1.1:1"))).status == 401
    response = await site.handle(request("/", client="10.1.1.1:1"))
    assert response.status == 429 and int(header(response, "retry-after")) > 0
    assert (await site.handle(request("/", client="10.1.1.1:2"))).status == 429  # any source port
    assert (await site.handle(request("/", client="10.1.1.2:1"))).status == 200


# --- admin ----------------------------------------------------------------------------


async def csrf_token(site, user="admin", password="pw"):
    page = (await site.handle(request("/", auth=basic(user, password)))).body.decode()
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def form(token, server="b", action="drain", **extra):
    fields = {"csrf": token, "backend": "rabbit", "server": server, "action": action, **extra}
    return "&".join(f"{k}={v}" for k, v in fields.items()).encode()


async def post(site, body, auth=basic(), content_type="application/x-www-form-urlencoded"):
    return await site.handle(request("/", "POST", auth=auth, body=body, content_type=content_type))


async def test_admin_post_changes_the_server_and_redirects_with_a_notice():
    site = make_site()
    token = await csrf_token(site)
    with structlog.testing.capture_logs() as logs:
        response = await post(site, form(token, action="maint"))
    assert response.status == 303
    assert site.runtime.server("rabbit", "b").admin is AdminState.MAINT
    assert any(e["event"] == "stats.admin_action" and e["user"] == "admin" for e in logs)
    location = header(response, "location")
    assert location.startswith("/?notice=")
    page = (await site.handle(request(location))).body.decode()
    assert "rabbit/b: MAINT" in page
    # Shown once.
    assert "rabbit/b: MAINT" not in (await site.handle(request(location))).body.decode()


async def test_admin_redirect_keeps_norefresh():
    site = make_site()
    token = await csrf_token(site)
    response = await post(site, form(token, norefresh="1"))
    assert header(response, "location").startswith("/?norefresh&notice=")


async def test_weight_and_kill_through_the_form():
    site = make_site()
    token = await csrf_token(site)
    assert (await post(site, form(token, action="weight", weight="9"))).status == 303
    assert site.runtime.server("rabbit", "b").weight == 9
    assert (await post(site, form(token, action="kill"))).status == 303


@pytest.mark.parametrize("token", ["", "garbage", "1.abc"])
async def test_bad_csrf_token_is_refused_and_logged(token):
    site = make_site()
    with structlog.testing.capture_logs() as logs:
        response = await post(site, form(token))
    assert response.status == 403
    assert site.runtime.server("rabbit", "b").admin is AdminState.READY
    assert any(e["event"] == "stats.csrf_refused" for e in logs)


async def test_token_of_another_user_is_refused():
    site = make_site()
    token = await csrf_token(site, "viewer", "view")
    assert (await post(site, form(token))).status == 403


async def test_admin_off_hides_forms_and_refuses_posts():
    site = make_site(admin=False)
    page = (await site.handle(request("/"))).body.decode()
    assert "<form" not in page
    response = await post(site, form(CsrfTokens().issue("admin", 0)))
    assert response.status == 403


# --- roles ------------------------------------------------------------------------------


async def test_a_read_only_user_sees_no_form_and_every_export():
    site = make_site(admins=("admin",))
    viewer = basic("viewer", "view")
    page = (await site.handle(request("/", auth=viewer))).body.decode()
    assert "<form" not in page and 'name="csrf"' not in page and "viewer (read only)" in page
    for path in ("/;csv", "/;json", "/metrics"):
        assert (await site.handle(request(path, auth=viewer))).status == 200, path
    admin_page = (await site.handle(request("/"))).body.decode()
    assert "<form" in admin_page and "(read only)" not in admin_page


async def test_a_read_only_users_post_is_refused_even_with_a_valid_token():
    site = make_site(admins=("admin",))
    token = site.csrf.issue("viewer", site.wall())  # as if it had leaked from somewhere
    with structlog.testing.capture_logs() as logs:
        response = await post(site, form(token, action="weight", weight="0"), auth=basic("viewer", "view"))
    assert response.status == 403 and b"may only read" in response.body
    assert site.runtime.server("rabbit", "b").weight == 1
    assert [(e["event"], e["user"]) for e in logs if e["log_level"] == "warning"] == [
        ("stats.admin_refused", "viewer")]
    assert (await post(site, form(await csrf_token(site), action="weight", weight="0"))).status == 303
    assert site.runtime.server("rabbit", "b").weight == 0


async def test_the_allowed_methods_follow_the_role():
    site = make_site(admins=("admin",))
    for auth, allowed in ((basic(), "GET, HEAD, POST"), (basic("viewer", "view"), "GET, HEAD")):
        response = await site.handle(request("/", "PUT", auth=auth))
        assert (response.status, header(response, "allow")) == (405, allowed)


async def test_without_admins_every_user_may_act_as_before():
    site = make_site()
    page = (await site.handle(request("/", auth=basic("viewer", "view")))).body.decode()
    assert "<form" in page and "(read only)" not in page


async def test_malformed_admin_posts():
    site = make_site()
    token = await csrf_token(site)
    assert (await post(site, form(token), content_type="text/plain")).status == 415
    assert (await post(site, b"%zz=\xff")).status == 400
    assert (await post(site, form(token, action="explode"))).status == 400
    response = await post(site, form(token, server="zz"))
    assert response.status == 303
    page = (await site.handle(request(header(response, "location")))).body.decode()
    assert 'class="notice error"' in page and "no server rabbit/zz" in page
