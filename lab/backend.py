"""The small TCP backend that tests and benchmarks start in their namespaces.

One script, run with ``python -c`` (so that it needs nothing importable
where it runs), parameterised by what it does with each connection:

- answer and close (``answer="h1", close=True``): a client learns which host
  served it (the failover prober, the VIP agent);
- hold (the default): every connection stays open until the process ends
  (idle clients, a master's many connections);
- answer and hold (``answer="hi"``).

It prints one line, ``{"event": "ready"}``, once it listens (:data:`READY`).
"""

from __future__ import annotations

import sys

READY = '{"event": "ready"}'

SCRIPT = r"""
import argparse, json, socket
parser = argparse.ArgumentParser()
parser.add_argument("port", type=int)
parser.add_argument("--bind", default="127.0.0.1")
parser.add_argument("--answer", default="")
parser.add_argument("--close", action="store_true")
args = parser.parse_args()
server = socket.socket(socket.AF_INET6 if ":" in args.bind else socket.AF_INET)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((args.bind, args.port))
server.listen(4096)
print(json.dumps({"event": "ready"}), flush=True)
answer, held = args.answer.encode(), []
while True:
    conn, _ = server.accept()
    try:
        if answer:
            conn.sendall(answer)
    except OSError:
        pass
    if args.close:
        conn.close()
    else:
        held.append(conn)
"""


def backend_argv(port: int, *, answer: str = "", close: bool = False, bind: str = "127.0.0.1") -> list[str]:
    """The command line of a backend on ``bind``:``port`` that sends ``answer`` (if any) to
    every client, then closes the connection (``close``) or holds it."""
    argv = [sys.executable, "-c", SCRIPT, str(port), "--bind", bind]
    if answer:
        argv += ["--answer", answer]
    if close:
        argv.append("--close")
    return argv
