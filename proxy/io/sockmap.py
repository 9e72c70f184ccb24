"""The kernel data path: a socket map whose program relays bytes in the kernel.

A pair of TCP sockets (a client's and its broker's) is put in a SOCKHASH
map with an ``sk_skb`` verdict program attached. For every skb arriving on a
socket of the map, the kernel runs the program, which redirects the skb to
the other socket's egress (``bpf_sk_redirect_hash``): the bytes are relayed
without waking Warren at all.

What the kernel does not do, and Warren therefore does (measured on 6.18;
see docs/architecture.md):

* **Bytes queued before the pair entered the map** stay in the receive
  queue: the program runs only when the next skb arrives. :meth:`Pair.flush`
  makes the kernel run it on what is queued at once, in order, under the
  socket's lock (``SO_RCVLOWAT`` calls the socket's data-ready callback,
  tcp_set_rcvlowat), so those bytes go out first.
* **No backpressure.** A redirected skb is consumed from the source's
  receive queue (its window reopens) and queued, unbounded, on the target's
  psock until a kernel worker sends it: a receiver that stops reading would
  let the sender fill kernel memory (1.9 GB in 5 s here). Hence a *credit*
  per direction: the program redirects while ``redirected < limit``; beyond
  it, and while bytes it passed are still with Warren, it *passes* skbs to
  the source socket's own queue, which is charged to that socket's receive
  buffer: its TCP window closes and the sender stops. Warren is woken
  (the notification ring, see :class:`Sockmap`; EPOLLIN without one),
  forwards the passed bytes itself once the target has sent all
  redirected ones, and grants new credit (:mod:`proxy.io.kernel_relay`).
* **End of stream**: a FIN is not redirected (a zero-length FIN skb, if
  redirected, would break the target's psock with EPIPE: the program drops
  it); Warren sees EPOLLRDHUP and shuts the other side down.
* **Bytes a socket already had, at the front of an skb** (a retransmitted
  segment that overlaps what was received; the rest of a segment Warren
  read part of before the pair entered the map): the verdict path hands
  whole skbs to the program (tcp_read_skb), where a read would skip them
  (6.18). The program cuts them off where the kernel lets it read TCP's
  sequence numbers (:func:`_repair`, CAP_PERFMON); :func:`overlap_hazard`
  finds out whether a hazard remains, ``relay = "auto"`` does not take the
  path where one does, and on the path a connection whose program saw more
  bytes than TCP received ends as an abort (:mod:`proxy.io.kernel_relay`).
* ``FIONREAD`` reads 0 for sockets in a socket map on this kernel (2026
  stable change "bpf, sockmap: Fix FIONREAD for sockmap"), and sockets in a
  map *without* a verdict lose read wake-ups: Warren never relies on either.
  The start-up self-test (:func:`probe`) proves what it does rely on.

Per-socket state lives in an mmapped BPF array shared with the program, so
counters are read and credit granted with plain memory accesses, no system
call: per socket ``redirected`` and ``passed`` (bytes received, written by
the program only) and ``limit`` and ``forwarded`` (written by Warren only).
A hash map gives each socket's cookie its slot in that array.
"""

from __future__ import annotations

import _socket
import collections
import errno
import fcntl
import ipaddress
import mmap
import os
import platform
import select
import socket
import struct
import time
from dataclasses import dataclass

from ..privileges import KERNEL_RELAY_NEEDS, effective_capabilities, has, parse_effective
from ..vip.packet import internet_checksum, pseudo_header
from . import bpf, btf
from .bpf import (
    R0, R1, R2, R3, R4, R6, R7, R8, R9, R10, U32, U64, JEQ, JGE, JLE, JNE,
    Label, add32_reg, add_imm, assemble, atomic_add64, call, call_kernel, exit_, goto, jump_if_imm,
    jump_if_reg, load_map_fd, load_mem, mov32_reg, mov_imm, mov_reg, rsh_imm, store_mem, sub32_reg, sub_reg,
)  # fmt: skip

# Words of a socket's state in the shared array (u64 each): the counters;
# the overlap repair's (see _repair): the sequence number of the next byte
# not yet seen (low half; high half 1 once known), bytes it dropped and cut
# off as already seen; then the last bytes it received (the program copies
# the end of each skb, at most TAIL_BYTES, and their length): read once when
# an AMQP connection ends, to tell a completed Connection.Close from an
# abort (proxy.amqp.closing).
_REDIRECTED, _PASSED, _LIMIT, _FORWARDED, _NEXT_SEQ, _DROPPED, _TRIMMED, _TAIL_LENGTH, _TAIL = range(9)
TAIL_BYTES = 128  # a Close-Ok (12 bytes); a broker's Close with a reply text of up to 114
# The overlap repair cuts old bytes off an skb in steps: bpf_skb_adjust_room
# takes at most 0xfff bytes per call on sk_skb. An overlapping skb may hold
# several segments (the receive queue coalesces them: 4 loopback segments,
# 262 kB, were seen under bulk load); 256 steps cut up to 1 MiB.
_TRIM_STEP, _TRIM_STEPS = 0xFFF, 256
# Behind a stream parser (kernels before 5.13) an skb's control block is the
# parser's, not TCP's: no sequence number to repair with.
_BEHIND_A_PARSER = "a stream parser hides the segments' sequence numbers"
_STATE_WORDS = _TAIL + TAIL_BYTES // 8
_STATE_SIZE = 8 * _STATE_WORDS

# How many bytes a direction may redirect before Warren looks at it again:
# at most what the target's send buffer has room for (:func:`send_room`), so
# that redirected bytes never wait in the target's psock queue. That queue
# is shared with the bytes the program passes to the target socket itself:
# a redirected skb stuck in it (its receiver stopped reading) would hold up
# the *other* direction's passed bytes behind it. The first grant, before
# Warren has looked at the buffers, is small; later ones are capped here.
DEFAULT_CREDIT = 4 * 1024 * 1024
FIRST_CREDIT = 64 * 1024
DEFAULT_CAPACITY = 16384  # sockets, i.e. 8,192 pairs
_STALE_BATCH = 256  # closed sockets' slot entries deleted together

# The notification ring (see Sockmap): 16-byte records (an 8-byte header:
# length with BUSY and DISCARD bits, page offset; the 4-byte slot, padded).
RING_SIZE = 256 * 1024  # 16,384 notifications not yet read (a power of two, whole pages)
_DATA_WORD = mmap.PAGESIZE // 4  # the data follows the producer's page
_RECORD_BUSY, _RECORD_DISCARD = 1 << 31, 1 << 30
_RECORD_LENGTH = _RECORD_DISCARD - 1

