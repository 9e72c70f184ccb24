"""The live model: availability, slowstart, reload reconciliation, snapshots."""

from dataclasses import replace

import pytest
import trio
import trio.testing

from proxy.config.model import Backend, CheckKind, Config, Health, Server
from proxy.runtime import AdminState, Runtime


def runtime(*servers: Server, health: Health = Health()) -> Runtime:
    return Runtime(Config(path="<t>", backends=(Backend(name="be", servers=servers, health=health),)))


def test_unchecked_servers_are_up_and_available():
    rt = runtime(Server("a", "127.0.0.1", 1))
    server = rt.server("be", "a")
    assert server.up and server.status == "no check" and server.available


def test_checked_servers_start_down_by_default():
    rt = runtime(Server("a", "127.0.0.1", 1), health=Health(kinds=(CheckKind.TCP,)))
    assert not rt.server("be", "a").available


def test_dns_named_server_is_unavailable_until_resolved():
    server = runtime(Server("a", "rabbit.example", 1)).server("be", "a")
    assert not server.available
    server.addresses = ("10.0.0.1",)
    assert server.available


@pytest.mark.parametrize("state", [AdminState.DRAIN, AdminState.MAINT])
def test_drain_and_maint_take_no_new_connections(state):
    rt = runtime(Server("a", "127.0.0.1", 1), Server("b", "127.0.0.1", 2))
    rt.server("be", "a").set_admin(state, 0.0)
    assert [s.name for s in rt.backends["be"].candidates()] == ["b"]


def test_weight_zero_takes_no_new_connections():
    rt = runtime(Server("a", "127.0.0.1", 1, weight=0))
    assert rt.backends["be"].candidates() == []


def test_backups_only_when_no_active_server():
    rt = runtime(Server("a", "127.0.0.1", 1), Server("b", "127.0.0.1", 2, backup=True))
    assert [s.name for s in rt.backends["be"].candidates()] == ["a"]
    rt.server("be", "a").set_admin(AdminState.MAINT, 0.0)
    assert [s.name for s in rt.backends["be"].candidates()] == ["b"]


def test_slowstart_ramps_the_weight_linearly(monkeypatch):
    import proxy.runtime as module

    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    server = runtime(Server("a", "127.0.0.1", 1, weight=100)).server("be", "a")
    server.slowstart = (100.0, 10.0)
    assert server.weight == 1  # never 0: it must get some traffic
    now[0] = 102.5
    assert server.weight == 25
    now[0] = 110.0
    assert server.weight == 100 and server.slowstart is None
    server.weight = 40  # an operator's weight is the admin weight
    assert server.admin_weight == 40


def test_reload_keeps_state_of_servers_that_keep_their_name():
    rt = runtime(Server("a", "127.0.0.1", 1), Server("b", "127.0.0.1", 2))
    a = rt.server("be", "a")
    a.set_admin(AdminState.DRAIN, 0.0)
    a.total_sessions = 7
    config = rt.config
    new = replace(config, backends=(replace(config.backends[0], servers=(
        Server("a", "127.0.0.1", 1, weight=3), Server("c", "127.0.0.1", 3))),))
    changes = rt.apply(new)
    assert changes == {"servers_added": ["be/c"], "servers_removed": ["be/b"]}
    assert rt.server("be", "a") is a and a.admin is AdminState.DRAIN and a.total_sessions == 7
    assert a.admin_weight == 3


def test_statistics_are_frozen_snapshots():
    rt = runtime(Server("a", "127.0.0.1", 1))
    stats = rt.statistics()
    with pytest.raises(AttributeError):
        stats.backends[0].servers[0].weight = 5
    assert stats.backends[0].servers[0].status == "no check"


def _with_servers(rt: Runtime, *servers: Server) -> Config:
    return replace(rt.config, backends=(replace(rt.config.backends[0], servers=servers),))


def _connect(server) -> object:
    from proxy.io.relay import Traffic
    from proxy.runtime import Connection

    conn = Connection(1, ("127.0.0.1", 1), "fe", Traffic())
    server.attach(conn)
    return conn


def test_a_server_removed_with_connections_is_retired_then_forgotten():
    rt = runtime(Server("a", "127.0.0.1", 1), Server("b", "127.0.0.1", 2))
    a = rt.server("be", "a")
    conn = _connect(a)
    rt.apply(_with_servers(rt, Server("b", "127.0.0.1", 2)))
    assert rt.server("be", "a") is a and a.retired and not a.available
    assert [s.name for s in rt.backends["be"].candidates()] == ["b"]
    (stats,) = rt.statistics().backends
    assert [(s.name, s.status) for s in stats.servers] == [("b", "no check"), ("a", "REMOVED")]
    assert stats.current_sessions == 1
    a.detach(conn)
    with pytest.raises(KeyError):
        rt.server("be", "a")


def test_a_retired_server_named_again_is_revived_with_its_connections():
    rt = runtime(Server("a", "127.0.0.1", 1), Server("b", "127.0.0.1", 2))
    a = rt.server("be", "a")
    _connect(a)
    rt.apply(_with_servers(rt, Server("b", "127.0.0.1", 2)))
    rt.apply(_with_servers(rt, Server("a", "127.0.0.1", 1), Server("b", "127.0.0.1", 2)))
    assert rt.server("be", "a") is a and not a.retired and a.current_sessions == 1
    assert rt.backends["be"].retired == {}


