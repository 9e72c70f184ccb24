"""TLS on the relays' poller: ssl.SSLObject and memory BIOs, no task per connection.

Python's ``ssl.SSLObject`` runs TLS over two memory BIOs and never touches a
socket, which fits the relays' poller (:mod:`proxy.io.poller`): it owns the
sockets, reports readiness, and calls links back. This module has

* :class:`TlsEnd`: one socket's TLS state (the SSLObject, its BIOs, and the
  ciphertext the socket has not taken yet);
* :class:`Handshake`: a poller link that drives one handshake, with its own
  deadline, and reports completion or the reason it failed;
* :class:`TlsDirection`: one direction of the relay (:mod:`proxy.io.relay`)
  when either side speaks TLS: read plaintext from the source (decrypting
  if it is TLS), write it to the destination (encrypting if it is TLS).

What an idle connection holds: the SSLObject (OpenSSL frees its record
buffers between records: ``SSL_MODE_RELEASE_BUFFERS``, set by CPython) and
two empty BIOs. Bytes are read into and decrypted into two scratch buffers
shared by every connection (everything here runs on the trio thread and
never holds them across calls); only bytes a socket has not accepted yet
are kept per connection, as the copy path keeps its buffer.

Edge-triggered readiness, as in the relay: a direction waits for its source
only after a read found the socket empty (EAGAIN, or a short read with no
end of stream announced), for its destination only after a write was
refused (EAGAIN). Bytes a handshake read beyond its last message (a client
that sends AMQP right after Finished) stay in the incoming BIO: the relay
starts by moving once without waiting (see ``proxy.io.relay``).
"""

from __future__ import annotations

import math
import os
import ssl
from typing import Any, Callable

from ..io.directions import READ, TAIL, WRITE, YIELD, Direction, SideLost, lost_or_raise
from ..io.poller import EDGE_MASK
from . import errors

# A TLS record carries at most 16 KiB of plaintext (RFC 8446 section 5.1);
# reading a few records at a time keeps a round short and the buffers small.
_RAW_SIZE = 64 * 1024
_PLAIN_SIZE = 64 * 1024
_raw = memoryview(bytearray(_RAW_SIZE))
_plain = memoryview(bytearray(_PLAIN_SIZE))
_RAW_IOV, _PLAIN_IOV = (_raw,), (_plain,)  # readv's argument, built once
_ROUND_BUDGET = 1024 * 1024  # as the relay's: a busy sender cannot starve others


class TlsEnd:
    """One socket speaking TLS: its SSLObject, BIOs, and ciphertext still owed to it."""

    __slots__ = ("fd", "ssl", "obj", "incoming", "outgoing", "tx", "short_read", "ended")

    def __init__(self, fd: int, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None):
        self.fd = fd
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        # The C object under ssl.SSLObject: its read/write skip a Python
        # wrapper call per record (measured in bench/OPTIMISATIONS.md).
        self.obj = getattr(self.ssl, "_sslobj", self.ssl)
        self.tx = b""  # ciphertext the socket has not taken yet
        self.short_read = False  # the last read found the socket's queue empty
        self.ended = False  # the peer's end of stream came out of the TLS object

    def receive(self) -> int:
        """One read from the socket into the TLS object; 0 at end of stream.

        Raises BlockingIOError when the socket has nothing, OSError on errors.
        """
        received = os.readv(self.fd, _RAW_IOV)
        if received:
            self.incoming.write(_raw[:received])
            self.short_read = received < _RAW_SIZE
        else:
            self.incoming.write_eof()
        return received

    def send(self) -> bool:
        """Hand TLS output to the socket; True once nothing is owed. Raises OSError on errors."""
        tx = self.tx
        if self.outgoing.pending:
            tx = tx + self.outgoing.read() if tx else self.outgoing.read()
        while tx:
            try:
                sent = os.write(self.fd, tx)
            except BlockingIOError:
                self.tx = tx
                return False
            tx = tx[sent:]
        self.tx = tx
        return True

    def peer(self) -> TlsPeer:
        return TlsPeer.of(self.ssl)


class TlsPeer:
    """What a completed handshake established, for logs, stats and PROXY v2 TLVs."""

    __slots__ = ("version", "cipher", "reused", "certificate", "common_name", "dns_names")

    def __init__(self, version: str, cipher: str, reused: bool, certificate: bool,
                 common_name: str | None, dns_names: tuple[str, ...]):
        self.version = version
        self.cipher = cipher
        self.reused = reused
        self.certificate = certificate  # the peer presented a certificate that was verified
        self.common_name = common_name
        self.dns_names = dns_names

    @classmethod
    def of(cls, sslobj: ssl.SSLObject) -> TlsPeer:
        cert = sslobj.getpeercert()  # a dict only for a verified certificate
        common_name, dns = None, ()
        if cert:
            for rdn in cert.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        common_name = value
            dns = tuple(value for key, value in cert.get("subjectAltName", ()) if key == "DNS")
        cipher = sslobj.cipher()
        return cls(sslobj.version() or "", cipher[0] if cipher else "", sslobj.session_reused, bool(cert),
                   common_name, dns)

    @property
    def subject(self) -> str | None:
        """The client's identity as logged: its CN, else its first DNS SAN."""
        return self.common_name or (self.dns_names[0] if self.dns_names else None)


