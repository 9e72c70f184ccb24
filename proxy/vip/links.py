"""The peer link's trio shell: masters accept links, backups hold one to their master.

The protocol and its proofs are in :mod:`proxy.vip.peerlink` (sans-I/O);
what a link's end means is decided by the machine
(:meth:`proxy.vip.machine.VrrpMachine.master_link_lost`). This module only
moves bytes:

- :class:`LinkServer`: the listening sockets of the process, one per
  (address, port), shared by the instances using that address (several
  VRIDs on one interface), which register by VRID. Every link is bounded:
  a handshake must finish within HANDSHAKE_TIMEOUT, at most MAX_LINKS links
  per socket and MAX_LINKS_PER_PEER per source address (beyond that a
  proven BUSY answer), and in unicast mode only the instance's peers get a
  link. An established link is held until the backup closes it or the
  instance ends. On it the backup reports its priority and the master names
  its successor (:func:`proxy.vip.peerlink.designate` over the instance's
  linked backups), to every linked backup, whenever that choice changes.
- The links and their listening sockets sit at the top of the process's
  descriptor table (:func:`closed_first`): a killed process's kernel
  releases its descriptors highest first, so a killed master's backups see
  their links end, and their confirming connection refused, before the
  kernel gets to the rest (thousands of client connections, or an
  AF_PACKET socket whose release waits for an RCU grace period).
- :class:`MasterLink`: one instance's link to the master its machine
  follows. When the link ends with FIN or RST, it confirms at once with a
  new connection: refused, reset or unproven, the master's Warren is gone
  and ``on_gone(master)`` is called; a proven answer means it is alive (a
  spurious reset) and that connection becomes the link; no answer (a
  timeout, an unreachable host) decides nothing and the RFC timers apply.
  A master of another version of the link (a proven VERSION_MISMATCH, or
  a connection closed before any greeting: the first link's Warren on a
  hello with features) is alive and gets no link: the RFC timers apply,
  one warning is logged (``vip.peer_link_version_mismatch``, on both sides
  when the other is this version or newer) and the backup retries slowly.
  While the link is up it reports the instance's priority (:meth:`MasterLink.report_priority`)
  and hands each successor the master names to ``on_successor(master, successor)``.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import ipaddress
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from proxy.vip.packet import IPAddress
from proxy.vip.peerlink import (
    ACCEPTED, FEATURES, GREETING_SIZE, HELLO_SIZE, PROOF_SIZE, BackupHandshake, LinkError, MasterHandshake,
    MessageReader, PriorityReport, Status, Successor, decode_hello, designate,
)  # fmt: skip

log = structlog.get_logger("warren.vip")

HANDSHAKE_TIMEOUT = 2.0
MAX_LINKS = 64  # per listening socket
MAX_LINKS_PER_PEER = 4
RETRY_MIN, RETRY_MAX = 1.0, 30.0  # between attempts to link to a master that does not answer
# TCP keepalive keeps firewalls' and NATs' state for the idle link (and ends a link
# to a vanished host with ETIMEDOUT, which is not taken as a death: no FIN).
KEEPALIVE = ((socket.SO_KEEPALIVE, socket.SOL_SOCKET, 1), (socket.TCP_KEEPIDLE, socket.IPPROTO_TCP, 30),
             (socket.TCP_KEEPINTVL, socket.IPPROTO_TCP, 10), (socket.TCP_KEEPCNT, socket.IPPROTO_TCP, 3))
_ENDED = (errno.ECONNRESET, errno.EPIPE, errno.ECONNREFUSED)  # the peer's kernel answered: no process
# Descriptors at the top of the table, where the links and their listeners go: at most
# this far below the soft RLIMIT_NOFILE (capped, so that the kernel's descriptor table
# stays small: 64k entries are 512 KiB).
TOP_SLOTS = 64
TOP_CAP = 1 << 16


# -- the master's side -------------------------------------------------------------------------


@dataclass(eq=False)
class Registration:
    """One instance's links on a shared listening socket."""

    address: IPAddress
    port: int
    vrid: int
    key: bytes | None
    peers: frozenset[IPAddress]  # empty: anybody (multicast mode)
    counters: collections.Counter
    scopes: set[trio.CancelScope] = field(default_factory=set)
    backups: dict[object, tuple[IPAddress, int]] = field(default_factory=dict)  # per established link
    successor: IPAddress | None = None
    mismatched: set = field(default_factory=set)  # backups of another version, warned about once
    changed: trio.Event = field(default_factory=trio.Event)  # set (and replaced) when successor changes

    def report(self, link: object, backup: tuple[IPAddress, int] | None) -> None:
        """A linked backup's (address, priority), or None when its link ended: the successor
        is chosen again, and the links are woken to tell it when it changed."""
        if backup is None:
            self.backups.pop(link, None)
        else:
            self.backups[link] = backup
        successor = designate(self.backups.values())
        if successor != self.successor:
            self.successor = successor
            self.counters["successor_changes"] += 1
            log.info("vip.successor_named", vrid=self.vrid, successor=str(successor) if successor else None)
            self.changed.set()
            self.changed = trio.Event()


