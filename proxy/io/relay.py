"""The relay: bytes between a client socket and a broker socket, both ways.

One connection's data path once the broker connection is established.
8,000 mostly idle AMQP connections are the normal case, so a connection must
cost little while idle: no task, nursery or wait stack of its own. A
connection is a :class:`Link` of the run's shared poller
(``proxy.io.poller``): both sockets are registered once in its epoll,
edge-triggered, and its idle deadline sits in the poller's timer heap.
Whenever a socket reports an event, the poller, running inside trio's own
I/O wait (``proxy.io.trio_nesting``), serves the link on the spot: it moves
what the kernel allows right away, with non-blocking system calls (moving
never blocks, so nothing waits per wake-up):

* the splice path (a ``PipePool`` given): ``splice(socket -> pipe)`` then
  ``splice(pipe -> socket)``, the bytes never entering user space; small
  reads are copied instead, where two splices would cost more;
* the copy path (``pipes=None``): ``readv`` into a buffer, ``write`` out
  (``proxy.io.directions``).

The outcome goes to whoever owns the link: ``relay()``'s task sleeps until
it is rescheduled with it, ``start_relay``'s callback gets it, and a
session, which is its connection's link, takes it in ``ended``.

Idle connections hold neither a pipe nor a buffer: both are borrowed when the
source turns readable and handed back once everything read has been written.

Half-close (RFC 9293 section 3.6): EOF from one side is forwarded as
``shutdown(SHUT_WR)`` on the other, and the opposite direction keeps flowing
until it ends too. With ``owned`` the relay closes both sockets when it
stops; otherwise the caller owns them (and must stop a running relay before
closing them).
"""
from __future__ import annotations

import enum
import functools
import math
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Final

import outcome
import trio
from mypy_extensions import mypyc_attr

from .directions import DONE, NO_PIPE, READ, WRITE, YIELD, CopyDirection, Hold, SideLost, SpliceDirection
from .pipes import PipePool
from .poller import EDGE_MASK, current_poller, retire


class Ending(enum.Enum):
    """How a relay ended; the session maps it to a HAProxy termination code."""

    NORMAL = "normal"  # both directions ended with EOF
    CLIENT_ABORT = "client_abort"  # error/reset on the client socket -> "CD"
    SERVER_ABORT = "server_abort"  # error/reset on the server socket -> "SD"
    CLIENT_TIMEOUT = "client_timeout"  # client idle / client-fin expired -> "cD"
    SERVER_TIMEOUT = "server_timeout"  # server idle / server-fin expired -> "sD"
    HELD = "held"  # a tap withheld bytes (Hold): the sockets are the caller's again

    # Members are singletons compared by identity: hashed by identity too, in
    # C, rather than by Enum's Python-level hash of the name (a session looks
    # its termination code up by its Ending once per connection).
    __hash__ = object.__hash__


