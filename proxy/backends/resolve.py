"""DNS resolution of backend server addresses, on trio, with c-ares (pycares).

Server addresses in the configuration may be DNS names.  ``Resolver.resolve``
turns a name into its sorted, de-duplicated A and AAAA addresses;
``keep_resolved`` re-resolves a set of names periodically and reports changes.

How pycares is driven from trio, and why
-----------------------------------------
pycares 5 offers two modes.  Without ``sock_state_cb`` a channel starts
c-ares' own event thread and calls our callbacks *on that thread*, which would
force every result across a thread boundary (``TrioToken.run_sync_soon``) and
leave a thread we do not control running behind trio's back.  With
``sock_state_cb`` c-ares tells us which sockets it wants watched and does I/O
only inside ``Channel.process_fd``; every callback then runs synchronously in
the calling thread.  We use the latter: the resolving task itself waits on
those sockets with ``trio.lowlevel.wait_readable``/``wait_writable`` (plus a
deadline from ``Channel.timeout()`` for c-ares' retransmission timers) and
calls ``process_fd``.  No event thread, no cross-thread hand-off, and
cancellation is plain trio cancellation.  (pycares still starts one daemon
thread per process, used only to destroy closed channels.)

Each lookup uses its own short-lived channel, driven by the task that asked.
A shared channel would need one long-lived driver task (trio forbids two tasks
waiting on one fd) and hence a nursery owned by the resolver; a per-lookup
channel needs none, so ``Resolver`` holds no resources and needs no
``aclose``.  The costs are small for Warren's handful of names re-resolved
every few seconds: resolv.conf is re-read per lookup (a feature: edits are
picked up) and c-ares' response cache, which lives in the channel, never
serves a stale answer to ``keep_resolved``.

Sockets closed by c-ares: c-ares reports a socket's end with
``sock_state_cb(fd, False, False)`` immediately before it closes the fd, and we
call ``trio.lowlevel.notify_closing`` there, as trio requires before an fd it
may have watched is closed.  ``pycares.Channel.close()`` destroys the channel
on pycares' own shutdown thread; we cancel pending queries first (so their
callbacks run here) and ignore any callback arriving on another thread.

Lookups go through c-ares' ``getaddrinfo`` (AF_UNSPEC): it asks A and AAAA,
honours resolv.conf's search list and /etc/hosts like the system resolver, and
succeeds if either family has addresses.  Literal IP addresses never touch DNS.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

import pycares
import structlog
import trio

log = structlog.get_logger("warren.dns")

# Without pending timers c-ares gives no deadline; wake at least this often.
_IDLE_WAKEUP = 1.0
_BAD_FD = pycares.ARES_SOCKET_BAD
_REASONS = {
    pycares.errno.ARES_ENOTFOUND: "nxdomain",
    pycares.errno.ARES_ENODATA: "nodata",
    pycares.errno.ARES_ESERVFAIL: "servfail",
    pycares.errno.ARES_EREFUSED: "refused",
    pycares.errno.ARES_ETIMEOUT: "timeout",
    pycares.errno.ARES_ECONNREFUSED: "connection_refused",
}


class ResolveError(Exception):
    """``name`` could not be resolved; ``reason`` is a short stable token
    (``nxdomain``, ``nodata``, ``servfail``, ``refused``, ``timeout``, ...)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name, reason)
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


class Resolver:
    """Resolves names to addresses via ``nameservers`` (``(ip, port)`` pairs;
    empty means the system's resolv.conf).  Each ``resolve`` call fails with
    ``ResolveError(name, "timeout")`` after at most ``timeout`` seconds."""

    def __init__(self, nameservers: Sequence[tuple[str, int]] = (), timeout: float = 2.0) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._servers = [_server_spec(host, port) for host, port in nameservers]
        self._timeout = timeout

    async def resolve(self, name: str) -> tuple[str, ...]:
        """Return the sorted, de-duplicated A and AAAA addresses of ``name``
        (IPv4 first).  A literal IP address is returned as is, without DNS.
        Raises ``ResolveError`` on NXDOMAIN, SERVFAIL, no addresses or timeout."""
        literal = literal_ip(name)
        if literal is not None:
            return (literal,)
        with trio.move_on_after(self._timeout):
            return await self._lookup(name)
        raise ResolveError(name, "timeout")

    async def _lookup(self, name: str) -> tuple[str, ...]:
        try:
            lookup = _AresLookup(self._servers, self._timeout)
        except pycares.AresError as error:  # e.g. unreadable resolv.conf
            raise ResolveError(name, "resolver_init_failed") from error
        try:
            lookup.start(name)
            await lookup.run_until_done()
        finally:
            lookup.close()
        return lookup.addresses(name)


def literal_ip(name: str) -> str | None:
    """The normalised address if ``name`` is an IP literal (brackets allowed
    around IPv6), else ``None``."""
    candidate = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


def _server_spec(host: str, port: int) -> str:
    # ares_set_servers_csv syntax: "ip:port", IPv6 in brackets.
    ip = ipaddress.ip_address(host)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _sort_key(address: str) -> tuple[int, bytes]:
    """IPv4 before IPv6, then numerically (plain string order is not)."""
    ip = ipaddress.ip_address(address)
    return ip.version, ip.packed