class HandshakeFailed:
    """Why a handshake did not complete: ``key`` for counters, ``description`` for logs."""

    __slots__ = ("key", "description")

    def __init__(self, key: str, description: str):
        self.key = key
        self.description = description

    def __repr__(self) -> str:
        return f"HandshakeFailed({self.key!r}, {self.description!r})"


class Handshake:
    """A poller link that completes one TLS handshake on `end` before `deadline`.

    `notify` gets None once the handshake is complete (ciphertext the
    socket could not take yet stays in ``end.tx`` for the relay), or a
    :class:`HandshakeFailed`: an alert or garbage, the peer closing, a
    reset, or the deadline; `fail` gets an unexpected error (a bug). As the
    poller's ``Writable``: whoever started it calls :meth:`cancel` if it
    stops caring first; the socket stays registered with ``EDGE_MASK`` for
    the relay to take over.
    """

    __slots__ = ("end", "fds", "events", "queued", "notify", "on_error", "scheduled", "deadline")

    def __init__(self, end: TlsEnd, poller: Any, deadline: float,
                 notify: Callable[[HandshakeFailed | None], Any], fail: Callable[[Exception], Any]):
        self.end = end
        self.fds = (end.fd,)
        self.events = [0]
        self.queued = False
        self.notify: Callable[[HandshakeFailed | None], Any] | None = notify
        self.on_error = fail
        self.scheduled = self.deadline = deadline
        poller.watch(end.fd, self, EDGE_MASK)
        poller.wake_at(self, deadline)

    def start(self) -> None:
        """Make the first move now (a client sends its hello; a server reads one already there)."""
        self.serve()

    def serve(self) -> bool:
        self.events[0] = 0
        end = self.end
        try:
            while True:
                try:
                    end.ssl.do_handshake()
                except ssl.SSLWantReadError:
                    if not end.send():
                        return False  # the socket is full: wait until it is writable
                    if not end.receive():  # raises BlockingIOError when there is nothing yet
                        self._finish(_closed())
                        return False
                    continue
                end.send()
                self._finish(None)
                return False
        except BlockingIOError:
            return False  # nothing to read: the next edge brings more
        except ssl.SSLError as error:
            self._flush_alert()
            self._finish(_failure(error))
        except OSError as error:
            self._finish(HandshakeFailed(errors.RESET, f"TLS handshake failed: {error.strerror}"))
        return False

    def _flush_alert(self) -> None:
        try:  # best effort: the alert tells a real client why
            self.end.send()
        except OSError:
            pass

    def _finish(self, failed: HandshakeFailed | None) -> None:
        notify = self.notify
        if notify is not None:
            self._let_go()
            notify(failed)

    def expire(self) -> None:
        self._finish(HandshakeFailed(errors.TIMEOUT, "TLS handshake timeout"))

    def fail(self, error: Exception) -> None:
        on_error = self.on_error
        if self.notify is not None:
            self._let_go()
            on_error(error)

    def cancel(self) -> None:
        self._let_go()

    def _let_go(self) -> None:
        # The timer entry (stale from now on) keeps this link until the
        # handshake deadline: holding nothing, it no longer keeps a closed
        # connection's session and SSL object alive until then (as the
        # poller's Writable).
        self.notify = self.on_error = self.end = None
        self.scheduled = math.inf


def _closed() -> HandshakeFailed:
    return HandshakeFailed(errors.CLOSED, "the peer closed the connection during the TLS handshake")


def _failure(error: ssl.SSLError) -> HandshakeFailed:
    if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return _closed()
    return HandshakeFailed(errors.reason_key(error), errors.describe(error))


