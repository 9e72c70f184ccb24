"""User-space instructions per proxied connection, counted by valgrind's callgrind.

Usage (from a checkout):
    python -m bench.instrcount [--small 100] [--large 400] [--amqp] [--mode amqp|tcp]
                               [--checkout DIR ...]

`warren run` is started under ``valgrind --tool=callgrind`` in front of
bench.callcount's fake brokers (or echo servers without ``--amqp``), a client
process opens `small`, then in a second run `large` connections one after
another, and the difference of the two runs' instruction totals divided by
`large - small` is what one connection costs Warren in user space (the
interpreter, the libraries, libc; not the kernel), without the fixed cost of
starting and stopping. Each ``--checkout`` is measured in turn (default: this
one), so an A/B is one command.

Why: on this 2-core machine the benchmarks' CPU per connection spreads ~10 %
between rounds of the same code (bench/OPTIMISATIONS.md), more than most
single changes to the connection path save. Instructions counted by
callgrind do not depend on the machine's load: the same code gives the same
count to within a fraction of a percent. They are not time (cache misses and
system calls are not in them), so a change is judged by them and then
confirmed by ``bench.run --baseline``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.callcount import AMQP_BROKER, AMQP_CLIENT, CLIENT, ECHO, LOAD_ENV, config_text
from bench.procs import free_ports, spawn, wait_listening

REPO = Path(__file__).resolve().parent.parent
_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def instructions(checkout: Path, config: str, client: str, connections: int, work: Path,
                 keep: Path | None = None) -> int:
    """Warren's user-space instructions over its whole run with `connections`
    sequential clients."""
    (port,) = free_ports(1)
    path = work / "warren.toml"
    path.write_text(config.replace('bind = ["127.0.0.1:0"]', f'bind = ["127.0.0.1:{port}"]'))
    out = work / "callgrind.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            sys.executable, "-m", "proxy", "run", str(path)]
    warren = spawn("warren-callgrind", argv, log_path=work / "warren.log", cwd=checkout,
                   env={**os.environ, "PYTHONPATH": str(checkout)})
    try:
        wait_listening(port, warren, timeout=300)
        subprocess.run([sys.executable, "-c", client, "127.0.0.1", str(port), str(connections)],
                       env=LOAD_ENV, check=True, timeout=1800)
    finally:
        warren.stop(timeout=300)  # SIGTERM: callgrind writes its totals as Warren exits
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        out = Path(shutil.copy(out, keep / f"callgrind.{checkout.name}.{connections}"))
    totals = _TOTALS.findall(out.read_bytes())
    if not totals:
        raise SystemExit(f"no instruction total in {out}")
    return int(totals[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=400)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--mode", choices=("amqp", "tcp"), default="amqp", help="the frontend's mode")
    parser.add_argument("--amqp", action="store_true", help="fake AMQP brokers, whole AMQP connections")
    parser.add_argument("--checkout", type=Path, action="append", help="a Warren checkout to measure (repeatable)")
    parser.add_argument("--keep", type=Path, help="keep each run's callgrind output here (for callgrind_annotate)")
    args = parser.parse_args()
    server, client = (AMQP_BROKER, AMQP_CLIENT) if args.amqp else (ECHO, CLIENT)
    backend = subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True, env=LOAD_ENV)
    try:
        port = int(backend.stdout.readline())
        config = config_text(port, args.servers, args.mode)
        for checkout in args.checkout or [REPO]:
            with tempfile.TemporaryDirectory() as work:
                small = instructions(checkout.resolve(), config, client, args.small, Path(work), args.keep)
                large = instructions(checkout.resolve(), config, client, args.large, Path(work), args.keep)
            per_connection = (large - small) / (args.large - args.small)
            print(f"{checkout}: {per_connection:,.0f} instructions per connection "
                  f"({small:,} for {args.small}, {large:,} for {args.large})", flush=True)
    finally:
        backend.terminate()
        backend.wait()


if __name__ == "__main__":
    main()
