"""One TLS stream of bulk bytes through a proxy that terminates TLS, to a sink in clear.

Usage:
  python -m bench.tools.tls_bulk sink PORT             # discards what it receives
  python -m bench.tools.tls_bulk send HOST PORT SECONDS

The sender writes 256 KiB chunks over TLS for SECONDS, then closes and
prints {"event": "done", "bytes": N, "seconds": S}. iperf3 cannot speak
TLS, hence this tool; its own encryption (OpenSSL, AES-GCM) costs the
sender's core, not the proxy's.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import time

CHUNK = 256 * 1024


def sink(port: int) -> int:
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    buffer = bytearray(1024 * 1024)

    def drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv_into(buffer):
                pass

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def send(host: str, port: int, seconds: float) -> int:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    payload = b"\0" * CHUNK
    with socket.create_connection((host, port), timeout=30) as raw, context.wrap_socket(raw) as tls:
        start = time.monotonic()
        end = start + seconds
        sent = 0
        while time.monotonic() < end:
            tls.sendall(payload)
            sent += CHUNK
        elapsed = time.monotonic() - start
    print(json.dumps({"event": "done", "bytes": sent, "seconds": elapsed}), flush=True)
    return 0


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "sink":
        sys.exit(sink(int(sys.argv[2])))
    sys.exit(send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
