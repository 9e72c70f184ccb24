"""The kernel relay: a connection whose bytes the kernel moves (a socket map).

The third relay path beside splice and copy (:mod:`proxy.io.sockmap` says
what the kernel does and does not do). Once the pair is in the map, Warren
is woken only for what the kernel leaves to it:

* **passed bytes** (the socket map's notification ring, :class:`RingWatch`;
  EPOLLIN without a ring): a direction ran out of credit, or a skb came
  while its peer was not in the map yet. The program keeps passing until
  Warren has forwarded all of them, so Warren waits until the kernel has put
  every redirected byte in the target's send queue (``queued_into``), then
  reads the passed bytes and writes them, in order, and grants new credit.
  A target that does not drain (its receiver stopped reading) is waited for:
  meanwhile the source's window stays closed. That is the backpressure.
* **end of stream** (EPOLLRDHUP): once the program has handled every byte
  before the FIN and the target has sent them, ``shutdown(SHUT_WR)`` on the
  target; when both directions have ended the relay ends and both sockets
  are closed (which takes them out of the map).
* **errors** (EPOLLERR with SO_ERROR set): the relay ends with that side's
  abort, and the other socket is reset (closed with SO_LINGER 0): a reset is
  propagated, once the kernel has put the bytes redirected before it in the
  other socket's send queue (as the splice and copy paths write every byte
  read before the reset): RabbitMQ sends its Close-Ok right before a reset.
  A reset after that side's FIN, once both ways were done with everything
  delivered, lost nothing and is not an abort (``_ended_before_reset``).
* **idle deadlines**: checked lazily when they fall due, from the kernel's
  last-receive times (TCP_INFO ``tcpi_last_data_recv``), not from reads.
* **bytes the program saw twice** (a kernel that relays a retransmitted
  segment's overlap again, :func:`proxy.io.sockmap.overlap_hazard`, where
  the program cannot cut it off, :func:`proxy.io.sockmap._repair`): at
  each credit grant and end of stream the program's count of a socket's
  bytes is checked against TCP's own (TCP_INFO ``tcpi_bytes_received``);
  more ends the connection as that side's abort (``relay.kernel_duplicate``).
  Old bytes the program did cut off are logged when the connection ends
  (``relay.kernel_repaired``).

Byte counts come from the program's counters (:class:`KernelTraffic`).
Sockets are registered for EPOLLRDHUP only, edge-triggered (and EPOLLIN
where the map has no notification ring): EPOLLIN would wake Warren for
every skb the program redirects, EPOLLOUT for every one the kernel sends;
each is added only while a direction waits for it.

A connection usually gets here from splice/copy (:func:`hand_over`) once it
proved long-lived, or at once (:func:`start_kernel_relay`).
"""

from __future__ import annotations

import _socket
import math
import os
import select
import socket

import outcome
import structlog

from ..lograte import Rate, RateLimitedLog
from .directions import SideLost, lost_or_raise
from .poller import current_poller, retire
from .relay import Ending, Handover, Link, Timeouts, reset_on_close
from .sockmap import Full, Pair, Sockmap, acknowledged, queued_into, received_total, send_room, since_last_receive

log = structlog.get_logger("warren.relay")
LOG_RATES = {"relay.notifications_lost": Rate(burst=1, interval=10.0)}

_CLIENT, _SERVER = 0, 1
_ABORT = (Ending.CLIENT_ABORT, Ending.SERVER_ABORT)
_TIMEOUT = (Ending.CLIENT_TIMEOUT, Ending.SERVER_TIMEOUT)

_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
# How a relayed socket is registered: for its FIN (and errors, always
# reported); for EPOLLIN too where the socket map has no notification ring
# (see Sockmap); EPOLLIN while its direction waits for passed bytes to land
# in its queue (_WAIT_READ); EPOLLOUT while the other direction waits to
# write to it or for it to drain.
_FLOWING_MASK = select.EPOLLRDHUP | select.EPOLLET
_WITHOUT_RING_MASK = _FLOWING_MASK | select.EPOLLIN

# A direction's state.
_FLOWING, _WAIT_TARGET, _WAIT_WRITE, _WAIT_READ, _DONE = range(5)

