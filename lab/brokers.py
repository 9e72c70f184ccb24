"""RabbitMQ nodes for one run of the tests or a benchmark: names no other run
on this machine uses at the same time, free ports, a second try.

Thin on purpose: proxy.devcluster does the work (and the `make run` demo).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace

from proxy.devcluster import DevClusterError, NodeSpec, RabbitCluster

START_ATTEMPTS = 2  # a second try with fresh ports, in case another run took one
_serial = itertools.count(1)


def unique_node_name(tag: str) -> str:
    """A node name no other run on this machine uses at the same time."""
    return f"wt{os.getpid()}-{tag}{next(_serial)}"


def start_nodes(count: int, *, cluster: bool, tag: str, mgmt: bool = False, also_listen: str | None = None,
                start_timeout: float = 120.0, **options) -> RabbitCluster:
    """A started RabbitCluster of ``count`` nodes on free ports (in a temporary
    directory removed by its close()); retried once with fresh ports. Options
    go to NodeSpec (proxy_protocol, extra_conf). With ``also_listen`` (an IPv4
    address, e.g. `Lan.link_root()`'s), every node also accepts AMQP there, on
    its own port."""
    for attempt in range(1, START_ATTEMPTS + 1):
        specs = [NodeSpec.on_free_ports(unique_node_name(tag), mgmt=mgmt, **options) for _ in range(count)]
        if also_listen is not None:
            specs = [replace(spec, extra_conf={**spec.extra_conf, "listeners.tcp.lab": f"{also_listen}:{spec.amqp_port}"})
                     for spec in specs]
        try:
            return RabbitCluster(specs, cluster=cluster, start_timeout=start_timeout).start()
        except DevClusterError:
            if attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")
