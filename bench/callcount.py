"""Python function calls per proxied connection, counted with cProfile.

Usage (from a checkout; PYTHONPATH selects the Warren under test):
    python bench/callcount.py [--small 300] [--large 1500] [--top 25] [--amqp]
                              [--mode amqp|tcp] [--relay ...] [--kernel-after N]

Warren runs in this process (an App in front of `--servers` echo servers,
roundrobin, like a three-node RabbitMQ cluster by default), a client
process opens connections one after another (connect, 64 bytes there and
back, close), and cProfile counts every Python and builtin call Warren's
process makes meanwhile. With `--amqp` the servers are fake AMQP brokers and
each connection is bench.tools.amqp_connrate's: the whole AMQP 0-9-1
handshake (client properties, PLAIN login) up to Open-Ok, then
Connection.Close / Close-Ok (an AMQP frontend's tap reads every handshake, a
TCP one relays it blind). Two runs, `small` and `large` connections, and the
difference divided by their difference gives the calls per connection
without the fixed cost of starting and stopping the load. Call counts do not
depend on the machine's speed, so this is a stable A/B measure where timings
on a shared machine are not (only the poller's idle rounds vary a little).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
if not any(Path(entry or ".").resolve() == REPO for entry in sys.path):
    sys.path.append(str(REPO))  # this checkout's Warren, unless PYTHONPATH names another
# The load's processes take bench.amqpwire from this checkout, whichever Warren is measured.
LOAD_ENV = {**os.environ, "PYTHONPATH": str(REPO)}

from proxy.app import App  # noqa: E402
from proxy.config import load_config  # noqa: E402

CLIENT = textwrap.dedent("""
    import socket, sys
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for _ in range(count):
        s = socket.create_connection((host, port))
        s.sendall(b"x" * 64)
        got = 0
        while got < 64:
            chunk = s.recv(64 - got)
            if not chunk:
                sys.exit("closed early")
            got += len(chunk)
        s.close()
""")

ECHO = textwrap.dedent("""
    import socket, sys, threading
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(listener.getsockname()[1], flush=True)
    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
""")


# --amqp: each connection a whole AMQP one (bench.tools.amqp_connrate's).
AMQP_CLIENT = textwrap.dedent("""
    import socket, sys
    from bench.amqpwire import LIBRARY_PROPERTIES, ClientHandshake
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for _ in range(count):
        s = socket.create_connection((host, port))
        handshake = ClientHandshake(properties=LIBRARY_PROPERTIES, then_close=True)
        s.sendall(handshake.start())
        while not handshake.ready:
            data = s.recv(65536)
            if not data:
                sys.exit("closed early")
            s.sendall(handshake.received(data))
        s.close()
""")

# A broker that answers the handshake as RabbitMQ does, one frame per step,
# and closes after Close-Ok.
AMQP_BROKER = textwrap.dedent("""
    import socket, sys, threading
    from bench import amqpwire as w
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(listener.getsockname()[1], flush=True)
    ANSWERS = {w.CONNECTION_START_OK: w.connection_tune(), w.CONNECTION_OPEN: w.connection_open_ok(),
               w.CONNECTION_CLOSE: w.connection_close_ok()}
    def serve(conn):
        with conn:
            header = b""
            while len(header) < 8:
                chunk = conn.recv(8 - len(header))
                if not chunk:
                    return
                header += chunk
            conn.sendall(w.connection_start())
            frames = w.FrameReader()
            while data := conn.recv(65536):
                frames.feed(data)
                for _kind, _channel, payload in frames.frames():
                    method = w.method_of(payload)[0]
                    if method in ANSWERS:
                        conn.sendall(ANSWERS[method])
                    if method == w.CONNECTION_CLOSE:
                        return
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
""")


def config_text(port: int, servers: int, mode: str = "amqp", relay: str = "auto", kernel_after: int = 8) -> str:
    text = textwrap.dedent(f"""
        [global]
        log_level = "warning"
        relay = "{relay}"
        kernel_after = {kernel_after}

        [frontends.fe]
        bind = ["127.0.0.1:0"]
        backend = "be"
        mode = "{mode}"

        [backends.be]
        retries = 3
        redispatch = true
    """)
    for index in range(servers):  # one echo server behind several names
        text += f'[[backends.be.servers]]\nname = "echo{index}"\naddress = "127.0.0.1"\nport = {port}\n'
    return text


def count_calls(config_path: Path, connections: int, client: str = CLIENT) -> pstats.Stats:
    profile = cProfile.Profile()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            app = App(load_config(str(config_path)), handle_signals=False)
            app.services = []  # no health checks, stats or VIP: the data path only
            await nursery.start(app.serve)
            host, port = app.addresses["fe"][0]
            argv = [sys.executable, "-c", client, host, str(port), str(connections)]
            profile.enable()
            await trio.run_process(argv, env=LOAD_ENV)
            while app.sessions.live:  # the last session's end is still being served
                await trio.sleep(0.001)
            profile.disable()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return pstats.Stats(profile)


def _python_calls(stats: pstats.Stats) -> int:
    """Calls of functions written in Python (builtins are filed under "~")."""
    return sum(calls for (file, _, _), (_, calls, *_rest) in stats.stats.items() if file != "~")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--large", type=int, default=1500)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--top", type=int, default=0, help="list the most called functions")
    parser.add_argument("--mode", choices=("amqp", "tcp"), default="amqp", help="the frontend's mode")
    parser.add_argument("--relay", choices=("auto", "kernel", "splice", "copy"), default="auto",
                        help="[global] relay (TCP frontends take the kernel path where it is in use)")
    parser.add_argument("--kernel-after", type=int, default=8, help="[global] kernel_after (0: into the map at once)")
    parser.add_argument("--amqp", action="store_true", help="fake AMQP brokers, whole AMQP connections")
    args = parser.parse_args()
    server, client = (AMQP_BROKER, AMQP_CLIENT) if args.amqp else (ECHO, CLIENT)
    echo = subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True, env=LOAD_ENV)
    try:
        port = int(echo.stdout.readline())
        with tempfile.TemporaryDirectory() as work:
            path = Path(work) / "warren.toml"
            path.write_text(config_text(port, args.servers, args.mode, args.relay, args.kernel_after))
            small = count_calls(path, args.small, client)
            large = count_calls(path, args.large, client)
    finally:
        echo.terminate()
        echo.wait()
    spread = args.large - args.small
    per_connection = (large.total_calls - small.total_calls) / spread
    python = (_python_calls(large) - _python_calls(small)) / spread
    print(f"calls per proxied connection: {per_connection:.1f}, of which Python functions {python:.1f} "
          f"(the rest builtins; {small.total_calls} calls for {args.small}, {large.total_calls} for {args.large})")
    if args.top:
        rows = []
        for key, (_, calls, *_rest) in large.stats.items():
            before = small.stats.get(key, (0, 0))[1]
            rows.append(((calls - before) / (args.large - args.small), key))
        for per, (file, line, name) in sorted(rows, reverse=True)[: args.top]:
            print(f"{per:7.2f}  {name}  {Path(file).name}:{line}")


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
