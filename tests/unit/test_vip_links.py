"""The peer link's trio shell over real sockets on 127.0.0.1: links made, refused, ended, confirmed."""

from __future__ import annotations

import collections
import ipaddress
import os
import resource
import socket

import pytest
import structlog
import trio

from lab import wait_until
from proxy.vip import links as links_module
from proxy.vip import peerlink as peerlink_module
from proxy.vip.links import MAX_LINKS_PER_PEER, LinkServer, MasterLink, Outcome
from proxy.vip.peerlink import (
    FEATURES, FLAG_AUTHENTICATED, GREETING_SIZE, HELLO_SIZE, BackupHandshake, Status, Successor, link_key,
)
from tests.proxyutil import read_to_end

LOCAL = ipaddress.IPv4Address("127.0.0.1")
KEY = link_key("0123456789abcdef-secret")


async def closed_by_peer(stream) -> bool:
    """The peer closed (FIN, or RST when it left input unread) without a word."""
    try:
        return await stream.receive_some(100) == b""
    except trio.BrokenResourceError:
        return True


class Backup:
    """A MasterLink with what it reported."""

    def __init__(self, port: int, *, vrid: int = 51, key: bytes | None = None, source=LOCAL, priority=100) -> None:
        self.gone: list = []
        self.gone_event = trio.Event()
        self.successors: list = []  # (master, successor) as named
        self.counters: collections.Counter = collections.Counter()
        self.link = MasterLink("vip1", vrid, key, port, source, self._on_gone, priority=priority,
                               on_successor=self._on_successor, counters=self.counters)

    def _on_gone(self, master) -> None:
        self.gone.append(master)
        self.gone_event.set()

    def _on_successor(self, master, successor) -> None:
        self.successors.append((master, successor))

    def told(self):
        return self.successors[-1][1] if self.successors else "nothing"


async def serving(nursery, *, vrid=51, key=None, peers=frozenset()):
    server = LinkServer()
    await nursery.start(server.run)
    counters = collections.Counter()
    registration = server.register(LOCAL, 0, vrid, key, peers=peers, counters=counters)
    return server, registration, counters


async def linked(nursery, *, key=None):
    """A master's link server and a Backup whose link to it is up."""
    server, registration, served = await serving(nursery, key=key)
    backup = Backup(registration.port, key=key)
    backup.link.follow(nursery, LOCAL)
    await wait_until(lambda: backup.link.up, what="link up")
    return server, registration, served, backup


@pytest.mark.parametrize("key", [None, KEY])
async def test_a_backup_links_to_its_master_and_learns_at_once_when_its_warren_is_gone(key):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, registration, served, backup = await linked(nursery, key=key)
            # The master counts its link after sending the acceptance: the backup may be first.
            await wait_until(lambda: served["links_accepted"] == 1, what="link up on the master's side")
            assert backup.counters["links_established"] == 1
            server.unregister(registration)  # what the master's death does: FIN, then nobody listens
            await backup.gone_event.wait()
            assert backup.gone == [LOCAL] and backup.counters["masters_gone"] == 1
            nursery.cancel_scope.cancel()


async def test_a_link_that_ends_while_the_master_runs_is_made_again_and_reports_nothing():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, registration, served, backup = await linked(nursery)
            for scope in list(registration.scopes):  # a spurious end: the master's process lives on
                scope.cancel()
            await wait_until(lambda: backup.counters["links_established"] == 2, what="linked again")
            assert backup.counters["links_lost"] == 1 and backup.gone == []
            nursery.cancel_scope.cancel()


