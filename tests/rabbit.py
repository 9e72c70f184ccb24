"""pytest fixtures for real RabbitMQ nodes (a plugin: `pytest_plugins = ["tests.rabbit"]`).

- `rabbit_cluster` (session): three clustered nodes on free loopback ports,
  started once (about 20 s on two cores). Tests that break a node must request
  `healthy_cluster` instead, or leave the repair to the next test that does.
- `healthy_cluster` (function): the same cluster after `heal()`, so all three
  nodes serve and are clustered when the test starts. Free when nothing broke.
- `rabbit_node_factory` (function): starts independent extra nodes with
  options (proxy_protocol, mgmt, extra_conf, tls: TLS-only listeners with the
  test PKI's certificates), all stopped and removed after the test.

All are synchronous, so trio tests can use them too. Every test using one of
them is marked `rabbit` (deselect with `-m "not rabbit"`); they skip with the
reason when rabbitmq-server is not installed or we are not root.
"""

from __future__ import annotations

import signal
from typing import Iterator, Mapping

import pytest

from lab import start_nodes
from proxy.devcluster import NodeTls, RabbitCluster, RabbitNode, unavailable_reason

RABBIT_FIXTURES = frozenset({"rabbit_cluster", "healthy_cluster", "rabbit_node_factory"})


def pytest_configure(config: pytest.Config) -> None:
    # CI runners stop jobs with SIGTERM, which would end pytest without its
    # session teardown and leave the nodes running; as KeyboardInterrupt it
    # runs the teardown that stops them.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if RABBIT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.rabbit)


def skip_without_rabbitmq() -> None:
    if reason := unavailable_reason():
        pytest.skip(reason)


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """Three clustered nodes for the whole session (management plugin off)."""
    skip_without_rabbitmq()
    cluster = start_nodes(3, cluster=True, tag="c")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def healthy_cluster(rabbit_cluster: RabbitCluster) -> RabbitCluster:
    """The session cluster with every node serving and clustered."""
    rabbit_cluster.heal()
    return rabbit_cluster


class NodeFactory:
    """Starts independent nodes for one test; `close()` removes them all."""

    def __init__(self) -> None:
        self._clusters: list[RabbitCluster] = []

    def __call__(self, *, proxy_protocol: bool = False, mgmt: bool = False,
                 extra_conf: Mapping[str, str] | None = None, tls: NodeTls | None = None) -> RabbitNode:
        """One started node (mgmt=True also enables the management plugin; with
        `tls` it listens for AMQPS, and HTTPS for management, only)."""
        return self.start_many(1, proxy_protocol=proxy_protocol, mgmt=mgmt, extra_conf=extra_conf, tls=tls)[0]

    def start_many(self, count: int, *, cluster: bool = False, proxy_protocol: bool = False,
                   mgmt: bool = False, extra_conf: Mapping[str, str] | None = None,
                   tls: NodeTls | None = None) -> list[RabbitNode]:
        """`count` nodes started in parallel, clustered together if `cluster`."""
        started = start_nodes(count, cluster=cluster, tag="n", mgmt=mgmt, tls=tls,
                              proxy_protocol=proxy_protocol, extra_conf=dict(extra_conf or {}))
        self._clusters.append(started)
        return started.nodes

    def close(self) -> None:
        for cluster in self._clusters:
            cluster.close()


@pytest.fixture
def rabbit_node_factory() -> Iterator[NodeFactory]:
    skip_without_rabbitmq()
    factory = NodeFactory()
    try:
        yield factory
    finally:
        factory.close()
