"""The RabbitMQ harness (proxy.devcluster and tests/rabbit.py) does what the
rest of the suite and `make run` rely on: real nodes that serve AMQP, form a
cluster, can be crashed, hung and healed, speak PROXY protocol on request,
and leave nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from base64 import b64encode
from pathlib import Path
from typing import Iterator

import pika
import pytest

from lab import unique_node_name, wait_until, wait_until_blocking
from proxy.devcluster import (
    DevClusterError, NodeSpec, RabbitCluster, epmd_names, epmd_pids, free_ports, port_accepts, unavailable_reason,
)
from proxy.devcluster import _node as devcluster_node, forget
from proxy.devcluster._system import EPMD_PORT, stop_epmd_if_idle

pytestmark = [pytest.mark.rabbit, pytest.mark.timeout(180)]
if reason := unavailable_reason():
    pytestmark.append(pytest.mark.skip(reason=reason))

AMQP_0_9_1_HEADER = b"AMQP\x00\x00\x09\x01"
REPO = Path(__file__).resolve().parents[2]


def first_reply(port: int, prefix: bytes = b"", timeout: float = 5.0) -> bytes:
    """Sends `prefix` + the AMQP 0-9-1 protocol header; returns the first 11
    bytes answered (fewer if the broker closes first; b"" on reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(prefix + AMQP_0_9_1_HEADER)
        return read_up_to(sock, 11)


def read_up_to(sock: socket.socket, size: int) -> bytes:
    data = b""
    try:
        while len(data) < size and (chunk := sock.recv(size - len(data))):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def is_connection_start(frame: bytes) -> bool:
    """Method frame (type 1) on channel 0 carrying Connection.Start (10, 10)."""
    return len(frame) == 11 and frame[0] == 1 and frame[1:3] == b"\0\0" and frame[7:11] == b"\x00\x0a\x00\x0a"


def blocking_connection(port: int) -> pika.BlockingConnection:
    params = pika.ConnectionParameters(
        host="127.0.0.1", port=port, connection_attempts=1, socket_timeout=5,
        blocked_connection_timeout=10, stack_timeout=10,
    )
    return pika.BlockingConnection(params)


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def reachable_temp_dir() -> Path:
    """A new empty directory the rabbitmq user can enter (mkdtemp makes 0700)."""
    path = Path(tempfile.mkdtemp(prefix="warren-test-"))
    path.chmod(0o755)
    return path


# -- the session cluster ------------------------------------------------------

def test_every_node_accepts_an_amqp_client(healthy_cluster):
    for node in healthy_cluster:
        connection = blocking_connection(node.spec.amqp_port)
        assert connection.is_open, node
        connection.close()


def test_all_three_nodes_run_in_one_cluster(healthy_cluster):
    names = {node.nodename for node in healthy_cluster}
    for node in healthy_cluster:
        status = node.cluster_status()
        assert set(status["running_nodes"]) == names
        assert set(status["disk_nodes"]) == names
        assert not status["partitions"]


def test_a_message_published_via_one_node_is_consumed_via_another(healthy_cluster):
    queue = f"devcluster-{uuid.uuid4()}"
    publisher = blocking_connection(healthy_cluster[0].spec.amqp_port)
    consumer = blocking_connection(healthy_cluster[1].spec.amqp_port)
    try:
        channel = publisher.channel()
        channel.queue_declare(queue, arguments={"x-queue-type": "quorum"}, durable=True)
        channel.confirm_delivery()  # basic_publish returns once the queue has it
        channel.basic_publish("", queue, b"hello", mandatory=True)
        method, _, body = consumer.channel().basic_get(queue, auto_ack=True)
        assert method is not None and body == b"hello"
        channel.queue_delete(queue)
    finally:
        publisher.close()
        consumer.close()


async def test_connections_lists_clients_as_the_broker_sees_them(healthy_cluster):
    node = healthy_cluster[0]
    connection = blocking_connection(node.spec.amqp_port)
    try:
        seen = await wait_until(lambda: [c for c in node.connections() if c["user"] == "guest"],
                                timeout=10, interval=0.2, what="the client listed")
        assert seen[0]["peer_host"] == "127.0.0.1"
        assert seen[0]["port"] == node.spec.amqp_port
        assert isinstance(seen[0]["peer_port"], int)
    finally:
        connection.close()


def test_heal_does_nothing_when_every_node_serves(healthy_cluster):
    assert healthy_cluster.heal() == []


async def test_a_killed_node_refuses_connections_until_healed(healthy_cluster):
    node = healthy_cluster[2]
    crashed_vm = node.beam_pid
    node.kill()
    assert not pid_alive(crashed_vm)
    assert not port_accepts(node.spec.amqp_port)
    await wait_until(lambda: node.nodename not in healthy_cluster[0].cluster_status()["running_nodes"],
                     timeout=10, interval=0.2, what="the killed node out of running_nodes")

    assert healthy_cluster.heal() == [node]
    assert node.beam_pid not in (None, crashed_vm)
    assert is_connection_start(first_reply(node.spec.amqp_port))
    assert node.nodename in healthy_cluster[0].cluster_status()["running_nodes"]


def test_a_node_that_crashed_on_its_own_is_forgotten_by_the_reaper_when_healed(healthy_cluster, monkeypatch):
    # Its wrapper's PID is free once reaped: left registered, the reaper would
    # hold a PGID that the kernel may give to another program's group.
    forgotten = []

    def recording_forget(pgid: int) -> None:
        forgotten.append(pgid)
        forget(pgid)

    monkeypatch.setattr(devcluster_node, "forget", recording_forget)
    node = healthy_cluster[2]
    crashed_wrapper = node.wrapper_pid
    os.kill(node.beam_pid, signal.SIGKILL)  # not node.kill(): a crash nobody asked for
    wait_until_blocking(lambda: not node.is_running(), timeout=30, what="the wrapper exited")

    assert healthy_cluster.heal() == [node]
    assert forgotten == [crashed_wrapper]


def test_a_paused_node_accepts_tcp_but_stays_silent_until_healed(healthy_cluster):
    node = healthy_cluster[1]
    node.pause()
    with pytest.raises(TimeoutError):
        first_reply(node.spec.amqp_port, timeout=1.0)  # the kernel still completes the handshake

    assert healthy_cluster.heal() == [node]
    assert not node.paused
    assert is_connection_start(first_reply(node.spec.amqp_port))


# -- extra nodes --------------------------------------------------------------

async def test_a_proxy_protocol_node_closes_on_plain_amqp_and_reports_proxied_addresses(rabbit_node_factory):
    node = rabbit_node_factory(proxy_protocol=True)
    assert first_reply(node.spec.amqp_port) == b""  # no Connection.Start, just closed

    port = node.spec.amqp_port
    header = f"PROXY TCP4 192.0.2.7 127.0.0.1 40001 {port}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(header + AMQP_0_9_1_HEADER)
        assert is_connection_start(read_up_to(sock, 11))
        seen = await wait_until(lambda: [c for c in node.connections() if c["peer_host"] == "192.0.2.7"],
                                timeout=10, interval=0.2, what="the proxied address listed")
        assert seen[0]["peer_port"] == 40001


def test_close_stops_even_a_paused_node_and_removes_its_directory():
    base = reachable_temp_dir() / "nodes"  # created by the cluster
    cluster = RabbitCluster([NodeSpec.on_free_ports(f"wt{os.getpid()}-close")], base, cluster=False).start()
    node = cluster[0]
    vm, wrapper = node.beam_pid, node.wrapper_pid
    node.pause()
    try:
        cluster.close()
        assert not pid_alive(vm) and not pid_alive(wrapper)
        assert not process_group_members(wrapper)
        assert not base.exists()
    finally:
        base.parent.rmdir()


def process_group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and pid_alive(int(entry.name)):
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except FileNotFoundError:
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


NODE_OWNER = """
import sys
from pathlib import Path
from proxy.devcluster import NodeSpec, RabbitCluster
cluster = RabbitCluster([NodeSpec.on_free_ports(sys.argv[1])], Path(sys.argv[2]), cluster=False).start()
print("owner-ready", cluster[0].wrapper_pid, cluster[0].dir, flush=True)
sys.stdin.read()  # until killed
"""


def test_nodes_die_with_the_process_that_started_them_even_when_it_is_sigkilled():
    # What a benchmark run killed by pytest's timeout leaves: no stop(), no close().
    base = reachable_temp_dir() / "nodes"
    owner = subprocess.Popen([sys.executable, "-c", NODE_OWNER, f"wt{os.getpid()}-orphan", str(base)],
                             cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    wrapper = None
    try:
        line = read_until(owner, "owner-ready ").splitlines()[-1]  # bounded by the test's timeout
        _, pgid, path = line.split(" ", 2)
        wrapper, directory = int(pgid), Path(path)
        assert process_group_members(wrapper) and directory.is_dir()
        owner.kill()
        owner.wait()
        wait_until_blocking(lambda: not process_group_members(wrapper), timeout=30, what="the node's processes gone")
        wait_until_blocking(lambda: not directory.exists(), timeout=10, what="the node's directory removed")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if wrapper is not None and process_group_members(wrapper):
            os.killpg(wrapper, signal.SIGKILL)  # the group of a node we started
        shutil.rmtree(base.parent, ignore_errors=True)


def test_a_node_that_cannot_start_is_cleaned_up():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))  # the broker's AMQP port, taken
        squatter.listen()
        amqp_port = squatter.getsockname()[1]
        dist_port, = free_ports(1)
        cluster = RabbitCluster([NodeSpec(f"wt{os.getpid()}-fail", amqp_port, dist_port)], cluster=False,
                                start_timeout=60)
        with pytest.raises(DevClusterError, match="exited"):
            cluster.start()
    assert cluster.base_dir is not None and not cluster.base_dir.exists()
    assert not any(node.is_running() for node in cluster)