_SO_COOKIE = getattr(socket, "SO_COOKIE", 57)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_COOKIE = struct.Struct("=Q")
_SLOTS = struct.Struct("=II")
_ENOTSUPP = 524  # the kernel's internal "operation not supported" (no batch operations)


@dataclass(frozen=True, slots=True)
class KernelLayout:
    """Where the overlap repair finds what it reads in the running kernel
    (:func:`kernel_layout`): the type id of ``bpf_cast_to_kern_ctx`` and
    the byte offsets of ``sk_buff.cb`` (whose first word is TCP's
    ``seq``, struct tcp_skb_cb) and ``tcp_sock.copied_seq``."""

    cast_to_kernel: int
    skb_cb: int
    copied_seq: int


def kernel_layout() -> KernelLayout:
    """The running kernel's layout, from its BTF; raises btf.BtfError."""
    types = btf.kernel()
    return KernelLayout(
        types.function("bpf_cast_to_kern_ctx"), types.offset("sk_buff", "cb"), types.offset("tcp_sock", "copied_seq")
    )


def build_program(slots_fd: int, state_fd: int, socks_fd: int, ring_fd: int | None = None,
                  capacity: int = 0, layout: KernelLayout | None = None) -> bytes:  # fmt: skip
    """The verdict program, run by the kernel for each skb received on a
    socket of the map (r1 = the skb, a ``struct __sk_buff``). With `ring_fd`
    it also writes the slot of a socket it passes bytes to into that ring
    buffer (Warren's wake-up, see :class:`Sockmap`), and counts a full
    ring's lost notification in the state array's last element
    (index `capacity`). With `layout` it repairs overlaps (:func:`_repair`)."""
    return assemble(
        [
            # An empty skb carries only a FIN: drop it (the FIN itself is
            # handled by TCP; redirecting an empty skb breaks the target).
            load_mem(U32, R2, R1, 0),                 # r2 = skb->len
            jump_if_imm(JGE, R2, 1, "data"),          # if r2 >= 1: go on (the verifier learns len >= 1)
            mov_imm(R0, bpf.SK_DROP),                 # return SK_DROP
            exit_(),
            Label("data"),
            mov_reg(R6, R1),                          # r6 = skb (r1-r5 die in calls)
            mov_reg(R8, R2),                          # r8 = skb->len
            # The socket's cookie: the key of its slot and of its peer.
            call(bpf.FUNC_GET_SOCKET_COOKIE),         # r0 = cookie(skb->sk)
            store_mem(U64, R10, -8, R0),              # stack[-8] = cookie
            load_map_fd(R1, slots_fd),                # r1 = slots map
            mov_reg(R2, R10),
            add_imm(R2, -8),                          # r2 = &cookie
            call(bpf.FUNC_MAP_LOOKUP_ELEM),           # r0 = &slots[cookie] or NULL
            jump_if_imm(JEQ, R0, 0, "pass_quiet"),    # not Warren's: to pass_quiet
            load_mem(U32, R1, R0, 0),                 # r1 = slot
            store_mem(U32, R10, -12, R1),             # stack[-12] = slot
            load_map_fd(R1, state_fd),                # r1 = state array
            mov_reg(R2, R10),
            add_imm(R2, -12),                         # r2 = &slot
            call(bpf.FUNC_MAP_LOOKUP_ELEM),           # r0 = &state[slot] or NULL
            jump_if_imm(JEQ, R0, 0, "pass_quiet"),    # (cannot happen)
            mov_reg(R7, R0),                          # r7 = state
            *_keep_tail(),
            *(_repair(layout) if layout is not None else []),
            # Bytes passed earlier are still with Warren: keep passing, or
            # this skb would overtake them.
            load_mem(U64, R1, R7, 8 * _PASSED),       # r1 = passed
            load_mem(U64, R2, R7, 8 * _FORWARDED),    # r2 = forwarded
            jump_if_reg(JNE, R1, R2, "pass"),         # if passed != forwarded: to pass
            # Credit spent: pass, so that this socket's window closes.
            load_mem(U64, R1, R7, 8 * _REDIRECTED),   # r1 = redirected
            load_mem(U64, R2, R7, 8 * _LIMIT),        # r2 = limit
            jump_if_reg(JGE, R1, R2, "pass"),         # if redirected >= limit: to pass
            # Redirect to the socket kept under this socket's cookie: its peer.
            mov_reg(R1, R6),                          # r1 = skb
            load_map_fd(R2, socks_fd),                # r2 = socket map
            mov_reg(R3, R10),
            add_imm(R3, -8),                          # r3 = &cookie
            mov_imm(R4, 0),                           # r4 = flags: the peer's egress
            call(bpf.FUNC_SK_REDIRECT_HASH),          # r0 = SK_PASS if redirected
            jump_if_imm(JNE, R0, bpf.SK_PASS, "pass"), # no peer in the map: to pass
            atomic_add64(R7, 8 * _REDIRECTED, R8),    # redirected += len
            mov_imm(R0, bpf.SK_PASS),                 # return SK_PASS (the redirect)
            exit_(),
            # Keep the skb in this socket's own queue for Warren to read.
            Label("pass"),
            atomic_add64(R7, 8 * _PASSED, R8),        # passed += len
            *(_notify(ring_fd, state_fd, capacity) if ring_fd is not None else []),
            Label("pass_quiet"),
            mov_imm(R0, bpf.SK_PASS),                 # return SK_PASS
            exit_(),
        ]
    )  # fmt: skip


