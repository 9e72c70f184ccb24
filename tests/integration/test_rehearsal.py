"""The migration rehearsal, end to end: from haproxy.cfg + keepalived.conf to two Warren hosts.

Two proxy hosts (network namespaces) each get the HAProxy + keepalived pair an
operator would have, turned into Warren's TOML by `warren import`, and run
`warren run` as an unprivileged user with only ambient CAP_NET_ADMIN +
CAP_NET_RAW. Three real RabbitMQ nodes, clustered, listen on the root
namespace's end of a veth to the hosts' LAN. A client namespace runs
publishers with confirms on a quorum queue through the VIP. Then: SIGKILL the
master Warren, then stop a broker. Every publisher reconnects through the VIP
and keeps confirming, and every confirmed message is in the queue at the end.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import pytest
import trio

from lab import NetLab, start_nodes, wait_until
from proxy.devcluster import RabbitCluster, unavailable_reason
from tests.viplab import REPO, Agent, VipLab, unprivileged_user

pytestmark = [
    pytest.mark.netns,
    pytest.mark.rabbit,
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux"),
]

PUBLISHERS = 3
_serial = itertools.count()

HAPROXY = """
global
    log /dev/log local0
    maxconn 4000
    daemon

defaults
    mode tcp
    option tcplog
    option redispatch
    retries 3
    timeout connect 2s
    timeout client 3h
    timeout server 3h

frontend amqp
    bind {vip}:5672
    default_backend rabbitmq

backend rabbitmq
    balance leastconn
    option tcp-check
    tcp-check connect
    tcp-check send-binary 414d515000000901
    tcp-check expect binary 0100000000
    default-server inter 500ms fastinter 200ms rise 2 fall 2 on-marked-down shutdown-sessions
{servers}
"""

KEEPALIVED = """
global_defs {{
    vrrp_version 3
}}

vrrp_script chk_haproxy {{
    script "killall -0 haproxy"
    interval 1
    weight -60
}}

vrrp_instance amqp {{
    state {state}
    interface lan0
    virtual_router_id 71
    priority {priority}
    advert_int 0.1
    virtual_ipaddress {{
        {vip}/24
    }}
    track_script {{
        chk_haproxy
    }}
}}
"""

CLIENT = r"""
import json, sys, threading, time
import pika

VIP, QUEUE, COUNT = sys.argv[1], sys.argv[2], int(sys.argv[3])
stop = threading.Event()
lock = threading.Lock()
confirmed = {i: [] for i in range(COUNT)}
connections = {i: 0 for i in range(COUNT)}
errors = {i: "" for i in range(COUNT)}

def parameters():
    return pika.ConnectionParameters(host=VIP, port=5672, heartbeat=10, connection_attempts=1, socket_timeout=2,
                                     stack_timeout=5, blocked_connection_timeout=10)

def publisher(index):
    sequence = 0
    while not stop.is_set():
        connection = None
        try:
            connection = pika.BlockingConnection(parameters())
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
            with lock:
                connections[index] += 1
            while not stop.is_set():
                body = f"{index}-{sequence}"
                sequence += 1
                try:
                    channel.basic_publish("", QUEUE, body.encode(), pika.BasicProperties(delivery_mode=2))
                except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as error:
                    errors[index] = repr(error)
                    time.sleep(0.1)
                    continue
                with lock:
                    confirmed[index].append(body)  # the broker confirmed it: it must not be lost
                time.sleep(0.01)
        except Exception as error:
            errors[index] = repr(error)
            time.sleep(0.1)
        finally:
            if connection is not None and connection.is_open:
                try:
                    connection.close()
                except Exception:
                    pass

def drain():
    connection = pika.BlockingConnection(parameters())
    channel = connection.channel()
    bodies = []
    while True:
        _, _, body = channel.basic_get(QUEUE, auto_ack=True)
        if body is None:
            break
        bodies.append(body.decode())
    channel.queue_delete(QUEUE)
    connection.close()
    return bodies

threads = [threading.Thread(target=publisher, args=(i,), daemon=True) for i in range(COUNT)]
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "start":
        for thread in threads:
            thread.start()
        reply = {}
    elif request["op"] == "status":
        with lock:
            reply = {"confirmed": {i: len(c) for i, c in confirmed.items()}, "connections": connections,
                     "errors": errors}
    elif request["op"] == "stop":
        stop.set()
        for thread in threads:
            thread.join(30)
        with lock:
            reply = {"confirmed": [b for c in confirmed.values() for b in c]}
    else:
        reply = {"bodies": drain()}
    print(json.dumps(reply), flush=True)
