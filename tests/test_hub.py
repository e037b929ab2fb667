"""The hub on its own: no server, no database."""

from __future__ import annotations

import socket
from typing import Any

import gevent
import pytest

from attune_sse.core.event import ExecutionEvent
from attune_sse.core.grants import ALL_GRANTS, Principal, compile_grants, parse_grants
from attune_sse.core.hub import BATCH_BYTES, SIGNED_OUT, Hub
from attune_sse.http.sink import ClientSocket


def event(event_id: int, entity_id: int = 1) -> ExecutionEvent:
    return ExecutionEvent.from_record(event_id, entity_id, b'{"entity_id": %d, "event_id": %d}' % (entity_id, event_id))


def test_every_subscriber_gets_every_event_in_order() -> None:
    hub = Hub()
    subs = [hub.subscribe() for _ in range(3)]
    for i in range(1, 6):
        assert hub.publish_batch([event(i)]) == 3
    for sub in subs:
        assert [e.event_id for e in sub.next_batch(0.1)] == [1, 2, 3, 4, 5]
    assert hub.stats.published == 5 and hub.stats.delivered == 15


def test_filter_by_execution() -> None:
    hub = Hub()
    only_7 = hub.subscribe(execution_id=7)
    everything = hub.subscribe()
    hub.publish_batch([event(1, entity_id=8)])
    hub.publish_batch([event(2, entity_id=7)])
    assert [e.event_id for e in only_7.next_batch(0.1)] == [2]
    assert [e.event_id for e in everything.next_batch(0.1)] == [1, 2]


def test_timeout_returns_empty_batch() -> None:
    hub = Hub()
    sub = hub.subscribe()
    assert sub.next_batch(0.01) == []


def test_waiting_reader_wakes_on_publish() -> None:
    hub = Hub()
    sub = hub.subscribe()
    reader = gevent.spawn(sub.next_batch, 5)
    gevent.sleep(0)
    hub.publish_batch([event(1)])
    assert [e.event_id for e in reader.get(timeout=1)] == [1]


def test_slow_subscriber_is_closed_without_blocking_others() -> None:
    hub = Hub(max_pending=3)
    slow = hub.subscribe()
    fast = hub.subscribe()
    for i in range(1, 4):
        hub.publish_batch([event(i)])
        assert [e.event_id for e in fast.next_batch(0)] == [i]
    assert hub.publish_batch([event(4)]) == 1, "only the reader that keeps up gets the 4th event"
    assert slow.reason == "overflow"
    assert hub.stats.overflows == 1
    # It still receives what was queued before the close, then the end.
    assert [e.event_id for e in slow.next_batch(0)] == [1, 2, 3]
    assert slow.next_batch(0) is None
    assert len(hub) == 1


def test_unsubscribe_is_idempotent_and_leaves_no_trace() -> None:
    hub = Hub()
    for _ in range(5000):
        hub.unsubscribe(hub.subscribe(execution_id=3))
        hub.unsubscribe(hub.subscribe())
    assert len(hub) == 0
    assert hub._by_execution == {}
    sub = hub.subscribe(execution_id=9)
    hub.unsubscribe(sub)
    hub.unsubscribe(sub)
    assert len(hub) == 0


def test_close_ends_every_subscription() -> None:
    hub = Hub()
    subs = [hub.subscribe(), hub.subscribe(execution_id=1)]
    hub.publish_batch([event(1)])
    assert hub.close() == 2
    for sub in subs:
        assert [e.event_id for e in sub.next_batch(0)] == [1]
        assert sub.next_batch(0) is None
        assert sub.reason == "shutdown"
    late = hub.subscribe()
    assert late.next_batch(0) is None, "a subscriber after close ends at once"
    assert len(hub) == 0


@pytest.mark.parametrize("count", [1, 100])
def test_batch_holds_everything_pending(count: int) -> None:
    hub = Hub()
    sub = hub.subscribe()
    for i in range(count):
        hub.publish_batch([event(i + 1)])
    assert len(sub.next_batch(0)) == count


