"""Several local nodes started together, optionally clustered; cleanup."""

from __future__ import annotations

import atexit
import concurrent.futures
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import structlog

from ._node import NodeSpec, RabbitNode
from ._system import (
    CtlError, DevClusterError, check_reachable_by_rabbitmq, epmd_pids, port_accepts, stop_epmd_if_idle,
)

log = structlog.get_logger("warren.devcluster")


def in_parallel(fn: Callable, items: Sequence) -> list:
    """fn(item) for each item in threads; results in order, or all failures
    together in an ExceptionGroup."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    pool = concurrent.futures.ThreadPoolExecutor(len(items))
    try:
        futures = [pool.submit(fn, item) for item in items]
        concurrent.futures.wait(futures)
    finally:
        # On Ctrl-C, do not wait for the threads: the caller's cleanup stops
        # the nodes they are waiting for, which ends them.
        pool.shutdown(wait=False, cancel_futures=True)
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise ExceptionGroup("devcluster: parallel step failed", errors)
    return [f.result() for f in futures]


def for_each_node(fn: Callable[[RabbitNode], object], nodes: Sequence[RabbitNode], step: str) -> None:
    """in_parallel, with the failures folded into one DevClusterError."""
    try:
        in_parallel(fn, nodes)
    except ExceptionGroup as group:
        messages = "\n".join(str(exc) for exc in group.exceptions)
        raise DevClusterError(f"{step} failed:\n{messages}") from group


_open_clusters: set[RabbitCluster] = set()
_epmd_before: list[int] = []


class RabbitCluster:
    """Nodes started together, optionally joined into one cluster (to nodes[0]).

    `base_dir=None` makes a temporary directory (removed at close); a given
    base_dir is created if missing (then removed at close). start() cleans up
    after itself if it fails; close() stops every node and removes every
    directory it created, and runs at interpreter exit if forgotten."""

    def __init__(self, specs: Sequence[NodeSpec], base_dir: Path | str | None = None, *,
                 cluster: bool = True, start_timeout: float = 120.0):
        self.specs = list(specs)
        self.cluster = cluster
        self.start_timeout = start_timeout
        self._given_dir = Path(base_dir).absolute() if base_dir is not None else None
        self.base_dir: Path | None = None
        self._remove_base_dir = False
        self.nodes: list[RabbitNode] = []

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __iter__(self) -> Iterator[RabbitNode]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> RabbitNode:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def start(self) -> RabbitCluster:
        """Starts all nodes at once, waits until each is ready, then joins
        nodes[1:] to nodes[0] when `cluster`. Returns self; on failure closes
        and re-raises."""
        began = time.monotonic()
        if not _open_clusters:
            _epmd_before[:] = epmd_pids()
        _open_clusters.add(self)
        try:
            self.base_dir = self._make_base_dir()
            self.nodes = [RabbitNode(spec, self.base_dir) for spec in self.specs]
            for node in self.nodes:
                node.prepare()
                node.start()
            for_each_node(lambda n: n.wait_ready(self.start_timeout), self.nodes, "start")
            if self.cluster:
                for node in self.nodes[1:]:
                    join_cluster(node, self.nodes[0])
                self.wait_clustered(self.start_timeout)
        except BaseException:
            self.close()
            raise
        log.info("cluster.started", nodes=[n.nodename for n in self.nodes],
                 seconds=round(time.monotonic() - began, 1))
        return self

    def wait_clustered(self, timeout: float = 60.0) -> None:
        """Polls until every node is a running member and nothing is partitioned."""
        deadline = time.monotonic() + timeout
        want = {n.nodename for n in self.nodes}
        while True:
            try:
                status = self.nodes[0].cluster_status()
                if set(status["running_nodes"]) >= want and not status.get("partitions"):
                    return
            except CtlError:
                pass
            if time.monotonic() > deadline:
                raise DevClusterError(f"cluster not formed after {timeout}s: want {sorted(want)}")
            time.sleep(0.3)

    def heal(self, timeout: float = 120.0) -> list[RabbitNode]:
        """Brings every node back to serving and clustered: resumes paused
        ones, starts stopped or killed ones (in parallel), starts the app where
        the VM runs without it, then waits for the cluster to re-form. Returns
        the nodes it had to fix; costs one port probe per node when none."""
        resumed = [node for node in self.nodes if node.paused]
        for node in resumed:
            node.resume()
        broken = [node for node in self.nodes if not node.is_serving()]
        if broken:
            log.info("cluster.healing", nodes=[n.nodename for n in broken])
            for_each_node(lambda node: repair(node, timeout), broken, "heal")
        fixed = [node for node in self.nodes if node in resumed or node in broken]
        if fixed and self.cluster:
            # A node paused past net_ticktime comes back partitioned; autoheal
            # (see render_conf) restarts the losing side's app.
            self.wait_clustered(timeout)
        return fixed

    def close(self, timeout: float = 30.0) -> None:
        """Stops all nodes (in parallel), removes directories. Idempotent."""
        try:
            in_parallel(lambda n: n.stop(timeout), self.nodes)
        finally:
            for node in self.nodes:
                shutil.rmtree(node.dir, ignore_errors=True)
            if self._remove_base_dir and self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            _open_clusters.discard(self)
            if not _open_clusters and not _epmd_before:
                stop_epmd_if_idle()

    def _make_base_dir(self) -> Path:
        if self._given_dir is None:
            path = Path(tempfile.mkdtemp(prefix="warren-rabbit-"))
            self._remove_base_dir = True
            path.chmod(0o755)  # mkdtemp makes 0700; the rabbitmq user must enter
        else:
            path = self._given_dir
            check_reachable_by_rabbitmq(path)
            self._remove_base_dir = not path.exists()
            for part in [*reversed(path.parents), path]:
                if not part.exists():
                    part.mkdir()
                    part.chmod(0o755)  # whatever the umask: the rabbitmq user must enter
        return path


def repair(node: RabbitNode, timeout: float) -> None:
    """Gets one node serving again, whatever state a test left it in."""
    if node.is_running() and not port_accepts(node.spec.amqp_port):
        try:
            node.ctl("start_app", timeout=timeout)  # VM up, app stopped
        except CtlError:
            node.stop()
    if not node.is_running():
        node.start()
    node.wait_ready(timeout)


def join_cluster(node: RabbitNode, seed: RabbitNode) -> None:
    """stop_app; join_cluster seed; start_app (the documented sequence)."""
    node.ctl("stop_app")
    node.ctl("join_cluster", seed.nodename)
    node.ctl("start_app")


@atexit.register
def _close_forgotten_clusters() -> None:
    for cluster in list(_open_clusters):
        cluster.close(timeout=10.0)