@dataclass(eq=False)
class _Listener:
    listener: trio.SocketListener
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    registrations: dict[int, Registration] = field(default_factory=dict)
    links: int = 0
    per_peer: collections.Counter = field(default_factory=collections.Counter)


class LinkServer:
    """The peer-link listening sockets of this process; :meth:`run` in the VIP service's nursery."""

    def __init__(self) -> None:
        self._listeners: dict[tuple[IPAddress, int], _Listener] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for entry in self._listeners.values():
                entry.listener.socket.close()
            self._listeners.clear()

    def register(self, address: IPAddress, port: int, vrid: int, key: bytes | None, *,
                 ifindex: int = 0, peers: frozenset[IPAddress] = frozenset(),
                 counters: collections.Counter | None = None) -> Registration:
        """Accept links for ``vrid`` on ``address``:``port`` (0: any free port, for tests).

        ``OSError`` when the port cannot be listened on; ``ValueError`` when
        that VRID is registered on that address already.
        """
        assert self._nursery is not None, "LinkServer.run first"
        entry = self._listeners.get((address, port)) if port else None
        if entry is None:
            entry = _Listener(trio.SocketListener(trio.socket.from_stdlib_socket(_listen(address, port, ifindex))))
            port = entry.listener.socket.getsockname()[1]
            self._listeners[(address, port)] = entry
            self._nursery.start_soon(self._accept, entry)
        if vrid in entry.registrations:
            raise ValueError(f"peer link: VRID {vrid} is registered on {address} already")
        registration = Registration(address, port, vrid, key, peers, counters if counters is not None else collections.Counter())
        entry.registrations[vrid] = registration
        return registration

    def unregister(self, registration: Registration) -> None:
        """Ends the instance's links (their backups see a FIN) and closes an unused socket."""
        key = (registration.address, registration.port)
        entry = self._listeners.get(key)
        if entry is None or entry.registrations.get(registration.vrid) is not registration:
            return
        del entry.registrations[registration.vrid]
        for scope in registration.scopes:
            scope.cancel()
        if not entry.registrations:
            entry.scope.cancel()
            entry.listener.socket.close()
            del self._listeners[key]

    async def _accept(self, entry: _Listener) -> None:
        with entry.scope:
            while True:
                try:
                    stream = await entry.listener.accept()
                except trio.ClosedResourceError:
                    return
                except OSError as error:  # EMFILE and friends: wait, the others are served
                    log.error("vip.peer_link_accept_failed", error=str(error))
                    await trio.sleep(0.1)
                    continue
                assert self._nursery is not None
                self._nursery.start_soon(self._serve, entry, trio.SocketStream(closed_first(stream.socket)))

    async def _serve(self, entry: _Listener, stream: trio.SocketStream) -> None:
        peer = _peer_ip(stream)
        entry.links += 1
        entry.per_peer[peer] += 1
        scope = trio.CancelScope()
        try:
            async with stream:
                with scope:
                    registration = await self._handshake(entry, stream, peer, scope)
                    if registration is not None:
                        registration.counters["links_accepted"] += 1
                        await self._hold(registration, stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, LinkError, OSError):
            pass  # that one link ends
        except Exception:  # a bug: it ends this link only, never the service
            log.exception("vip.peer_link_failed", peer=str(peer))
        finally:
            entry.links -= 1
            entry.per_peer[peer] -= 1
            if not entry.per_peer[peer]:
                del entry.per_peer[peer]
            for registered in entry.registrations.values():
                registered.scopes.discard(scope)

    async def _handshake(self, entry: _Listener, stream: trio.SocketStream, peer: IPAddress | None,
                         scope: trio.CancelScope) -> Registration | None:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            hello = decode_hello(await _receive_exactly(stream, HELLO_SIZE))
            registration = entry.registrations.get(hello.vrid)
            if registration is not None:  # from now on, the instance's end ends this link too
                registration.scopes.add(scope)
            status = self._status(entry, registration, peer)
            handshake = MasterHandshake(registration.key if registration is not None else None)
            await stream.send_all(handshake.greet(hello, status))
            if handshake.status is not Status.OK or registration is None:
                if registration is not None:
                    registration.counters[f"links_refused_{handshake.status.name.lower()}"] += 1
                    if handshake.status is Status.VERSION_MISMATCH and peer not in registration.mismatched:
                        registration.mismatched.add(peer)
                        log.warning("vip.peer_link_version_mismatch", vrid=hello.vrid, peer=str(peer),
                                    features=hello.features, ours=FEATURES)
                return None
            if not handshake.check(await _receive_exactly(stream, PROOF_SIZE)):
                registration.counters["links_refused_bad_proof"] += 1
                return None
            _keepalive(stream.socket)
            await stream.send_all(ACCEPTED)
        return registration

    @staticmethod
    async def _hold(registration: Registration, stream: trio.SocketStream, peer: IPAddress | None) -> None:
        """Until the backup closes the link: take its priority reports, tell it the successor.
        Returns (the link ends) on its end, its violation or a failed send."""
        link = object()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_ending(nursery.cancel_scope, _tell_successor), registration, stream)
                await _ending(nursery.cancel_scope, _take_reports)(registration, stream, peer, link)
        finally:
            registration.report(link, None)

    @staticmethod
    def _status(entry: _Listener, registration: Registration | None, peer: IPAddress | None) -> Status:
        if registration is None:
            return Status.UNKNOWN_VRID
        if registration.peers and peer not in registration.peers:
            return Status.NOT_A_PEER
        if entry.links > MAX_LINKS or entry.per_peer[peer] > MAX_LINKS_PER_PEER:
            return Status.BUSY
        return Status.OK