def test_keepalive_tick_wakes_only_quiet_waiting_subscribers() -> None:
    hub = Hub()
    quiet, busy = hub.subscribe(), hub.subscribe(execution_id=2)
    readers = [gevent.spawn(sub.next_batch) for sub in (quiet, busy)]
    gevent.sleep(0)
    assert hub.tick() == 0, "the first tick only marks everyone quiet"
    hub.publish_batch([event(1, entity_id=5)])  # reaches `quiet` (unfiltered): it gets events, not a keep-alive
    gevent.sleep(0)
    assert [e.event_id for e in readers[0].get(timeout=1)] == [1]
    readers[0] = gevent.spawn(quiet.next_batch)
    gevent.sleep(0)
    assert hub.tick() == 1, "only `busy`, quiet and waiting since the last tick, is woken"
    assert readers[1].get(timeout=1) == []
    assert not readers[0].ready()
    hub.close()
    assert readers[0].get(timeout=1) is None


def _chunks(data: bytes) -> list[bytes]:
    """The payloads of HTTP/1.1 chunks."""
    out = []
    while data:
        size, _, data = data.partition(b"\r\n")
        out.append(data[: int(size, 16)])
        data = data[int(size, 16) + 2:]
    return out


@pytest.fixture
def socket_pair() -> Any:
    server_side, client_side = socket.socketpair()
    server_side.setblocking(False)
    yield server_side, client_side
    server_side.close()
    client_side.close()


def test_idle_writer_gets_events_written_directly_as_chunks(socket_pair: Any) -> None:
    server_side, client_side = socket_pair
    hub = Hub()
    sub = hub.subscribe(sink=ClientSocket(server_side, direct=True))
    reader = gevent.spawn(sub.next_batch)
    gevent.sleep(0)
    assert hub.publish_batch([event(1), event(2), event(3)]) == 3
    gevent.sleep(0)
    assert not reader.ready(), "the writer was not woken: the hub wrote for it"
    # One chunk for the batch, made once whoever takes it.
    assert _chunks(client_side.recv(65536)) == [event(1).frame + event(2).frame + event(3).frame]
    assert hub.stats.sent == 3 and sub.pending == 0


def test_direct_write_skips_what_a_resumed_stream_was_sent(socket_pair: Any) -> None:
    server_side, client_side = socket_pair
    hub = Hub()
    sub = hub.subscribe(sink=ClientSocket(server_side, direct=True))
    sub.skip_through = 2  # a resumed stream: 1 and 2 came from the record
    reader = gevent.spawn(sub.next_batch)
    gevent.sleep(0)
    assert hub.publish_batch([event(1), event(2), event(3), event(4)]) == 2
    assert _chunks(client_side.recv(65536)) == [event(3).frame + event(4).frame]
    reader.kill()


def test_direct_write_leaves_what_the_socket_did_not_take_to_the_writer(socket_pair: Any) -> None:
    server_side, client_side = socket_pair
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    hub = Hub()
    sub = hub.subscribe(sink=ClientSocket(server_side, direct=True))
    reader = gevent.spawn(sub.next_batch)
    gevent.sleep(0)
    big = ExecutionEvent.from_record(1, 1, b'{"event_id": 1, "result": "' + b"x" * 200_000 + b'"}')
    hub.publish_batch([big])
    assert reader.get(timeout=1) == [], "woken, with no event queued: the rest is raw bytes"
    raw = sub.take_raw()
    chunk = b"%X\r\n%s\r\n" % (len(big.frame), big.frame)
    assert 0 < len(raw) < len(chunk) and chunk.endswith(raw)
    # Now the socket is full: the next event cannot be written directly and is queued.
    reader = gevent.spawn(sub.next_batch)
    gevent.sleep(0)
    hub.publish_batch([event(2)])
    assert [e.event_id for e in reader.get(timeout=1)] == [2]
    assert client_side.recv(10)  # the start of the big chunk went out directly


def test_expired_subscriptions_are_closed_with_their_reason() -> None:
    hub = Hub()
    soon, later, never = hub.subscribe(), hub.subscribe(execution_id=3), hub.subscribe()
    soon.expires_at, later.expires_at = 100.0, 200.0
    assert hub.expire(150.0) == 1
    assert soon.reason == "token expired" and soon.next_batch(0) is None
    assert later.reason is None and never.reason is None and len(hub) == 2
    assert hub.expire(250.0) == 1 and len(hub) == 1


def test_queued_events_a_resumed_stream_was_sent_already_are_left_out() -> None:
    hub = Hub()
    sub = hub.subscribe()
    hub.publish_batch([event(1), event(2), event(3)])  # queued while the backlog is being sent
    sub.skip_through = 2  # the backlog reached event 2
    assert [e.event_id for e in sub.next_batch(0)] == [3]
    hub.publish_batch([event(2)])  # a late repeat is not even queued
    assert sub.pending == 0


