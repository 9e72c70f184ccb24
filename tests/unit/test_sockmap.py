"""The socket map and its verdict program, on real loopback sockets.

These need CAP_BPF and CAP_NET_ADMIN (CI runs as root); the fallback of an
unprivileged process is specified too, with setpriv.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from lab import wait_until_blocking
from proxy.io import bpf, sockmap
from proxy.io.sockmap import Full, Sockmap, missing_capabilities, probe, queued_into

BOUND = 10.0  # seconds: every wait below fails rather than hangs

needs_bpf = pytest.mark.skipif(
    bool(missing_capabilities()), reason="needs CAP_BPF and CAP_NET_ADMIN (run as root)"
)


# --- the assembler and the system call, without the kernel -----------------------


def test_jumps_are_resolved_to_their_labels_counting_two_slots_per_map_load():
    code = bpf.assemble(
        [
            bpf.jump_if_imm(bpf.JEQ, bpf.R1, 0, "end"),
            bpf.load_map_fd(bpf.R2, 7),
            bpf.mov_imm(bpf.R0, 1),
            bpf.Label("end"),
            bpf.exit_(),
        ]
    )
    insns = [struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8)]
    assert len(insns) == 5
    assert insns[0] == (0x15, 0x01, 3, 0)  # jeq r1, 0, +3 (over the 2-slot load and the mov)
    assert insns[1] == (0x18, 0x12, 0, 7)  # r2 = map fd 7 (src_reg 1: a map fd)
    assert insns[4] == (0x95, 0, 0, 0)


def test_the_verdict_program_is_a_few_dozen_instructions():
    code = sockmap.build_program(3, 4, 5)
    assert len(code) % 8 == 0 and 30 <= len(code) // 8 <= 70
    with_ring = sockmap.build_program(3, 4, 5, 6, 16)
    assert len(with_ring) // 8 <= 90
    repairing = sockmap.build_program(3, 4, 5, 6, 16, layout=sockmap.KernelLayout(1, 40, 1464))
    # The repair: a few dozen instructions (its cuts are a loop).
    assert len(with_ring) // 8 < len(repairing) // 8 <= len(with_ring) // 8 + 80


@pytest.mark.parametrize("machine, number", [("x86_64", 321), ("aarch64", 280), ("arm64", 280)])
def test_the_system_call_number_per_architecture(machine, number):
    assert bpf.syscall_number(machine) == number


def test_an_unknown_architecture_is_refused_with_its_name():
    with pytest.raises(bpf.Unsupported, match="riscv64"):
        bpf.syscall_number("riscv64")


@pytest.mark.parametrize(
    "cap_eff, missing",
    [
        ("000001ffffffffff", []),
        ("0000008000001000", []),  # CAP_BPF + CAP_NET_ADMIN only
        ("0000000000201000", []),  # CAP_SYS_ADMIN stands in for CAP_BPF (before 5.8)
        ("0000000000001000", ["CAP_BPF"]),
        ("0000008000000000", ["CAP_NET_ADMIN"]),
        ("0000000000000000", ["CAP_BPF", "CAP_NET_ADMIN"]),
    ],
)
def test_missing_capabilities_are_read_from_the_effective_set(cap_eff, missing):
    status = f"Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n"
    assert missing_capabilities(status) == missing


# --- the kernel ---------------------------------------------------------------------


def tcp_pair(listener) -> tuple[socket.socket, socket.socket]:
    outer = socket.create_connection(listener.getsockname(), timeout=BOUND)
    inner, _ = listener.accept()
    inner.settimeout(BOUND)
    return outer, inner


def connected_pairs(count: int) -> list[socket.socket]:
    """`count` connected loopback pairs, flat: [outer, inner, outer, inner...]."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(count)
        return [sock for _ in range(count) for sock in tcp_pair(listener)]


@pytest.fixture
def pairs():
    """pairs(count): connected_pairs(count), every socket closed after the test."""
    made = []

    def make(count: int) -> list[socket.socket]:
        socks = connected_pairs(count)
        made.extend(socks)
        return socks

    yield make
    for sock in made:
        sock.close()


