"""Warren as an unprivileged user: only ambient CAP_NET_ADMIN + CAP_NET_RAW, as the systemd unit grants.

Two hosts in network namespaces run `warren run` through `setpriv` as a user
made for the test; they still elect a master, hold the VIP and move it when
the master dies. Without the capabilities Warren refuses at start-up, naming
the capability and the unit setting, and so does `warren check`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import pytest
import trio

from tests.viplab import REPO, VipLab, unprivileged_user, write

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux"),
]

_serial = itertools.count()


def config(priority: int, vip: str) -> str:
    return f"""
[global]
log_format = "json"
grace = "1s"

[frontends.amqp]
bind = "{vip}:5672"
backend = "local"

[backends.local]
servers = [{{ name = "here", address = "127.0.0.1", port = 9000 }}]

[vip.front]
interface = "lan0"
vrid = 61
priority = {priority}
advert_interval = "100ms"
addresses = ["{vip}/32"]
"""


@pytest.fixture
def user():
    with unprivileged_user(f"lp{os.getpid() % 100000}{next(_serial)}") as made:
        yield made


@pytest.fixture
def lab(user, netlab):  # in this order: the lab's processes are gone before the user is
    return VipLab(netlab, user.home, "10.215.1")


async def test_with_only_net_admin_and_net_raw_an_unprivileged_warren_elects_holds_and_moves_the_vip(lab, user):
    caps = user.setpriv("net_admin", "net_raw")
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            h1, h2 = lab.add_host("h1"), lab.add_host("h2")
            for host in (h1, h2):
                await lab.start_backend(host)
            w1 = await lab.start_warren(nursery, h1, config(150, lab.vip()), wrapper=caps)
            await w1.wait_for("vip.master", instance="front", timeout=15)
            w2 = await lab.start_warren(nursery, h2, config(100, lab.vip()), wrapper=caps)
            await w2.wait_for("vip.backup", instance="front")
            await lab.steadily_held_by(lab.vip(), {"h1"}, seconds=0.5)
            status = (await trio.run_process(["ps", "-o", "user=", "-p", str(w1.process.pid)],
                                             capture_stdout=True)).stdout.decode().strip()
            assert status == user.name  # really not root
            w1.process.kill()
            await w2.wait_for("vip.master", instance="front", timeout=15)
            await lab.wait_holders(lab.vip(), {"h2"}, timeout=15)  # the killed master's lease ran out too
            agent = await lab.start_agent([lab.vip()])
            assert await agent.served_by(lab.vip(), "h2")
            nursery.cancel_scope.cancel()


async def test_without_the_capabilities_warren_refuses_naming_them_and_the_unit_setting(lab, user):
    host = lab.add_host("h1")
    path = write(user.home / "h1.toml", config(150, lab.vip()))
    run = ["ip", "netns", "exec", host.ns, *user.setpriv(), sys.executable, "-m", "proxy"]
    done = await trio.run_process([*run, "run", str(path)], capture_stderr=True, check=False, cwd=REPO)
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "vip.front: needs CAP_NET_ADMIN" in stderr and "vip.front: needs CAP_NET_RAW" in stderr
    assert "AmbientCapabilities=CAP_NET_ADMIN" in stderr
    assert "Traceback" not in stderr
    check = subprocess.run([*run, "check", str(path)], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert check.returncode == 1 and "needs CAP_NET_RAW" in check.stderr
    assert "cannot run it" in check.stderr