def test_position_is_the_last_id_published_and_only_grows() -> None:
    hub = Hub()
    assert hub.position is None and hub.wait_position(0.01) is None
    hub.advance(10)
    assert hub.wait_position(0) == 10
    hub.publish_batch([event(11), event(12)])
    assert hub.position == 12
    hub.advance(5)  # a listener never moves it back
    assert hub.position == 12


def test_a_stream_waiting_for_the_first_position_is_woken() -> None:
    hub = Hub()
    waiter = gevent.spawn(hub.wait_position, 5)
    gevent.sleep(0)
    hub.advance(7)
    assert waiter.get(timeout=1) == 7


# -- what each subscriber may read -----------------------------------------------

def ref_event(event_id: int, entity_id: int, action_ref: str) -> ExecutionEvent:
    return ExecutionEvent.from_record(event_id, entity_id, b"{}", action_ref=action_ref)


def principal(identity: int, grants: list[dict[str, Any]], frozen: bool = False) -> Principal:
    return Principal(identity, f"user{identity}", frozen, compile_grants(grants))


def pack_read(*packs: str) -> list[dict[str, Any]]:
    return [{"resource": "executions", "actions": ["read"], "constraints": {"pack_refs": list(packs)}}]


def test_subscribers_get_only_events_their_scope_allows() -> None:
    hub = Hub()
    a = principal(1, pack_read("a")).scope("executions", "read")
    only_ref = principal(2, [{"resource": "executions", "actions": ["read"],
                              "constraints": {"refs": ["b.two"]}}]).scope("executions", "read")
    sub_a = [hub.subscribe(identity=1, scope=a) for _ in range(2)]
    sub_ref = hub.subscribe(identity=2, scope=only_ref)
    sub_all = hub.subscribe(identity=3)
    sub_one = hub.subscribe(execution_id=5, identity=1, scope=a)  # b.two is not in pack a
    sub_none = hub.subscribe(identity=4, scope=principal(4, []).scope("executions", "read"))
    hub.publish_batch([ref_event(1, 4, "a.one"), ref_event(2, 5, "b.two"), ref_event(3, 6, "b.three"),
                       ref_event(4, 4, "a.one")])
    for sub in sub_a:
        assert [e.event_id for e in sub.next_batch(0.1)] == [1, 4]
    assert [e.event_id for e in sub_ref.next_batch(0.1)] == [2]
    assert [e.event_id for e in sub_all.next_batch(0.1)] == [1, 2, 3, 4]
    assert sub_one.next_batch(0.05) == [] and sub_none.next_batch(0.05) == []
    assert hub.streams_of(1) == 3 and sorted(hub.identities()) == [1, 2, 3, 4]


def test_apply_access_ends_and_narrows_streams() -> None:
    hub = Hub()
    both = principal(1, pack_read("a", "b")).scope("executions", "read")
    narrowed = hub.subscribe(identity=1, scope=both)
    frozen = hub.subscribe(identity=2, scope=both)
    deleted = hub.subscribe(identity=3, scope=both)
    anonymous = hub.subscribe()
    unknown = hub.subscribe(identity=9, scope=both)  # not in what was reloaded: left as it is
    ended = hub.apply_access({1: principal(1, pack_read("a")), 2: principal(2, pack_read("a"), frozen=True),
                              3: None})
    assert ended == 2 and frozen.reason == SIGNED_OUT and deleted.reason == SIGNED_OUT
    assert narrowed.reason is None and anonymous.reason is None and unknown.reason is None
    assert sorted(hub.identities()) == [1, 9] and len(hub) == 3
    hub.publish_batch([ref_event(1, 1, "a.x"), ref_event(2, 2, "b.x")])
    assert [e.event_id for e in narrowed.next_batch(0.1)] == [1]
    assert [e.event_id for e in anonymous.next_batch(0.1)] == [1, 2]
    hub.unsubscribe(narrowed)
    assert hub.identities() == [9] and hub.streams_of(1) == 0


def test_a_batch_holds_about_batch_bytes_and_the_rest_stays_pending() -> None:
    hub = Hub()
    sub = hub.subscribe()
    big = [ExecutionEvent.from_record(n, 1, b'"' + b"x" * 100_000 + b'"') for n in range(1, 11)]
    hub.publish_batch(big)
    first = sub.next_batch(0)
    assert 2 <= len(first) <= 3 and sum(len(e.frame) for e in first) <= BATCH_BYTES + 100_100
    assert sub.pending == 10 - len(first)


