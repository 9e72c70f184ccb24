"""`make run`: python -m proxy.devcluster --config conf/warren.toml

Starts local RabbitMQ nodes (clustered), runs Warren in front of them until it
exits or we get SIGINT/SIGTERM, then stops everything and removes the nodes'
directories."""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
from typing import Sequence

from ._cluster import RabbitCluster
from ._node import NodeSpec
from ._system import DevClusterError, unavailable_reason

DEMO_FRONT = "127.0.0.1:5670"  # as in conf/warren.toml
DEMO_STATS = "http://127.0.0.1:8404/ (admin/admin)"
WARREN_STOP_TIMEOUT = 15.0


class _StopRequested(BaseException):
    """SIGINT or SIGTERM arrived; unwinds to the cleanup."""


def demo_specs(nodes: int, base_port: int, mgmt_base_port: int | None,
               dist_base_port: int | None = None, name_prefix: str = "warren") -> list[NodeSpec]:
    """warren-a, warren-b, ... (`name_prefix`-a, ...) on consecutive AMQP
    ports from `base_port`, distribution ports from `dist_base_port`
    (default: 20000 above the AMQP ports), management ports from
    `mgmt_base_port`."""
    dist = dist_base_port if dist_base_port else base_port + 20000
    return [
        NodeSpec(f"{name_prefix}-{chr(ord('a') + i)}", base_port + i, dist + i,
                 mgmt_base_port + i if mgmt_base_port else None)
        for i in range(nodes)
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m proxy.devcluster",
                                description="Local RabbitMQ cluster with Warren in front (make run).")
    p.add_argument("--config", default="conf/warren.toml", help="Warren configuration file")
    p.add_argument("--nodes", type=int, default=3, help="number of RabbitMQ nodes (default 3)")
    p.add_argument("--base-port", type=int, default=5681, help="AMQP port of the first node")
    p.add_argument("--dist-base-port", type=int, default=0,
                   help="Erlang distribution port of the first node (default: AMQP port + 20000)")
    p.add_argument("--mgmt-base-port", type=int, default=15681, help="management port of the first node (0: off)")
    p.add_argument("--name-prefix", default="warren",
                   help="nodes are PREFIX-a@localhost, PREFIX-b@localhost, ... (default warren); a node name "
                        "is unique on a machine, so a second launcher needs another prefix (and other ports)")
    p.add_argument("--dir", default=None,
                   help="node directories (default: a new directory under /tmp, which the rabbitmq "
                        "user can enter even when the checkout is under a private home; removed at exit)")
    p.add_argument("--command", help="run this instead of Warren (shell words; for tests)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Starts the nodes, runs Warren until it exits or we are signalled,
    then stops everything. Exit code: Warren's, or 0 when signalled."""
    args = parse_args(argv)
    if reason := unavailable_reason():
        print(f"devcluster: {reason}", file=sys.stderr)
        return 2
    command = shlex.split(args.command) if args.command else [sys.executable, "-m", "proxy", "run", args.config]
    specs = demo_specs(args.nodes, args.base_port, args.mgmt_base_port, args.dist_base_port, args.name_prefix)
    cluster = RabbitCluster(specs, args.dir, cluster=args.nodes > 1)
    _raise_on_stop_signals()
    try:
        cluster.start()
        print_nodes(cluster)
        return run_until_stopped(command)
    except _StopRequested:
        return 0
    except DevClusterError as exc:
        print(f"devcluster: {exc}", file=sys.stderr)
        return 1
    finally:
        _ignore_stop_signals()  # cleanup is bounded; do not let a 2nd Ctrl-C cut it short
        print("devcluster: stopping nodes", flush=True)
        cluster.close()


def run_until_stopped(command: list[str]) -> int:
    """Runs Warren in its own session (a terminal's Ctrl-C reaches only us, and
    we forward SIGTERM); returns its exit code, or 0 if we were signalled."""
    warren = subprocess.Popen(command, start_new_session=True)
    print(f"Warren      pid {warren.pid}: {' '.join(command)}\n"
          f"  front     {DEMO_FRONT}\n  stats     {DEMO_STATS}\n"
          "Ctrl-C stops Warren and the nodes.", flush=True)
    try:
        code = warren.wait()
        return 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    except _StopRequested:
        _ignore_stop_signals()
        warren.terminate()
        try:
            warren.wait(WARREN_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            warren.kill()
            warren.wait()
        return 0


def print_nodes(cluster: RabbitCluster) -> None:
    print(f"RabbitMQ    {len(cluster)} node(s){' clustered' if cluster.cluster else ''}, in {cluster.base_dir}")
    for node in cluster:
        mgmt = f"  management http://127.0.0.1:{node.spec.mgmt_port}/ (guest/guest)" if node.spec.mgmt_port else ""
        print(f"  {node.nodename:22} amqp 127.0.0.1:{node.spec.amqp_port}{mgmt}")
    print(f"  rabbitmqctl: sudo rabbitmqctl -n {cluster[0].nodename} cluster_status", flush=True)


def _raise_on_stop_signals() -> None:
    def handler(signum, frame):
        _ignore_stop_signals()
        raise _StopRequested(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