# While a target drains its redirected bytes (a kernel worker sends them),
# look again after this long, doubling up to the maximum; an EPOLLOUT edge
# (the target's buffer had filled and now has room) looks again at once.
_DRAIN_POLL_FIRST = 0.001
_DRAIN_POLL_MAX = 0.1
_CHUNK = 256 * 1024
# queued_into counts an acknowledged FIN as a byte: the most it may exceed
# the bytes a target was given.
_FIN_BYTE = 1
# How long a reset waits for the bytes redirected before it to reach the
# other socket's send queue (a kernel worker's job: microseconds, as a rule).
_RESET_DRAIN = 0.1
# Below this much room in the target's buffer, wait for it to drain rather
# than wake up for every few bytes.
_MIN_GRANT = 4096



class KernelTraffic:
    """Byte counters of a kernel-relayed connection, read from the program's
    counters while it lives (no system call), frozen when it ends. ``base``:
    bytes relayed another way before the pair entered the map."""

    __slots__ = ("pair", "frozen_in", "frozen_out", "base_in", "base_out")

    def __init__(self, pair: Pair, base: tuple[int, int] = (0, 0)) -> None:
        self.pair: Pair | None = pair
        self.base_in, self.base_out = base
        self.frozen_in = self.frozen_out = 0

    @property
    def bytes_in(self) -> int:
        pair = self.pair
        return self.frozen_in if pair is None else self.base_in + pair.received(_CLIENT)

    @property
    def bytes_out(self) -> int:
        pair = self.pair
        return self.frozen_out if pair is None else self.base_out + pair.received(_SERVER)

    def freeze(self) -> None:
        if self.pair is not None:
            self.frozen_in, self.frozen_out = self.bytes_in, self.bytes_out
            self.pair = None


class Refused(Exception):
    """The kernel (or a full map) refused the pair, e.g. a socket no longer
    established (a client that sent its FIN already): nothing was changed,
    relay the sockets another way."""


def start_kernel_relay(
    client: _socket.socket,
    server: _socket.socket,
    sockmap: Sockmap,
    timeouts: Timeouts,
    *,
    written: tuple[int, int] = (0, 0),
    notify,
) -> KernelLink:
    """Put a connected pair in the socket map and serve what the kernel
    leaves to Warren; `notify` gets the outcome (an Ending, None after
    ``interrupt()``, or an unexpected error) and must then call ``stop()``,
    which closes both sockets. `written` counts bytes Warren already wrote
    to (client, server), e.g. a PROXY header; `server` is the socket Warren
    connected, `client` an accepted one.

    Raises Refused with the sockets untouched if the pair cannot enter the
    map. Once in, the pair never leaves for another path: any later failure
    closes both sockets and propagates."""
    try:
        pair = sockmap.add(client, server)
    except (Full, OSError) as exc:
        raise Refused(str(exc)) from exc
    return _serve_pair(client, server, pair, timeouts, written, notify, (0, 0))


def hand_over(link: Link, sockmap: Sockmap, notify, written: tuple[int, int] = (0, 0)) -> KernelLink | None:
    """Move a splice/copy relay's connection onto the kernel path, in a quiet
    round of that link (both directions wait to read; everything read has
    been written, so no byte sits in a buffer or a pipe; no end of stream
    announced). Bytes that arrive from now on, or arrived since the link's
    last read, wait in the sockets' receive queues and go through the
    program first, in order (:meth:`Pair.flush`): behind every byte the link
    wrote, as the bytes of a PROXY header are behind nothing. `written`:
    bytes others wrote to (client, server) before the link (a PROXY header).

    Returns the kernel's link, `notify` getting its outcome (the old link is
    detached and never served again), or None when the kernel refuses the
    pair (nothing changed: the old link goes on)."""
    client, server = link.socks
    try:
        pair = sockmap.add(client, server)
    except (Full, OSError):
        return None
    traffic, timeouts = link.traffic, link.timeouts
    kernel = _serve_pair(
        client, server, pair, Timeouts() if timeouts is None else timeouts,
        (written[0] + traffic.bytes_out, written[1] + traffic.bytes_in), notify,
        (traffic.bytes_in, traffic.bytes_out),
    )  # fmt: skip
    # Only now: had the kernel's link failed to start (closing both
    # sockets), the old one would still report that failure to its owner.
    link.detach()
    return kernel