# -- the `make run` launcher ----------------------------------------------------

def launch_demo(base: Path, command: str) -> tuple[subprocess.Popen, int, int]:
    """The `make run` launcher with one node, on free ports, named as no
    other run on this machine names its nodes (not as `make run` does)."""
    amqp, mgmt, dist = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.devcluster", "--nodes", "1", "--base-port", str(amqp),
         "--mgmt-base-port", str(mgmt), "--dist-base-port", str(dist), "--name-prefix", unique_node_name("demo"),
         "--dir", str(base), "--command", command],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return proc, amqp, mgmt


def read_until(proc: subprocess.Popen, marker: str) -> str:
    """The launcher's output up to the line containing `marker` (bounded by the
    test's timeout: a launcher that never prints it fails the test)."""
    seen = ""
    for line in proc.stdout:
        seen += line
        if marker in line:
            return seen
    raise AssertionError(f"launcher exited before {marker!r}:\n{seen}")


def test_the_launcher_serves_management_and_cleans_up_on_ctrl_c():
    base = reachable_temp_dir()
    proc, amqp, mgmt = launch_demo(base / "devcluster", "sleep 120")
    try:
        summary = read_until(proc, "Ctrl-C stops")
        assert f"amqp 127.0.0.1:{amqp}" in summary and "127.0.0.1:5670" in summary
        auth = b64encode(b"guest:guest").decode()
        request = urllib.request.Request(f"http://127.0.0.1:{mgmt}/api/overview",
                                         headers={"Authorization": f"Basic {auth}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        sleeper = int(summary.split("Warren      pid ")[1].split(":")[0])

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not pid_alive(sleeper)
        assert not port_accepts(amqp)
        assert not (base / "devcluster").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        base.rmdir()


def test_the_launcher_exits_with_warrens_status_and_cleans_up():
    base = reachable_temp_dir()
    proc, amqp, _ = launch_demo(base / "devcluster", "sh -c 'exit 3'")
    try:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 3, output
        assert not port_accepts(amqp)
        assert not (base / "devcluster").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        base.rmdir()


MAKE_RUN_NODES = ["warren-a", "warren-b", "warren-c"]  # the nodes `make run` starts


def alive2_request(name: str, port: int) -> bytes:
    """EPMD's ALIVE2_REQ for a normal (77) TCP/IPv4 node `name` listening on
    `port`, distribution protocol versions 5-6, no extra data."""
    body = struct.pack(">BHBBHHH", 120, port, 77, 0, 6, 5, len(name)) + name.encode() + struct.pack(">H", 0)
    return struct.pack(">H", len(body)) + body


@contextlib.contextmanager
def node_names_held(names: list[str]) -> Iterator[None]:
    """Holds `names` in the local epmd as running nodes do, so no other node
    can take them (each registration lasts as long as its connection); a
    name a real node holds already stays with it. Starts epmd if none runs,
    and then stops it at exit if no node is registered any more."""
    epmd_started = not epmd_pids()
    try:
        if epmd_started:
            subprocess.run(["epmd", "-daemon", "-address", "127.0.0.1"], check=True, timeout=10)
            wait_until_blocking(lambda: epmd_names() is not None, timeout=10, what="epmd answering")
        port, = free_ports(1)  # nothing listens there: a node that asks its holder gets no answer
        with contextlib.ExitStack() as registrations:
            for name in names:
                sock = registrations.enter_context(socket.create_connection(("127.0.0.1", EPMD_PORT), timeout=5))
                sock.sendall(alive2_request(name, port))
                assert read_up_to(sock, 2)[:1] in (b"\x79", b"\x76")  # ALIVE2_RESP or ALIVE2_X_RESP
            yield
    finally:
        if epmd_started:
            stop_epmd_if_idle()


def test_the_launcher_the_tests_run_starts_beside_a_make_run():
    # A `make run` left running while the suite runs (or another suite's
    # launcher test) holds its node names for as long as it runs.
    base = reachable_temp_dir()
    with node_names_held(MAKE_RUN_NODES):
        proc, amqp, _ = launch_demo(base / "devcluster", "sh -c 'exit 3'")
        try:
            output, _ = proc.communicate(timeout=120)
            assert proc.returncode == 3, output
            assert not any(f"{name}@localhost" in output for name in MAKE_RUN_NODES)
            assert not port_accepts(amqp)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            shutil.rmtree(base, ignore_errors=True)
