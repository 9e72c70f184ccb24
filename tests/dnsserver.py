"""A tiny authoritative UDP DNS responder for tests (RFC 1035 wire format).

It answers A and AAAA questions from a mutable ``records`` mapping
(name -> list of address strings; an address containing ':' is AAAA), with
NXDOMAIN for names it does not know and an empty NOERROR answer (NODATA) for
known names without records of the asked type.  Tests steer failures through
two mutable sets: names in ``servfail`` get SERVFAIL, queries for names in
``drop`` are silently discarded (so the client times out).  Every question
received is appended to ``seen`` as ``(name, "A" | "AAAA" | str(qtype))``.

TTLs are 0 so no resolver cache can hide a record change from a test.
"""

from __future__ import annotations

import ipaddress
import struct

import trio

QTYPE_A, QTYPE_AAAA = 1, 28
QCLASS_IN = 1
RCODE_NOERROR, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN = 0, 1, 2, 3
_HEADER = struct.Struct("!HHHHHH")  # id, flags, qd, an, ns, ar (RFC 1035 4.1.1)
_QTYPE_NAMES = {QTYPE_A: "A", QTYPE_AAAA: "AAAA"}


async def serve_dns(
    records: dict[str, list[str]],
    *,
    servfail: set[str] | None = None,
    drop: set[str] | None = None,
    seen: list[tuple[str, str]] | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``records`` on 127.0.0.1, port chosen by the kernel.

    ``task_status.started((host, port))`` once the socket is bound.  The
    mappings and sets are read on every query, so tests may mutate them.
    """
    servfail = servfail if servfail is not None else set()
    drop = drop if drop is not None else set()
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname())
        while True:
            query, peer = await sock.recvfrom(4096)
            reply = answer(query, records, servfail, drop, seen)
            if reply is not None:
                await sock.sendto(reply, peer)


def answer(
    query: bytes,
    records: dict[str, list[str]],
    servfail: set[str],
    drop: set[str],
    seen: list[tuple[str, str]] | None = None,
) -> bytes | None:
    """Build the response to one query, or ``None`` to stay silent."""
    try:
        query_id, flags, qdcount, *_ = _HEADER.unpack_from(query)
        name, question_end = _read_name(query, _HEADER.size)
        qtype, qclass = struct.unpack_from("!HH", query, question_end)
    except (struct.error, ValueError, IndexError):
        return None  # not even a header to answer to
    question = query[_HEADER.size : question_end + 4]
    if seen is not None:
        seen.append((name, _QTYPE_NAMES.get(qtype, str(qtype))))
    if flags & 0x8000:
        return None  # a response, not a query: never answer it (no loops)
    if qdcount != 1:
        return _response(query_id, flags, RCODE_FORMERR, question, [])
    if name in drop:
        return None
    if name in servfail:
        return _response(query_id, flags, RCODE_SERVFAIL, question, [])
    if name not in records:
        return _response(query_id, flags, RCODE_NXDOMAIN, question, [])
    rdatas = _rdatas(records[name], qtype) if qclass == QCLASS_IN else []
    return _response(query_id, flags, RCODE_NOERROR, question, [(qtype, r) for r in rdatas])


def _read_name(message: bytes, offset: int) -> tuple[str, int]:
    """Read an uncompressed name (queries never need pointers); lower-cased."""
    labels = []
    while True:
        length = message[offset]
        offset += 1
        if length == 0:
            return ".".join(labels).lower(), offset
        if length > 63:
            raise ValueError("compressed or invalid label in question")
        labels.append(message[offset : offset + length].decode("ascii"))
        offset += length


def _rdatas(addresses: list[str], qtype: int) -> list[bytes]:
    wanted = {QTYPE_A: 4, QTYPE_AAAA: 6}.get(qtype)
    ips = [ipaddress.ip_address(a) for a in addresses]
    return [ip.packed for ip in ips if ip.version == wanted]


def _response(
    query_id: int, query_flags: int, rcode: int, question: bytes, answers: list[tuple[int, bytes]]
) -> bytes:
    # QR=1, keep opcode and RD from the query, AA=1, RA=1 (RFC 1035 4.1.1).
    flags = 0x8000 | (query_flags & 0x7900) | 0x0400 | 0x0080 | rcode
    header = _HEADER.pack(query_id, flags, 1 if question else 0, len(answers), 0, 0)
    body = b"".join(
        # 0xC00C: pointer to the question name right after the header.
        struct.pack("!HHHIH", 0xC00C, qtype, QCLASS_IN, 0, len(rdata)) + rdata
        for qtype, rdata in answers
    )
    return header + question + body
