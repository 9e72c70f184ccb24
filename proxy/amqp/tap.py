"""The AMQP side of one relayed connection: a tap on the relay during the handshake.

A session on an AMQP frontend gives its relay link to an :class:`AmqpConnection`
before any byte moves. Until the handshake is over, both directions show each
read to the :class:`~proxy.amqp.inspect.HandshakeInspector` (the bytes are in
user space anyway: the relay copies small reads, and a handshake is a few
small reads); the relay writes exactly the bytes it read. Then:

- the broker's Open-Ok (or its refusing Close), or bytes that are not AMQP
  0-9-1, or a handshake over the budget: the taps are removed and the
  connection goes on on the normal data path, splice included;
- from then on each direction keeps only its last :data:`~proxy.io.directions.TAIL`
  bytes of reads that pass through user space (one slice per read), read once
  at the end to tell a completed AMQP close from an abort (proxy.amqp.closing);
- where the kernel relays (a socket map), the link's quiet rounds are counted
  from then on and the connection moves to the kernel path as a TCP one does
  (``kernel_after``); the socket map's program keeps the end of the last skb
  each socket received (:meth:`proxy.io.sockmap.Pair.tail`), which replaces
  a direction's tail once that side received anything on the kernel path;
- the idle timeouts follow the phase: ``timeout.handshake`` until the client's
  protocol header, the configured (fallback) ones during the handshake, and
  with ``timeout.client = "heartbeat"`` the limits of the negotiated heartbeat
  (proxy.amqp.heartbeat) once it is open;
- connection limits are checked at the client's Connection.Open; a refusal
  withholds the Open (the relay ends with ``HELD``) and the session answers
  with :func:`proxy.amqp.refuse.refuse` (530 NOT_ALLOWED to the client, a
  clean open-and-close to the broker).
"""

from __future__ import annotations

import time
from typing import Any, Final

import structlog

from ..config.model import HEARTBEAT, Backend, Frontend, LimitAction
from ..io.directions import Hold
from ..io.relay import Ending, Timeouts
from .admission import ConnectionCounts
from .closing import clean_close
from .heartbeat import idle_limits
from .inspect import HandshakeInspector, Identity, Phase, reply_name

log = structlog.get_logger("warren.amqp")

_ABORTS: Final = ("SD", "CD")


class AmqpPolicy:
    """The relay timeouts of one frontend + backend pair, by phase, made once per config."""

    def __init__(self, frontend: Frontend, backend: Backend) -> None:
        ftimeout, btimeout = frontend.timeout, backend.timeout
        self.heartbeat_mode = ftimeout.client == HEARTBEAT
        client = None if self.heartbeat_mode else ftimeout.client
        assert not isinstance(client, str), "seconds or None unless HEARTBEAT (build_frontend settles AUTO)"
        self._base = dict(client_fin=ftimeout.client_fin, server=btimeout.server, tunnel=btimeout.tunnel,
                          server_fin=btimeout.server_fin)
        self._fallback_client = ftimeout.client_fallback if self.heartbeat_mode else client
        handshake = ftimeout.handshake if isinstance(ftimeout.handshake, float) else None
        self.handshake_limit = handshake
        # Until the protocol header: waiting on the client is bounded by the handshake timeout.
        self.before_header = Timeouts(**{**self._base, "client": handshake or self._fallback_client})
        self.fallback = Timeouts(client=self._fallback_client, **self._base)
        self._established: dict[int, Timeouts] = {}

    def established(self, heartbeat: int | None) -> Timeouts:
        if not self.heartbeat_mode or not heartbeat:
            return self.fallback
        timeouts = self._established.get(heartbeat)
        if timeouts is None:
            limits = idle_limits(heartbeat, fallback=self._fallback_client, server=self._base["server"])
            timeouts = Timeouts(**{**self._base, "client": limits.client, "server": limits.server})
            if len(self._established) < 1024:
                self._established[heartbeat] = timeouts
        return timeouts