_LINK_ENDS = (trio.BrokenResourceError, trio.ClosedResourceError, LinkError, OSError)


def _ending(scope: trio.CancelScope, task):
    """``task`` whose end, or the link's (an error in ``_LINK_ENDS``), ends ``scope``: the
    two halves of a held link stop together and nothing escapes into an exception group."""

    async def run(*args) -> None:
        try:
            await task(*args)
        except _LINK_ENDS:
            pass
        finally:
            scope.cancel()

    return run


async def _take_reports(registration: Registration, stream: trio.SocketStream, peer: IPAddress | None,
                        link: object) -> None:
    reader = MessageReader(PriorityReport)
    while data := await stream.receive_some():
        for report in reader.feed(data):
            if peer is not None:
                registration.report(link, (peer, report.priority))


async def _tell_successor(registration: Registration, stream: trio.SocketStream) -> None:
    told: object = ()  # nothing yet: the first successor is always said
    while True:
        changed = registration.changed
        if registration.successor != told:
            told = registration.successor
            await stream.send_all(Successor(registration.successor).encode())
        await changed.wait()


# -- the backup's side --------------------------------------------------------------------------


class Outcome:
    ESTABLISHED = "established"
    GONE = "gone"  # refused, reset, or answered by something that cannot prove it is that master
    ALIVE = "alive"  # a proven answer that turns the link down (BUSY...): the master runs
    UNKNOWN = "unknown"  # no answer in time, or the host is unreachable: proves nothing
    MISMATCH = "version_mismatch"  # a master speaking another version of the link: alive, no link


