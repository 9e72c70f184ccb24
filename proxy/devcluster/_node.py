"""One local RabbitMQ node: its spec, its directory, its processes."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import structlog

from ._reaper import forget, reap_if_we_die
from ._system import (
    BASE_ENV, COOKIE_HOME, RABBITMQ_BIN, DevClusterError, as_rabbitmq_user, children, chown_tree,
    comm, free_ports, port_accepts, run_ctl,
)

log = structlog.get_logger("warren.devcluster")


@dataclass(frozen=True)
class NodeTls:
    """TLS-only listeners for a node (RabbitMQ's `listeners.ssl` and `ssl_options`).

    The files (PEM) are copied into the node's directory, so the `rabbitmq`
    user can read them wherever they came from. With `verify_peer`, clients
    must present a certificate signed by `cacertfile`
    (`verify_peer` + `fail_if_no_peer_cert`)."""

    cacertfile: str
    certfile: str
    keyfile: str
    verify_peer: bool = False


@dataclass(frozen=True)
class NodeSpec:
    """What one node is: name (node `name@localhost`), ports, options.

    With `tls`, `amqp_port` and `mgmt_port` speak TLS only (AMQPS, HTTPS).
    `extra_conf` lines are appended to the generated rabbitmq.conf."""

    name: str
    amqp_port: int
    dist_port: int
    mgmt_port: int | None = None
    proxy_protocol: bool = False
    extra_conf: Mapping[str, str] = field(default_factory=dict)
    tls: NodeTls | None = None

    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    @classmethod
    def on_free_ports(cls, name: str, *, mgmt: bool = False, **options) -> NodeSpec:
        """A spec whose AMQP, distribution (and management) ports are free now."""
        amqp, dist, mgmt_port = free_ports(3)
        return cls(name, amqp, dist, mgmt_port if mgmt else None, **options)


class RabbitNode:
    """One local broker, living in `base_dir/<spec.name>`.

    Lifecycle: start() -> wait_ready() -> [kill / pause / resume / stop /
    restart]* -> stop(). Directories are kept across stop/start (a restarted
    node keeps its cluster membership); RabbitCluster removes them."""

    def __init__(self, spec: NodeSpec, base_dir: Path):
        self.spec = spec
        self.dir = Path(base_dir) / spec.name
        self.paused = False
        self.beam_pid: int | None = None  # the Erlang VM, known once ready
        self._wrapper: subprocess.Popen | None = None

    # -- identity ---------------------------------------------------------
    @property
    def nodename(self) -> str:
        return self.spec.nodename

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.spec.amqp_port)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.spec.amqp_port}/%2F"

    @property
    def wrapper_pid(self) -> int | None:
        """PID of the rabbitmq-server shell wrapper (our child), while it runs."""
        return self._wrapper.pid if self._wrapper is not None else None

    def __repr__(self) -> str:
        return f"<RabbitNode {self.nodename} amqp={self.spec.amqp_port}>"

    # -- lifecycle --------------------------------------------------------
    def prepare(self) -> None:
        """Writes a fresh node directory (config, plugins), owned by rabbitmq."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True)
        tls_dir = None
        if self.spec.tls is not None:
            tls_dir = self.dir / "tls"
            tls_dir.mkdir()
            for name, source in (("ca.pem", self.spec.tls.cacertfile), ("cert.pem", self.spec.tls.certfile),
                                 ("key.pem", self.spec.tls.keyfile)):
                shutil.copyfile(source, tls_dir / name)
                (tls_dir / name).chmod(0o600 if name == "key.pem" else 0o644)
        (self.dir / "rabbitmq.conf").write_text(render_conf(self.spec, tls_dir))
        plugins = "[rabbitmq_management]." if self.spec.mgmt_port else "[]."
        (self.dir / "enabled_plugins").write_text(plugins + "\n")
        chown_tree(self.dir)

    def start(self) -> None:
        """Spawns the node and returns at once; call wait_ready() next."""
        if self.is_running():
            raise DevClusterError(f"{self.nodename} is already running")
        self._forget_processes()  # a wrapper that exited by itself (a crash) is still registered
        if not self.dir.exists():
            self.prepare()
        with open(self.dir / "startup.log", "ab") as out:
            self._wrapper = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")], env=self._server_env(),
                cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, **as_rabbitmq_user(),
            )
        reap_if_we_die(self._wrapper.pid, self.dir)  # its session is its process group
        self.beam_pid, self.paused = None, False
        log.info("node.spawned", node=self.nodename, wrapper_pid=self._wrapper.pid)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Returns once the node accepts AMQP connections and has finished
        booting (`rabbitmqctl await_startup`); raises DevClusterError with the
        start-up output if it exits or is not ready within `timeout`.

        The port probe connects and closes without sending a byte, which
        RabbitMQ does not log as a warning (a half-sent handshake would be)."""
        deadline = time.monotonic() + timeout
        while not port_accepts(self.spec.amqp_port):
            self._raise_if_exited()
            if time.monotonic() > deadline:
                raise DevClusterError(f"{self.nodename} not answering after {timeout}s\n{self.startup_output()}")
            time.sleep(0.1)
        self.beam_pid = self._find_beam_pid(deadline)
        remaining = max(deadline - time.monotonic(), 1.0)
        self.ctl("await_startup", "--timeout", str(int(remaining) + 1), timeout=remaining + 10)

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop (SIGTERM to the wrapper, which runs the broker's
        shutdown); SIGKILLs the node's process group after `timeout`."""
        if self._wrapper is None:
            return
        if self.paused:
            self.resume()
        if self._wrapper.poll() is None:
            self._wrapper.send_signal(signal.SIGTERM)
            try:
                self._wrapper.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("node.stop_timeout", node=self.nodename, timeout=timeout)
                self._kill_process_group()
        self._forget_processes()

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILLs the Erlang VM, like a crash: the port refuses on return."""
        if self.beam_pid is not None and self.is_running():
            os.kill(self.beam_pid, signal.SIGKILL)  # works on a stopped process too
        if self._wrapper is not None:
            try:
                self._wrapper.wait(timeout)  # the wrapper exits when its VM does
            except subprocess.TimeoutExpired:
                self._kill_process_group()
        self._forget_processes()

    def pause(self) -> None:
        """SIGSTOPs the VM: the kernel still accepts TCP, nothing answers."""
        self._signal_beam(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONTs a paused VM (only clears the flag if it died meanwhile)."""
        if self.is_running():
            self._signal_beam(signal.SIGCONT)
        self.paused = False

    def restart(self, timeout: float = 60.0) -> None:
        """stop() (gracefully), start(), wait_ready()."""
        self.stop()
        self.start()
        self.wait_ready(timeout)

    def is_running(self) -> bool:
        """True while the wrapper lives (paused or not)."""
        return self._wrapper is not None and self._wrapper.poll() is None

    def is_serving(self) -> bool:
        """Running, not paused, and accepting AMQP connections."""
        return self.is_running() and not self.paused and port_accepts(self.spec.amqp_port)

    # -- asking the node --------------------------------------------------
    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Runs `rabbitmqctl -n NODE *args`; returns stdout, raises CtlError."""
        return run_ctl(self.nodename, *args, timeout=timeout)

    def upgrade(self, *args: str, timeout: float = 60.0) -> str:
        """Runs `rabbitmq-upgrade -n NODE *args` (drain / revive for maintenance)."""
        return run_ctl(self.nodename, *args, timeout=timeout, tool="rabbitmq-upgrade")

    def connections(self) -> list[dict]:
        """Client connections as the broker sees them: dicts with peer_host,
        peer_port, host, port (broker side), name, user; addresses as text
        ("127.0.0.1", "2001:db8::7")."""
        out = self.ctl("list_connections", "peer_host", "peer_port", "host", "port", "name", "user",
                       "--formatter", "json", "--quiet")
        connections = json.loads(out)
        for connection in connections:  # JSON renders addresses as Erlang tuples
            connection["peer_host"] = ip_text(connection["peer_host"])
            connection["host"] = ip_text(connection["host"])
        return connections

    def cluster_status(self) -> dict:
        """`rabbitmqctl cluster_status` as parsed JSON (running_nodes, partitions...)."""
        return json.loads(self.ctl("cluster_status", "--formatter", "json", "--quiet"))

    def log_path(self) -> Path:
        return self.dir / "log" / f"{self.nodename}.log"

    def log_size(self) -> int:
        """A mark for log_text(since=...): the log's current length in bytes."""
        try:
            return self.log_path().stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        """The node's log file from byte offset `since` ('' if none yet)."""
        try:
            with open(self.log_path(), "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_warnings(self, since: int = 0) -> list[str]:
        """Log lines at warning level or worse from byte offset `since`. A
        fresh node logs one itself ("rebuilding indices from scratch"), so
        take a log_size() mark after start and pass it here."""
        levels = ("[warning]", "[error]", "[critical]", "[alert]", "[emergency]")
        return [line for line in self.log_text(since).splitlines() if any(lv in line for lv in levels)]

    def startup_output(self, tail: int = 40) -> str:
        """The wrapper's stdout/stderr, last `tail` lines (for error messages)."""
        try:
            lines = (self.dir / "startup.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-tail:])

    # -- internals --------------------------------------------------------
    def _server_env(self) -> dict[str, str]:
        d = self.dir
        return {
            **BASE_ENV,
            "HOME": str(COOKIE_HOME),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.spec.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.spec.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "beam.pid"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),  # absent on purpose
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),  # absent: ignore /etc/rabbitmq
            "ERL_CRASH_DUMP": str(d / "erl_crash.dump"),
            # Distribution and a freshly started epmd listen on loopback only.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _raise_if_exited(self) -> subprocess.Popen:
        wrapper = self._wrapper
        if wrapper is None or wrapper.poll() is not None:
            code = wrapper.returncode if wrapper else "stop()"
            raise DevClusterError(f"{self.nodename} exited ({code}) during start-up\n{self.startup_output()}")
        return wrapper

    def _find_beam_pid(self, deadline: float) -> int:
        # The wrapper's only child execs erl -> erlexec -> beam.smp (same PID).
        while True:
            pid = self._raise_if_exited().pid
            for child in children(pid):
                if comm(child) == "beam.smp":
                    return child
            if time.monotonic() > deadline:
                raise DevClusterError(f"{self.nodename}: no beam.smp under wrapper {pid}")
            time.sleep(0.05)

    def _signal_beam(self, sig: signal.Signals) -> None:
        if self.beam_pid is None or not self.is_running():
            raise DevClusterError(f"{self.nodename} is not running")
        os.kill(self.beam_pid, sig)

    def _kill_process_group(self) -> None:
        # The group exists while the unreaped wrapper holds its id, so the id
        # cannot belong to anybody else yet.
        if self._wrapper is not None and self._wrapper.poll() is None:
            os.killpg(self._wrapper.pid, signal.SIGKILL)
            self._wrapper.wait()
        elif self.beam_pid is not None and comm(self.beam_pid) == "beam.smp":
            os.kill(self.beam_pid, signal.SIGKILL)

    def _forget_processes(self) -> None:
        if self._wrapper is not None and self._wrapper.returncode is not None:
            log.info("node.stopped", node=self.nodename, code=self._wrapper.returncode)
            forget(self._wrapper.pid)
            self._wrapper = None
        self.beam_pid, self.paused = None, False


def ip_text(address: object) -> object:
    """An Erlang address tuple ([127, 0, 0, 1] or 8 x 16-bit) as text; other
    values (already text, or 'undefined') unchanged."""
    if isinstance(address, list) and len(address) == 4:
        return str(ipaddress.IPv4Address(bytes(address)))
    if isinstance(address, list) and len(address) == 8:
        return str(ipaddress.IPv6Address(b"".join(part.to_bytes(2, "big") for part in address)))
    return address


def _tls_conf(spec: NodeSpec, tls_dir: Path) -> dict[str, str]:
    """AMQPS (and management over HTTPS) only: no plaintext listener at all."""
    files = {"cacertfile": tls_dir / "ca.pem", "certfile": tls_dir / "cert.pem", "keyfile": tls_dir / "key.pem"}
    conf = {"listeners.tcp": "none", "listeners.ssl.1": f"127.0.0.1:{spec.amqp_port}"}
    conf.update({f"ssl_options.{key}": str(path) for key, path in files.items()})
    conf["ssl_options.versions.1"] = "tlsv1.3"
    conf["ssl_options.versions.2"] = "tlsv1.2"
    if spec.tls.verify_peer:
        conf["ssl_options.verify"] = "verify_peer"
        conf["ssl_options.fail_if_no_peer_cert"] = "true"
    if spec.mgmt_port:
        conf["management.ssl.ip"] = "127.0.0.1"
        conf["management.ssl.port"] = str(spec.mgmt_port)
        conf.update({f"management.ssl.{key}": str(path) for key, path in files.items()})
    return conf


def render_conf(spec: NodeSpec, tls_dir: Path | None = None) -> str:
    """The rabbitmq.conf (new-style, sysctl format) for `spec`; `tls_dir` holds
    ca.pem, cert.pem and key.pem when `spec.tls` is set."""
    conf = {
        "listeners.tcp.1": f"127.0.0.1:{spec.amqp_port}",  # loopback only
        # Through a proxy the broker may see a non-loopback client address.
        "loopback_users": "none",
        # A node resumed after a long pause rejoins instead of staying split.
        "cluster_partition_handling": "autoheal",
        "log.file.level": "info",
    }
    if spec.proxy_protocol:
        conf["proxy_protocol"] = "true"
    if spec.mgmt_port:
        conf["management.tcp.ip"] = "127.0.0.1"
        conf["management.tcp.port"] = str(spec.mgmt_port)
    if spec.tls is not None:
        for key in ("listeners.tcp.1", "management.tcp.ip", "management.tcp.port"):
            conf.pop(key, None)
        conf.update(_tls_conf(spec, tls_dir or Path("tls")))
    conf.update(spec.extra_conf)
    return "".join(f"{key} = {value}\n" for key, value in conf.items())