def test_what_is_queued_when_access_changes_is_refiltered_or_dropped() -> None:
    hub = Hub()
    both = principal(1, pack_read("a", "b")).scope("executions", "read")
    narrowed = hub.subscribe(identity=1, scope=both)
    frozen = hub.subscribe(identity=2, scope=both)
    hub.publish_batch([ref_event(1, 1, "a.x"), ref_event(2, 2, "b.x"), ref_event(3, 1, "a.x")])
    assert narrowed.pending == 3 and frozen.pending == 3  # their writers are slow: nothing taken yet
    hub.apply_access({1: principal(1, pack_read("a")), 2: principal(2, pack_read("a", "b"), frozen=True)})
    assert [e.event_id for e in narrowed.next_batch(0)] == [1, 3]
    assert frozen.next_batch(0) is None and frozen.reason == SIGNED_OUT


@pytest.mark.parametrize("constraints", [[], False, "", 0, ["pack_refs"]])
def test_constraints_that_are_not_an_object_are_refused(constraints: Any) -> None:
    with pytest.raises(ValueError, match="'constraints' must be an object"):
        parse_grants([{"resource": "executions", "actions": ["read"], "constraints": constraints}])
    assert parse_grants([{"resource": "executions", "actions": ["read"], "constraints": None}])


def big(event_id: int, size: int) -> ExecutionEvent:
    return ExecutionEvent.from_record(event_id, 1, b'{"entity_id": 1, "result": "%s"}' % (b"x" * size))


def test_a_client_past_its_bytes_is_dropped_and_the_others_keep_theirs() -> None:
    hub = Hub(max_client_bytes=3_000_000)
    dropped: list[str] = []
    slow = hub.subscribe(on_overflow=lambda: dropped.append("slow"))
    fast = hub.subscribe()
    for i in range(1, 6):
        hub.publish_batch([big(i, 1_000_000)])
        assert [e.event_id for e in fast.next_batch(0)] == [i]  # reads each as it comes
    assert dropped == ["slow"] and slow.reason == "overflow"
    assert hub.stats.overflows == 1
    # What the slow client held was given back; the fast one holds only its last batch until it asks again.
    assert hub.buffers.held == fast.held <= 1_000_100
    fast.next_batch(0)
    assert hub.buffers.held == 0


def test_an_event_larger_than_the_bound_still_reaches_a_client_that_reads() -> None:
    hub = Hub(max_client_bytes=100_000)
    sub = hub.subscribe()
    for i in range(1, 4):
        hub.publish_batch([big(i, 500_000)])
        assert [e.event_id for e in sub.next_batch(0)] == [i]
    assert sub.reason is None and hub.stats.overflows == 0


def test_the_worker_bound_drops_the_clients_that_hold_the_most() -> None:
    hub = Hub(max_client_bytes=0, max_worker_bytes=5_500_000)

    def read(sub: Any) -> None:
        assert sub.next_batch(0)
        assert sub.next_batch(0) == []  # written: the writer asks again, and gives its batch back

    heavy, light, *reading = [hub.subscribe() for _ in range(4)]
    hub.publish_batch([big(1, 1_000_000)])
    for sub in (light, *reading):
        read(sub)
    for i in range(2, 5):  # heavy comes to hold 4 MB, light 3 MB, each reader nothing
        hub.publish_batch([big(i, 1_000_000)])
        for sub in reading:
            read(sub)
    assert heavy.reason == "overflow", "the one that held the most went first"
    assert light.reason is None and all(sub.reason is None for sub in reading)
    assert hub.buffers.held == light.held == 3 * len(big(1, 1_000_000).frame)


def test_narrowed_access_gives_back_the_bytes_it_drops() -> None:
    hub = Hub(max_client_bytes=10_000_000)
    sub = hub.subscribe(identity=7, scope=compile_grants(parse_grants(ALL_GRANTS))[("executions", "read")])
    hub.publish_batch([big(1, 1_000_000)])
    held = hub.buffers.held
    assert held > 1_000_000
    hub.apply_access({7: Principal(7, "seven", False, compile_grants([]))})  # may read nothing now
    assert hub.buffers.held == 0 and sub.pending == 0
