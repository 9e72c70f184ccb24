"""When new connections reach a listener on loopback: the kernel's own stamps.

A broker's record of when it accepted a connection (RabbitMQ's
`connected_at`) is the broker's view: it is stamped when the broker gets
round to the socket, and a broker starved of CPU accepts in bunches, so a
proxy that sent its connects evenly can look bursty there. What a rate
limit promises is the moment the connects *reach the listener*; on
loopback that is the moment the client's SYN is delivered, which happens
inside the connecting process's connect() call (loopback_xmit ->
netif_rx, where the kernel stamps the packet), whether or not the broker
runs at that moment.

:class:`SynWatch` records those stamps with a packet socket on ``lo``
(AF_PACKET, so root or CAP_NET_RAW, no tool to install): a classic BPF
filter keeps only incoming IPv4 TCP SYNs (without ACK) to one port, and
SO_TIMESTAMPNS hands out the kernel's receive stamp, taken when the packet
was delivered, not when it is read. Nothing reads the socket while the
benchmark runs (the watcher costs no CPU in the storm); its receive buffer
(forced large) holds the packets until :meth:`SynWatch.stamps`, which
fails if the kernel dropped any (PACKET_STATISTICS).

The kernel stamps packets on delivery only once some socket asked for
stamps, and it turns that on in a deferred work item (net_enable_timestamp):
until then a packet is stamped when it is read. So the watcher is ready
only once a datagram sent to itself comes back stamped on delivery.

A SYN retransmitted by a client is counted again (it did reach the
listener again); on loopback with a large backlog there are none.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import time

ETH_P_IP = 0x0800
PACKET_HOST = 0
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # SKF_AD_OFF + SKF_AD_PKTTYPE: the packet's direction

_BUFFER = 64 << 20  # a SYN's buffer cost (truesize) is ~1 KiB: tens of thousands fit


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def syn_filter(port: int) -> bytes:
    """A classic BPF program (struct sock_filter[]) for a SOCK_DGRAM packet
    socket (offsets from the IP header): incoming IPv4 TCP, not a fragment,
    destination `port`, SYN set and ACK clear."""
    accept, drop = 64, 0
    program = [
        _insn(0x20, 0, 0, SKF_AD_PKTTYPE),  # ld pkttype
        _insn(0x15, 0, 11, PACKET_HOST),    # jeq HOST, next, drop
        _insn(0x30, 0, 0, 9),               # ldb [9]: protocol
        _insn(0x15, 0, 9, socket.IPPROTO_TCP),
        _insn(0x28, 0, 0, 6),               # ldh [6]: flags + fragment offset
        _insn(0x45, 7, 0, 0x1FFF),          # jset fragment offset, drop
        _insn(0xB1, 0, 0, 0),               # ldxb 4*([0]&0xf): IP header length
        _insn(0x48, 0, 0, 2),               # ldh [x+2]: destination port
        _insn(0x15, 0, 4, port),
        _insn(0x50, 0, 0, 13),              # ldb [x+13]: TCP flags
        _insn(0x54, 0, 0, 0x12),            # and SYN|ACK
        _insn(0x15, 0, 1, 0x02),            # jeq SYN alone
        _insn(0x06, 0, 0, accept),          # ret: keep (the first bytes are enough)
        _insn(0x06, 0, 0, drop),            # ret 0: drop
    ]
    return b"".join(program)


def _stamps(ancillary: list[tuple[int, int, bytes]]) -> list[float]:
    """The SCM_TIMESTAMPNS of one recvmsg's ancillary data, as time.time() seconds."""
    return [seconds + nanoseconds / 1e9 for level, kind, data in ancillary
            if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS
            for seconds, nanoseconds in [struct.unpack("qq", data[:16])]]


def _stamp(sock: socket.socket) -> float:
    _, ancillary, _, _ = sock.recvmsg(16, socket.CMSG_SPACE(16))
    (stamp,) = _stamps(ancillary)
    return stamp


def _wait_for_delivery_stamps(timeout: float = 10.0) -> None:
    """Returns once the kernel stamps packets when they are delivered (a
    datagram read 20 ms after it was sent carries the earlier moment)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        probe.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        deadline = time.monotonic() + timeout
        while True:
            probe.sendto(b".", probe.getsockname())
            time.sleep(0.02)  # the gap to tell a delivery stamp from a read stamp
            if time.time() - _stamp(probe) >= 0.015:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the kernel does not stamp packets on delivery after {timeout}s")


class SynWatch:
    """Records, from now on, when connection attempts reach ``lo``:`port`.

    The filter is in place before the socket sees any packet (it is bound
    to an interface and protocol only afterwards). Use as a context manager
    or :meth:`close`.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)  # protocol 0: no packets yet
        try:
            program = syn_filter(port)
            self._program = ctypes.create_string_buffer(program)
            # struct sock_fprog {unsigned short len; struct sock_filter *filter;}
            fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(self._program))
            self._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _BUFFER)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self._sock.bind(("lo", ETH_P_IP))
            _wait_for_delivery_stamps()
        except BaseException:
            self._sock.close()
            raise

    def stamps(self) -> list[float]:
        """The kernel's stamps (time.time() seconds) of the SYNs that reached
        the port so far and were not read yet. Raises RuntimeError if the
        kernel dropped any (the buffer overflowed): the record would be
        incomplete."""
        found: list[float] = []
        while True:
            try:
                _, ancillary, _, _ = self._sock.recvmsg(64, socket.CMSG_SPACE(16), socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            found.extend(_stamps(ancillary))
        _packets, drops = struct.unpack("II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        if drops:
            raise RuntimeError(f"SYN watch on port {self.port}: the kernel dropped {drops} packets")
        return found

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SynWatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