class AmqpConnection:
    """One client connection's AMQP state; see the module docstring.

    Owned by the session: ``attach`` when its relay starts, ``finish`` when
    it ends (before the link is stopped), ``ending`` to name the end.
    """

    __slots__ = ("inspector", "policy", "counts", "limits", "link", "counted", "to_server", "tails",
                 "opened", "backend_name", "timeouts", "kernel_after")

    def __init__(self, policy: AmqpPolicy, backend: Any) -> None:
        self.policy = policy
        self.counts: ConnectionCounts = backend.amqp_counts
        self.limits = backend.config.limits
        self.backend_name = backend.name
        self.inspector = HandshakeInspector(admit=self._admit)
        self.link: Any = None
        self.counted: tuple[str | None, str | None] | None = None
        self.to_server = b""  # HELD: what the broker still has to get (the rest of the Open)
        self.tails: tuple[bytes | None, bytes | None] = (None, None)
        self.opened: float | None = None  # monotonic time of the broker's Open-Ok
        self.timeouts = policy.before_header  # the link's timeouts, as last set
        self.kernel_after = 0  # quiet rounds after the handshake before the kernel relays it (0: never)

    @property
    def identity(self) -> Identity:
        return self.inspector.identity

    # -- the tap ---------------------------------------------------------------------

    def attach(self, link: Any, kernel_after: int = 0) -> None:
        """Tap `link`'s directions; with `kernel_after`, the link's ``trial``
        starts with that many quiet rounds once the handshake is over (its
        ``promote`` then hands it to the kernel path, ``handed_over``)."""
        self.link = link
        self.kernel_after = kernel_after
        link.ways[0].tap = self._from_client
        link.ways[1].tap = self._from_server

    def _from_client(self, view: memoryview, length: int) -> None:
        inspector = self.inspector
        header_seen = inspector.header_seen
        forward = inspector.from_client(view[:length])
        phase = inspector.phase
        if phase is Phase.HELD:
            self.to_server = bytes(view[:forward]) + inspector.held
            raise Hold
        if inspector.header_seen and not header_seen:
            self._retime(self.policy.fallback)
        if phase is not Phase.INSPECTING:
            self._handshake_over()

    def _from_server(self, view: memoryview, length: int) -> None:
        inspector = self.inspector
        inspector.from_server(view[:length])
        if inspector.phase is not Phase.INSPECTING:
            self._handshake_over()

    def _retime(self, timeouts) -> None:
        """The link's idle timeouts, restarted from now, unless they stay the same
        (no timeouts before and after, the common case: a no-op)."""
        if timeouts is not self.timeouts or timeouts.enabled:
            self.timeouts = timeouts
            self.link.retime(timeouts)

    def _handshake_over(self) -> None:
        """The taps come off; an opened or refused connection keeps its tails."""
        ways = self.link.ways
        phase = self.inspector.phase
        self.inspector.release()  # a connection lives for hours: keep its identity, not buffers
        for way in ways:
            way.tap = None
            if phase is not Phase.PASSED:
                way.tail = b""
        if phase is Phase.OPEN:
            self.opened = time.monotonic()
            self._retime(self.policy.established(self.inspector.identity.heartbeat))
        elif phase is Phase.PASSED and not self.inspector.header_seen:
            self._retime(self.policy.fallback)
        if phase is not Phase.REFUSED:  # a refused connection ends now: not worth the map
            self.link.trial = self.kernel_after

    # -- admission ---------------------------------------------------------------------

    def _admit(self, identity: Identity) -> str | None:
        vhost, user = identity.vhost, identity.user
        if self.limits.enabled:
            hit = self.counts.check(self.limits, vhost, user)
            if hit is not None:
                log.warning("amqp.limit_reached", backend=self.backend_name, kind=hit.kind, name=hit.name,
                            limit=hit.limit, action=self.limits.action.value)
                if self.limits.action is LimitAction.REFUSE:
                    return hit.text()
        self.counts.add(vhost, user)
        self.counted = (vhost, user)
        return None

    # -- the end -------------------------------------------------------------------------

    def finish(self, link: Any) -> None:
        """The relay ended (its link not yet stopped): keep the tails, uncount. Once.

        Lets go of the link and the inspector's `admit`: both point back
        here (the session holds this), and a cycle would leave every ended
        connection to the cyclic collector instead of reference counting."""
        if link is not None and link.ways is not None:
            self.tails = (link.ways[0].tail, link.ways[1].tail)
        self.link = None
        self.inspector.release()
        if self.counted is not None:
            self.counts.remove(*self.counted)
            self.counted = None

    def handed_over(self, tails: tuple[bytes | None, bytes | None]) -> None:
        """The link moved to the kernel path with these tails (None: not kept)."""
        self.tails = tails

    def finish_kernel(self, pair: Any) -> None:
        """The kernel relay ended (its pair not yet released): a side that
        received anything since the hand-over has the program's tail
        (:meth:`proxy.io.sockmap.Pair.tail`), the other keeps its tail from
        before; uncount. Once."""
        client, server = self.tails
        self.tails = (
            None if client is None else (pair.tail(0) or client),
            None if server is None else (pair.tail(1) or server),
        )
        self.finish(None)

    def ending(self, ending: Ending | None, termination: str) -> tuple[str, str | None]:
        """(termination, reason) for the log line, AMQP-aware.

        ``cR``: the client never sent its protocol header within
        ``timeout.handshake``. A completed AMQP close that ended in a reset
        (RabbitMQ's linger 0) is ``--``; a broker's refusal during the
        handshake is ``SR`` and names its reply.
        """
        inspector = self.inspector
        if ending is Ending.CLIENT_TIMEOUT and not inspector.header_seen and inspector.phase is Phase.INSPECTING:
            limit = self.policy.handshake_limit
            return "cR", f"no AMQP protocol header within {limit:g}s" if limit else "no AMQP protocol header"
        close = self.identity.broker_close
        if inspector.phase is Phase.REFUSED and close is not None and (termination in _ABORTS or termination == "--"):
            return "SR", f"refused by broker: {reply_name(close[0])}"
        if termination in _ABORTS or termination == "--":
            clean = clean_close(*self.tails)
            if clean is not None:
                return "--", clean.reason
        return termination, None
