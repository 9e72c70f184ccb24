"""Which relay path Warren takes at start-up, and what it says about it."""

from __future__ import annotations

import dataclasses

import pytest
import structlog.testing

from proxy.config.model import BindAddress, Config, Frontend, Global, RelayPath
from proxy.errors import StartupError
from proxy.frontends import relay_path
from proxy.io.sockmap import Availability


def config(relay: RelayPath, maxconn: int = 2000) -> Config:
    frontend = Frontend(name="fe", binds=(BindAddress("127.0.0.1", 0),), backend="be", maxconn=maxconn)
    return Config(path="<test>", global_=Global(relay=relay), frontends=(frontend,))


class FakeSockmap:
    def __init__(self, capacity):
        self.capacity = capacity

    def close(self):
        pass


@pytest.fixture
def kernel(monkeypatch):
    """Pretend the self-test passed (or set .result to say why not)."""

    class Kernel:
        result = Availability(True, attach="verdict")

    monkeypatch.setattr(relay_path, "_probe", lambda: Kernel.result)
    monkeypatch.setattr(relay_path.sockmap, "Sockmap", FakeSockmap)
    monkeypatch.setattr(relay_path, "splice_supported", lambda: True)
    return Kernel


@pytest.mark.parametrize("relay", [RelayPath.AUTO, RelayPath.KERNEL])
def test_the_kernel_path_where_the_self_test_passes(kernel, relay):
    with structlog.testing.capture_logs() as logs:
        choice = relay_path.choose_relay(config(relay))
    assert choice.path == "kernel" and isinstance(choice.sockmap, FakeSockmap)
    assert choice.pipes is not None  # bulk frontends are spliced
    assert choice.describe() == "kernel (bulk frontends: splice)"
    choice.check()
    assert [e["event"] for e in logs] == ["relay.path"]
    assert logs[0]["repaired"] is False  # whether the program repairs the kernel's overlap bug


def test_the_start_up_line_says_whether_the_program_repairs_overlaps(kernel):
    kernel.result = Availability(True, attach="verdict", repaired=True)
    with structlog.testing.capture_logs() as logs:
        choice = relay_path.choose_relay(config(RelayPath.AUTO))
    assert choice.path == "kernel" and choice.reason == ""
    assert [(e["event"], e["repaired"]) for e in logs] == [("relay.path", True)]
    choice.close()


def test_auto_falls_back_to_splice_with_one_warning_saying_why(kernel):
    kernel.result = Availability(False, "missing CAP_BPF (the kernel path needs CAP_BPF and CAP_NET_ADMIN)")
    with structlog.testing.capture_logs() as logs:
        choice = relay_path.choose_relay(config(RelayPath.AUTO))
    assert (choice.path, choice.sockmap) == ("splice", None)
    assert logs == [{
        "event": "relay.fallback", "log_level": "warning", "path": "splice",
        "reason": "kernel path unavailable: missing CAP_BPF (the kernel path needs CAP_BPF and CAP_NET_ADMIN)",
    }]  # fmt: skip
    assert choice.describe().startswith("splice — kernel path unavailable: missing CAP_BPF")
    choice.check()  # auto: starts anyway
    choice.close()


HAZARD = "this kernel relays bytes twice when a retransmitted segment overlaps bytes already received"


def test_auto_does_not_take_a_kernel_path_that_may_corrupt_a_stream(kernel):
    kernel.result = Availability(True, attach="verdict", hazard=HAZARD)
    with structlog.testing.capture_logs() as logs:
        choice = relay_path.choose_relay(config(RelayPath.AUTO))
    assert (choice.path, choice.sockmap) == ("splice", None)
    assert logs == [{
        "event": "relay.fallback", "log_level": "warning", "path": "splice",
        "reason": f"kernel path not chosen automatically: {HAZARD}",
    }]  # fmt: skip
    assert choice.describe() == f"splice — kernel path not chosen automatically: {HAZARD}"
    choice.check()
    choice.close()


def test_insisting_on_a_kernel_path_with_a_hazard_takes_it_and_says_so(kernel):
    kernel.result = Availability(True, attach="verdict", hazard=HAZARD)
    with structlog.testing.capture_logs() as logs:
        choice = relay_path.choose_relay(config(RelayPath.KERNEL))
    assert choice.path == "kernel" and isinstance(choice.sockmap, FakeSockmap)
    assert [(e["event"], e["log_level"]) for e in logs] == [("relay.kernel_hazard", "warning"), ("relay.path", "info")]
    assert logs[0]["hazard"] == HAZARD
    assert choice.describe() == f"kernel (bulk frontends: splice) — {HAZARD}"
    choice.check()  # starts: the operator asked for it
    choice.close()


def test_insisting_on_the_kernel_path_refuses_to_start_without_it(kernel):
    kernel.result = Availability(False, "self-test failed: no EPOLLRDHUP after the client's FIN")
    choice = relay_path.choose_relay(config(RelayPath.KERNEL))
    with pytest.raises(StartupError, match='relay = "kernel": the kernel path unavailable: self-test failed'):
        choice.check()
    choice.close()


def test_splice_and_copy_are_taken_as_asked_and_never_probe(kernel):
    kernel.result = None  # would fail if probed
    assert relay_path.choose_relay(config(RelayPath.SPLICE)).path == "splice"
    copy = relay_path.choose_relay(config(RelayPath.COPY))
    assert (copy.path, copy.pipes, copy.sockmap) == ("copy", None, None)


def test_no_splice_forbidden_or_missing_means_copy(kernel, monkeypatch):
    assert relay_path.choose_relay(config(RelayPath.SPLICE), splice=False).path == "copy"
    monkeypatch.setattr(relay_path, "splice_supported", lambda: False)
    choice = relay_path.choose_relay(config(RelayPath.SPLICE))
    assert (choice.path, choice.reason) == ("copy", "splice(2) unavailable")


@pytest.mark.parametrize("maxconn, capacity", [(10, 4096), (2000, 8000), (300_000, 1 << 20)])
def test_the_map_holds_two_sockets_per_connection_with_room_for_a_reload(kernel, maxconn, capacity):
    assert relay_path.choose_relay(config(RelayPath.AUTO, maxconn)).sockmap.capacity == capacity