@contextmanager
def relayed_by_the_kernel(*, before=(b"", b""), credit=1 << 20, attach="verdict", **options):
    """(client, server, pair, near, far): client <-> near ... far <-> server,
    near and far in the map; `before` is sent by client and server first."""
    client, near, far, server = socks = connected_pairs(2)
    smap = Sockmap(16, first_credit=credit, attach=attach, **options)
    try:
        if before[0]:
            client.sendall(before[0])
        if before[1]:
            server.sendall(before[1])
        for sock, sent in ((near, before[0]), (far, before[1])):
            wait_until_blocking(lambda sock=sock, sent=sent: len(peek(sock)) >= len(sent), timeout=BOUND, interval=0.001)
        pair = smap.add(near, far)
        pair.flush()
        yield client, server, pair, near, far
    finally:
        for sock in socks:
            sock.close()
        smap.close()


def readable(sock) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def peek(sock, size: int = 64) -> bytes:
    """What is queued on ``sock`` (up to `size` bytes), without taking it."""
    return sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT) if readable(sock) else b""


def recv_exactly(sock, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def events_of(sock, mask: int, *, bound: float = BOUND) -> int:
    """The first epoll report for `sock` matching `mask` (0 if none in time)."""
    with select.epoll() as epoll:
        epoll.register(sock.fileno(), mask | select.EPOLLET)
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            for _, events in epoll.poll(0.05):
                if events & mask:
                    return events
    return 0


@needs_bpf
def test_the_self_test_passes_here():
    availability = probe()
    assert (availability.available, availability.reason, availability.attach) == (True, "", "verdict")


@needs_bpf
def test_the_self_test_passes_with_a_stream_parser_as_older_kernels_need():
    availability = probe(attach="stream")
    assert (availability.available, availability.reason, availability.attach) == (True, "", "stream")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a raw socket and TCP repair mode need root")


@needs_root
def test_plain_tcp_delivers_a_retransmission_overlapping_received_bytes_once(pairs):
    """The check's own premise: the hand-made retransmission is taken as one
    (its old half skipped) by a socket outside the map."""
    client, near = pairs(1)
    client.sendall(sockmap.OVERLAP_SENT)
    assert recv_exactly(near, len(sockmap.OVERLAP_SENT)) == sockmap.OVERLAP_SENT
    sockmap.retransmit_overlapping(client)
    assert recv_exactly(near, len(sockmap.OVERLAP_NEW)) == sockmap.OVERLAP_NEW


@needs_bpf
@needs_root
def test_the_overlap_check_names_the_hazard_of_a_kernel_that_relays_an_overlap_twice():
    """Measured on a pair in the map of a program without the repair: if the
    old half comes out again, the check says so (auto then does not take the
    kernel path unless the program repairs it); if not, it finds no hazard."""
    with relayed_by_the_kernel(repair=False) as (client, server, pair, _, _):
        assert pair.sockmap.unrepaired == "not asked for"
        client.sendall(sockmap.OVERLAP_SENT)
        assert recv_exactly(server, len(sockmap.OVERLAP_SENT)) == sockmap.OVERLAP_SENT
        sockmap.retransmit_overlapping(client)
        twice = recv_exactly(server, len(sockmap.OVERLAP_NEW)) != sockmap.OVERLAP_NEW
    hazard = unrepaired_hazard()
    if twice:
        assert hazard.startswith("this kernel relays bytes twice when a retransmitted segment overlaps"), hazard
    else:
        assert hazard == ""


def unrepaired_hazard() -> str:
    """The overlap check's finding for a program without the repair."""
    unrepaired = Sockmap(8, repair=False)
    try:
        return sockmap.overlap_hazard(unrepaired)
    finally:
        unrepaired.close()


def repairing_sockmap_or_skip() -> None:
    """The repair needs bpf_cast_to_kern_ctx (Linux 6.3+), the kernel's BTF
    and CAP_PERFMON: where the kernel refuses it, say why in the skip."""
    smap = Sockmap(2)
    try:
        if smap.unrepaired:
            pytest.skip(f"the verdict program's overlap repair is off here: {smap.unrepaired}")
    finally:
        smap.close()


@needs_bpf
@needs_root
def test_the_repaired_program_relays_only_the_new_bytes_of_an_overlapping_retransmission():
    """The program sees that the skb starts 500 bytes before what the socket
    has seen and cuts them off; what follows is not held back (the socket's
    own count of bytes read stays right)."""
    repairing_sockmap_or_skip()
    with relayed_by_the_kernel() as (client, server, pair, _, _):
        client.sendall(sockmap.OVERLAP_SENT)
        assert recv_exactly(server, len(sockmap.OVERLAP_SENT)) == sockmap.OVERLAP_SENT
        sockmap.retransmit_overlapping(client)
        assert recv_exactly(server, len(sockmap.OVERLAP_NEW)) == sockmap.OVERLAP_NEW
        assert (pair.received(0), pair.repaired(0)) == (1500, 500)
        # The client's TCP never sent the new bytes: it sends them now, old
        # to the receiver (dropped by TCP, or cut off by the program if they
        # go in one segment with what follows). A short message next: had
        # the kernel counted the 500 old bytes as read, it would wait for
        # 500 more before handing it to the program.
        client.sendall(sockmap.OVERLAP_NEW)
        client.sendall(b"on the kernel again")
        assert recv_exactly(server, 19) == b"on the kernel again"
        assert pair.received(0) == 1519
        assert not readable(server)


@needs_bpf
@needs_root
@pytest.mark.parametrize("old_size", [4095, 4096, 3 * 4095 + 100, 64000])  # one IPv4 packet: 65,495 at most
def test_the_repaired_program_cuts_overlaps_longer_than_one_cut(old_size):
    """The kernel cuts at most 4,095 bytes at a time: longer overlaps (up to
    several segments of a coalesced skb) take several, and the last one
    may be shorter."""
    repairing_sockmap_or_skip()
    sent = os.urandom(old_size + 1000)
    new = os.urandom(700)
    with relayed_by_the_kernel() as (client, server, pair, _, _):
        client.sendall(sent)
        assert recv_exactly(server, len(sent)) == sent
        sockmap.retransmit_overlapping(client, sent[-old_size:], new)
        assert recv_exactly(server, len(new)) == new
        assert (pair.received(0), pair.repaired(0)) == (len(sent) + len(new), old_size)
        client.sendall(new + b"and on")  # new to its TCP, old to the receiver but for "and on"
        assert recv_exactly(server, 6) == b"and on"
        assert not readable(server)


@needs_bpf
def test_the_repaired_program_does_not_relay_again_what_was_read_before_the_pair_entered(pairs):
    """Bytes read from a socket before the pair entered the map may end in
    the middle of an skb, which the kernel then hands to the program whole:
    without the repair its first part reaches the server a second time."""
    repairing_sockmap_or_skip()
    client, near, far, server = pairs(2)
    data = bytes(range(256)) * 40
    client.sendall(data)
    wait_until_blocking(lambda: len(peek(near, len(data))) == len(data), timeout=BOUND, interval=0.001)
    first = recv_exactly(near, 1000)  # a part of what is queued
    smap = Sockmap(4, first_credit=1 << 20)
    try:
        pair = smap.add(near, far)
        pair.flush()
        assert first + recv_exactly(server, len(data) - 1000) == data
        assert (pair.received(0), pair.repaired(0)) == (len(data) - 1000, 1000)
        client.sendall(b"and then")
        assert recv_exactly(server, 8) == b"and then"
        assert not readable(server)
    finally:
        smap.close()


@needs_bpf
@needs_root
def test_the_self_test_finds_no_hazard_where_the_program_repairs_overlaps():
    repairing_sockmap_or_skip()
    availability = probe()
    assert (availability.available, availability.hazard, availability.repaired) == (True, "", True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
@pytest.mark.parametrize(
    "caps, missing",
    [("-all", "CAP_BPF and CAP_NET_ADMIN"), ("+net_admin", "CAP_BPF"), ("+bpf", "CAP_NET_ADMIN")],
)
def test_an_unprivileged_process_is_told_which_capability_it_lacks(caps, missing, tmp_path):
    reason = probe_as_nobody("" if caps == "-all" else caps, "a.reason", tmp_path)
    assert reason == f"missing {missing} (the kernel path needs CAP_BPF and CAP_NET_ADMIN)"


def probe_as_nobody(caps: str, shown: str, cwd) -> str:
    """What `shown` (an expression of the probe's Availability `a`) prints in
    a process of user nobody with only the capabilities `caps` ("+bpf,...")
    and CAP_DAC_READ_SEARCH, to read this checkout wherever it is."""
    kept = "+dac_read_search" + (f",{caps}" if caps else "")
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={kept}",
         f"--ambient-caps={kept}", sys.executable, "-c",
         f"from proxy.io import sockmap; a = sockmap.probe(); print({shown})"],
        capture_output=True, text=True, timeout=60, cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@needs_bpf
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
@pytest.mark.parametrize("perfmon", [False, True])
def test_the_overlap_repair_needs_cap_perfmon(perfmon, tmp_path):
    """Without CAP_PERFMON the program loads without its repair, and on a
    kernel with the hazard the self-test names it and says why the repair
    is off; with it, nothing to report."""
    repairing_sockmap_or_skip()
    shown = probe_as_nobody("+bpf,+net_admin,+net_raw" + (",+perfmon" if perfmon else ""),
                            "a.available, a.repaired, a.hazard", tmp_path)  # fmt: skip
    if perfmon:
        assert shown == "True True"
    elif unrepaired_hazard():
        assert shown.startswith("True False this kernel relays bytes twice"), shown
        assert shown.endswith(
            "; the program's repair of such segments is off: the repair reads kernel structures, which needs CAP_PERFMON"
        ), shown
    else:
        assert shown == "True False"


@needs_bpf
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_without_cap_net_raw_the_overlap_is_unchecked_and_counts_as_a_hazard(tmp_path):
    shown = probe_as_nobody("+bpf,+net_admin", "a.available, a.hazard", tmp_path)
    assert shown.startswith("True unchecked: whether the kernel relays a retransmitted segment's overlap once")
    assert "(CAP_NET_RAW), which this process lacks" in shown


@needs_bpf
@pytest.mark.parametrize("attach", ["verdict", "stream"])
def test_bytes_queued_before_the_pair_entered_go_first_and_in_order(attach):
    before = (b"AMQP\x00\x00\x09\x01", b"220 server greets first\r\n")
    with relayed_by_the_kernel(before=before, attach=attach) as (client, server, pair, near, far):
        client.sendall(b"then this")
        assert recv_exactly(server, 17) == before[0] + b"then this"
        server.sendall(b"and that")
        assert recv_exactly(client, 33) == before[1] + b"and that"
        assert (pair.received(0), pair.received(1)) == (17, 33)
        assert (pair.passed(0), pair.passed(1)) == (0, 0)


CLOSE_OK = b"\x01\x00\x00\x00\x00\x00\x04\x00\x0a\x00\x33\xce"


@needs_bpf
@pytest.mark.parametrize("attach", ["verdict", "stream"])
def test_each_socket_keeps_the_end_of_what_it_received_last(attach):
    with relayed_by_the_kernel(before=(b"AMQP\x00\x00\x09\x01", b""), attach=attach) as (client, server, pair, _, _):
        assert recv_exactly(server, 8) == b"AMQP\x00\x00\x09\x01"
        assert (pair.tail(0), pair.tail(1)) == (b"AMQP\x00\x00\x09\x01", b"")  # nothing received yet
        message = os.urandom(5000)
        client.sendall(message)
        assert recv_exactly(server, len(message)) == message
        assert pair.tail(0) == message[-sockmap.TAIL_BYTES:]
        server.sendall(CLOSE_OK)  # a short last message: all of it
        assert recv_exactly(client, len(CLOSE_OK)) == CLOSE_OK
        assert pair.tail(1) == CLOSE_OK
        # Bytes passed to Warren (out of credit) are received too.
        pair.stop(0)
        client.sendall(b"held back")
        wait_until_blocking(lambda: pair.passed(0) == 9, timeout=BOUND, interval=0.001)
        assert pair.tail(0) == b"held back"


@needs_bpf
def test_a_reused_slot_starts_with_an_empty_tail(pairs):
    socks = pairs(4)
    smap = Sockmap(2)  # one pair: the second reuses its slots
    try:
        client, near, far, server = socks[:4]
        first = smap.add(near, far)
        first.flush()
        client.sendall(CLOSE_OK)
        assert recv_exactly(server, 12) == CLOSE_OK
        assert first.tail(0) == CLOSE_OK
        first.release()
        near.close()
        far.close()
        second = smap.add(socks[5], socks[6])
        assert second.slots == first.slots and (second.tail(0), second.tail(1)) == (b"", b"")
    finally:
        smap.close()


@needs_bpf
def test_bulk_both_ways_at_once_arrives_intact_and_counted():
    import threading

    blob = os.urandom(8 << 20)
    with relayed_by_the_kernel(credit=64 << 20) as (client, server, pair, near, far):
        got = {}

        def pump(src, dst, name):
            src.sendall(blob)
            got[name] = recv_exactly(dst, len(blob))

        threads = [
            threading.Thread(target=pump, args=(client, server, "at_server")),
            threading.Thread(target=pump, args=(server, client, "at_client")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(BOUND * 3)
        assert got == {"at_server": blob, "at_client": blob}
        assert (pair.redirected(0), pair.redirected(1)) == (len(blob), len(blob))


@needs_bpf
def test_out_of_credit_the_bytes_stay_with_the_socket_wake_it_and_stop_the_sender():
    with relayed_by_the_kernel(credit=256 * 1024) as (client, server, pair, near, far):
        client.setblocking(False)
        sent = 0
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:
            try:
                sent += client.send(b"s" * 65536)
            except BlockingIOError:
                # The window closed: wait a little to be sure it stays closed.
                if not select.select([], [client], [], 0.2)[1]:
                    break
        assert sent < 16 << 20, "the sender was never stopped"
        assert pair.redirected(0) >= 256 * 1024 and pair.passed(0) > 0
        assert events_of(near, select.EPOLLIN) & select.EPOLLIN
        # What the server reads is exactly what was redirected, nothing passed.
        assert recv_exactly(server, pair.redirected(0)) == b"s" * pair.redirected(0)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.recv(1)


@needs_bpf
def test_passed_bytes_forwarded_by_warren_keep_their_place_in_the_stream():
    with relayed_by_the_kernel() as (client, server, pair, near, far):
        pair.stop(0)
        client.sendall(b"one ")
        wait_until_blocking(lambda: pair.passed(0) == 4, timeout=BOUND, interval=0.001)
        pair.grant(0, 1 << 20)  # credit again, but the passed bytes are not forwarded yet
        client.sendall(b"two ")
        wait_until_blocking(lambda: pair.passed(0) == 8, timeout=BOUND, interval=0.001)
        assert pair.redirected(0) == 0  # kept passing: "two" must not overtake "one"
        assert recv_exactly(near, 8) == b"one two "
        far.sendall(b"one two ")
        pair.set_forwarded(0, 8)
        client.sendall(b"three")
        assert recv_exactly(server, 13) == b"one two three"
        assert (pair.redirected(0), pair.passed(0), pair.forwarded(0)) == (5, 8, 8)


@needs_bpf
@pytest.mark.parametrize("first", [0, 1])
def test_a_fin_wakes_warren_and_leaves_the_other_socket_and_direction_intact(first):
    with relayed_by_the_kernel() as (client, server, pair, near, far):
        ends = [(client, near, far, server), (server, far, near, client)][first]
        closer, closer_near, other_near, talker = ends
        closer.sendall(b"last words")
        assert recv_exactly(talker, 10) == b"last words"
        closer.shutdown(socket.SHUT_WR)
        assert events_of(closer_near, select.EPOLLRDHUP) & select.EPOLLRDHUP
        assert closer_near.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        assert other_near.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        other_near.shutdown(socket.SHUT_WR)
        assert talker.recv(1) == b""
        talker.sendall(b"x" * 300_000)
        assert recv_exactly(closer, 300_000) == b"x" * 300_000
        assert pair.received(first) == 10


@needs_bpf
def test_a_reset_reports_an_error_on_the_socket_in_the_map():
    with relayed_by_the_kernel() as (client, server, pair, near, far):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        assert events_of(near, select.EPOLLERR) & select.EPOLLERR
        assert near.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
        server.sendall(b"still fine")  # the other socket is untouched


@needs_bpf
def test_send_queue_accounting_counts_what_was_put_in_either_way():
    with relayed_by_the_kernel(before=(b"hdr", b"")) as (client, server, pair, near, far):
        far.sendall(b"PROXY TCP4 ...\r\n")  # written by Warren itself
        client.sendall(b"redirected")
        recv_exactly(server, 29)
        wait_until_blocking(lambda: queued_into(far, connected=True) == 29, timeout=BOUND, interval=0.001)
        assert queued_into(near, connected=False) == 0


@needs_bpf
def test_a_full_map_refuses_a_pair_until_one_is_released(pairs):
    socks = pairs(3)
    smap = Sockmap(4)
    try:
        first = smap.add(socks[0], socks[1])
        smap.add(socks[2], socks[3])
        with pytest.raises(Full):
            smap.add(socks[4], socks[5])
        first.release()
        first.release()  # idempotent
        socks[0].close()  # closing takes a socket out of the map
        socks[1].close()
        smap.add(socks[4], socks[5])
        assert smap.pairs == 2
    finally:
        smap.close()


@needs_bpf
def test_a_socket_the_kernel_refuses_leaves_nothing_behind(pairs):
    client, near = pairs(1)
    unconnected = socket.socket()
    smap = Sockmap(2)
    try:
        with pytest.raises(OSError):
            smap.add(near, unconnected)
        assert smap.pairs == 0
        # Its slots are free again: a good pair still fits.
        smap.add(*pairs(1))
    finally:
        unconnected.close()
        smap.close()


# --- the notification ring ------------------------------------------------------------


@needs_bpf
def test_bytes_passed_to_a_socket_are_announced_in_the_ring_and_redirected_ones_are_not():
    with relayed_by_the_kernel(credit=1 << 20) as (client, server, pair, near, far):
        assert pair.sockmap.ring_fd is not None  # x86_64 and 5.8+, as here
        client.sendall(b"redirected")
        assert recv_exactly(server, 10) == b"redirected"
        assert pair.sockmap.notified() == ([], False)
        pair.stop(0)
        client.sendall(b"passed")
        wait_until_blocking(lambda: pair.passed(0) == 6, timeout=BOUND, interval=0.001)
        slots, lost = pair.sockmap.notified()
        assert slots == [pair.slots[0]] and not lost
        assert pair.sockmap.notified() == ([], False)  # read once


@needs_bpf
def test_a_redirected_message_does_not_wake_a_socket_registered_without_epollin():
    """The point of the ring: registered for EPOLLIN, a socket in the map
    wakes its epoll waiter for every redirected skb; registered for its FIN
    only, it wakes for nothing but the FIN."""
    with relayed_by_the_kernel() as (client, server, pair, near, far):
        with select.epoll() as epoll:
            epoll.register(near.fileno(), select.EPOLLRDHUP | select.EPOLLET)
            client.sendall(b"x" * 100)
            assert recv_exactly(server, 100) == b"x" * 100
            assert epoll.poll(0.05) == []
            client.shutdown(socket.SHUT_WR)
            assert epoll.poll(BOUND)[0][1] & select.EPOLLRDHUP


@needs_bpf
def test_a_full_ring_says_notifications_were_lost():
    page = os.sysconf("SC_PAGE_SIZE")
    with relayed_by_the_kernel(credit=1, ring_size=page) as (client, server, pair, near, far):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair.stop(0)
        records = page // 16
        for _ in range(records + 50):  # one passed skb each: more than the ring holds
            before = pair.passed(0)
            client.send(b"p")
            wait_until_blocking(lambda before=before: pair.passed(0) > before, timeout=BOUND, interval=0.0001)
            near.recv(16)  # the socket's buffer never fills (forwarded never catches up: all are passed)
            if pair.sockmap._words[pair.sockmap.capacity * sockmap._STATE_WORDS]:  # the lost count
                break
        slots, lost = pair.sockmap.notified()
        assert lost and set(slots) == {pair.slots[0]}
        assert pair.sockmap.notified() == ([], False)


@needs_bpf
def test_without_the_ring_relayed_sockets_rely_on_epollin():
    with relayed_by_the_kernel(notify=False) as (client, server, pair, near, far):
        assert pair.sockmap.ring_fd is None
        pair.stop(0)
        client.sendall(b"held")
        assert events_of(near, select.EPOLLIN) & select.EPOLLIN