"""


async def progress_past(client: Agent, marks: dict[str, int], what: str, timeout: float = 60) -> dict:
    """Waits until every publisher confirmed more than at ``marks``; returns the status then."""

    async def progressed() -> dict | None:
        status = await client.call(op="status")
        return status if all(status["confirmed"][i] > marks.get(i, 0) + 5 for i in status["confirmed"]) else None

    return await wait_until(progressed, timeout=timeout, interval=0.2, what=f"publishers progressing {what}")


def brokers(ip: str) -> RabbitCluster:
    """Three clustered nodes listening on loopback and on ``ip`` (the LAN's view of the root namespace)."""
    return start_nodes(3, cluster=True, tag="rh", also_listen=ip)


async def test_a_migrated_pair_survives_a_killed_master_and_a_stopped_broker_without_losing_a_message(
    netlab: NetLab,
):
    if reason := unavailable_reason():
        pytest.skip(reason)
    tag = f"{os.getpid() % 10000}r{next(_serial)}"
    with unprivileged_user(f"rh{tag}") as user:
        lab = VipLab(netlab, user.home, None)  # a subnet free in the root namespace: the brokers listen there
        cluster = None
        try:
            broker_ip = lab.lan.link_root()
            cluster = await trio.to_thread.run_sync(brokers, broker_ip)
            await rehearse(lab, user, cluster, broker_ip)
        finally:
            netlab.destroy()  # the user's processes end before the user goes
            if cluster is not None:
                await trio.to_thread.run_sync(cluster.close)


async def rehearse(lab: VipLab, user, cluster: RabbitCluster, broker_ip: str) -> None:
    vip = lab.vip()
    servers = "\n".join(f"    server rmq{i} {broker_ip}:{node.spec.amqp_port} check"
                        for i, node in enumerate(cluster.nodes, 1))
    configs = {}
    for name, state, priority in (("h1", "MASTER", 150), ("h2", "BACKUP", 100)):
        haproxy = user.home / f"{name}-haproxy.cfg"
        keepalived = user.home / f"{name}-keepalived.conf"
        haproxy.write_text(HAPROXY.format(vip=vip, servers=servers))
        keepalived.write_text(KEEPALIVED.format(state=state, priority=priority, vip=vip))
        configs[name] = user.home / f"{name}.toml"
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "import", str(haproxy), "--keepalived", str(keepalived),
             "-o", str(configs[name])], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 2, done.stderr  # daemon, log... are reported, the rest translated
        shutil.chown(configs[name], group=user.name)
    caps = user.setpriv("net_admin", "net_raw")
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            hosts = {name: lab.add_host(name) for name in ("h1", "h2")}
            w1 = await lab.start_warren(nursery, hosts["h1"], configs["h1"].read_text(), wrapper=caps)
            await w1.wait_for("vip.master", instance="amqp", timeout=30)
            w2 = await lab.start_warren(nursery, hosts["h2"], configs["h2"].read_text(), wrapper=caps)
            await w2.wait_for("vip.backup", instance="amqp", timeout=30)
            for warren in (w1, w2):
                for index in range(1, 4):
                    await warren.wait_for("server.up", server=f"rmq{index}", timeout=30)
            client = Agent(await lab.open_process(lab.lan.ns, [sys.executable, "-c", CLIENT, vip,
                                                               f"rehearsal-{lab.net.tag}", str(PUBLISHERS)],
                                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            await client.ready()
            await client.call(op="start")
            before = await progress_past(client, {}, "after the start")

            w1.process.kill()  # the master Warren dies without a word
            await w2.wait_for("vip.master", instance="amqp", timeout=15)
            after_kill = await progress_past(client, before["confirmed"], "after the master was killed")
            assert all(after_kill["connections"][i] >= 2 for i in after_kill["connections"]), after_kill

            await trio.to_thread.run_sync(cluster.nodes[0].stop)  # a broker leaves (CONNECTION_FORCED)
            await w2.wait_for("server.down", server="rmq1", timeout=30)
            after_stop = await progress_past(client, after_kill["confirmed"], "after a broker stopped")
            # leastconn spread the three reconnections over the three brokers: rmq1's publisher reconnected.
            assert sum(after_stop["connections"].values()) > sum(after_kill["connections"].values()), after_stop

            confirmed = (await client.call(op="stop"))["confirmed"]
            bodies = set((await client.call(op="drain"))["bodies"])
            lost = [body for body in confirmed if body not in bodies]
            assert confirmed and lost == [], f"{len(lost)} confirmed messages lost, e.g. {lost[:5]}"
            print(f"\nrehearsal: {len(confirmed)} confirmed messages, none lost; "
                  f"connections per publisher {after_stop['connections']}")
            nursery.cancel_scope.cancel()