def _repair(layout: KernelLayout) -> list:
    """Cut off what the socket has already seen. The kernel hands the
    program whole skbs (tcp_read_skb), also one that starts before what the
    socket received (a retransmission that overlaps it, queued whole by
    tcp_data_queue) or before what Warren read from it before the pair
    entered the map: those old bytes must not be relayed again.

    The program keeps the sequence number of the next byte not yet seen
    (first: the socket's ``copied_seq``, what was read before the map) and
    compares each skb's own (``TCP_SKB_CB(skb)->seq``, read through
    ``bpf_cast_to_kern_ctx``; CAP_PERFMON). An skb of old bytes only is
    dropped (counted in DROPPED). One that starts with old bytes loses them
    before it is relayed (TRIMMED counts them): made linear, then cut
    (``bpf_skb_pull_data``, ``bpf_skb_adjust_room``), at most _TRIM_STEP
    bytes per call, in a loop of at most _TRIM_STEPS. The cut also keeps the socket's
    ``copied_seq`` right, which the kernel advances by the skb's length:
    advanced by the old bytes too, it would run ahead of what TCP received,
    and the socket would report nothing to read until as many new bytes
    had come (tcp_epollin_ready), stalling the stream. Where a cut fails
    (no memory, a longer overlap) the rest goes through whole, and Warren's
    count check ends the connection as an abort (proxy.io.kernel_relay).
    r6 = skb, r7 = state, r8 = skb->len (>= 1); leaves them (r8 the new
    length)."""
    return [
        mov_reg(R1, R6),
        call_kernel(layout.cast_to_kernel),           # r0 = the struct sk_buff
        load_mem(U32, R9, R0, layout.skb_cb),         # r9 = seq (struct tcp_skb_cb's first member)
        load_mem(U64, R2, R7, 8 * _NEXT_SEQ),         # r2 = next not yet seen, 1 << 32 set once known
        jump_if_imm(JNE, R2, 0, "compare"),
        # The first skb since the pair entered the map: bytes before what
        # was read from the socket until then are old.
        load_mem(U64, R1, R6, bpf.SKB_SK),            # r1 = the skb's socket
        jump_if_imm(JEQ, R1, 0, "no_socket"),
        call(bpf.FUNC_SKC_TO_TCP_SOCK),               # r0 = its tcp_sock or NULL
        jump_if_imm(JEQ, R0, 0, "no_socket"),
        load_mem(U32, R2, R0, layout.copied_seq),     # r2 = copied_seq
        goto("first"),
        Label("no_socket"),
        mov_reg(R2, R9),                              # r2 = seq: nothing old
        Label("first"),
        mov_imm(R1, 1),
        store_mem(U32, R7, 8 * _NEXT_SEQ + 4, R1),    # known from now on
        Label("compare"),
        mov32_reg(R3, R2),
        sub32_reg(R3, R9),                            # r3 = (u32)(next - seq): old bytes at the start
        mov_reg(R4, R3),
        rsh_imm(R4, 31),
        jump_if_imm(JEQ, R4, 0, "ordered"),           # seq not after next
        mov_imm(R3, 0),                               # seq after next (cannot happen in order): nothing old
        Label("ordered"),
        jump_if_reg(JGE, R3, R8, "old"),              # old >= len: nothing new in it
        mov32_reg(R1, R9),
        add32_reg(R1, R8),
        store_mem(U32, R7, 8 * _NEXT_SEQ, R1),        # next = seq + len
        jump_if_imm(JEQ, R3, 0, "new"),               # nothing old: on as always
        # Old bytes, then new: cut the old ones off.
        mov_reg(R9, R3),                              # r9 = old left to cut
        mov_imm(R8, 0),                               # r8 = whole cuts made (the length is read again after)
        # Whole cuts while more than one is left: constant sizes, so that
        # the verifier walks the loop once, not once per way of sizing a cut.
        Label("cut"),
        jump_if_imm(JLE, R9, _TRIM_STEP, "last_cut"),
        jump_if_imm(JGE, R8, _TRIM_STEPS, "trimmed"), # a bound the verifier can see
        add_imm(R8, 1),
        *_cut(_TRIM_STEP),
        jump_if_imm(JNE, R0, 0, "trimmed"),
        add_imm(R9, -_TRIM_STEP),                     # old left -= a whole cut
        mov_imm(R1, _TRIM_STEP),
        atomic_add64(R7, 8 * _TRIMMED, R1),           # trimmed += a whole cut
        goto("cut"),
        Label("last_cut"),
        jump_if_imm(JEQ, R9, 0, "trimmed"),
        store_mem(U64, R10, -24, R9),                 # stack[-24] = the last cut (1 ... _TRIM_STEP)
        *_cut(None),
        jump_if_imm(JNE, R0, 0, "trimmed"),
        load_mem(U64, R1, R10, -24),
        atomic_add64(R7, 8 * _TRIMMED, R1),           # trimmed += the last cut
        Label("trimmed"),
        load_mem(U32, R8, R6, 0),                     # r8 = skb->len, now
        jump_if_imm(JGE, R8, 1, "new"),
        Label("old"),
        atomic_add64(R7, 8 * _DROPPED, R8),           # dropped += len
        mov_imm(R0, bpf.SK_DROP),                     # return SK_DROP
        exit_(),
        Label("new"),
    ]  # fmt: skip


def _cut(size: int | None) -> list:
    """Cut `size` bytes (None: as many as r9 says, 1 ... _TRIM_STEP, also
    kept on the stack at -24) off the front of the skb in r6: r0 = 0 once
    done. bpf_skb_adjust_room shrinks only the linear part, which
    bpf_skb_pull_data makes hold them first."""
    if size is None:
        load_size, negative = [mov_reg(R2, R9)], [mov_imm(R2, 0), load_mem(U64, R3, R10, -24), sub_reg(R2, R3)]
    else:
        load_size, negative = [mov_imm(R2, size)], [mov_imm(R2, -size)]
    failed = f"cut_failed_{size}"
    return [
        mov_reg(R1, R6),
        *load_size,
        call(bpf.FUNC_SKB_PULL_DATA),                 # r0 = 0 once its first r2 bytes are linear
        jump_if_imm(JNE, R0, 0, failed),
        mov_reg(R1, R6),
        *negative,                                    # r2 = -size: shrink at the front
        mov_imm(R3, 0),                               # mode 0 (sk_skb: the only one)
        mov_imm(R4, 0),                               # flags 0
        call(bpf.FUNC_SKB_ADJUST_ROOM),               # r0 = 0 once cut
        Label(failed),
    ]  # fmt: skip


def _keep_tail() -> list:
    """The last bytes of this skb (at most TAIL_BYTES) into the socket's
    state, with their length: after the last skb, the end of what the socket
    received. r6 = skb, r7 = state, r8 = skb->len (>= 1)."""
    return [
        mov_reg(R4, R8),                              # r4 = len
        jump_if_imm(JLE, R4, TAIL_BYTES, "sized"),    # if r4 <= TAIL_BYTES: keep it
        mov_imm(R4, TAIL_BYTES),                      # else r4 = TAIL_BYTES
        Label("sized"),
        store_mem(U64, R7, 8 * _TAIL_LENGTH, R4),     # tail length = r4
        mov_reg(R1, R6),                              # r1 = skb
        mov_reg(R2, R8),
        sub_reg(R2, R4),                              # r2 = len - r4: where the tail starts
        mov_reg(R3, R7),
        add_imm(R3, 8 * _TAIL),                       # r3 = &state.tail
        call(bpf.FUNC_SKB_LOAD_BYTES),                # r0 = 0, or < 0 if it failed
        jump_if_imm(JEQ, R0, 0, "tailed"),
        mov_imm(R1, 0),
        store_mem(U64, R7, 8 * _TAIL_LENGTH, R1),     # failed: tail length = 0 (unknown)
        Label("tailed"),
    ]  # fmt: skip


