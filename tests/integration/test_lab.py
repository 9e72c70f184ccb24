"""The shared harness (the top-level `lab` package) does what the netns tests
and the benchmarks rely on: names no other run uses, everything removed even
after a failure, partitions that keep the carrier up, packet drops without a
FIN, and one polling helper with a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from lab import LabError, NetLab, ip, netns_missing, nft_missing, wait_until, wait_until_blocking
from lab.backend import READY, backend_argv

# A TCP client run inside a namespace: "ok <reply>", "timeout" or "refused".
CONNECT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        print("ok", s.recv(100).decode())
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
"""

def connect(net: NetLab, ns: str, host: str, port: int, timeout: float = 1.0) -> str:
    argv = net.command(ns, [sys.executable, "-c", CONNECT, host, str(port), str(timeout)])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10).stdout.strip()


async def serve(net: NetLab, ns: str, port: int) -> trio.Process:
    """A TCP server answering "hi" to every client and keeping the connection open."""
    process = await net.open_process(ns, backend_argv(port, answer="hi", bind="0.0.0.0"), stdout=subprocess.PIPE)
    assert await read_line(process) == READY
    return process


async def read_line(process: trio.Process, timeout: float = 10) -> str:
    """The first line a child process writes (bytes read one at a time: nothing after it is lost)."""
    line = b""
    with trio.fail_after(timeout):
        while not line.endswith(b"\n"):
            byte = await process.stdout.receive_some(1)
            if not byte:
                raise AssertionError(f"the process ended before a whole line: {line!r}")
            line += byte
    return line.decode().strip()


def namespaces() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


def links() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link", "show").splitlines()}


# -- polling -------------------------------------------------------------------------------


async def test_wait_until_returns_the_first_truthy_value(autojump_clock):
    values = iter([0, None, [], [3]])
    assert await wait_until(lambda: next(values), timeout=5) == [3]


async def test_wait_until_accepts_an_async_predicate(autojump_clock):
    calls = []

    async def third_time() -> str | None:
        calls.append(trio.current_time())
        return "yes" if len(calls) == 3 else None

    assert await wait_until(third_time, timeout=5, interval=0.5) == "yes"
    assert calls == [0, 0.5, 1.0]


async def test_wait_until_fails_at_its_deadline_naming_what_it_waited_for(autojump_clock):
    started = trio.current_time()
    with pytest.raises(AssertionError, match=r"not the answer within 3 s \(last value: 0\)"):
        await wait_until(lambda: 0 if trio.current_time() < 10 else 1, timeout=3, what="the answer")
    assert trio.current_time() - started == pytest.approx(3, abs=0.02)


async def test_wait_until_cancels_an_async_predicate_still_running_at_the_deadline(autojump_clock):
    async def hangs() -> bool:
        await trio.sleep_forever()

    started = trio.current_time()
    with pytest.raises(AssertionError, match="hangs"):
        await wait_until(hangs, timeout=2)
    assert trio.current_time() - started == 2


def test_wait_until_blocking_has_the_same_contract_outside_trio():
    values = iter([None, 0, "done"])
    assert wait_until_blocking(lambda: next(values), timeout=5, interval=0.001) == "done"
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"not never within 0.2 s \(last value: False\)"):
        wait_until_blocking(lambda: False, timeout=0.2, interval=0.01, what="never")
    assert 0.2 <= time.monotonic() - started < 5


# -- namespaces and cleanup ----------------------------------------------------------------

needs_netns = pytest.mark.skipif(bool(netns_missing()), reason=str(netns_missing()))


@needs_netns
async def test_names_carry_the_pid_and_destroy_removes_namespaces_links_and_processes():
    net = NetLab()
    try:
        lan = net.lan()
        h1 = lan.add_host("h1")
        root_ip = lan.link_root()
        process = await serve(net, h1.ns, 9000)
        stray = subprocess.Popen(net.command(h1.ns, ["sleep", "600"]))  # not adopted: found in the namespace
        made = set(net.namespaces)
        root_link = lan.root_link
        assert all(str(os.getpid()) in name for name in [*made, root_link])
        assert made <= namespaces() and root_link in links()
        assert connect(net, h1.ns, root_ip, 1) == "refused"  # the veth to the root namespace carries packets
    finally:
        net.destroy()
    assert not made & namespaces()
    assert root_link not in links()
    assert process.returncode is not None
    assert stray.wait(5) is not None
    net.destroy()  # again: nothing left to do


@needs_netns
def test_a_failed_build_leaves_nothing_behind():
    with pytest.raises(LabError):
        with NetLab() as net:
            lan = net.lan()
            lan.add_host("h1")
            made = set(net.namespaces)
            lan.add_host("h1")  # the same namespace again: refused by the kernel
    assert made and not made & namespaces()


@needs_netns
def test_two_labs_of_one_run_do_not_collide():
    with NetLab() as first, NetLab() as second:
        a, b = first.lan(), second.lan()
        assert a.ns != b.ns and a.subnet != b.subnet
        for lan in (a, b):
            lan.add_host("h1")
            lan.link_root()


# -- partitions ----------------------------------------------------------------------------


@needs_netns
async def test_a_cut_host_is_unreachable_with_its_carrier_up_until_healed(netlab):
    lan = netlab.lan()
    h1, h2 = lan.add_host("h1"), lan.add_host("h2")
    await serve(netlab, h2.ns, 9000)
    assert connect(netlab, h1.ns, h2.ip, 9000) == "ok hi"
    lan.cut(h2)
    assert connect(netlab, h1.ns, h2.ip, 9000, timeout=0.5) == "timeout"
    assert "LOWER_UP" in ip("-n", h2.ns, "link", "show", "lan0")  # no FAULT: the link stays up
    lan.heal(h2)
    assert connect(netlab, h1.ns, h2.ip, 9000) == "ok hi"


@needs_netns
@pytest.mark.skipif(bool(nft_missing()), reason=str(nft_missing()))
async def test_a_drop_silences_one_peer_port_both_ways_without_a_fin(netlab):
    lan = netlab.lan()
    h1, h2 = lan.add_host("h1"), lan.add_host("h2")
    await serve(netlab, h2.ns, 9000)
    await serve(netlab, h2.ns, 9001)
    # An established connection from h1, held by a child that reports what it sees.
    watcher = textwrap.dedent(f"""
        import socket, sys
        s = socket.create_connection(("{h2.ip}", 9000), timeout=5)
        assert s.recv(2) == b"hi"
        print("connected", flush=True)
        sys.stdin.readline()
        s.settimeout(1)
        try:
            print("eof" if s.recv(1) == b"" else "data", flush=True)
        except socket.timeout:
            print("silent", flush=True)
        """)
    held = await netlab.open_process(h1.ns, [sys.executable, "-c", watcher], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
    assert await read_line(held) == "connected"
    with netlab.drop(h1.ns, h2.ip, 9000) as dropped:
        assert connect(netlab, h1.ns, h2.ip, 9000, timeout=0.5) == "timeout"  # SYN dropped, no RST
        assert connect(netlab, h1.ns, h2.ip, 9001) == "ok hi"  # only that port
        await held.stdin.send_all(b"\n")
        assert await read_line(held) == "silent"  # no FIN reached it
    assert not dropped.active
    assert connect(netlab, h1.ns, h2.ip, 9000) == "ok hi"
