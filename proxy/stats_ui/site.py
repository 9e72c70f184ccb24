"""What the stats server answers: authentication, routes, admin posts.

Routes (with `uri` from `[stats]`, "/" by default):

    GET  <uri>           the page (?norefresh stops the meta refresh)
    POST <uri>           an admin action (admin = true, by a user in `admins`), answered 303 back to the page
    GET  <uri>;csv       HAProxy-compatible CSV
    GET  <uri>;json      JSON
    GET  <uri>;connections[.json]  the connections view (?backend, server, frontend, sort, order, page)
    GET  /metrics        Prometheus text format (no auth if metrics_auth = false)

HEAD is accepted wherever GET is. Every route needs basic auth, unknown paths
included (a 404 must not tell an anonymous prober what exists). The page
routes win if `uri` itself is "/metrics".

Roles: with `admin = true`, the users listed in `admins` (every user when
`admins` is absent) get the admin forms and may POST; everyone else reads
the page, the exports and the metrics, sees no form, and a POST of theirs
is refused with 403 (`stats.admin_refused`). Reading is all any export
offers, so every user may read every one.

The only await is the password verification, run in a worker thread one at
a time so a burst of logins can neither stall the event loop nor eat both
cores; everything else is synchronous and reads one runtime snapshot.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import structlog
import trio

from .. import __version__
from . import admin, connections
from .auth import Authenticator, Challenge, Denied, Granted, Pending, Throttled
from .history import History
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import render_metrics
from .render_csv import render_csv
from .render_html import PageContext, render_page
from .render_json import render_json
from .server import Request, Response, text_response

log = structlog.get_logger("warren.stats")

METRICS_PATH = "/metrics"
MAX_QUERY_FIELDS = 8  # the page reads two ("norefresh", "notice")
FORM_TYPE = "application/x-www-form-urlencoded"

# No script may run on these pages; forms may only post back to us; nobody may frame us.
_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class StatsSite:
    """Answers one request at a time; owns nothing that outlives a reload but its settings.

    `settings` is the `[stats]` section; `runtime` the live model (read via
    statistics(), written only through :mod:`.admin`). `wall` is the clock
    for CSRF windows and notices; `monotonic` the runtime's clock.
    """

    def __init__(self, settings: Any, runtime: Any, *, authenticator: Authenticator, csrf: admin.CsrfTokens,
                 notices: admin.Notices, history: History | None = None, sample_interval: float = 2.0,
                 wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 verify_limiter: trio.CapacityLimiter | None = None, logger: Any = log):
        self.settings = settings
        self.runtime = runtime
        self.auth = authenticator
        self.csrf = csrf
        self.notices = notices
        self.history = history
        self.sample_interval = sample_interval
        self.wall, self.monotonic = wall, monotonic
        self._verify_limiter = verify_limiter or trio.CapacityLimiter(1)
        self.log = logger
        uri = settings.uri
        self._routes = {
            uri: self._page,
            uri + ";csv": self._csv,
            uri + ";json": self._json,
            uri + ";connections": self._connections,
            uri + ";connections.json": self._connections,
        }
        self._routes.setdefault(METRICS_PATH, self._metrics)
        # Only the exporter may skip auth, and only if `uri` did not take its path.
        self._metrics_open = not settings.metrics_auth and self._routes[METRICS_PATH] == self._metrics
        self._server_header = "Warren" if settings.hide_version else f"Warren/{__version__}"

    async def handle(self, request: Request) -> Response:
        response = await self._answer(request)
        headers = (("server", self._server_header), ("cache-control", "no-store"),
                   ("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer"))
        if response.status >= 400:
            self.log.info("stats.request_refused", client=request.client, method=request.method,
                     path=request.path[:200], status=response.status)
        return Response(response.status, response.body, response.content_type,
                        response.headers + headers, response.close)

    async def _answer(self, request: Request) -> Response:
        if request.path == METRICS_PATH and self._metrics_open:
            return self._route(request, user="")
        verdict = await self.authenticate(request)
        if isinstance(verdict, Throttled):
            retry = str(max(1, round(verdict.retry_after)))
            return text_response(429, "too many failed logins; try later", headers=(("retry-after", retry),))
        if not isinstance(verdict, Granted):
            challenge = f'Basic realm="{self.settings.realm}", charset="UTF-8"'
            return text_response(401, headers=(("www-authenticate", challenge),))
        return self._route(request, verdict.user)

    async def authenticate(self, request: Request) -> Granted | Challenge | Denied | Throttled:
        client = request.client_host  # failures count per address, whatever the source port
        verdict = self.auth.begin(request.header("authorization"), client, self.monotonic())
        if not isinstance(verdict, Pending):
            return verdict
        if not verdict.expensive:
            return self.auth.finish(verdict, verdict.verify(), client, self.monotonic())
        async with self._verify_limiter:
            # Parallel guesses from one address queue here; look again once it is our turn.
            retry_after = self.auth.limiter.retry_after(client, self.monotonic())
            if retry_after is not None:
                return Throttled(retry_after)
            verified = await trio.to_thread.run_sync(verdict.verify)
        return self.auth.finish(verdict, verified, client, self.monotonic())

    def _route(self, request: Request, user: str) -> Response:
        handler = self._routes.get(request.path)
        if handler is None:
            return text_response(404)
        if request.method == "POST" and handler == self._page:
            return self._post_admin(request, user)
        if request.method not in ("GET", "HEAD"):
            allowed = "GET, HEAD, POST" if handler == self._page and self.may_act(user) else "GET, HEAD"
            return text_response(405, headers=(("allow", allowed),))
        return handler(request, user)

    def may_act(self, user: str) -> bool:
        """Whether `user` may change servers from the page (the one place of this rule)."""
        admins = self.settings.admins
        return self.settings.admin and (admins is None or user in admins)

    # --- GET ---------------------------------------------------------------------------

    def _page(self, request: Request, user: str) -> Response:
        try:
            query = urllib.parse.parse_qs(request.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:
            return text_response(400, f"at most {MAX_QUERY_FIELDS} query fields")
        norefresh = "norefresh" in query
        notice_key = (query.get("notice") or [""])[0]
        notice = self.notices.take(user, notice_key, self.wall()) if notice_key else None
        configured = self.settings.refresh
        may_act = self.may_act(user)
        context = PageContext(
            uri=self.settings.uri,
            refresh=None if norefresh else configured,
            refresh_configured=configured,
            admin=may_act,
            hide_version=self.settings.hide_version,
            user=user,
            csrf_token=self.csrf.issue(user, self.wall()) if may_act else "",
            notice=notice,
            error=bool(notice and notice.startswith("error:")),
            metrics_path=METRICS_PATH,
            history_capacity=self.history.capacity if self.history else 150,
            sample_interval=self.sample_interval,
            read_only=self.settings.admin and not may_act,
        )
        body = render_page(self.runtime.statistics(), context, self.history)
        return Response(200, body.encode(), "text/html; charset=utf-8",
                        headers=(("content-security-policy", _CSP), ("x-frame-options", "DENY")))

    def _csv(self, request: Request, user: str) -> Response:
        return Response(200, render_csv(self.runtime.statistics()).encode(), "text/csv; charset=utf-8")

    def _json(self, request: Request, user: str) -> Response:
        body = render_json(self.runtime.statistics(), hide_version=self.settings.hide_version)
        return Response(200, body.encode(), "application/json")

    def _metrics(self, request: Request, user: str) -> Response:
        body = render_metrics(self.runtime.statistics(), hide_version=self.settings.hide_version,
                              label_limit=self.settings.label_limit)
        return Response(200, body.encode(), METRICS_CONTENT_TYPE)

    def _connections(self, request: Request, user: str) -> Response:
        try:
            params = urllib.parse.parse_qs(request.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
            query = connections.ConnectionQuery.from_params(params)
        except ValueError as error:  # too many fields, or connections.BadQuery
            return text_response(400, str(error))
        page = connections.select(self.runtime, query)
        if request.path.endswith(".json"):
            return Response(200, connections.render_json(page).encode(), "application/json")
        return Response(200, connections.render_html(page, self.settings.uri).encode(), "text/html; charset=utf-8",
                        headers=(("content-security-policy", _CSP), ("x-frame-options", "DENY")))

    # --- POST --------------------------------------------------------------------------

    def _post_admin(self, request: Request, user: str) -> Response:
        if not self.settings.admin:
            return text_response(403, "admin actions are disabled ([stats] admin = false)")
        if not self.may_act(user):
            self.log.warning("stats.admin_refused", client=request.client, user=user)
            return text_response(403, f'user "{user}" may only read (not in [stats] admins)')
        content_type = (request.header("content-type") or "").split(";", 1)[0].strip().lower()
        if content_type != FORM_TYPE:
            return text_response(415, f"expected {FORM_TYPE}")
        try:
            form = admin.parse_form(request.body)
        except admin.BadRequest as error:
            return text_response(400, str(error))
        if not self.csrf.valid(form.get("csrf", ""), user, self.wall()):
            self.log.warning("stats.csrf_refused", client=request.client, user=user)
            return text_response(403, "invalid or expired form token: reload the page and try again")
        try:
            action = admin.request_from_form(form)
            notice = admin.apply_request(self.runtime, action, self.monotonic(), user=user, source="http")
        except admin.BadRequest as error:
            return text_response(400, str(error))
        except KeyError as error:
            notice = f"error: {error.args[0] if error.args else error}"
        key = self.notices.put(user, notice, self.wall())
        query = ("norefresh&" if form.get("norefresh") else "") + f"notice={key}"
        return Response(303, b"", headers=(("location", f"{self.settings.uri}?{query}"),))