def _notify(ring_fd: int, state_fd: int, capacity: int) -> list:
    """Tell Warren which socket was passed bytes: its slot into the ring."""
    return [
        load_map_fd(R1, ring_fd),                     # r1 = ring buffer
        mov_reg(R2, R10),
        add_imm(R2, -12),                             # r2 = &slot
        mov_imm(R3, 4),                               # r3 = its size
        mov_imm(R4, 0),                               # r4 = flags: wake the reader if it waits
        call(bpf.FUNC_RINGBUF_OUTPUT),                # r0 = 0, or < 0 when the ring is full
        jump_if_imm(JEQ, R0, 0, "pass_quiet"),        # written: done
        # Full: count it; Warren then looks at every pair.
        mov_imm(R1, capacity),
        store_mem(U32, R10, -16, R1),                 # stack[-16] = capacity
        load_map_fd(R1, state_fd),                    # r1 = state array
        mov_reg(R2, R10),
        add_imm(R2, -16),                             # r2 = &capacity
        call(bpf.FUNC_MAP_LOOKUP_ELEM),               # r0 = &state[capacity]
        jump_if_imm(JEQ, R0, 0, "pass_quiet"),        # (cannot happen)
        mov_imm(R1, 1),
        atomic_add64(R0, 0, R1),                      # lost += 1
    ]  # fmt: skip


def build_parser() -> bytes:
    """A stream parser for kernels without BPF_SK_SKB_VERDICT: every skb is
    a whole message (return its length)."""
    return load_mem(U32, R0, R1, 0) + exit_()  # return skb->len


class Full(Exception):
    """No slot left in the socket map: relay this pair another way."""


class Torn(Exception):
    """A pair the kernel refused after it had taken one socket, which
    received bytes in that moment: they are gone with its removal, so the
    connection cannot go on (rare: a broker closing exactly then)."""