class _AresLookup:
    """One getaddrinfo on a private c-ares channel, pumped by the calling
    trio task.  Must be created, run and closed in the same trio thread."""

    def __init__(self, servers: list[str], timeout: float) -> None:
        self._thread = threading.get_ident()
        self._interest: dict[int, tuple[bool, bool]] = {}
        self._done = False
        self._status: int | None = None
        self._result: pycares.AddrInfoResult | None = None
        # Two tries of half the budget each: one lost UDP datagram is
        # retransmitted (to the next server, if several) before trio's
        # deadline in Resolver.resolve ends the lookup.
        self._channel = pycares.Channel(
            sock_state_cb=self._on_socket_state,
            timeout=max(timeout / 2, 0.001),
            tries=2,
            servers=servers or None,
        )

    def start(self, name: str) -> None:
        self._channel.getaddrinfo(
            name, None, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, callback=self._on_result
        )

    async def run_until_done(self) -> None:
        """Serve c-ares' sockets and timers until the lookup has completed."""
        while not self._done:
            ready = await _wait_for_sockets(dict(self._interest), self._channel.timeout(_IDLE_WAKEUP))
            for fd, (readable, writable) in ready.items():
                if fd in self._interest:  # an earlier process_fd may have closed it
                    self._channel.process_fd(fd if readable else _BAD_FD, fd if writable else _BAD_FD)
            # Processing with no fds runs c-ares' timeout handling (retries).
            self._channel.process_fd(_BAD_FD, _BAD_FD)

    def close(self) -> None:
        """Cancel what is pending and release the channel (never blocks)."""
        if not self._done:
            self._channel.cancel()  # callbacks run now, in this thread
        self._done = True
        # Sockets c-ares still holds are closed by pycares' shutdown thread:
        # make trio forget them first.
        for fd in list(self._interest):
            trio.lowlevel.notify_closing(fd)
        self._interest.clear()
        self._channel.close()

    def addresses(self, name: str) -> tuple[str, ...]:
        if self._status is not None:
            reason = _REASONS.get(self._status)
            if reason is None:
                reason = pycares.errno.errorcode.get(self._status, str(self._status))
                reason = reason.removeprefix("ARES_E").lower()
            raise ResolveError(name, reason)
        assert self._result is not None
        found = {_decode(node.addr[0]) for node in self._result.nodes}
        if not found:
            raise ResolveError(name, "nodata")
        return tuple(sorted(found, key=_sort_key))

    def _on_result(self, result: pycares.AddrInfoResult | None, status: int | None) -> None:
        if threading.get_ident() != self._thread or self._done:
            return  # late callback from pycares' shutdown thread: nobody waits
        self._done = True
        self._result, self._status = result, status

    def _on_socket_state(self, fd: int, readable: bool, writable: bool) -> None:
        if threading.get_ident() != self._thread:
            return  # channel teardown on pycares' shutdown thread
        if readable or writable:
            self._interest[fd] = (bool(readable), bool(writable))
        elif self._interest.pop(fd, None) is not None:
            # c-ares closes fd right after this callback returns.
            trio.lowlevel.notify_closing(fd)


def _decode(address: str | bytes) -> str:
    text = address.decode("ascii") if isinstance(address, bytes) else address
    return str(ipaddress.ip_address(text))


async def _wait_for_sockets(
    interest: Mapping[int, tuple[bool, bool]], timeout: float
) -> dict[int, tuple[bool, bool]]:
    """Wait until one watched socket is ready or ``timeout`` passes; return
    the sockets seen ready as ``{fd: (readable, writable)}`` (maybe empty)."""
    ready: dict[int, tuple[bool, bool]] = {}

    async def watch(fd: int, wait_for_writable: bool, scope: trio.CancelScope) -> None:
        if wait_for_writable:
            await trio.lowlevel.wait_writable(fd)
        else:
            await trio.lowlevel.wait_readable(fd)
        readable, writable = ready.get(fd, (False, False))
        ready[fd] = (readable or not wait_for_writable, writable or wait_for_writable)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = trio.current_time() + timeout
        for fd, (readable, writable) in interest.items():
            if readable:
                nursery.start_soon(watch, fd, False, nursery.cancel_scope)
            if writable:
                nursery.start_soon(watch, fd, True, nursery.cancel_scope)
    return ready


# --------------------------------------------------------------------------
# Periodic re-resolution


def changed_entries(
    known: Mapping[str, tuple[str, ...]], fresh: Mapping[str, tuple[str, ...]]
) -> list[tuple[str, tuple[str, ...]]]:
    """The ``(name, addresses)`` of ``fresh`` that differ from ``known``.
    Names missing from ``fresh`` (failed lookups) are never reported."""
    return [(name, addresses) for name, addresses in fresh.items() if known.get(name) != addresses]


async def resolve_all(resolver: Resolver, names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Resolve ``names`` concurrently; failures are logged (``dns.failed``)
    and left out of the result.  Never raises ``ResolveError``."""
    results: dict[str, tuple[str, ...]] = {}

    async def resolve_one(name: str) -> None:
        try:
            results[name] = await resolver.resolve(name)
        except ResolveError as error:
            log.warning("dns.failed", name=name, reason=error.reason)

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(resolve_one, name)
    return results


async def keep_resolved(
    resolver: Resolver,
    names: Iterable[str],
    interval: float,
    on_change: Callable[[str, tuple[str, ...]], None],
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``names`` resolved, forever.

    Resolves every name once and reports ``task_status.started(initial)``
    (names that failed are absent from ``initial``).  Then re-resolves all
    names every ``interval`` seconds and calls ``on_change(name, addresses)``
    only when a name's address set differs from the last one known (including
    a name's first success after failing).  A failed lookup keeps the last good
    addresses and is logged as ``dns.failed``; DNS failures never raise.
    """
    names = tuple(dict.fromkeys(names))
    known = await resolve_all(resolver, names)
    task_status.started(dict(known))
    while True:
        await trio.sleep(interval)
        fresh = await resolve_all(resolver, names)
        for name, addresses in changed_entries(known, fresh):
            log.info("dns.changed", name=name, old=known.get(name), new=addresses)
            known[name] = addresses
            on_change(name, addresses)