class TlsDirection(Direction):
    """One direction of a relay where the source, the destination or both speak TLS.

    ``ends`` are the link's two sides: a :class:`TlsEnd`, or None for a plain
    socket. Plaintext goes through the shared scratch buffer; what the
    destination does not take at once is kept (``owed`` for a plain
    destination; ``TlsEnd.tx`` for a TLS one) and sent first next time.
    """

    __slots__ = ("src_end", "dst_end", "owed", "closing", "drained")

    def __init__(self, link: Any, index: int, ends: tuple[TlsEnd | None, TlsEnd | None]) -> None:
        self.link = link
        self.index = index
        self.src = link.fds[index]
        self.dst = link.fds[1 - index]
        self.eof = False
        self.ending = 0
        self.tap = self.tail = None  # the AMQP tap sees the plaintext, as on the copy path
        self.src_end = ends[index]
        self.dst_end = ends[1 - index]
        self.owed = b""  # plaintext a plain destination has not taken yet
        self.closing = False  # close_notify queued for the destination
        self.drained = False  # a plain source's last read found its queue empty

    def move(self) -> int:
        # The per-wake-up path, kept flat (few Python calls per record):
        # what the destination still owes first, then read, then write.
        index, dst_end = self.index, self.dst_end
        if dst_end is not None:
            if (dst_end.tx or dst_end.outgoing.pending) and not self._send(dst_end, 1 - index):
                return WRITE
        elif self.owed and not self._flush_owed():
            return WRITE
        if self.eof:
            return self._forward_eof()
        src_end = self.src_end
        if src_end is not None:
            src_end.short_read = False
        self.drained = False
        moved = 0
        while True:
            if src_end is not None:
                received = self._decrypt(src_end)
                if received is None:
                    return READ
            else:
                try:
                    received = os.readv(self.src, _PLAIN_IOV)
                except BlockingIOError:
                    return READ
                except OSError as exc:
                    raise lost_or_raise(exc, index) from exc
                # A stream socket's read stops short only once its queue is
                # empty: after writing this, wait for the next edge instead
                # of probing.
                self.drained = 0 < received < _PLAIN_SIZE and not self.ending
            if not received:
                self.eof = True
                return self._forward_eof()
            if index:
                self.link.traffic.bytes_out += received
            else:
                self.link.traffic.bytes_in += received
            if self.tap is not None:
                self.tap(_plain, received)
            if self.tail is not None:
                self.tail = _plain[received - TAIL if received > TAIL else 0 : received].tobytes()
            if dst_end is not None:
                try:
                    dst_end.obj.write(_plain[:received])
                except ssl.SSLError as exc:
                    raise SideLost(1 - index) from exc
                try:
                    sent = dst_end.send()
                except OSError as exc:
                    raise lost_or_raise(exc, 1 - index) from exc
                if not sent:
                    return WRITE
            else:
                try:
                    written = os.write(self.dst, _plain[:received])
                except BlockingIOError:
                    written = 0
                except OSError as exc:
                    raise lost_or_raise(exc, 1 - index) from exc
                if written < received:
                    self.owed = _plain[written:received].tobytes()
                    return WRITE
            if self.drained:
                return READ  # the next arrival is a new edge
            moved += received
            if moved >= _ROUND_BUDGET:
                return YIELD

    def _decrypt(self, end: TlsEnd) -> int | None:
        """Plaintext from TLS source `end` into the scratch buffer: its
        length, 0 at the end, None when the source is empty."""
        # Every record OpenSSL can decrypt now goes into one buffer, for one
        # write: a client that sends each frame as its own record (pika: a
        # publish's method, header and body) costs the destination one
        # segment per wake-up, not one per record (SSL_read returns one
        # record at a time). OpenSSL is asked only when it has bytes to work
        # on: its refusal (SSLWantReadError) costs several µs to raise and
        # came twice per wake-up (before the socket read, after the last
        # record). With read-ahead off (CPython's default) what OpenSSL has
        # not decrypted yet is in the incoming BIO or is a partial record
        # waiting for more bytes, and SSL_pending counts what it decrypted
        # and did not return (a record larger than the buffer's room).
        obj, incoming = end.obj, end.incoming
        filled = 0
        try:
            while filled < _PLAIN_SIZE and not end.ended:
                if incoming.pending or incoming.eof or obj.pending():
                    try:
                        got = obj.read(_PLAIN_SIZE - filled, _plain[filled:] if filled else _plain)
                    except ssl.SSLWantReadError:
                        got = -1  # a partial record (or a handshake message): more bytes needed
                    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                        got = 0
                    except ssl.SSLError as exc:  # a forged or broken record: this connection is unusable
                        raise SideLost(self.index) from exc
                    if got > 0:
                        filled += got
                        continue
                    if not got:  # close_notify or a bare end of stream, after the bytes before it
                        end.ended = True
                        break
                if end.short_read and not self.ending:
                    self.drained = True  # the socket's queue was empty at the last read
                    break
                try:
                    end.receive()
                except BlockingIOError:
                    self.drained = True
                    break
                except OSError as exc:
                    raise lost_or_raise(exc, self.index) from exc
        finally:
            if end.outgoing.pending:  # post-handshake messages (key updates) owed to the source
                self._send(end, self.index)
        return filled if filled or not self.drained else None

    def _flush_owed(self) -> bool:
        """Plaintext a plain destination did not take before; True once it took it all."""
        while self.owed:
            try:
                written = os.write(self.dst, self.owed)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise lost_or_raise(exc, 1 - self.index) from exc
            self.owed = self.owed[written:]
        return True

    @staticmethod
    def _send(end: TlsEnd, side: int) -> bool:
        try:
            return end.send()
        except OSError as exc:
            raise lost_or_raise(exc, side) from exc

    def _forward_eof(self) -> int:
        """The source ended: a TLS destination gets close_notify first, then the half-close."""
        end = self.dst_end
        if end is not None and not self.closing:
            self.closing = True
            try:
                end.ssl.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: our close_notify is queued, the peer's may follow
            if not self._send(end, 1 - self.index):
                return WRITE
        return self.forward_eof()

    def give_back(self) -> None:
        self.owed = b""


def tls_ways(ends: tuple[TlsEnd | None, TlsEnd | None]) -> Callable[[Any], list[TlsDirection]]:
    """The relay's directions for a connection with TLS on one or both sides."""
    return lambda link: [TlsDirection(link, 0, ends), TlsDirection(link, 1, ends)]