def _serve_pair(client, server, pair: Pair, timeouts: Timeouts, written, notify, base) -> KernelLink:
    try:
        return KernelLink(client, server, pair, timeouts, written, notify, base)
    except BaseException:
        pair.release()
        poller = current_poller()
        for sock in (client, server):
            poller.drop(sock.fileno())
            sock.close()
        raise


class TrialLink(Link):
    """A splice/copy relay that moves onto the kernel path once its
    connection proved long-lived (``rounds`` quiet rounds, see
    :func:`hand_over`): for its owner one link throughout, whose ``notify``
    gets the outcome of whichever path ends it. A session does the same as
    itself (:mod:`proxy.frontends.session`); this is the io-level form."""

    __slots__ = ("sockmap", "written", "kernel")

    def __init__(self, client, server, traffic, timeouts, pipes, notify, sockmap: Sockmap, rounds: int,
                 written: tuple[int, int] = (0, 0)) -> None:  # fmt: skip
        self.sockmap, self.written, self.kernel = sockmap, written, None
        Link.__init__(self, client, server, traffic, timeouts, pipes, current_poller(), True, notify)
        self.trial = rounds

    def promote(self) -> None:
        kernel = hand_over(self, self.sockmap, self.notify, self.written)
        if kernel is not None:
            self.kernel, self.traffic = kernel, kernel.traffic

    def interrupt(self) -> None:
        if self.kernel is not None:
            self.kernel.interrupt()
        else:
            Link.interrupt(self)

    def abort(self, raise_cancel):
        if self.kernel is not None:
            self.kernel.notify = None
        return Link.abort(self, raise_cancel)

    def stop(self) -> None:
        if self.kernel is not None:
            self.kernel.stop()
        else:
            Link.stop(self)


class RingWatch:
    """The poller's link for a socket map's notification ring (see
    :class:`Sockmap`): each slot the program wrote there is a socket it
    passed bytes to, whose kernel link is served as if that socket had
    reported EPOLLIN. Lost notifications (a full ring) have every kernel
    link served. Registered level-triggered: a record still being written
    when the ring is read keeps the fd readable until it is read."""

    __slots__ = ("sockmap", "poller", "fds", "events", "queued", "notify", "scheduled", "deadline", "log")

    def __init__(self, sockmap: Sockmap, poller) -> None:
        self.sockmap, self.poller = sockmap, poller
        self.fds = (sockmap.ring_fd, -1)
        self.events = [0, 0]
        self.queued = False
        self.notify = True  # never finished: served as long as the poller runs
        self.scheduled = self.deadline = math.inf  # when the losses logged are summed up
        # A full ring comes with a load that fills it again at once.
        self.log = RateLimitedLog(log, LOG_RATES, clock=lambda: poller.now())
        poller.watch(sockmap.ring_fd, self, select.EPOLLIN)

    def serve(self) -> bool:
        self.events[0] = 0
        slots, lost = self.sockmap.notified()
        pair_of, poke = self.sockmap.pair_of, self.poller.poke
        if lost:
            self._log_lost()
            slots = range(len(pair_of))
        for slot in slots:
            pair = pair_of[slot]
            if pair is not None and pair.owner is not None:
                poke(pair.owner)
        return False

    def _log_lost(self) -> None:
        self.log.warning("relay.notifications_lost", pairs=self.sockmap.pairs)
        if self.deadline == math.inf:
            # The summary of the losses left out is due when the interval
            # ends, even if none follows.
            self.deadline = self.scheduled = self.poller.now() + LOG_RATES["relay.notifications_lost"].interval
            self.poller.wake_at(self, self.deadline)

    def expire(self) -> None:
        self.deadline = math.inf
        self.log.flush()

    def fail(self, error: Exception) -> None:
        # A bug here must not stop notifications: logged, and served again.
        log.error("relay.notifications_failed", exc_info=error)