class Sockmap:
    """The maps and the loaded program of one process.

    ``capacity`` is the number of sockets (two per pair) the maps hold;
    ``credit`` the bytes a direction redirects before Warren looks again.
    Raises :class:`bpf.BpfError` (or :class:`bpf.Unsupported`) when the
    kernel refuses; :func:`probe` turns that into a reason. Single-threaded:
    all calls from the trio thread.

    How Warren learns that the program passed bytes to a socket (credit
    spent, or its peer not in the map yet): with a notification ring
    (``notify``, the default where it can: x86_64, kernel 5.8+) the program
    writes the socket's slot into a BPF ring buffer, whose fd Warren's
    poller watches, and relayed sockets are not registered for EPOLLIN at
    all. Registered for EPOLLIN, a socket in a socket map wakes its epoll
    waiter for *every* skb the program redirects (the psock calls the
    socket's original data-ready callback after each run, 6.5+), though
    epoll then has nothing to report: two context switches of Warren per
    request and response, measured here. Without the ring (``ring_fd``
    None) relayed sockets stay registered for EPOLLIN, as before. The ring
    is read with plain loads from its mmapped pages, which x86's memory
    order makes safe; other architectures keep EPOLLIN.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, *, credit: int = DEFAULT_CREDIT,
                 first_credit: int = FIRST_CREDIT, attach: str = "verdict",
                 notify: bool | None = None, ring_size: int = RING_SIZE, repair: bool = True) -> None:  # fmt: skip
        if capacity < 2 or credit < 1 or first_credit < 1:
            raise ValueError("capacity must be >= 2 and credits >= 1")
        self.capacity = capacity
        self.credit = credit
        self.first_credit = first_credit
        self._fds: list[int] = []
        try:
            # Room for the cookies of closed sockets until they are collected.
            slots_size = capacity + _STALE_BATCH
            self._slots_fd = self._keep(bpf.create_map(bpf.MAP_TYPE_HASH, 8, 4, slots_size, name="warren_slots"))
            self._state_fd = self._keep(
                bpf.create_map(bpf.MAP_TYPE_ARRAY, 4, _STATE_SIZE, capacity + 1, bpf.F_MMAPABLE, name="warren_state")
            )
            self._socks_fd = self._keep(bpf.create_map(bpf.MAP_TYPE_SOCKHASH, 8, 8, capacity, name="warren_socks"))
            self.ring_fd = self._ring(notify, ring_size)
            self._prog_fd = self._load(capacity, repair and attach == "verdict")
            if repair and attach != "verdict":
                self.unrepaired = _BEHIND_A_PARSER
            self.attach_mode = self._attach(attach)
            self._mmap = bpf.mmap_map(self._state_fd, (capacity + 1) * _STATE_SIZE)
        except BaseException:
            self.close()
            raise
        self._words = memoryview(self._mmap).cast("Q")
        self._lost_seen = 0
        if self.ring_fd is not None:
            self._head = memoryview(self._consumer).cast("Q")  # [0]: consumer position
            self._tail = memoryview(self._producer).cast("Q")  # [0]: producer position
            self._records = memoryview(self._producer).cast("I")  # data from PAGESIZE on
        # slot -> the pair holding it, for notifications
        self.pair_of: list[Pair | None] = [None] * capacity
        self.watcher = None  # the notification ring's link in the current poller (proxy.io.kernel_relay)
        self._slots = bpf.Updates(self._slots_fd, 8, 4, batch=2)
        self._socks = bpf.Updates(self._socks_fd, 8, 8)
        self._slots_batch = True
        # Freed slots are reused oldest first: a program run still finishing
        # for a closed socket (an RCU grace period) cannot touch a new pair.
        self._free = collections.deque(range(capacity))
        self._stale: list[bytes] = []  # cookies of closed sockets, still in the slots map
        self.pairs = 0

    def _load(self, capacity: int, repair: bool) -> int:
        """Load the verdict program, with the overlap repair where this
        kernel and process allow it (else ``unrepaired`` says why not)."""
        self.unrepaired = "not asked for"
        maps = (self._slots_fd, self._state_fd, self._socks_fd, self.ring_fd, capacity)
        if repair:
            try:
                program = build_program(*maps, layout=kernel_layout())
                fd = self._keep(bpf.load_program(bpf.PROG_TYPE_SK_SKB, program, "warren_verdict"))
            except btf.BtfError as exc:
                self.unrepaired = str(exc)
            except bpf.BpfError as exc:
                self.unrepaired = _repair_refusal(exc)
            else:
                self.unrepaired = ""
                return fd
        return self._keep(bpf.load_program(bpf.PROG_TYPE_SK_SKB, build_program(*maps), "warren_verdict"))

    def _ring(self, notify: bool | None, size: int) -> int | None:
        """The notification ring's fd, mapped; None without one."""
        self._consumer = self._producer = None
        self._ring_mask = size - 1
        if notify is None:
            notify = platform.machine() == "x86_64"
        if not notify:
            return None
        try:
            fd = self._keep(bpf.create_map(bpf.MAP_TYPE_RINGBUF, 0, 0, size, name="warren_ring"))
        except bpf.BpfError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return None  # before 5.8: no ring buffers, EPOLLIN it is
        self._consumer, self._producer = bpf.mmap_ring(fd, size)
        return fd

    def notified(self) -> tuple[list[int], bool]:
        """The slots the program passed bytes to since the last call (a slot
        once per skb passed), and whether notifications were lost to a full
        ring since (then any pair may have been passed bytes). Records still
        being written end the list; the ring's fd stays readable for them."""
        head, tail, records, mask = self._head, self._tail, self._records, self._ring_mask
        consumer, producer = head[0], tail[0]
        slots = []
        while consumer < producer:
            at = _DATA_WORD + (consumer & mask) // 4
            length = records[at]
            if length & _RECORD_BUSY:
                break
            if not length & _RECORD_DISCARD:
                slots.append(records[at + 2])
            consumer += ((length & _RECORD_LENGTH) + 8 + 7) & ~7
        head[0] = consumer
        lost = self._words[self.capacity * _STATE_WORDS]
        if lost == self._lost_seen:
            return slots, False
        self._lost_seen = lost
        return slots, True

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _attach(self, mode: str) -> str:
        """Attach as the map's verdict; a kernel before 5.13 has no
        BPF_SK_SKB_VERDICT and wants a stream parser and stream verdict."""
        if mode == "verdict":
            try:
                bpf.attach_program(self._socks_fd, self._prog_fd, bpf.SK_SKB_VERDICT)
                return "verdict"
            except bpf.BpfError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            if not self.unrepaired:
                self._prog_fd = self._load(self.capacity, False)
                self.unrepaired = _BEHIND_A_PARSER
        parser = self._keep(bpf.load_program(bpf.PROG_TYPE_SK_SKB, build_parser(), "warren_parser"))
        bpf.attach_program(self._socks_fd, parser, bpf.SK_SKB_STREAM_PARSER)
        bpf.attach_program(self._socks_fd, self._prog_fd, bpf.SK_SKB_STREAM_VERDICT)
        return "stream"

    def close(self) -> None:
        """Release the maps and program (pairs still in the map keep working
        until their sockets close: the kernel holds references)."""
        for view in ("_words", "_head", "_tail", "_records"):
            if getattr(self, view, None) is not None:
                getattr(self, view).release()
                setattr(self, view, None)
        for ring in ("_consumer", "_producer"):
            if getattr(self, ring, None) is not None:
                getattr(self, ring).close()
                setattr(self, ring, None)
        if getattr(self, "_mmap", None) is not None:
            self._mmap.close()
            self._mmap = None
        while self._fds:
            os.close(self._fds.pop())

    # --- pairs ------------------------------------------------------------------

    def add(self, client: _socket.socket, server: _socket.socket) -> Pair:
        """Put a pair in the map: from now on bytes arriving on either socket
        are redirected to the other. Both must be connected TCP sockets.
        Call :meth:`Pair.flush` next, for bytes queued before. Raises Full
        when no slot is left, OSError when the kernel refuses a socket (e.g.
        EOPNOTSUPP: no longer ESTABLISHED); nothing is left in the map then.

        Five system calls: two socket cookies, both slots in one batch
        update, one update of the socket map per socket (socket maps have
        no batch update).
        """
        free = self._free
        if len(free) < 2:
            raise Full(f"socket map full ({self.capacity} sockets)")
        getsockopt = client.getsockopt
        client_cookie = getsockopt(_SOL_SOCKET, _SO_COOKIE, 8)
        server_cookie = server.getsockopt(_SOL_SOCKET, _SO_COOKIE, 8)
        slots = (free.popleft(), free.popleft())
        words, credit = self._words, self.first_credit
        for slot in slots:
            base = slot * _STATE_WORDS
            words[base + _REDIRECTED] = words[base + _PASSED] = words[base + _FORWARDED] = 0
            for word in (_NEXT_SEQ, _DROPPED, _TRIMMED, _TAIL_LENGTH):
                words[base + word] = 0
            words[base + _LIMIT] = credit
        cookies = (client_cookie, server_cookie)
        try:
            self._update_slots(client_cookie + server_cookie, _SLOTS.pack(*slots))
            # Each socket is kept under its peer's cookie: the program, run
            # for a socket, finds the peer under its own cookie.
            self._socks.update(server_cookie, _COOKIE.pack(client.fileno()))
            self._socks.update(client_cookie, _COOKIE.pack(server.fileno()))
        except BaseException as exc:
            for cookie in cookies:
                _delete_quietly(self._socks_fd, cookie)
                _delete_quietly(self._slots_fd, cookie)
            free.extend(slots)
            if words[slots[0] * _STATE_WORDS + _PASSED]:
                # The client was in the map alone for a moment and the program
                # passed its bytes to its psock, which the removal discards.
                raise Torn(f"the pair could not enter the map ({exc}) and bytes the client sent meanwhile "
                           "were dropped with it") from exc
            raise
        self.pairs += 1
        pair = self.pair_of[slots[0]] = self.pair_of[slots[1]] = Pair(self, (client, server), cookies, slots)
        return pair

    def _update_slots(self, cookies: bytes, slots: bytes) -> None:
        """Both slots in one system call where the kernel has batch updates
        (5.6+), else one each (decided at the first pair)."""
        if self._slots_batch:
            try:
                self._slots.update(cookies, slots)
                return
            except bpf.BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP):
                    raise
                self._slots_batch = False
        self._slots.update(cookies[:8], slots[:4])
        self._slots.update(cookies[8:], slots[4:])

    def _release(self, pair: Pair) -> None:
        """The pair's sockets are closed (or about to be): free its slots."""
        self.pairs -= 1
        self.pair_of[pair.slots[0]] = self.pair_of[pair.slots[1]] = None
        self._stale.extend(pair.cookies)
        self._free.extend(pair.slots)
        if len(self._stale) >= _STALE_BATCH:
            self._collect_stale()

    def _collect_stale(self) -> None:
        """Delete slot entries of closed sockets, in one system call where
        the kernel can (cookies are never reused, so a stale entry is
        harmless; it only takes room)."""
        stale, self._stale = self._stale, []
        try:
            bpf.delete_batch(self._slots_fd, stale)
            return
        except OSError:
            pass  # no batch operations (before 5.6), or one already gone
        for cookie in stale:
            _delete_quietly(self._slots_fd, cookie)


