"""Local RabbitMQ nodes for the test suite and the `make run` demo.

Debian's rabbitmq-server runs several nodes on one machine when each has its
own node name, ports and directories. This package starts such nodes as the
`rabbitmq` user, every directory under one base directory, and removes all of
it again: `RabbitCluster(specs, base_dir, cluster=True)` is the entry point;
`python -m proxy.devcluster` is the demo launcher (see __main__.py).

Process model, which kill/pause rely on: each node is the `rabbitmq-server`
shell wrapper (our child, leader of a new session, so a terminal's Ctrl-C
reaches only us) and its child `beam.smp`, the Erlang VM. The wrapper turns
SIGTERM into a graceful broker stop; SIGKILL or SIGSTOP go straight to the VM
to imitate a crash or a hang. Nodes die with the process that started them,
however it ends (a SIGKILL too): see _reaper.py. Every node shares the Erlang cookie of the
`rabbitmq` user (/var/lib/rabbitmq/.erlang.cookie), so the rabbitmqctl run
here, or by hand with `sudo rabbitmqctl -n NODE`, reaches it.

Needs root (or the `rabbitmq` user). Objects are not thread-safe; the parallel
work inside runs in short-lived threads.
"""

from ._cluster import RabbitCluster, in_parallel, join_cluster
from ._node import NodeSpec, NodeTls, RabbitNode, render_conf
from ._reaper import forget, reap_if_we_die
from ._system import (
    CtlError, DevClusterError, epmd_names, epmd_pids, free_ports, port_accepts, run_ctl,
    unavailable_reason,
)

__all__ = [
    "CtlError", "DevClusterError", "NodeSpec", "NodeTls", "RabbitCluster", "RabbitNode", "epmd_names",
    "epmd_pids", "forget", "free_ports", "in_parallel", "join_cluster", "port_accepts",
    "reap_if_we_die", "render_conf", "run_ctl", "unavailable_reason",
]