async def test_the_whole_server_stopping_ends_the_links_too():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as server_nursery:
                _, registration, _ = await serving(server_nursery)
                backup = Backup(registration.port)
                backup.link.follow(nursery, LOCAL)
                await wait_until(lambda: backup.link.up, what="link up")
                server_nursery.cancel_scope.cancel()
            await backup.gone_event.wait()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("backup_key, master_key, vrid, counter", [
    (KEY, link_key("another secret of 16+ bytes"), 51, None),  # the master cannot prove itself
    (KEY, None, 51, "link_refused_auth_mismatch"),
    (None, KEY, 51, "link_refused_auth_mismatch"),
    (None, None, 52, "link_refused_unknown_vrid"),
])
async def test_no_link_without_the_same_key_and_vrid(backup_key, master_key, vrid, counter):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, registration, served = await serving(nursery, key=master_key)
            backup = Backup(registration.port, vrid=vrid, key=backup_key)
            outcome, stream = await backup.link.connect(LOCAL)
            assert stream is None and outcome in (Outcome.GONE, Outcome.ALIVE)
            assert served["links_accepted"] == 0
            if counter:
                assert backup.counters[counter] == 1
            nursery.cancel_scope.cancel()


async def test_a_backup_not_among_the_unicast_peers_gets_no_link():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, registration, served = await serving(nursery, peers=frozenset({ipaddress.ip_address("127.0.0.9")}))
            outcome, _ = await Backup(registration.port).link.connect(LOCAL)
            assert outcome == Outcome.ALIVE
            await wait_until(lambda: served["links_refused_not_a_peer"] == 1, what="counted")
            nursery.cancel_scope.cancel()


async def test_links_per_backup_address_are_bounded_with_a_proven_busy_answer():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, registration, served = await serving(nursery, key=KEY)
            backup = Backup(registration.port, key=KEY)
            held = []
            for _ in range(MAX_LINKS_PER_PEER):
                outcome, stream = await backup.link.connect(LOCAL)
                assert outcome == Outcome.ESTABLISHED
                held.append(stream)
            outcome, _ = await backup.link.connect(LOCAL)
            assert outcome == Outcome.ALIVE  # a proven refusal: alive, never a takeover
            await wait_until(lambda: served["links_refused_busy"] == 1, what="counted as busy")
            for stream in held:
                await stream.aclose()
            await wait_until(lambda: not registration.scopes, what="links closed")
            assert (await backup.link.connect(LOCAL))[0] == Outcome.ESTABLISHED
            nursery.cancel_scope.cancel()


async def test_nobody_listening_is_gone_but_reports_nothing_before_a_link_existed():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            probe = trio.socket.socket()
            await probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
            probe.close()  # a port nobody listens on: connections refused
            backup = Backup(port)
            assert (await backup.link.connect(LOCAL))[0] == Outcome.GONE
            backup.link.follow(nursery, LOCAL)  # e.g. a keepalived master: no link, retried slowly
            await trio.sleep(0.2)
            assert backup.gone == [] and not backup.link.up
            nursery.cancel_scope.cancel()


