"""Admin actions on servers, shared by the stats page and `warren ctl`, sans-I/O.

An action is parsed from a form (or a ctl command) into an
:class:`AdminRequest`, then applied to the runtime by :func:`apply_request`,
which is the only writer here. Forms carry a CSRF token (:class:`CsrfTokens`)
bound to the authenticated user; the answer is a 303 back to the page with a
short-lived notice (:class:`Notices`) naming what was done.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import re
import secrets
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import structlog

from ..runtime import AdminState, KillReason

log = structlog.get_logger("warren.stats")

MAX_WEIGHT = 256  # HAProxy's bound for `set server B/S weight`
MAX_FORM_FIELDS = 16
# ASCII digits only: str.isdigit() also accepts "²" or "①", which int() refuses.
_WEIGHT = re.compile(r"[0-9]{1,3}")
_TOKEN_SLOT = re.compile(r"[0-9]{1,20}")


class Action(enum.StrEnum):
    READY = "ready"
    DRAIN = "drain"
    MAINT = "maint"
    WEIGHT = "weight"
    KILL = "kill"
    REBALANCE = "rebalance"  # a backend's action: close connections over their share
    REBALANCE_DRY_RUN = "rebalance-dry-run"  # ... or only say which


BACKEND_ACTIONS = frozenset({Action.REBALANCE, Action.REBALANCE_DRY_RUN})


_ADMIN_STATES = {Action.READY: AdminState.READY, Action.DRAIN: AdminState.DRAIN, Action.MAINT: AdminState.MAINT}


class BadRequest(ValueError):
    """The form or command is not a valid admin action; the message says why."""


@dataclass(frozen=True, slots=True)
class AdminRequest:
    backend: str
    server: str
    action: Action
    weight: int | None = None

    @property
    def target(self) -> str:
        return f"{self.backend}/{self.server}"


# --- parsing --------------------------------------------------------------------------


def parse_form(body: bytes) -> dict[str, str]:
    """An application/x-www-form-urlencoded body as a dict (first value of each name)."""
    try:
        text = body.decode("ascii")
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text),
                                       max_num_fields=MAX_FORM_FIELDS, errors="strict")
    except (UnicodeDecodeError, ValueError) as error:
        raise BadRequest(f"malformed form: {error}") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form


def parse_weight(text: str) -> int:
    """A weight from 0 to MAX_WEIGHT written in ASCII digits; BadRequest otherwise."""
    digits = text.strip()
    if not _WEIGHT.fullmatch(digits) or int(digits) > MAX_WEIGHT:
        raise BadRequest(f"weight must be a whole number from 0 to {MAX_WEIGHT}")
    return int(digits)


def request_from_form(form: dict[str, str]) -> AdminRequest:
    """Fields: backend, server, action (ready|drain|maint|weight|kill), weight;
    a backend's actions (rebalance, rebalance-dry-run) need no server."""
    backend, server = form.get("backend", ""), form.get("server", "")
    try:
        action = Action(form.get("action", ""))
    except ValueError:
        raise BadRequest("unknown action") from None
    if not backend or not (server or action in BACKEND_ACTIONS):
        raise BadRequest("missing backend or server")
    weight = parse_weight(form.get("weight", "")) if action is Action.WEIGHT else None
    return AdminRequest(backend, server, action, weight)


# --- applying -------------------------------------------------------------------------


def apply_request(runtime: Any, request: AdminRequest, now: float, *, user: str, source: str) -> str:
    """Applies `request`; returns a one-line notice. Raises KeyError for an unknown server.

    `now` is on the runtime's clock (time.monotonic). Every action is logged
    as `stats.admin_action` with who asked and through which surface.
    """
    if request.action in BACKEND_ACTIONS:
        notice = _rebalance(runtime, request, now)
        log.info("stats.admin_action", user=user, source=source, backend=request.backend,
                 action=request.action.value)
        return notice
    server = runtime.server(request.backend, request.server)
    if request.action is Action.KILL:
        killed = server.kill_sessions(KillReason.KILLED)
        notice = f"{request.target}: {killed} session(s) killed"
    elif request.action is Action.WEIGHT:
        server.weight = request.weight
        _wake_queue(server)
        notice = f"{request.target}: weight {request.weight}"
    else:
        server.set_admin(_ADMIN_STATES[request.action], now)
        _wake_queue(server)
        notice = f"{request.target}: {request.action.value.upper()}"
    log.info("stats.admin_action", user=user, source=source, backend=request.backend,
             server=request.server, action=request.action.value, weight=request.weight)
    return notice


def _rebalance(runtime: Any, request: AdminRequest, now: float) -> str:
    from ..amqp import rebalancer

    backend = runtime.backends.get(request.backend)
    if backend is None:
        raise KeyError(f"no backend {request.backend}")
    if request.action is Action.REBALANCE_DRY_RUN:
        return rebalancer.describe(backend.name, rebalancer.rebalance(backend, now, dry_run=True), dry_run=True)
    return rebalancer.describe(backend.name, rebalancer.request(backend, now), dry_run=False)


def _wake_queue(server: Any) -> None:
    # Clients queued on the backend (all servers at maxconn or unusable) wait
    # for a slot; a server that became usable is one, so let them look again.
    queue = getattr(getattr(server, "backend", None), "queue", None)
    if queue is not None and hasattr(queue, "unpark_all"):
        queue.unpark_all()


# --- CSRF -----------------------------------------------------------------------------


class CsrfTokens:
    """Form tokens: ``<window>.<HMAC-SHA256(secret, user, window)>``.

    The secret is per process, so tokens die with it; a token is accepted in
    the window it was issued in and the next one (between `window` and twice
    `window` seconds of life). Binding to the user means a token leaked from
    one operator's page is worthless to another account.
    """

    def __init__(self, secret: bytes | None = None, window: float = 1800.0):
        self._secret = secret or os.urandom(32)
        self._window = window

    def issue(self, user: str, now: float) -> str:
        slot = int(now // self._window)
        return f"{slot}.{self._mac(user, slot)}"

    def valid(self, token: str, user: str, now: float) -> bool:
        slot_text, _, mac = token.partition(".")
        if not _TOKEN_SLOT.fullmatch(slot_text) or not mac.isascii():
            return False
        slot = int(slot_text)
        current = int(now // self._window)
        if slot not in (current, current - 1):
            return False
        return hmac.compare_digest(mac.encode(), self._mac(user, slot).encode())

    def _mac(self, user: str, slot: int) -> str:
        message = user.encode("utf-8", "surrogateescape") + b"\0" + str(slot).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()


# --- notices after the redirect -------------------------------------------------------


class Notices:
    """Messages shown once on the page after an admin action (Post/Redirect/Get).

    The redirect carries only a random id; the text stays here, so nothing a
    link can carry is ever shown as a message. Bounded in count and age.
    """

    def __init__(self, capacity: int = 64, ttl: float = 300.0):
        self._items: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self._capacity, self._ttl = capacity, ttl

    def put(self, user: str, text: str, now: float) -> str:
        key = secrets.token_urlsafe(9)
        self._items[key] = (user, text, now)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return key

    def take(self, user: str, key: str, now: float) -> str | None:
        item = self._items.get(key)
        if item is None or item[0] != user:
            return None
        del self._items[key]
        return item[1] if now - item[2] <= self._ttl else None