class _Way:
    """One direction: bytes received on ``source`` go out on ``target``."""

    __slots__ = ("source", "target", "state", "eof", "pending", "checked", "poll", "active", "excess", "unseen")

    def __init__(self, source: int) -> None:
        self.source = source
        self.target = 1 - source
        self.state = _FLOWING
        self.eof = False  # the source's FIN has been seen
        self.pending = b""  # passed bytes read but not yet written
        self.checked = False  # the target has sent every redirected byte
        self.poll = _DRAIN_POLL_FIRST
        self.active = 0.0  # when this direction last made progress (trio time)
        self.excess = 0  # bytes the target's send queue got beyond what it was given (_target_drained)
        self.unseen = 0  # bytes the source received that the program never saw (at most): read before the map


class KernelLink(Handover):
    """One kernel-relayed connection, as a link of the relays' poller
    (handing its outcome over as the splice/copy relay's link does)."""

    __slots__ = (
        "socks", "fds", "pair", "traffic", "written", "ways", "events", "queued",
        "timeouts", "idle_deadline", "deadline", "scheduled", "poller", "masks", "drain_at",
        "ending", "closed", "quiet", "lost", "lost_until", "timer",
    )  # fmt: skip

    def __init__(self, client, server, pair: Pair, timeouts: Timeouts, written, notify, base=(0, 0)) -> None:
        self.socks = (client, server)
        self.fds = (client.fileno(), server.fileno())
        self.pair = pair
        self.traffic = KernelTraffic(pair, base)
        self.written = written
        self.ways = (_Way(_CLIENT), _Way(_SERVER))
        self.events = [0, 0]
        self.queued = False
        self.notify = notify
        self.timeouts = timeouts if timeouts.enabled else None
        # The poller calls expire() once `deadline` has passed: the earlier of
        # the idle deadline and the next look at a draining direction.
        self.idle_deadline = self.deadline = self.scheduled = self.drain_at = math.inf
        self.timer: list | None = None  # that timer entry, retired when superseded or closed (poller.retire)
        self.ending: Ending | None = None
        self.closed = False
        self.lost: int | None = None  # a side that failed, its reset waiting for a drain (_lose)
        self.lost_until = math.inf
        self.poller = poller = current_poller()
        sockmap = pair.sockmap
        if sockmap.ring_fd is None:
            self.quiet = _WITHOUT_RING_MASK
        else:
            self.quiet = _FLOWING_MASK
            if sockmap.watcher is None or sockmap.watcher.poller is not poller:
                sockmap.watcher = RingWatch(sockmap, poller)
        self.masks = [self.quiet, self.quiet]
        poller.watch(self.fds[0], self, self.quiet)
        try:
            poller.watch(self.fds[1], self, self.quiet)
        except BaseException:
            poller.forget(self.fds[0])
            raise
        pair.owner = self
        # What each socket had queued before the pair entered the map goes
        # through the program now, ahead of anything arriving later.
        pair.flush()
        for way in self.ways:
            way.unseen = self._unseen(way.source, base[way.source])
        now = self.poller.now()
        for way in self.ways:
            way.active = now
        if self.timeouts is not None:
            self._schedule(now)
        # Anything already announced (a FIN, a reset) is reported by the
        # registrations above; the poller serves us then.

    # --- the poller's side ----------------------------------------------------------

    def serve(self) -> bool:
        events = self.events
        reported = (events[0], events[1])
        events[0] = events[1] = 0
        if self.lost is not None:
            self._lose(self.lost)
            return False
        try:
            for side in (_CLIENT, _SERVER):
                if reported[side] & (select.EPOLLERR | select.EPOLLHUP):
                    self._check_error(side)
                if reported[side] & (select.EPOLLRDHUP | select.EPOLLHUP):
                    self.ways[side].eof = True
            self._advance()
        except SideLost as lost:
            self._lose(lost.side)
        return False

    def expire(self) -> None:
        """A timer fell due: a drain to look at again, or an idle deadline."""
        now = self.poller.now()
        if self.lost is not None:
            self._lose(self.lost)
            return
        try:
            if self.drain_at <= now:
                self.drain_at = math.inf
                self._advance()
            if self.notify is not None and self.idle_deadline <= now:
                blamed = self._idle_blame(now)
                if blamed is not None:
                    self._end(_TIMEOUT[blamed])
                    return
        except SideLost as lost:
            self._lose(lost.side)
            return
        if self.notify is not None:
            self._schedule(now)

    def stop(self) -> None:
        """Close both sockets (taking them out of the map); a reset of one
        side resets the other. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.notify = None
        self.scheduled = math.inf
        retire(self.timer)
        self.timer = None
        self.traffic.freeze()
        repaired = self.pair.repaired(_CLIENT), self.pair.repaired(_SERVER)
        if any(repaired):
            # Segments that overlapped what a socket had (retransmissions):
            # the program relayed only their new bytes (proxy.io.sockmap._repair).
            log.info("relay.kernel_repaired", client=repaired[0], server=repaired[1])
        self.pair.release()
        reset = self.ending in _ABORT
        for fd, sock in zip(self.fds, self.socks):
            self.poller.drop(fd)
            if reset:
                reset_on_close(sock)
            sock.close()

    # --- moving what the kernel leaves to Warren -------------------------------------

    def _end(self, ending: Ending) -> None:
        self.ending = ending
        self.finish(outcome.Value(ending))

    def _lose(self, side: int) -> None:
        """`side` failed: end with its abort (which resets the other side)
        once the kernel has put every byte it redirected from `side` in the
        other's send queue, or after _RESET_DRAIN. Until then nothing else
        is done for this connection."""
        now = self.poller.now()
        if self.lost is None:
            self.lost, self.lost_until = side, now + _RESET_DRAIN
        try:
            drained = self._target_drained(self.ways[side])
        except SideLost:
            drained = True  # the other side is gone too: nothing to wait for
        if drained or now >= self.lost_until:
            self._end(_ABORT[side])
            return
        self.drain_at = min(now + _DRAIN_POLL_FIRST, self.lost_until)
        self._schedule(now)

    def _check_error(self, side: int) -> None:
        """Raise SideLost if `side` failed, unless its reset lost nothing."""
        sock = self.socks[side]
        harmless = self._ended_before_reset(side)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # read, hence cleared
        if error and not harmless:
            raise lost_or_raise(OSError(error, os.strerror(error)), side)

    def _ended_before_reset(self, side: int) -> bool:
        """Had `side`'s connection ended before its reset? Its FIN came
        first, the way towards it had ended (Warren's FIN sent) with every
        byte acknowledged, the way from it had forwarded every passed byte.
        Such a reset answers the FIN Warren passed on, from a host that had
        already forgotten its closed socket (a full TIME_WAIT table drops
        the FIN_WAIT2 state: tcp_max_tw_buckets, TCPTimeWaitOverflow). The
        copy and splice paths read that FIN before the error (it is queued
        first) and end normally; so does this one."""
        towards, away = self.ways[1 - side], self.ways[side]
        if towards.state != _DONE or away.pending or not self.pair.caught_up(side):
            return False
        sock = self.socks[side]
        try:
            if acknowledged(sock, connected=side == _SERVER) < self._sent_into(towards):
                return False
            # A receive reports the FIN (SOCK_DONE) before the error, and the
            # error (clearing it) where no FIN came.
            return sock.recv(1, _PEEK) == b""
        except BlockingIOError:
            return False
        except OSError as exc:
            raise lost_or_raise(exc, side) from exc

    def _advance(self) -> None:
        for way in self.ways:
            if way.state != _DONE:
                way.state = self._move(way)
        if self.ways[0].state == _DONE and self.ways[1].state == _DONE:
            self._end(Ending.NORMAL)
            return
        self._update_registrations()

    def _move(self, way: _Way) -> int:
        pair = self.pair
        for _ in range(2):
            if way.pending or not pair.caught_up(way.source):
                state = self._forward_passed(way)
                if state != _FLOWING:
                    return state
            if pair.redirected(way.source) >= pair.limit(way.source):
                # Out of credit (the program passes from now on): more once
                # the kernel has handed what it was given to the target, as
                # much as the target's buffer has room for.
                if not self._target_drained(way):
                    return _WAIT_TARGET
                room = self._room(way)
                if room < _MIN_GRANT:
                    return _WAIT_TARGET
                self._check_seen_once(way)
                pair.grant(way.source, min(room, self.pair.sockmap.credit))
                way.checked = False
            if not way.eof:
                return _FLOWING
            # The FIN. A system call that takes the socket's lock runs after
            # the softirq that queued it; the program has handled its data.
            try:
                peeked = self.socks[way.source].recv(1, _PEEK)
            except BlockingIOError:
                peeked = b""
            except OSError as exc:
                raise lost_or_raise(exc, way.source) from exc
            if not peeked and pair.caught_up(way.source):
                break
        else:
            return _WAIT_READ  # passed bytes still on their way to the socket's queue
        if not self._target_drained(way):
            return _WAIT_TARGET
        self._check_seen_once(way)
        if self.ways[way.target].state != _DONE:
            # The other way still flows: a half-close. (After both, closing
            # the sockets sends the last FIN.)
            try:
                self.socks[way.target].shutdown(socket.SHUT_WR)
            except OSError as exc:
                raise lost_or_raise(exc, way.target) from exc
        way.active = self.poller.now()
        return _DONE

    def _forward_passed(self, way: _Way) -> int:
        """Forward the bytes the program passed to Warren, after every byte
        it redirected; _FLOWING once caught up."""
        if not way.checked and not self._target_drained(way):
            return _WAIT_TARGET
        way.checked = True
        pair, source = self.pair, way.source
        src, dst = self.socks[source], self.socks[way.target]
        forwarded = pair.forwarded(source)
        while True:
            if way.pending:
                try:
                    sent = dst.send(way.pending)
                except BlockingIOError:
                    return _WAIT_WRITE
                except OSError as exc:
                    raise lost_or_raise(exc, way.target) from exc
                way.pending = way.pending[sent:]
                forwarded += sent
                pair.set_forwarded(source, forwarded)
                way.active = self.poller.now()
                if way.pending:
                    continue
            if forwarded == pair.passed(source):
                break
            try:
                way.pending = src.recv(min(_CHUNK, pair.passed(source) - forwarded))
            except BlockingIOError:
                return _WAIT_READ  # still on its way to the socket's queue
            except OSError as exc:
                raise lost_or_raise(exc, source) from exc
            if not way.pending:
                return _WAIT_READ  # the end came first: the rest is still on its way
        way.checked = False
        return _FLOWING

    def _target_drained(self, way: _Way) -> bool:
        """Has the kernel put every byte it redirected in the target's send
        queue? A kernel worker sends them after the redirect, usually within
        microseconds: a FIN that follows a reply closely finds it still at
        work, so it gets one yield of the CPU before a timer is needed."""
        target, expected = way.target, self._sent_into(way)
        for attempt in range(2):
            try:
                queued = queued_into(self.socks[target], connected=target == _SERVER)
            except OSError as exc:
                raise lost_or_raise(exc, target) from exc
            if queued >= expected:
                if queued - expected > _FIN_BYTE and not way.excess:
                    self._report_excess(way, queued - expected, expected)
                way.poll = _DRAIN_POLL_FIRST
                return True
            if attempt == 0:
                os.sched_yield()
        return False

    def _report_excess(self, way: _Way, excess: int, expected: int) -> None:
        """The target's send queue holds more bytes than Warren wrote and the
        program redirected into it: bytes delivered twice, or a count gone
        wrong (docs/operations.md, the kernel path's known issue). Logged
        once per direction; what was sent cannot be taken back, so the
        relay goes on."""
        way.excess = excess
        log.error("relay.kernel_excess", towards="server" if way.target == _SERVER else "client",
                  bytes=excess, expected=expected)

    def _unseen(self, side: int, consumed: int) -> int:
        """Bytes `side` received that the program will never see, at most:
        those read before the pair entered the map (`consumed`, the other
        path's count), and no more than TCP's count beyond the program's
        now (read in that order, so a byte arriving meanwhile can only
        make it less). 0 if TCP's count cannot be read: the check is then
        only less sensitive."""
        try:
            total = received_total(self.socks[side])
        except OSError:
            return 0
        return max(0, min(consumed, total - self.pair.received(side)))

    def _check_seen_once(self, way: _Way) -> None:
        """Has the program seen more bytes than TCP received on `way`'s
        source? A kernel that relays a retransmitted segment's overlap
        again (proxy.io.sockmap.overlap_hazard): the stream is corrupt
        from there on, so the connection ends as an abort (both sides
        reset) rather than normally, with ``relay.kernel_duplicate``.

        The program's count is read first: TCP counts a byte when it queues
        it, before the program runs on it, so a byte arriving between the two
        reads can only make the difference smaller. (Read the other way
        round, a segment arriving in between looked like a duplicate: a
        false alarm that reset healthy bulk streams.)"""
        source = way.source
        seen = self.pair.received(source) + way.unseen
        try:
            total = received_total(self.socks[source]) - (_FIN_BYTE if way.eof else 0)
        except OSError as exc:
            raise lost_or_raise(exc, source) from exc
        duplicated = seen - total
        if duplicated > 0:
            log.error("relay.kernel_duplicate", side="client" if source == _CLIENT else "server", bytes=duplicated,
                      repaired=self.pair.repaired(source))  # fmt: skip
            raise SideLost(source)

    def _sent_into(self, way: _Way) -> int:
        """Bytes Warren and the kernel handed to `way`'s target: all that
        its send queue ever had, once drained."""
        return self.written[way.target] + self.pair.redirected(way.source) + self.pair.forwarded(way.source)

    def _room(self, way: _Way) -> int:
        try:
            return send_room(self.socks[way.target])
        except OSError as exc:
            raise lost_or_raise(exc, way.target) from exc

    def _update_registrations(self) -> None:
        """EPOLLOUT on a socket only while a direction waits to write to it;
        a drain to look at again on a timer."""
        now = None
        ways = self.ways
        for side in (_CLIENT, _SERVER):
            mask = self.quiet
            if ways[1 - side].state in (_WAIT_TARGET, _WAIT_WRITE):  # the direction writing to `side`
                mask |= select.EPOLLOUT
            if ways[side].state == _WAIT_READ:  # the direction reading from `side`
                mask |= select.EPOLLIN
            if mask != self.masks[side]:
                self.masks[side] = mask
                self.poller.watch(self.fds[side], self, mask)
        for way in self.ways:
            # A read wait is woken by EPOLLIN; the timer only guards it.
            if way.state in (_WAIT_TARGET, _WAIT_READ):
                now = self.poller.now() if now is None else now
                when = now + way.poll
                way.poll = min(way.poll * 2, _DRAIN_POLL_MAX)
                if when < self.drain_at:
                    self.drain_at = when
        if self.drain_at < math.inf:
            self._schedule(now if now is not None else self.poller.now())

    # --- idle deadlines -----------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        if self.timeouts is not None:
            self.idle_deadline = min(self._deadline(way, now) for way in self.ways)
        self.deadline = when = min(self.idle_deadline, self.drain_at)
        if when < self.scheduled:
            self.scheduled = when
            retire(self.timer)  # superseded
            self.timer = self.poller.wake_at(self, when)

    def _deadline(self, way: _Way, now: float) -> float:
        if way.state == _DONE:
            return math.inf
        return way.active + self._limit(way)

    def _waited_side(self, way: _Way) -> int:
        return way.target if way.state in (_WAIT_TARGET, _WAIT_WRITE) else way.source

    def _limit(self, way: _Way) -> float:
        side = self._waited_side(way)
        return self.timeouts.limit(side, fin=self.ways[way.target].state == _DONE and side == way.source)

    def _idle_blame(self, now: float) -> int | None:
        """Refresh each direction's last activity from the kernel; the side
        to blame if one is still past its deadline, else None."""
        for way in self.ways:
            if way.state != _DONE and self._waited_side(way) == way.source:
                way.active = max(way.active, now - since_last_receive(self.socks[way.source]))
        if self.timeouts.tunnel is not None:
            latest = max(way.active for way in self.ways)
            for way in self.ways:
                way.active = latest
        late = [way for way in self.ways if self._deadline(way, now) <= now]
        if not late:
            return None
        return self._waited_side(min(late, key=lambda way: self._deadline(way, now)))
