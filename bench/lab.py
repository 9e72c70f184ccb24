"""What the benchmarks of one run share: the mode, a work directory, the
progress display, and (started on first use) two local RabbitMQ nodes.

(Network namespaces and broker names unique to a run come from the
repository's `lab` package, shared with the tests.)"""

from __future__ import annotations

import shutil
import tempfile
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lab import start_nodes
from proxy.devcluster import RabbitCluster, RabbitNode, unavailable_reason

from .progress import Progress

# The brokers' listen backlog as RabbitMQ's networking guide advises where
# many clients connect at once. With the default (128), the 500 clients of
# the reconnect storm overflowed the surviving node's accept queue now and
# then, behind either proxy; the SYNs dropped were retransmitted by the
# kernel a second later, which made each storm round take either ~0.35 s or
# ~1.1 s by chance rather than by proxy.
BROKER_CONF = {"tcp_listen_options.backlog": "4096"}

T = TypeVar("T")


@dataclass(frozen=True)
class Mode:
    """How long a run is: "full" (make bench), "quick" (QUICK=1) or "smoke"
    (the test suite: one round of tiny sizes, numbers meaningless)."""

    name: str
    rounds: int | None = None  # overrides each benchmark's own round count

    def pick(self, full: T, quick: T, smoke: T) -> T:
        return {"full": full, "quick": quick, "smoke": smoke}[self.name]


class Lab:
    """Shared resources; close() releases all of them (also on errors)."""

    def __init__(self, mode: Mode, workdir: Path | None = None, progress: Progress | None = None):
        self.mode = mode
        self.progress = progress or Progress()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="warren-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._cluster: RabbitCluster | None = None
        self._cluster_error: BaseException | None = None
        self._starter: threading.Thread | None = None
        self.kept = False
        self.cases: tuple[str, ...] = ()  # --case: only these cases of benchmarks that have cases

    def dir(self, *parts: str) -> Path:
        """A fresh sub-directory of the work directory."""
        path = self.workdir.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- RabbitMQ ----------------------------------------------------------
    @staticmethod
    def rabbit_missing() -> str | None:
        return unavailable_reason()

    def start_rabbit_in_background(self) -> None:
        """Begins starting the nodes now (the smoke run overlaps it with the
        other benchmarks; full runs do not, to keep the CPU quiet)."""
        if self._starter is None and self._cluster is None and self.rabbit_missing() is None:
            self._starter = threading.Thread(target=self._start_rabbit, daemon=True)
            self._starter.start()

    def rabbit_nodes(self) -> list[RabbitNode]:
        """Two independent (not clustered) nodes, started on first use and
        serving when handed out: a suite that killed one (storm, detection)
        does not leave it dead for the next."""
        if self._cluster is None and self._starter is not None:
            self._starter.join()
            self._starter = None
            if self._cluster_error is not None:
                # The overlap is an optimisation: a start that failed in the helper
                # thread (once, under load: "release unlocked lock", from the
                # threading machinery, without a traceback) is tried again here.
                self.progress.note("starting the RabbitMQ nodes in the background failed:\n"
                                   + "".join(traceback.format_exception(self._cluster_error)))
                self._cluster_error = None
        if self._cluster is None and self._cluster_error is None:
            self.progress.note("starting two RabbitMQ nodes ...")
            self._start_rabbit()
        if self._cluster_error is not None:
            raise RuntimeError(f"RabbitMQ nodes did not start: {self._cluster_error}") from self._cluster_error
        self._cluster.heal()
        return self._cluster.nodes

    def _start_rabbit(self) -> None:
        try:
            self._cluster = start_nodes(2, cluster=False, tag="bench", extra_conf=BROKER_CONF, start_timeout=90.0)
        except BaseException as error:  # reported by rabbit_nodes()
            self._cluster_error = error

    # -- cleanup ------------------------------------------------------------
    def close(self, keep_workdir: bool = False) -> None:
        if self._starter is not None:
            self._starter.join(timeout=120)
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
        self.kept = keep_workdir or not self._own_workdir
        if not self.kept:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