async def test_garbage_and_silence_cost_the_master_nothing(monkeypatch):
    monkeypatch.setattr(links_module, "HANDSHAKE_TIMEOUT", 0.2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, registration, served = await serving(nursery)
            junk = await trio.open_tcp_stream("127.0.0.1", registration.port)
            await junk.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await closed_by_peer(junk)  # not a hello
            silent = await trio.open_tcp_stream("127.0.0.1", registration.port)
            assert await closed_by_peer(silent)  # after the handshake timeout
            backup = Backup(registration.port)
            assert (await backup.link.connect(LOCAL))[0] == Outcome.ESTABLISHED  # still serving
            for stream in (junk, silent):
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_two_instances_share_one_listening_socket_by_vrid():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, first, _ = await serving(nursery, vrid=51)
            second = server.register(LOCAL, first.port, 52, None)
            with pytest.raises(ValueError):
                server.register(LOCAL, first.port, 52, None)
            a, b = Backup(first.port, vrid=51), Backup(first.port, vrid=52)
            for backup in (a, b):
                backup.link.follow(nursery, LOCAL)
            await wait_until(lambda: a.link.up and b.link.up, what="both linked")
            server.unregister(second)  # one instance ends: its links only; the socket stays for the other
            await b.gone_event.wait()
            assert a.gone == [] and a.link.up
            nursery.cancel_scope.cancel()


async def test_an_instance_that_ends_during_a_handshake_ends_that_link_too(monkeypatch):
    monkeypatch.setattr(links_module, "HANDSHAKE_TIMEOUT", 60)  # the close must come from the unregistering
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, registration, _ = await serving(nursery)
            client = await trio.open_tcp_stream("127.0.0.1", registration.port)
            handshake = BackupHandshake(51, None)
            await client.send_all(handshake.hello())
            greeted = handshake.greeted(await receive_exactly(client, GREETING_SIZE))
            assert greeted.status is Status.OK
            server.unregister(registration)  # before our proof: the master never holds this link
            assert await closed_by_peer(client)
            await client.aclose()
            nursery.cancel_scope.cancel()


async def receive_exactly(stream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await stream.receive_some(size - len(data))
    return data


# -- descriptors: a killed master's kernel ends its links first ---------------------------------


def local_ports_by_descriptor() -> dict[int, int]:
    """fd -> local TCP port of every TCP socket of this process."""
    ports = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # not a socket (or gone meanwhile)
        with probe:
            if probe.type == socket.SOCK_STREAM and probe.family in (socket.AF_INET, socket.AF_INET6):
                ports[fd] = probe.getsockname()[1]
    return ports


async def test_a_masters_link_sockets_sit_above_every_other_descriptor():
    """The kernel releases a killed process's descriptors highest first (exit_files() queues
    them as task work, run last in, first out): the links, then their listener, must come
    before thousands of client connections or an AF_PACKET socket's RCU grace period."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, registration, _, backup = await linked(nursery)
            with socket.socket() as opened_later:
                ports = local_ports_by_descriptor()
                master_side = sorted(fd for fd, port in ports.items() if port == registration.port)
                assert len(master_side) == 2  # the listener and the accepted link
                listener, link = master_side  # the link, made last, goes first
                assert listener > max(fd for fd in ports if fd not in master_side)
                assert listener > opened_later.fileno()
                soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                assert link < min(soft, links_module.TOP_CAP)
            nursery.cancel_scope.cancel()


def test_without_room_at_the_top_a_socket_stays_where_it_is(monkeypatch):
    monkeypatch.setattr(links_module, "TOP_SLOTS", 0)  # the floor is the limit itself: no descriptor fits
    with socket.socket() as sock:
        assert links_module.closed_first(sock) is sock and sock.fileno() >= 0


async def test_the_master_names_its_best_linked_backup_to_all_of_them_and_keeps_that_current():
    low_ip, high_ip = ipaddress.IPv4Address("127.0.0.2"), ipaddress.IPv4Address("127.0.0.3")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, registration, served = await serving(nursery)
            low = Backup(registration.port, source=low_ip, priority=150)
            low.link.follow(nursery, LOCAL)
            await wait_until(lambda: low.told() == low_ip, what="the only backup named")
            high = Backup(registration.port, source=high_ip, priority=100)
            high.link.follow(nursery, LOCAL)
            await wait_until(lambda: high.told() == low_ip, what="the second backup told the first is the successor")
            high.link.report_priority(200)  # its tracking restored, say
            await wait_until(lambda: low.told() == high.told() == high_ip, what="both told of the new successor")
            assert registration.successor == high_ip and all(m == LOCAL for m, _ in low.successors + high.successors)
            high.link.stop()  # its link ends: the master names the one left
            await wait_until(lambda: low.told() == low_ip, what="the remaining backup named again")
            low.link.stop()
            await wait_until(lambda: registration.successor is None and not registration.backups, what="no backups")
            assert served["successor_changes"] == 4
            nursery.cancel_scope.cancel()


async def test_a_backup_that_breaks_the_message_protocol_loses_its_link_not_the_master():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, registration, served = await serving(nursery)
            backup = Backup(registration.port, source=ipaddress.IPv4Address("127.0.0.2"))
            backup.link.follow(nursery, LOCAL)
            await wait_until(lambda: registration.successor is not None, what="backup named")
            stream = await trio.open_tcp_stream("127.0.0.1", registration.port)
            handshake = BackupHandshake(51, None)
            await stream.send_all(handshake.hello())
            greeted = handshake.greeted(await links_module._receive_exactly(stream, GREETING_SIZE))
            await stream.send_all(greeted.reply)
            assert await links_module._receive_exactly(stream, 1) == b"\x01"
            await stream.send_all(b"\x02\x00")  # a successor, which only a master may send
            assert await closed_by_peer_after_successor(stream)
            assert registration.successor == ipaddress.IPv4Address("127.0.0.2") and backup.link.up
            nursery.cancel_scope.cancel()


async def closed_by_peer_after_successor(stream) -> bool:
    """Skips the successor the master says to every link, then expects its end."""
    return await read_to_end(stream) in (b"", Successor(ipaddress.IPv4Address("127.0.0.2")).encode())


# -- two versions of the link ----------------------------------------------------------------


async def test_a_backup_of_another_version_is_refused_proven_and_warned_about_once():
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            _, registration, served = await serving(nursery, key=KEY)
            for _ in range(2):  # the first peer link's backup (no features), retrying
                client = await trio.open_tcp_stream("127.0.0.1", registration.port)
                handshake = BackupHandshake(51, KEY, features=0)
                await client.send_all(handshake.hello())
                greeted = handshake.greeted(await receive_exactly(client, GREETING_SIZE))
                assert greeted.status is Status.VERSION_MISMATCH and greeted.proven
                assert await closed_by_peer(client)
                await client.aclose()
            assert served["links_refused_version_mismatch"] == 2 and served["links_accepted"] == 0
            assert [entry["features"] for entry in logs if entry["event"] == "vip.peer_link_version_mismatch"] == [0]
            backup = Backup(registration.port, key=KEY)  # this version still links
            assert (await backup.link.connect(LOCAL))[0] == Outcome.ESTABLISHED
            nursery.cancel_scope.cancel()


async def first_link_master(listener: trio.SocketListener, attempts: list) -> None:
    """The first peer link's master (before link messages): a hello with any flag but
    'authenticated' breaks its protocol, and it closes the connection without a greeting."""
    while True:
        stream = await listener.accept()
        attempts.append(trio.current_time())
        async with stream:
            hello = await receive_exactly(stream, HELLO_SIZE)
            assert hello[5] & ~FLAG_AUTHENTICATED  # ours has features: refused as "bad_flags"


async def test_a_master_of_the_first_link_version_is_alive_and_retried_slowly_not_gone(monkeypatch):
    monkeypatch.setattr(links_module, "RETRY_MIN", 0.3)
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            attempts: list = []
            nursery.start_soon(first_link_master, listeners[0], attempts)
            backup = Backup(listeners[0].socket.getsockname()[1])
            assert (await backup.link.connect(LOCAL))[0] == Outcome.MISMATCH
            backup.link.follow(nursery, LOCAL)
            await wait_until(lambda: len(attempts) >= 4, what="two retries after the first")
            assert attempts[3] - attempts[2] >= 0.3  # backed off, not re-linking in a loop
            assert backup.gone == [] and not backup.link.up
            warned = [entry for entry in logs if entry["event"] == "vip.peer_link_version_mismatch"]
            assert len(warned) == 1 and warned[0]["log_level"] == "warning"
            nursery.cancel_scope.cancel()


async def test_a_link_whose_end_is_confirmed_by_a_master_of_another_version_takes_nothing_over(monkeypatch):
    monkeypatch.setattr(links_module, "RETRY_MIN", 0.3)
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            _, registration, served, backup = await linked(nursery)
            # The master's Warren is replaced by another version between the link's end and the
            # confirming connection (BackupHandshake's default features stay this version's).
            monkeypatch.setattr(peerlink_module, "FEATURES", FEATURES << 1)
            for scope in list(registration.scopes):
                scope.cancel()
            await wait_until(lambda: served["links_refused_version_mismatch"] >= 2, what="confirmed, then retried")
            assert backup.gone == [] and backup.counters["links_lost"] == 1 and not backup.link.up
            assert backup.counters["link_refused_version_mismatch"] >= 2
            events = [entry["event"] for entry in logs]
            assert events.count("vip.peer_link_version_mismatch") == 2  # one on each side
            assert "vip.master_gone" not in events
            nursery.cancel_scope.cancel()