def test_a_reload_that_strands_live_connections_is_refused():
    rt = runtime(Server("a", "127.0.0.1", 1), Server("b", "127.0.0.1", 2))
    assert rt.refuse_reload(_with_servers(rt, Server("c", "127.0.0.1", 3))) == []  # nobody connected
    _connect(rt.server("be", "a"))
    assert rt.refuse_reload(_with_servers(rt, Server("a", "127.0.0.1", 1))) == []
    assert rt.refuse_reload(_with_servers(rt, Server("b", "127.0.0.1", 2))) == []  # b is kept
    (problem,) = rt.refuse_reload(_with_servers(rt, Server("c", "127.0.0.1", 3)))
    assert problem.startswith("backend be: the new configuration removes every one of its servers (a, b)")
    (problem,) = rt.refuse_reload(replace(rt.config, backends=()))
    assert problem.startswith("backend be: the new configuration removes it while 1 connection(s) use it")


@pytest.mark.parametrize(
    "leave, come_back",
    [
        (lambda s: s.set_health(False, "DOWN", 1.0), lambda s: s.set_health(True, "UP", 2.0)),
        (lambda s: s.set_admin(AdminState.MAINT, 1.0), lambda s: s.set_admin(AdminState.READY, 2.0)),
        (lambda s: setattr(s, "weight", 0), lambda s: setattr(s, "weight", 3)),  # an operator's weight
        (lambda s: setattr(s, "addresses", ()), lambda s: setattr(s, "addresses", ("10.0.0.9",))),  # DNS
        (lambda s: setattr(s, "up", False), lambda s: setattr(s, "up", True)),
    ],
    ids=["health", "admin", "weight", "dns", "up"],
)
def test_the_cached_candidates_follow_every_change_of_availability(leave, come_back):
    rt = runtime(Server("a", "127.0.0.1", 1), Server("b", "127.0.0.1", 2), Server("c", "127.0.0.1", 3, backup=True))
    backend, a = rt.backends["be"], rt.server("be", "a")
    assert [s.name for s in backend.candidates()] == ["a", "b"]
    leave(a)
    assert [s.name for s in backend.candidates()] == ["b"]
    leave(rt.server("be", "b"))
    assert [s.name for s in backend.candidates()] == ["c"]  # the backup, once no active server is left
    come_back(a)
    assert [s.name for s in backend.candidates()] == ["a"]


def test_the_cached_candidates_follow_a_reload():
    rt = runtime(Server("a", "127.0.0.1", 1), Server("b", "127.0.0.1", 2))
    backend = rt.backends["be"]
    assert [s.name for s in backend.candidates()] == ["a", "b"]
    config = replace(rt.config.backends[0], servers=(Server("b", "127.0.0.1", 2, backup=True), Server("d", "127.0.0.1", 4)))
    rt.apply(replace(rt.config, backends=(config,)))
    assert [s.name for s in rt.backends["be"].candidates()] == ["d"]


async def test_a_listener_waiting_for_a_frontend_slot_resumes_when_one_is_released():
    from proxy.runtime import FrontendRuntime
    from proxy.config.model import BindAddress, Frontend

    frontend = FrontendRuntime(Frontend("fe", (BindAddress("127.0.0.1", 0),), "be", maxconn=2))
    frontend.take_slot(), frontend.take_slot()
    assert (frontend.current, frontend.total_sessions, frontend.max_sessions) == (2, 2, 2)
    resumed = trio.Event()

    async def listener():
        await frontend.wait_for_slot()
        resumed.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener)
            await trio.testing.wait_all_tasks_blocked()
            assert not resumed.is_set()
            frontend.release_slot()
            await resumed.wait()
    assert (frontend.current, frontend.max_sessions) == (1, 2)


async def test_a_reload_that_raises_maxconn_lets_a_waiting_listener_accept_again():
    from proxy.runtime import FrontendRuntime
    from proxy.config.model import BindAddress, Frontend

    config = Frontend("fe", (BindAddress("127.0.0.1", 0),), "be", maxconn=1)
    frontend = FrontendRuntime(config)
    frontend.take_slot()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(frontend.wait_for_slot)
            await trio.testing.wait_all_tasks_blocked()
            frontend.reconfigure(replace(config, maxconn=2))
    assert frontend.current == 1


async def test_a_client_waiting_in_the_backend_queue_is_woken_when_a_slot_frees():
    rt = runtime(Server(name="a", address="127.0.0.1", port=1, maxconn=1))
    backend, server = rt.backends["be"], rt.backends["be"].servers["a"]
    from proxy.io.relay import Traffic
    from proxy.runtime import Connection

    holder = Connection(1, ("127.0.0.1", 1), "fe", Traffic())
    assert backend.acquire(holder, None, ()) is server
    server.detach(Connection(9, ("127.0.0.1", 9), "fe", Traffic()))  # not attached: frees nothing
    woken: list[bool] = []

    async def waiter():
        woken.append(await backend.wait_in_queue(until=trio.current_time() + 60))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert (backend.queued, woken) == (1, [])
            server.detach(holder)
    assert (woken, backend.queued, backend.queue_max) == ([True], 0, 1)


async def test_a_queue_wait_that_times_out_leaves_the_queue():
    rt = runtime(Server(name="a", address="127.0.0.1", port=1, maxconn=1))
    backend = rt.backends["be"]
    with trio.fail_after(5):
        assert await backend.wait_in_queue(until=trio.current_time() + 0.01) is False
    assert backend.queued == 0