class Pair:
    """Two sockets relayed by the kernel. Side 0 is the client, 1 the server.

    Counters are bytes *received* on a side and handled by the program:
    ``redirected`` to the peer by the kernel, ``passed`` to the socket's own
    queue for Warren to forward (``forwarded`` of them done so far). Each
    reads or writes the shared array directly (one call, no system call).
    """

    __slots__ = ("sockmap", "socks", "cookies", "slots", "released", "words", "bases", "owner")

    def __init__(self, sockmap: Sockmap, socks, cookies, slots) -> None:
        self.sockmap = sockmap
        self.socks = socks
        self.cookies = cookies
        self.slots = slots
        self.released = False
        self.words = sockmap._words
        self.bases = (slots[0] * _STATE_WORDS, slots[1] * _STATE_WORDS)
        self.owner = None  # the link serving it (proxy.io.kernel_relay), told of notifications

    def flush(self) -> None:
        """Run the program now on what each socket had queued before the pair
        entered the map (else it waits for the next skb), in order, under
        the socket's lock. Raises OSError if a socket is gone."""
        for sock in self.socks:
            sock.setsockopt(_SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def received(self, side: int) -> int:
        """Bytes received on `side` and handled by the program so far (each
        once where it repairs overlaps: see :meth:`repaired`)."""
        words, base = self.words, self.bases[side]
        return words[base + _REDIRECTED] + words[base + _PASSED]

    def repaired(self, side: int) -> int:
        """Bytes the program found `side` had seen already, and dropped
        (:func:`_repair`)."""
        words, base = self.words, self.bases[side]
        return words[base + _DROPPED] + words[base + _TRIMMED]

    def tail(self, side: int) -> bytes:
        """The last bytes `side` received (the end of its last skb, at most
        TAIL_BYTES); empty before the first byte since the pair entered the map."""
        words, base = self.words, self.bases[side]
        length = words[base + _TAIL_LENGTH]
        return words[base + _TAIL : base + _TAIL + TAIL_BYTES // 8].tobytes()[:length]

    def redirected(self, side: int) -> int:
        return self.words[self.bases[side] + _REDIRECTED]

    def passed(self, side: int) -> int:
        return self.words[self.bases[side] + _PASSED]

    def forwarded(self, side: int) -> int:
        return self.words[self.bases[side] + _FORWARDED]

    def limit(self, side: int) -> int:
        return self.words[self.bases[side] + _LIMIT]

    def caught_up(self, side: int) -> bool:
        """Warren has forwarded every byte the program passed on `side`."""
        words, base = self.words, self.bases[side]
        return words[base + _PASSED] == words[base + _FORWARDED]

    def set_forwarded(self, side: int, value: int) -> None:
        """Warren has forwarded `value` passed bytes of `side` in all: once
        that equals ``passed``, the program may redirect again."""
        self.words[self.bases[side] + _FORWARDED] = value

    def grant(self, side: int, amount: int) -> None:
        """New credit: `side` may redirect `amount` more bytes from now on."""
        words, base = self.words, self.bases[side]
        words[base + _LIMIT] = words[base + _REDIRECTED] + amount

    def stop(self, side: int) -> None:
        """No credit left for `side`: what it receives is passed from now on."""
        self.words[self.bases[side] + _LIMIT] = 0

    def release(self) -> None:
        """The caller closes both sockets now (closing takes them out of the
        socket map); the pair's slots are freed. Idempotent."""
        if not self.released:
            self.released = True
            self.sockmap._release(self)


def _delete_quietly(map_fd: int, key: bytes) -> None:
    try:
        bpf.delete_elem(map_fd, key)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


# --- can this process use it? ---------------------------------------------------

_SIOCOUTQ = 0x5411
# struct tcp_info (include/uapi/linux/tcp.h): where the fields Warren reads sit.
_TCPI_LAST_DATA_RECV = 52
_TCPI_BYTES_ACKED = 120
_TCPI_BYTES_RECEIVED = 128
_TCP_INFO_SIZE = 136  # up to bytes_received (Linux 4.1+)
_PROBE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Availability:
    """The outcome of :func:`probe`: ``available``, else ``reason`` says why
    not; ``attach`` is how the program was attached ("verdict" or "stream").
    ``hazard``, where the path works: why it may corrupt a stream here
    (:func:`overlap_hazard`, with why the program's repair is off where it
    is), so that it is used only where asked for; ``repaired``: the program
    repairs overlaps (:func:`_repair`)."""

    available: bool
    reason: str = ""
    attach: str = ""
    hazard: str = ""
    repaired: bool = False


def missing_capabilities(status: str | None = None) -> list[str]:
    """Capabilities the kernel path needs that this process lacks (from
    /proc/self/status): loading programs and maps needs CAP_BPF (or, before
    Linux 5.8, CAP_SYS_ADMIN), socket maps also CAP_NET_ADMIN."""
    effective = effective_capabilities() if status is None else parse_effective(status)
    return [capability for capability in KERNEL_RELAY_NEEDS if not has(capability, effective)]


def probe(*, attach: str = "verdict") -> Availability:
    """Prove the kernel path works here, on a loopback pair: load the
    program, put a pair in the map, move bytes both ways (including bytes
    sent before the pair entered the map), pass bytes to Warren and take
    them back, half-close, and check the readiness reports and byte counts
    Warren relies on; then look for the hazard of :func:`overlap_hazard`.
    Synchronous, a few milliseconds (2 s where the hazard stalls the
    stream). Never raises."""
    missing = missing_capabilities()
    if missing:
        return Availability(False, f"missing {' and '.join(missing)} (the kernel path needs CAP_BPF and CAP_NET_ADMIN)")
    try:
        sockmap = Sockmap(8, first_credit=1 << 20, attach=attach)
    except bpf.Unsupported as exc:
        return Availability(False, str(exc))
    except bpf.BpfError as exc:
        return Availability(False, _refusal(exc))
    try:
        _self_test(sockmap)
        hazard = overlap_hazard(sockmap)
    except SelfTestFailed as exc:
        return Availability(False, f"self-test failed: {exc}")
    except OSError as exc:
        return Availability(False, f"self-test failed: {exc}")
    finally:
        sockmap.close()
    if hazard and sockmap.unrepaired:
        hazard += f"; the program's repair of such segments is off: {sockmap.unrepaired}"
    return Availability(True, attach=sockmap.attach_mode, hazard=hazard, repaired=not sockmap.unrepaired)


def _repair_refusal(exc: bpf.BpfError) -> str:
    """Why the kernel refused the repaired program (the plain one may load)."""
    if "CAP_PERFMON" in exc.log or exc.errno == errno.EPERM:
        return "the repair reads kernel structures, which needs CAP_PERFMON"
    return _refusal(exc, "the repaired program")


def _refusal(exc: bpf.BpfError, program: str = "the program") -> str:
    if exc.errno == errno.EPERM:
        return f"the kernel refused bpf(2) ({exc.what}: EPERM): no CAP_BPF/CAP_NET_ADMIN here"
    if exc.errno == errno.ENOSYS:
        return "kernel built without bpf(2)"
    if exc.log:
        last = [line for line in exc.log.strip().splitlines() if line.strip()][-1:]
        return f"the kernel's verifier refused {program} ({exc.strerror}): {last[0] if last else ''}"
    if exc.errno == errno.EINVAL and "map" in exc.what:
        return f"kernel too old ({exc.what}: EINVAL; needs SOCKHASH, Linux 4.18, and mmapable arrays, 5.5)"
    return f"the kernel refused it ({exc})"


class SelfTestFailed(Exception):
    pass


def _loopback_connections() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """client <-> (near ... far) <-> server, as Warren relays a connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2)
        client = socket.create_connection(listener.getsockname(), timeout=_PROBE_TIMEOUT)
        near, _ = listener.accept()
        far = socket.create_connection(listener.getsockname(), timeout=_PROBE_TIMEOUT)
        server, _ = listener.accept()
    socks = (client, near, far, server)
    for sock in socks:
        sock.settimeout(_PROBE_TIMEOUT)
    return socks


def _self_test(sockmap: Sockmap) -> None:
    socks = client, near, far, server = _loopback_connections()
    epoll = select.epoll()
    try:
        client.sendall(b"client speaks first")
        server.sendall(b"server speaks first")
        _expect_queued(near, 19)
        _expect_queued(far, 19)
        pair = sockmap.add(near, far)
        epoll.register(near.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        pair.flush()
        _expect(server, b"client speaks first", "bytes queued before the pair entered the map")
        _expect(client, b"server speaks first", "bytes queued before the pair entered the map")
        blob = bytes(range(256)) * 1024
        client.sendall(blob)
        _expect(server, blob, "256 kB client to server")
        server.sendall(blob)
        _expect(client, blob, "256 kB server to client")
        if (pair.received(0), pair.received(1)) != (19 + len(blob), 19 + len(blob)):
            raise SelfTestFailed(f"the program counted {pair.received(0)}/{pair.received(1)} bytes")
        # Out of credit: bytes stay with the receiving socket and wake Warren.
        pair.stop(0)
        client.sendall(b"held")
        if not _wait_events(epoll, near, select.EPOLLIN):
            raise SelfTestFailed("no EPOLLIN for bytes passed to the socket (sockmap readiness regression)")
        if sockmap.ring_fd is not None and pair.slots[0] not in sockmap.notified()[0]:
            raise SelfTestFailed("no notification in the ring for bytes passed to the socket")
        held = near.recv(100)
        if held != b"held" or pair.passed(0) != 4:
            raise SelfTestFailed(f"passed bytes read back as {held!r}, counted {pair.passed(0)}")
        far.sendall(held)
        pair.set_forwarded(0, 4)
        pair.grant(0, send_room(far))
        client.sendall(b" and more")
        _expect(server, b"held and more", "bytes forwarded by Warren, then redirected again")
        _check_accounting(far, written=19 + len(blob) + 13, connected=True)
        _check_accounting(near, written=19 + len(blob), connected=False)
        # Half-close: the FIN wakes Warren, nothing is left behind, the other
        # way keeps flowing.
        client.shutdown(socket.SHUT_WR)
        if not _wait_events(epoll, near, select.EPOLLRDHUP):
            raise SelfTestFailed("no EPOLLRDHUP after the client's FIN")
        if near.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
            raise SelfTestFailed("a half-closed socket still reports data")
        if far.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            raise SelfTestFailed("the FIN broke the other socket")
        far.shutdown(socket.SHUT_WR)
        _expect(server, b"", "end of stream forwarded")
        server.sendall(b"after the half-close")
        _expect(client, b"after the half-close", "the other direction after a half-close")
        pair.release()
    finally:
        epoll.close()
        for sock in socks:
            sock.close()


# A retransmitted segment that overlaps bytes already received.
_TCP_REPAIR, _TCP_REPAIR_QUEUE, _TCP_QUEUE_SEQ = 19, 20, 21
_TCP_RECV_QUEUE, _TCP_SEND_QUEUE = 1, 2
OVERLAP_SENT, OVERLAP_NEW = bytes(range(200)) * 5, b"\xee" * 500
_TCP_ACK_PSH = 0x18


def overlap_hazard(sockmap: Sockmap) -> str:
    """Does the kernel relay the part of a retransmitted segment it already
    received a second time? A segment that starts before what the socket
    has received and ends after it is queued whole (tcp_data_queue, "partial
    packet"): a reader skips the part it has (tcp_recvmsg's offset), the
    socket map's verdict path (tcp_read_skb) hands the whole skb to the
    program, which relays the old part again: a duplicated run of bytes in
    the stream (measured on 6.18: one 64 kB segment per ~70 GB relayed under
    loss on loopback in the suite's echo test, one of up to 260 kB per ~7 GB
    of a bulk stream through Warren). Such segments come with
    retransmissions after loss. "" also where the program cuts those bytes
    off (:func:`_repair`), which is what the check then proves.

    Sent here on a loopback pair (:func:`retransmit_overlapping`); "" when
    only the new bytes come through; else why the path may corrupt (or
    stall) a stream here, also when the check cannot be made."""
    socks = client, near, far, server = _loopback_connections()
    pair = None
    try:
        pair = sockmap.add(near, far)
        pair.flush()
        client.sendall(OVERLAP_SENT)
        _expect(server, OVERLAP_SENT, "bytes before a retransmission")
        retransmit_overlapping(client)
        got = _receive(server, len(OVERLAP_NEW), bytearray())
        # The client's own socket knows nothing of the new bytes: sent by it
        # too (taken as a duplicate), the connection can close cleanly.
        client.sendall(OVERLAP_NEW)
    except PermissionError:
        return ("unchecked: whether the kernel relays a retransmitted segment's overlap once is tested "
                "with a raw socket (CAP_NET_RAW), which this process lacks")
    except TimeoutError:
        return "on this kernel a retransmitted segment that overlaps bytes already received stops the relayed stream"
    finally:
        if pair is not None:
            pair.release()
        for sock in socks:
            sock.close()
    if got == OVERLAP_NEW:
        return ""
    if got == OVERLAP_SENT[-len(OVERLAP_NEW) :]:
        return ("this kernel relays bytes twice when a retransmitted segment overlaps bytes already received "
                "(the socket map's tcp_read_skb does not skip them): a stream may be corrupted after packet loss")
    raise SelfTestFailed("a retransmission that overlaps received bytes came out garbled")


def retransmit_overlapping(client: socket.socket, old: bytes = OVERLAP_SENT[-len(OVERLAP_NEW) :],
                           new: bytes = OVERLAP_NEW) -> None:  # fmt: skip
    """Once `client` sent bytes ending in `old` and its peer received them:
    send, as a retransmission from `client` (a raw socket: CAP_NET_RAW;
    PermissionError without), `old` again followed by `new` (by default the
    last half of OVERLAP_SENT, then OVERLAP_NEW). A receiver that skips what
    it has gets `new` next."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
        sent, acked = _sequence_numbers(client)
        segment = _tcp_segment(client.getsockname(), client.getpeername(), (sent - len(old)) & 0xFFFFFFFF, acked,
                               old + new)  # fmt: skip
        raw.sendto(segment, (client.getpeername()[0], 0))


def _sequence_numbers(sock: socket.socket) -> tuple[int, int]:
    """(next sequence number to send, next to receive) of a connected TCP
    socket, read in repair mode (CAP_NET_ADMIN)."""
    sock.setsockopt(socket.IPPROTO_TCP, _TCP_REPAIR, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_REPAIR_QUEUE, _TCP_SEND_QUEUE)
        sent = sock.getsockopt(socket.IPPROTO_TCP, _TCP_QUEUE_SEQ)
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_REPAIR_QUEUE, _TCP_RECV_QUEUE)
        received = sock.getsockopt(socket.IPPROTO_TCP, _TCP_QUEUE_SEQ)
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_REPAIR, 0)
    return sent & 0xFFFFFFFF, received & 0xFFFFFFFF


def _tcp_segment(source: tuple, destination: tuple, seq: int, ack: int, payload: bytes) -> bytes:
    """A TCP segment (header without options, ACK|PSH, checksummed over
    the IPv4 pseudo-header) for a raw socket, which adds the IP header."""
    header = struct.pack("!HHIIBBHHH", source[1], destination[1], seq, ack, 5 << 4, _TCP_ACK_PSH, 65535, 0, 0)
    addresses = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    pseudo = pseudo_header(*addresses, len(header) + len(payload), socket.IPPROTO_TCP)
    checksum = internet_checksum(pseudo + header + payload)
    return header[:16] + struct.pack("!H", checksum) + header[18:] + payload


def _expect_queued(sock: socket.socket, size: int) -> None:
    deadline = time.monotonic() + _PROBE_TIMEOUT
    while len(sock.recv(size, socket.MSG_PEEK)) < size:
        if time.monotonic() > deadline:
            raise SelfTestFailed("loopback bytes did not arrive")
        select.select([], [], [], 0.001)


def _expect(sock: socket.socket, wanted: bytes, what: str) -> None:
    got = bytearray()
    try:
        _receive(sock, len(wanted), got)
        if not wanted and sock.recv(1) != b"":
            raise SelfTestFailed(f"{what}: no end of stream")
    except TimeoutError:
        raise SelfTestFailed(f"{what}: {len(got)} of {len(wanted)} bytes arrived") from None
    if got != wanted:
        raise SelfTestFailed(f"{what}: bytes differ")


def _receive(sock: socket.socket, size: int, got: bytearray) -> bytearray:
    """Read into `got` until it holds `size` bytes or the stream ended."""
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _wait_events(epoll: select.epoll, sock: socket.socket, mask: int) -> bool:
    deadline = time.monotonic() + _PROBE_TIMEOUT
    while time.monotonic() < deadline:
        for fd, events in epoll.poll(0.05):
            if fd == sock.fileno() and events & mask:
                return True
    return False


def queued_into(sock: socket.socket, connected: bool) -> int:
    """Bytes ever put in `sock`'s send queue (by Warren or by the kernel's
    redirects): acknowledged plus still queued. Read in that order: an
    acknowledgment in between makes it seem less, never more."""
    acked = acknowledged(sock, connected)
    return acked + struct.unpack("=i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]


def acknowledged(sock: socket.socket, connected: bool) -> int:
    """Bytes of `sock`'s send queue its peer acknowledged. The SYN of a
    connection this side opened counts as one acknowledged byte (tcp_ack in
    SYN-SENT), a FIN acknowledged as another."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    return struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)[0] - (1 if connected else 0)


def received_total(sock: socket.socket) -> int:
    """Bytes `sock` ever received in order, by TCP's own count (each once,
    however often it was sent; a FIN counts as one more)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    return struct.unpack_from("=Q", info, _TCPI_BYTES_RECEIVED)[0]


def since_last_receive(sock: socket.socket) -> float:
    """Seconds since `sock` last received data, by the kernel's own clock
    (jiffies: a few milliseconds' resolution)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LAST_DATA_RECV + 4)
    return struct.unpack_from("=I", info, _TCPI_LAST_DATA_RECV)[0] / 1000


_SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_MEMINFO = struct.Struct("=9I")  # rmem_alloc rcvbuf wmem_alloc sndbuf fwd_alloc wmem_queued ...


def send_room(sock: socket.socket) -> int:
    """Bytes `sock`'s send buffer takes now without a kernel worker having to
    wait: the worker sends only while less than half the buffer is in use
    (sock_writeable), and buffer use counts skb overhead too (about twice
    the payload for small segments), hence the quarter."""
    info = _MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size))
    sndbuf, queued = info[3], info[5]
    return max(0, sndbuf // 2 - queued) // 2


def _check_accounting(sock: socket.socket, *, written: int, connected: bool) -> None:
    deadline = time.monotonic() + _PROBE_TIMEOUT
    while (seen := queued_into(sock, connected)) != written:
        if time.monotonic() > deadline:
            raise SelfTestFailed(f"send-queue accounting: {seen} bytes seen, {written} written")
        select.select([], [], [], 0.001)