@dataclass(slots=True)
class Traffic:
    """Per-connection byte counters, bumped in place as bytes are received."""

    bytes_in: int = 0  # received from the client (forwarded to the server)
    bytes_out: int = 0  # received from the server (forwarded to the client)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Idle timeouts in seconds; None disables one, all None means none at all.

    ``tunnel`` (both directions, any traffic resets it) replaces ``client``
    and ``server`` when set. ``client`` bounds waiting on the client (to send,
    or to accept what we write), ``server`` likewise. Once one direction has
    ended, waiting for the other direction's sender is bounded by
    ``client_fin`` / ``server_fin`` when set, overriding the others (as
    HAProxy's timeout client-fin / server-fin override timeout tunnel).

    ``enabled`` (at least one is set) and ``waits`` (``limit(0)``,
    ``limit(1)``, ``limit(0, fin=True)``, ``limit(1, fin=True)``) are
    worked out once, here: a link reads them as it starts, and ``waits`` on
    every wake-up with traffic (bench/OPTIMISATIONS.md, TLS); there are a
    few Timeouts per config, and a connection or more per millisecond.
    """

    client: float | None = None
    server: float | None = None
    tunnel: float | None = None
    client_fin: float | None = None
    server_fin: float | None = None
    enabled: bool = field(init=False, repr=False, compare=False)
    waits: tuple[float, float, float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _TIMEOUT_NAMES:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"timeout {name} must be > 0 or None, got {value!r}")
        enabled = any(getattr(self, name) is not None for name in _TIMEOUT_NAMES)
        object.__setattr__(self, "enabled", enabled)
        waits = tuple(self.limit(side, fin=fin) for fin in (False, True) for side in (0, 1))
        object.__setattr__(self, "waits", waits)

    def limit(self, side: int, *, fin: bool) -> float:
        """How long a direction may wait on `side` (0: the client, 1: the
        server); `fin`: it waits on its sender while the other direction
        has ended, which that side's fin timeout bounds when set."""
        if fin:
            fin_limit = self.client_fin if side == 0 else self.server_fin
            if fin_limit is not None:
                return fin_limit
        if self.tunnel is not None:
            return self.tunnel
        limit = self.client if side == 0 else self.server
        return math.inf if limit is None else limit


_TIMEOUT_NAMES: Final = ("client", "server", "tunnel", "client_fin", "server_fin")


async def relay(
    client: trio.socket.SocketType,
    server: trio.socket.SocketType,
    traffic: Traffic,
    timeouts: Timeouts = Timeouts(),
    *,
    pipes: PipePool | None = None,
    owned: bool = False,
) -> Ending:
    """Pump bytes both ways until both directions end, a side fails or idles out.

    Returns NORMAL when both sides sent EOF, CLIENT_/SERVER_ABORT when a
    socket reports a connection error (reset, broken pipe, ...), and
    CLIENT_/SERVER_TIMEOUT when an idle timeout expires; the other direction
    simply stops. Uses splice through ``pipes`` when given (the caller checks
    ``splice_supported()`` first), else copies. With ``owned`` the relay
    closes both sockets when it ends, however it ends (which spares the
    system calls that unregister them and the last half-close); otherwise the
    caller keeps them. On cancellation, raises Cancelled after returning every
    borrowed pipe (closing those that still hold data). Unexpected OS errors
    propagate (raised here, although the bytes are moved by the shared
    poller).
    """
    task = trio.lowlevel.current_task()
    notify = functools.partial(trio.lowlevel.reschedule, task)
    link = start_relay(client, server, traffic, timeouts, pipes=pipes, owned=owned, notify=notify)
    try:
        # The poller moves the bytes; this task only waits for the outcome.
        return await trio.lowlevel.wait_task_rescheduled(link.abort)
    finally:
        link.stop()


def start_relay(
    client: socket.socket | trio.socket.SocketType,
    server: socket.socket | trio.socket.SocketType,
    traffic: Traffic,
    timeouts: Timeouts,
    *,
    pipes: PipePool | None,
    owned: bool,
    notify: Callable[[outcome.Outcome], Any],
) -> Link:
    """:func:`relay` without a task: `notify` gets the outcome (an Ending,
    None after ``interrupt()``, or an unexpected error) from the poller and
    must then call the link's ``stop()``. Nothing is delivered once the
    link is stopped first. Raises (closing owned sockets) if the sockets
    cannot be registered."""
    poller = current_poller()
    try:
        return Link(client, server, traffic, timeouts, pipes, poller, owned, notify)
    except BaseException:
        if owned:
            for sock in (client, server):
                poller.drop(sock.fileno())
                sock.close()
        raise


_CLIENT: Final = 0  # side index; the server is side 1
# Directions share the index of the side they read from: direction 0 reads
# the client and writes the server, direction 1 the reverse.
_ABORT: Final = (Ending.CLIENT_ABORT, Ending.SERVER_ABORT)
_TIMEOUT: Final = (Ending.CLIENT_TIMEOUT, Ending.SERVER_TIMEOUT)

_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT
# Both sockets stay registered for both events, edge-triggered (EDGE_MASK):
# an event says "something changed", and a direction that waits has always
# drained its source (EAGAIN, or a short read with no end of stream
# announced) or filled its destination (EAGAIN) first, so the next change is
# an edge that reaches us. Nothing to re-arm per event.
# The peer has sent its FIN, or the connection failed: after the data still
# queued, a read returns the end (or the error) without a further edge.
_ENDING: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# As in trio and selectors: EPOLLHUP/EPOLLERR wake readers and writers alike.
_WAKES_READER: Final = ~_OUT
_WAKES_WRITER: Final = ~_IN

_LINGER_RESET: Final = struct.pack("ii", 1, 0)


def reset_on_close(sock: socket.socket) -> None:
    """Make the coming close() send a reset (SO_LINGER 0): a side that
    failed is passed on to the other as what it was, not as an end of stream."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already gone


@mypyc_attr(allow_interpreted_subclasses=True)  # proxy.io.kernel_relay.KernelLink
class Handover:
    """How a link of the relays' poller hands its outcome over, once: to
    ``notify`` (a sleeping task's reschedule, or a callback) as an
    ``outcome.Value`` or ``outcome.Error``; nothing after ``stop`` or a
    cancelled wait. The splice/copy :class:`Link` and the kernel's
    (:class:`proxy.io.kernel_relay.KernelLink`) set ``notify``."""

    __slots__ = ("notify",)
    notify: Callable[[outcome.Outcome], object] | None

    def ended(self, ending: Ending | None) -> None:
        """The relay ended so (None: interrupted); the poller serves it no more."""
        self.finish(outcome.Value(ending))

    def fail(self, error: Exception) -> None:
        """The poller's call when serving raised: a bug or an unexpected OS
        error, which belongs to the relay's owner."""
        self.finish(outcome.Error(error))

    def finish(self, result: outcome.Outcome) -> None:
        """Hand the result over; the poller serves us no more."""
        notify = self.notify
        if notify is not None:
            self.notify = None
            notify(result)

    def interrupt(self) -> None:
        """End the relay from outside (a kill): the outcome is None."""
        self.ended(None)

    def abort(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self.notify = None  # cancelled: the poller must not touch us any more
        return trio.lowlevel.Abort.SUCCEEDED


@mypyc_attr(allow_interpreted_subclasses=True)  # proxy.io.kernel_relay.TrialLink, tests' links
class Link(Handover):
    """One connection being relayed: both directions, readiness and deadlines.

    Served by the poller (``serve`` runs the directions that can move); the
    outcome goes to ``ended``, which hands it to ``notify`` (a sleeping
    task's reschedule, or a callback) as an ``outcome.Value``. A subclass
    may take it directly instead by overriding ``ended`` (and ``fail``, for
    an unexpected error), and may run ``Link.__init__`` late, when its
    relay starts: a session is its connection's link
    (:mod:`proxy.frontends.session`).
    """

    __slots__ = (
        "socks", "fds", "traffic", "poller", "ways", "want", "events",
        "queued", "timeouts", "waits", "deadlines", "deadline", "scheduled", "timer", "owned", "lost",
        "trial",
    )  # fmt: skip

    def __init__(self, client, server, traffic, timeouts, pipes, poller, owned, notify, ways=None) -> None:
        self.socks = (client, server)
        self.fds = (client.fileno(), server.fileno())
        self.traffic = traffic
        self.poller = poller
        if ways is not None:
            # The caller's own directions (TLS: proxy.tls.pump). They may hold
            # bytes read before the relay began (a handshake's leftovers), so
            # they move once at start; registering the sockets reports them.
            self.ways = ways(self)
            self.want = [YIELD, YIELD]
        else:
            if pipes is None:
                self.ways = [CopyDirection(self, 0), CopyDirection(self, 1)]
            else:
                self.ways = [SpliceDirection(self, 0, pipes), SpliceDirection(self, 1, pipes)]
            self.want = [READ, READ]
        self.events = [0, 0]  # epoll events per side, delivered by the poller
        self.notify = notify  # gets the outcome; None once finished or cancelled
        self.queued = False  # in the poller's list of links to serve
        self.timeouts = timeouts if timeouts.enabled else None
        self.waits = timeouts.waits
        self.deadlines = [math.inf, math.inf]  # per direction
        self.deadline = math.inf  # the earlier of the two
        self.scheduled = math.inf  # when the poller will next look at us
        self.timer: list | None = None  # that timer entry, retired when superseded or stopped (poller.retire)
        self.owned = owned  # close the sockets at the end
        self.lost = -1  # the side that failed (SideLost), if one did: the close resets the other
        # Quiet rounds left before ``promote()`` (0: never): a subclass sets
        # it to move a connection that proved long-lived to the kernel path.
        self.trial = 0
        poller.watch(self.fds[0], self, EDGE_MASK)
        try:
            poller.watch(self.fds[1], self, EDGE_MASK)
        except BaseException:
            poller.forget(self.fds[0])
            raise
        if self.timeouts is not None:
            self._push_deadlines(True, True)

    def serve(self) -> bool:
        """Move what the delivered events allow; True if a direction has more.

        The per-wake-up path, run by the poller: kept flat on purpose.
        """
        want, events = self.want, self.events
        client_events, server_events = events
        events[0] = events[1] = 0
        if (client_events | server_events) & _ENDING:
            # Which end was announced is kept (a FIN alone lets the copy
            # path spare the read of the end: CopyDirection.move).
            if client_events & _ENDING:
                self.ways[0].ending |= client_events & _ENDING
            if server_events & _ENDING:
                self.ways[1].ending |= server_events & _ENDING
        moved0 = moved1 = False
        try:
            wanted = want[0]
            if (
                (wanted == READ and client_events & _WAKES_READER)
                or (wanted == WRITE and server_events & _WAKES_WRITER)
                or wanted == YIELD
            ):
                moved0 = True
                wanted = self.ways[0].move()
                want[0] = wanted if wanted != NO_PIPE else self._copy_instead(0)
            wanted = want[1]
            if (
                (wanted == READ and server_events & _WAKES_READER)
                or (wanted == WRITE and client_events & _WAKES_WRITER)
                or wanted == YIELD
            ):
                moved1 = True
                wanted = self.ways[1].move()
                want[1] = wanted if wanted != NO_PIPE else self._copy_instead(1)
        except SideLost as lost:
            self.lost = lost.side
            self.ended(_ABORT[lost.side])
            return False
        except Hold:
            self.owned = False  # stop() leaves both sockets open for the owner
            self.ended(Ending.HELD)
            return False
        want0, want1 = want
        if want0 == DONE and want1 == DONE:
            self.ended(Ending.NORMAL)
            return False
        if self.timeouts is not None:
            # A direction that just ended starts the other's fin timeout.
            self._push_deadlines(
                moved0 or (moved1 and want1 == DONE), moved1 or (moved0 and want0 == DONE)
            )
        if self.trial and (moved0 or moved1) and want0 == READ and want1 == READ:
            # Quiet: everything read is written (no byte in a buffer or a
            # pipe) and both sides are waited for, no end announced. Only a
            # round that moved something counts: the report of two sockets
            # just registered (writable, nothing to read) is no traffic.
            ways = self.ways
            if not (ways[0].ending or ways[1].ending):
                self.trial -= 1
                if not self.trial:
                    self.promote()
            return False
        return want0 == YIELD or want1 == YIELD

    def _copy_instead(self, index: int) -> int:
        """No pipe to be had (a direction's move said NO_PIPE): this
        direction copies from now on, starting now."""
        self.ways[index] = self.ways[index].as_copy()
        return self.ways[index].move()

    def promote(self) -> None:
        """The link's ``trial`` rounds are over, in a quiet round: a subclass
        may hand the sockets over now (``detach``, then
        :func:`proxy.io.kernel_relay.hand_over`)."""

    def detach(self) -> None:
        """Give both sockets, open and still registered, to the link that
        takes them over (which re-registers them: :meth:`Poller.watch`):
        this link holds nothing any more and is never served again. Only
        in a quiet round (nothing read and not yet written)."""
        self.notify = None
        self._unschedule()
        for way in self.ways:
            way.give_back()
        self.ways = None

    def _unschedule(self) -> None:
        """No timer any more: the pending entry lets go of this link."""
        self.scheduled = math.inf
        if self.timer is not None:  # none without timeouts
            retire(self.timer)
            self.timer = None

    def expire(self) -> None:
        """Called by the poller once ``deadline`` has passed."""
        self.ended(self._blame())

    def stop(self) -> None:
        if self.ways is None:
            return  # stopped already
        self.notify = None
        self._unschedule()
        for way in self.ways:
            way.give_back()
        self.ways = None
        if self.owned:
            # Closing removes them from the epoll set: no unregistering.
            # The side that failed is gone (its close sends nothing): only
            # the other needs SO_LINGER 0 to hear of it as a reset (every
            # RabbitMQ close: it resets after Close-Ok).
            fds, socks, poller = self.fds, self.socks, self.poller
            poller.drop(fds[0])
            poller.drop(fds[1])
            if self.lost >= 0:
                reset_on_close(socks[1 - self.lost])
            socks[0].close()
            socks[1].close()
        else:
            self.poller.forget(self.fds[0])
            self.poller.forget(self.fds[1])

    def retime(self, timeouts: Timeouts) -> None:
        """Replaces the idle timeouts (a handshake learnt the heartbeat);
        both directions' deadlines restart from now."""
        self.timeouts = timeouts if timeouts.enabled else None
        self.waits = timeouts.waits
        if self.timeouts is None:
            self.deadlines = [math.inf, math.inf]
            self.deadline = math.inf
        else:
            self._push_deadlines(True, True)

    # --- idle deadlines ------------------------------------------------------
    # Each direction's deadline is "now + the limit for the side it waits on",
    # pushed forward only for directions that moved, once per wake-up. The
    # poller keeps one timer per link and re-checks it lazily, so pushing a
    # deadline forward costs two float stores, not a cancel scope update.

    def _push_deadlines(self, moved0: bool, moved1: bool) -> None:
        # Run on every wake-up with traffic when timeouts are set (an AMQP
        # connection's heartbeat sets them): flat, with the limits looked up
        # once per Timeouts (``Timeouts.waits``; bench/OPTIMISATIONS.md, TLS).
        timeouts = self.timeouts
        assert timeouts is not None  # called only with timeouts set
        if timeouts.tunnel is not None and (moved0 or moved1):
            moved0 = moved1 = True
        want0, want1 = self.want
        client, server, client_fin, server_fin = self.waits
        deadlines = self.deadlines
        now = self.poller.now()
        # A direction waits on its destination to take bytes (WRITE), else
        # on its source to send, which is a fin wait once the other ended.
        if want0 == DONE:
            deadlines[0] = math.inf
        elif moved0:
            deadlines[0] = now + (server if want0 == WRITE else client_fin if want1 == DONE else client)
        if want1 == DONE:
            deadlines[1] = math.inf
        elif moved1:
            deadlines[1] = now + (client if want1 == WRITE else server_fin if want0 == DONE else server)
        d0, d1 = deadlines
        self.deadline = deadline = d0 if d0 < d1 else d1
        if deadline < self.scheduled:
            self.scheduled = deadline
            retire(self.timer)  # superseded
            self.timer = self.poller.wake_at(self, deadline)

    def _waited_side(self, index: int) -> int:
        return 1 - index if self.want[index] == WRITE else index

    def _blame(self) -> Ending:
        d0, d1 = self.deadlines
        return _TIMEOUT[self._waited_side(1 if d1 < d0 else 0)]
