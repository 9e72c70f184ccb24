"""Connection slots: limits overall and per client, the longest-waiting connection evicted first."""

from hypothesis import given
from hypothesis import strategies as st

from proxy.stats_ui.admission import Refused, Slot, Slots, client_key


def admit(slots: Slots, host: str, evicted_log: list) -> Slot | Refused:
    slot, evicted = slots.admit(host, lambda: evicted_log.append(host))
    return slot


def test_a_new_connection_evicts_the_one_that_has_waited_longest():
    slots, evicted = Slots(limit=2), []
    first, second = admit(slots, "10.0.0.1", evicted), admit(slots, "10.0.0.2", evicted)
    third, gone = slots.admit("10.0.0.3", lambda: None)
    assert gone == [first] and first.evicted and evicted == ["10.0.0.1"] and len(slots) == 2
    assert not second.evicted and isinstance(third, Slot)


def test_busy_connections_are_never_evicted_and_a_full_house_refuses():
    slots, evicted = Slots(limit=2), []
    first, second = admit(slots, "10.0.0.1", evicted), admit(slots, "10.0.0.2", evicted)
    first.busy()
    third, gone = slots.admit("10.0.0.3", lambda: None)
    assert gone == [second] and not first.evicted
    third.busy()
    refused, gone = slots.admit("10.0.0.4", lambda: None)
    assert refused == Refused("limit", "10.0.0.4") and gone == []


def test_waiting_again_makes_a_connection_the_newest_of_the_waiting():
    slots, evicted = Slots(limit=2), []
    first, second = admit(slots, "10.0.0.1", evicted), admit(slots, "10.0.0.2", evicted)
    first.busy()
    first.waiting()  # answered, now idle between keep-alive requests
    _, gone = slots.admit("10.0.0.3", lambda: None)
    assert gone == [second]


def test_one_client_evicts_only_its_own_connections_at_its_limit():
    slots, evicted = Slots(limit=10, per_client=2), []
    other = admit(slots, "10.0.0.9", evicted)
    first, second = (admit(slots, "10.0.0.1", evicted) for _ in range(2))
    third, gone = slots.admit("10.0.0.1", lambda: None)
    assert gone == [first] and not other.evicted
    second.busy()
    third.busy()
    refused, gone = slots.admit("10.0.0.1", lambda: None)
    assert refused == Refused("per_client", "10.0.0.1") and gone == [] and not other.evicted


def test_release_is_idempotent_and_frees_the_slot():
    slots = Slots(limit=1)
    slot, _ = slots.admit("10.0.0.1", lambda: None)
    slot.release()
    slot.release()
    assert len(slots) == 0 and slots.admit("10.0.0.1", lambda: None)[1] == []


def test_ipv6_clients_count_by_their_64():
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("192.0.2.1") == "192.0.2.1" and client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("?") == "?"


operations = st.lists(st.tuples(st.sampled_from(["admit", "busy", "waiting", "release"]),
                                st.integers(0, 5), st.integers(0, 40)), max_size=120)


@given(st.integers(1, 6), st.one_of(st.none(), st.integers(1, 4)), operations)
def test_limits_hold_and_only_the_longest_waiting_is_evicted_whatever_happens(limit, per_client, ops):
    slots, live, order = Slots(limit, per_client), [], []  # order: waiting slots, oldest first
    for operation, client, index in ops:
        host = f"10.0.0.{client}"
        if operation == "admit":
            before = list(order)
            slot, gone = slots.admit(host, lambda: None)
            for victim in gone:
                mine = [s for s in before if s.client == victim.client] if victim.client == host else before
                assert victim is mine[0] and victim.evicted  # the longest waiting in its scope
                live.remove(victim)
                order.remove(victim)
                before.remove(victim)
            if isinstance(slot, Slot):
                live.append(slot)
                order.append(slot)
            else:
                scope = [s for s in live if s.client == host] if slot.reason == "per_client" else live
                assert all(s not in order for s in scope)  # refused only when all in scope are busy
        elif live:
            slot = live[index % len(live)]
            getattr(slot, operation)()
            if slot in order:
                order.remove(slot)
            if operation == "waiting":
                order.append(slot)
            elif operation == "release":
                live.remove(slot)
        assert len(slots) == len(live) <= limit
        if per_client is not None:
            assert all(sum(s.client == c for s in live) <= per_client for c in {s.client for s in live})
