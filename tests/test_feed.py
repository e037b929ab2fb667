"""A worker's feed, in this process against the real PostgreSQL: holes are read from the record, nothing twice."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2.extensions
import pytest

from attune_sse.core.event import ExecutionEvent, ResetReason, UnknownEvent, reset_frame
from attune_sse.core.hub import Hub
from attune_sse.runtime.feed import Feed
from attune_sse.runtime.message import Message, decode, encode
from attune_sse.storage import record
from attune_sse.storage.db import Pool, make_psycopg2_green


@pytest.fixture
def pool(database: Any) -> Iterator[Pool]:
    make_psycopg2_green()
    pool = Pool(database.url, 2)
    yield pool
    pool.close()
    psycopg2.extensions.set_wait_callback(None)


def recorded(pool: Pool, after: int) -> list[ExecutionEvent]:
    with pool.cursor(dict_rows=False) as cur:
        return record.events_after(cur, after).events


def drain(sub: Any) -> list[ExecutionEvent]:
    events = []
    while batch := sub.next_batch(0.2):
        events.extend(batch)
    return events


def test_a_message_after_a_hole_reads_the_hole_from_the_record_and_drops_repeats(
    pool: Pool, database: Any, new_execution: Any, set_status: Any
) -> None:
    ((start,),) = database.query("SELECT coalesce(max(id), 0) FROM attune.execution_event")
    execution_id = new_execution()
    for status in ("scheduling", "scheduled", "running", "completed", "failed", "timeout"):
        set_status(execution_id, status)
    events = [e for e in recorded(pool, start) if e.entity_id == execution_id]
    assert len(events) == 7
    hub = Hub()
    sub = hub.subscribe()
    feed = Feed(hub, pool)

    feed.send(Message(after=start, to=start))  # the leader says where it is
    # The relay lost the first four events (a leader died, a broker restarted empty): the next
    # message follows the fourth. The feed reads 1-4 from the record, then publishes 5-7.
    feed.send(Message(after=events[3].event_id, to=events[6].event_id, events=events[4:]))
    # A new leader starting a little behind resends 6-7, then goes on.
    feed.send(Message(after=events[4].event_id, to=events[6].event_id, events=events[5:]))
    got = drain(sub)
    assert [e.event_id for e in got] == [e.event_id for e in events]
    assert [e.frame for e in got] == [e.frame for e in events], "the record's frames, byte for byte"
    assert feed.filled == 4 and feed.received == 7 and feed.position == events[6].event_id
    assert hub.position == events[6].event_id

    # A reset (a new history) goes to the clients as it came, and the position follows it; the
    # same reset read again (a broker re-read) changes nothing.
    frame = reset_frame(ResetReason.REWOUND, events[2].event_id)
    reset = Message(after=events[2].event_id, to=events[2].event_id, reset=ResetReason.REWOUND, epoch=1,
                    base=events[2].event_id)
    feed.send(reset)
    feed.send(reset)
    assert [e.frame for e in drain(sub)] == [frame]
    assert feed.position == events[2].event_id

    # A worker that missed the next reset (to event 1 of the seven) learns of it from any message of
    # the new history: its clients reload, and it reads the new history from the record.
    feed.send(Message(after=events[6].event_id, to=events[6].event_id, epoch=2, base=events[0].event_id))
    got = drain(sub)
    assert b"event: reset" in got[0].frame and int(got[0].event_id) == events[0].event_id
    assert [e.event_id for e in got[1:]] == [e.event_id for e in events[1:]]
    assert feed.epoch == 2 and feed.position == events[6].event_id


def test_a_hole_already_pruned_tells_clients_to_reload(
    pool: Pool, database: Any, new_execution: Any, set_status: Any
) -> None:
    execution_id = new_execution()
    set_status(execution_id, "running")
    ((newest,),) = database.query("SELECT max(id) FROM attune.execution_event")
    ((horizon,),) = database.query("SELECT pruned_to FROM attune.execution_event_horizon")
    hub = Hub()
    sub = hub.subscribe()
    feed = Feed(hub, pool)
    feed.send(Message(after=newest - 2, to=newest - 2))
    # The event before the newest is pruned before the feed got it: a hole it cannot fill.
    database.query("UPDATE attune.execution_event_horizon SET pruned_to = %s", (newest - 1,))
    try:
        feed.send(Message(after=newest, to=newest))
    finally:
        database.query("UPDATE attune.execution_event_horizon SET pruned_to = %s", (horizon,))
    got = drain(sub)
    assert b"event: reset" in got[0].frame and b"pruned" in got[0].frame
    assert [e.event_id for e in got[1:]] == [newest], "what is left after the horizon follows the reset"
    assert feed.position == newest


def test_messages_keep_every_byte_of_their_events() -> None:
    events = [ExecutionEvent.from_record(7, 3, '{"x":"\u00e9\\n"}'.encode(), 1.5, "pack.a"),
              ExecutionEvent.from_record(9, 4, b'{"y":' + b"1" * 70000 + b"}", 2.5, "")]
    message = Message(after=6, to=9, events=events, ok=False, sent_at=3.0)
    back = decode(encode(message))
    assert back == message
    with pytest.raises(ValueError):
        decode(encode(message) + b"extra")


def test_a_new_leader_that_knows_no_history_does_not_reset_the_workers(pool: Pool, database: Any) -> None:
    """A worker that leads before any message reached it emits epoch 0: the other workers keep their
    history (a reset there would replay the whole record to every client)."""
    ((newest,),) = database.query("SELECT coalesce(max(id), 0) FROM attune.execution_event")
    hub = Hub()
    sub = hub.subscribe()
    feed = Feed(hub, pool)
    feed.send(Message(after=newest, to=newest, reset=ResetReason.REWOUND, epoch=7, base=newest))
    feed.send(Message(after=newest, to=newest, epoch=0, base=0))
    assert drain(sub) == [] and feed.resets == 0 and feed.epoch == 7 and feed.position == newest


def test_a_resume_from_ids_passed_after_the_newest_event_is_not_unknown(pool: Pool, database: Any) -> None:
    """The ids of failed commits after the newest event are passed, and a keep-alive may give a client
    one of them as its position: resuming from it reads nothing and resets nothing."""
    ((newest,),) = database.query("SELECT coalesce(max(id), 0) FROM attune.execution_event")
    assert list(record.read_backlog(pool, None, newest + 3, newest + 3)) == [([], newest + 3)]
    with pytest.raises(UnknownEvent):
        list(record.read_backlog(pool, None, newest + 4, newest + 3))


@pytest.mark.parametrize("header", [
    b"[]", b'{"after": "1"}', b'{"after": 1, "to": 1, "epoch": 0, "base": 0, "events": 5}',
    b'{"after": 1, "to": 1, "epoch": 0, "base": 0, "events": [[1, 1, 0, "", "x"]]}',
    b'{"after": -1, "to": 1, "epoch": 0, "base": 0, "events": [], "reset": 0, "ok": true, "at": 0, "source": ""}',
])
def test_bytes_that_are_not_a_message_are_refused_as_such(header: bytes) -> None:
    """Entries of a Redis stream are anyone's: decode refuses what is not a message with ValueError
    (the reader skips it), never another error that would stall the stream."""
    with pytest.raises(ValueError):
        decode(header + b"\n")
    frame = b"event: reset\ndata: [1]\n\n"  # a reset whose data is not an object
    reset = b'{"after":1,"to":1,"epoch":0,"base":0,"events":[],"reset":%d,"ok":true,"at":0,"source":""}\n'
    with pytest.raises(ValueError):
        decode(reset % len(frame) + frame)


def test_messages_waiting_together_reach_the_follower_as_one_batch() -> None:
    """A follower that fell behind finds several messages in one read: the batches among them that follow
    one another come as one (one write per client), while a reset, a message of another history and one
    after a hole stay apart, in order."""
    import struct

    from gevent import socket

    from attune_sse.runtime.followers import read_messages

    def event(n: int) -> ExecutionEvent:
        return ExecutionEvent.from_record(n, 1, b'{"n":%d}' % n, float(n), "")

    sent = [Message(after=1, to=2, events=[event(2)], epoch=5), Message(after=2, to=4, events=[event(4)], epoch=5),
            Message(after=4, to=4, epoch=5, ok=False),  # a heartbeat says the source is down
            Message(after=4, to=6, events=[event(5), event(6)], epoch=5),
            Message(after=6, to=6, reset=ResetReason.REWOUND, epoch=6, base=6),
            Message(after=6, to=7, events=[event(7)], epoch=6, base=6),
            Message(after=9, to=10, events=[event(10)], epoch=6, base=6)]  # after a hole: the feed reads 8..9
    leader, follower = socket.socketpair()
    leader.sendall(b"".join(struct.pack("!I", len(encode(m))) + encode(m) for m in sent))
    leader.close()
    got = []
    with follower, pytest.raises(EOFError):
        for message in read_messages(follower):
            got.append(message)
    assert [(m.after, m.to, [e.event_id for e in m.events], m.reset, m.epoch) for m in got] == [
        (1, 6, [2, 4, 5, 6], None, 5), (6, 6, [], ResetReason.REWOUND, 6), (6, 7, [7], None, 6),
        (9, 10, [10], None, 6)]
    assert got[0].ok, "the last word on the source is the newest message's"
    assert [e.frame for m in got for e in m.events] == [event(n).frame for n in (2, 4, 5, 6, 7, 10)]