class MasterLink:
    """One instance's link to the master it follows; see the module docstring.

    :meth:`follow` (from the instance's FollowMaster action) replaces the
    link; ``on_gone(master)`` is called on the trio thread when the followed
    master's Warren is confirmed gone, ``on_successor(master, successor)``
    whenever that master names its successor. ``priority`` is reported to
    the master on every link, and again on :meth:`report_priority`.
    """

    def __init__(self, name: str, vrid: int, key: bytes | None, port: int, source: IPAddress,
                 on_gone: Callable[[IPAddress], None], *, priority: int = 100,
                 on_successor: Callable[[IPAddress, IPAddress | None], None] | None = None, ifindex: int = 0,
                 counters: collections.Counter | None = None) -> None:
        self.name, self.vrid, self.key, self.port = name, vrid, key, port
        self.source, self.ifindex = source, ifindex
        self.counters = counters if counters is not None else collections.Counter()
        self._on_gone = on_gone
        self._on_successor = on_successor
        self.priority = priority
        self._priority_changed = trio.Event()
        self._scope = trio.CancelScope()
        self.master: IPAddress | None = None
        self.up = False

    def follow(self, nursery: trio.Nursery, master: IPAddress | None) -> None:
        self._scope.cancel()
        self.master, self.up = master, False
        if master is not None:
            self._scope = trio.CancelScope()
            nursery.start_soon(self._follow, master, self._scope)

    def report_priority(self, priority: int) -> None:
        """The instance's effective priority; sent to the master if it changed."""
        if priority != self.priority:
            self.priority = priority
            self._priority_changed.set()
            self._priority_changed = trio.Event()

    def stop(self) -> None:
        self._scope.cancel()
        self.master, self.up = None, False

    async def _follow(self, master: IPAddress, scope: trio.CancelScope) -> None:
        with scope:
            delay, reported = RETRY_MIN, None
            outcome, stream = await self.connect(master)
            while True:
                if outcome != Outcome.ESTABLISHED:
                    if outcome != reported:  # once per kind of failure, not every retry
                        reported = outcome
                        if outcome == Outcome.MISMATCH:
                            log.warning("vip.peer_link_version_mismatch", instance=self.name, master=str(master),
                                        ours=FEATURES)
                        else:
                            log.info("vip.peer_link_unavailable", instance=self.name, master=str(master),
                                     outcome=outcome)
                    await trio.sleep(delay)
                    delay = min(RETRY_MAX, delay * 2)
                    outcome, stream = await self.connect(master)
                    continue
                assert stream is not None
                delay, reported = RETRY_MIN, None
                self.up = True
                self.counters["links_established"] += 1
                log.info("vip.peer_link_up", instance=self.name, master=str(master))
                ended = await self._hold(stream, master)
                self.up = False
                if not ended:  # no FIN or RST (keepalive timeout, garbage): link again
                    outcome, stream = await self.connect(master)
                    continue
                outcome, stream = await self.connect(master)  # confirm: is its Warren still there?
                if outcome == Outcome.GONE:
                    self.counters["masters_gone"] += 1
                    log.warning("vip.master_gone", instance=self.name, master=str(master))
                    self._on_gone(master)
                    return
                self.counters["links_lost"] += 1
                log.info("vip.peer_link_lost", instance=self.name, master=str(master), confirmed=outcome)

    async def _hold(self, stream: trio.SocketStream, master: IPAddress) -> bool:
        """Holds the link until it ends: True for FIN or RST (the peer's kernel closed it),
        False for anything else (a protocol violation, a failed send)."""
        ended = False

        async def take_successors() -> None:
            nonlocal ended
            reader = MessageReader(Successor)
            try:
                while data := await stream.receive_some():
                    for message in reader.feed(data):
                        if self._on_successor is not None:
                            self._on_successor(master, message.address)
            except trio.BrokenResourceError as error:
                ended = _errno(error) in _ENDED
                return
            ended = True  # b"": FIN

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(self._report_priorities, stream)
            await _ending(nursery.cancel_scope, take_successors)()
        return ended

    async def _report_priorities(self, stream: trio.SocketStream) -> None:
        # A failed send ends only this task: how the link ended (FIN, RST: the master's
        # death?) is for the reading side to find out.
        try:
            while True:
                changed = self._priority_changed
                await stream.send_all(PriorityReport(self.priority).encode())
                await changed.wait()
        except _LINK_ENDS:
            pass

    async def connect(self, master: IPAddress) -> tuple[str, trio.SocketStream | None]:
        """One attempt at a link; the stream only when ESTABLISHED (then the caller owns it)."""
        sock = trio.socket.socket(socket.AF_INET6 if master.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await sock.bind(_sockaddr(self.source, 0, self.ifindex))
                await sock.connect(_sockaddr(master, self.port, self.ifindex))
                stream = trio.SocketStream(sock)
                outcome = await self._handshake(stream)
        except trio.TooSlowError:
            outcome = Outcome.UNKNOWN
        except LinkError as error:  # closed before the greeting: a live Warren of the first link
            outcome = Outcome.MISMATCH if error.reason == "no_greeting" else Outcome.GONE
        except (trio.BrokenResourceError, OSError) as error:
            outcome = Outcome.GONE if _errno(error) in _ENDED else Outcome.UNKNOWN
        if outcome == Outcome.ESTABLISHED:
            _keepalive(sock)
            return outcome, stream
        sock.close()
        return outcome, None

    async def _handshake(self, stream: trio.SocketStream) -> str:
        handshake = BackupHandshake(self.vrid, self.key)
        await stream.send_all(handshake.hello())
        # A dead process cannot read a hello: a connection closed (FIN) before any byte of
        # the greeting was closed by a live one, the first link's Warren refusing features.
        first = await stream.receive_some(GREETING_SIZE)
        if not first:
            raise LinkError("no_greeting")
        greeted = handshake.greeted(first + await _receive_exactly(stream, GREETING_SIZE - len(first)))
        if greeted.status is not Status.OK:
            self.counters[f"link_refused_{greeted.status.name.lower()}"] += 1
            # No such instance there (any more) is as good as gone; other refusals come from
            # a running master, if it could prove it.
            alive = greeted.proven and greeted.status is not Status.UNKNOWN_VRID
            if alive and greeted.status is Status.VERSION_MISMATCH:
                return Outcome.MISMATCH
            return Outcome.ALIVE if alive else Outcome.GONE
        await stream.send_all(greeted.reply)
        if await _receive_exactly(stream, len(ACCEPTED)) != ACCEPTED:
            raise LinkError("not_accepted")
        return Outcome.ESTABLISHED




# -- plumbing ----------------------------------------------------------------------------------


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise LinkError("closed", f"after {len(data)} of {size} bytes")
        data += chunk
    return data


def closed_first(sock):
    """``sock`` (a stdlib or trio socket, which this consumes) on a descriptor near the
    top of the table, as the same kind of socket; ``sock`` itself when no such descriptor is free.

    When a process is killed, ``exit_files()`` hands each open file's release to
    task work, which runs last in, first out: the kernel closes the highest
    descriptor first (measured: a SIGKILLed process's six connections end in
    reverse descriptor order). And before that comes ``exit_mm()``, the
    teardown of the process's memory, which no descriptor number avoids.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = TOP_CAP if soft == resource.RLIM_INFINITY else min(soft, TOP_CAP)
    floor = ceiling - TOP_SLOTS
    if sock.fileno() >= floor:
        return sock
    try:
        high = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, floor)
    except OSError:  # EMFILE / EINVAL: the top is taken or the limit is tiny
        return sock
    moved = socket.socket(fileno=high)
    sock.close()
    if isinstance(sock, socket.socket):
        return moved
    return trio.socket.from_stdlib_socket(moved)


def _listen(address: IPAddress, port: int, ifindex: int) -> socket.socket:
    sock = closed_first(socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                                      socket.SOCK_STREAM))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(_sockaddr(address, port, ifindex))
        sock.listen(MAX_LINKS)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _sockaddr(address: IPAddress, port: int, ifindex: int) -> tuple:
    if address.version == 6:  # a link-local address needs its interface
        return (str(address), port, 0, ifindex if address.is_link_local else 0)
    return (str(address), port)


def _keepalive(sock) -> None:
    for option, level, value in KEEPALIVE:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


def _peer_ip(stream: trio.SocketStream) -> IPAddress | None:
    try:
        return ipaddress.ip_address(stream.socket.getpeername()[0].split("%")[0])
    except (OSError, ValueError):
        return None


def _errno(error: BaseException) -> int | None:
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error.errno if isinstance(error, OSError) else None
