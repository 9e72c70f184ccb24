"""The harness shared by tests/ and bench/: network namespaces, broker nodes
and polling, made and removed by one run without touching anybody else's.

It lives at the top of the repository, beside `proxy/`, `tests/` and
`bench/`, so that both the suite and the benchmarks import it and neither
imports the other; it is not part of the installed `warren` package.

    from lab import NetLab, wait_until

    with NetLab() as net:                       # tests: the `netlab` fixture
        lan = net.lan()                         # a bridge in its own namespace
        h1, h2 = lan.add_host("h1"), lan.add_host("h2")
        broker_ip = lan.link_root()             # root namespace <-> bridge
        warren = await net.open_process(h1.ns, [sys.executable, "-m", "proxy", "run", path])
        lan.cut(h1); lan.heal(h1)               # partition, carrier up
        with net.drop(h1.ns, broker_ip, port):  # packets dropped both ways, no FIN
            await wait_until(lambda: ..., timeout=10, what="n0 DOWN")

- `NetLab`, `Lan`, `Host`, `Pair`, `Side`, `Drop` (lab/netns.py): namespaces,
  links, packet drops, processes; everything removed by `destroy()`, by PID.
  `netns_missing()` / `nft_missing()` say why they cannot work here.
  `ip()`, `in_ns()`, `sysctl()`: the plumbing, for what the classes lack.
- `wait_until` (lab/polling.py): the one polling helper of the tests
  (`wait_until_blocking`: the same outside trio).
- `start_nodes`, `unique_node_name` (lab/brokers.py): RabbitMQ nodes with
  names unique to this run.
- `backend_argv` (lab/backend.py): the small TCP backend started in the
  namespaces (answer and close, or hold every connection).
"""

from .backend import backend_argv
from .brokers import start_nodes, unique_node_name
from .netns import (
    Drop, Host, Lan, LabError, NetLab, Pair, Side, in_ns, ip, kill_child, netns_missing, nft_missing, sysctl,
)
from .polling import wait_until, wait_until_blocking

__all__ = [
    "Drop", "Host", "LabError", "Lan", "NetLab", "Pair", "Side", "backend_argv", "in_ns", "ip", "kill_child",
    "netns_missing", "nft_missing", "start_nodes", "sysctl", "unique_node_name", "wait_until",
    "wait_until_blocking",
]
