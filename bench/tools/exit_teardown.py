"""How long a SIGKILLed process's peer waits for its FIN, by the dead process's memory.

    .venv/bin/python -m bench.tools.exit_teardown --kinds warren,warren-huge,p4k,pthp --mib 48 --rounds 9

The kernel frees a dying process's address space (``exit_mm()``) before it
closes any descriptor (``exit_files()``): a VIP master's peer link ends only
after that (docs/vip.md, the peer link). Each kill: a child process fills
memory of one kind, connects to us on loopback, is SIGKILLed; we time
``kill()`` to the connection's EOF. Kinds are interleaved in every round;
prints medians and ranges (ms) with the child's RSS and the load average.

Kinds: ``bare`` (the interpreter), ``p4k`` / ``pthp`` (``--mib`` of private
anonymous memory on 4 KiB pages / madvised transparent huge pages),
``file`` (``--mib`` of a mapped file's pages), ``objects`` (about ``--mib``
of small Python objects), ``warren`` (Warren's imports, start-up objects
frozen) and ``warren-huge`` (the same, then moved onto huge pages as
``warren run`` does with a peer link).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import mmap, socket, sys, time
kind, mib, port, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
keep = []
if kind in ("p4k", "pthp"):
    m = mmap.mmap(-1, (mib + 2) << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE if kind == "pthp" else mmap.MADV_NOHUGEPAGE)
    for i in range(0, (mib + 2) << 20, 4096):
        m[i] = 1
    keep.append(m)
elif kind == "file":
    m = mmap.mmap(open(path, "rb").fileno(), mib << 20, prot=mmap.PROT_READ)
    keep.append(sum(m[i] for i in range(0, mib << 20, 4096)))
    keep.append(m)
elif kind == "objects":
    keep.append([str(i) * 3 for i in range(mib * 9000)])
elif kind.startswith("warren"):
    import proxy.app, proxy.cli, proxy.memory, proxy.vip.service  # noqa: F401
    proxy.memory.freeze_startup_objects()
    if kind == "warren-huge":
        proxy.memory.collapse_startup_memory()
link = socket.create_connection(("127.0.0.1", port))
status = {line.split(":")[0]: line.split()[1] for line in open("/proc/self/status")
          if line.startswith(("VmRSS", "RssAnon", "RssFile"))}
link.sendall(f"{status['VmRSS']}/{status['RssAnon']}/{status['RssFile']}".encode())
while True:
    time.sleep(100)
"""


def kill_once(kind: str, mib: int, path: str) -> tuple[float, str]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(60)
        child = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(mib), str(listener.getsockname()[1]), path],
                                 cwd=REPO, stderr=subprocess.DEVNULL)
        try:
            link, _ = listener.accept()
        except TimeoutError:
            child.kill()
            raise SystemExit(f"{kind}: the child never connected")
        with link:
            link.settimeout(60)
            rss = link.recv(100).decode()
            time.sleep(0.05)  # the child is asleep in time.sleep
            began = time.monotonic()
            os.kill(child.pid, signal.SIGKILL)
            while link.recv(4096):
                pass
            elapsed = (time.monotonic() - began) * 1000
        child.wait()
    return elapsed, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="bare,p4k,pthp,warren,warren-huge")
    parser.add_argument("--mib", default="48", help="sizes, comma-separated (for p4k, pthp, file, objects)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    plan = [(kind, int(mib)) for kind in args.kinds.split(",") for mib in args.mib.split(",")]
    plan = list(dict.fromkeys((k, m if k in ("p4k", "pthp", "file", "objects") else 0) for k, m in plan))
    times: dict = {p: [] for p in plan}
    sizes: dict = {}
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as data:
        if any(kind == "file" for kind, _ in plan):
            data.write(os.urandom(max(m for _, m in plan) << 20))
            data.flush()
        print("load average at the start:", " ".join(open("/proc/loadavg").read().split()[:3]))
        for _ in range(args.rounds):
            for kind, mib in plan:
                elapsed, sizes[(kind, mib)] = kill_once(kind, mib, data.name)
                times[(kind, mib)].append(elapsed)
    for (kind, mib), values in times.items():
        values.sort()
        print(f"{kind:12} {mib:4} MiB  RSS/anonymous/file kB {sizes[(kind, mib)]:22}  "
              f"median {statistics.median(values):6.2f} ms  range {values[0]:.2f}-{values[-1]:.2f}")
    print("load average at the end:", " ".join(open("/proc/loadavg").read().split()[:3]))


if __name__ == "__main__":
    main()
