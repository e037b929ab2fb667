"""The record is the truth: ids in commit order without a writer lock, commits in flight, failed commits.

Writers are real PostgreSQL sessions; the clients are SSE streams on the real
server. A test-only deferred trigger, named to fire after the event trigger,
can hold a committing transaction after its event id was drawn (until the test
releases an advisory lock) or fail it there, which is how a commit in flight
and a commit that fails look to a reader.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from helpers import Stream, wait_until

STREAM = "/api/v1/executions/stream"
RELEASE_KEY = 7_202_611  # the advisory lock a held commit waits for

HOLD_TRIGGER = f"""
CREATE FUNCTION attune.test_hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    CASE current_setting('attune_test.commit', true)
        WHEN 'hold' THEN PERFORM pg_advisory_xact_lock({RELEASE_KEY});
        WHEN 'fail' THEN RAISE EXCEPTION 'attune_test: this commit fails after its event id was drawn';
        ELSE NULL;
    END CASE;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER zz_test_hold_commit AFTER INSERT OR UPDATE ON attune.execution
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION attune.test_hold_commit();
"""


@pytest.fixture
def commit_control(database: Any) -> Iterator[Any]:
    """Connections whose commits can be held after their event id is drawn, or failed there."""
    database.query(HOLD_TRIGGER)
    release = database.connect()
    opened: list[Any] = [release]

    def writer(mode: str | None = None) -> Any:
        conn = psycopg2.connect(database.url, application_name="attune-sse-tests-writer")
        opened.append(conn)
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = '20s'")  # a held commit never hangs the suite
            if mode:
                cur.execute("SELECT set_config('attune_test.commit', %s, false)", (mode,))
        conn.commit()
        return conn

    writer.release = release
    try:
        yield writer
    finally:
        for conn in opened:
            conn.close()
        database.query("DROP TRIGGER zz_test_hold_commit ON attune.execution; "
                       "DROP FUNCTION attune.test_hold_commit()")


def _update(conn: Any, execution_id: int, status: str) -> None:
    with conn.cursor() as cur:
        cur.execute("UPDATE attune.execution SET status = %s WHERE id = %s", (status, execution_id))


def _events_of(database: Any, execution_id: int) -> list[int]:
    return [r[0] for r in database.query(
        "SELECT id FROM attune.execution_event WHERE execution = %s ORDER BY id", (execution_id,))]


def _fail_one_then_commit_another(commit_control: Any, database: Any, failing_execution: int,
                                  next_execution: int) -> tuple[Any, int]:
    """A transaction draws an event id and fails at commit; another commits after it. (the
    committed writer, kept open for more, and its event's id)"""
    failing = commit_control("fail")
    _update(failing, failing_execution, "running")
    with pytest.raises(psycopg2.errors.RaiseException):
        failing.commit()
    writer = commit_control()
    _update(writer, next_execution, "running")
    writer.commit()
    return writer, _events_of(database, next_execution)[-1]


def test_an_open_transaction_delays_no_other_writer_and_its_events_come_at_commit(
    server: Any, token: str, database: Any, new_execution: Any
) -> None:
    one, two = new_execution(), new_execution()
    live = Stream(server.base_url + STREAM, {"token": token})
    slow = psycopg2.connect(database.url, application_name="attune-sse-tests-open")
    other = psycopg2.connect(database.url, application_name="attune-sse-tests-other")
    try:
        _update(slow, one, "running")  # and the transaction stays open
        with other.cursor() as cur:
            cur.execute("SET statement_timeout = '5s'")  # fails fast, not forever, if writers still queue
        began = time.monotonic()
        _update(other, two, "running")
        other.commit()
        took = time.monotonic() - began
        assert took < 1.0, f"a write of another execution waited {took:.2f}s for an open transaction"
        seen = live.events_until(lambda e: e["entity_id"] == two and e["data"]["status"] == "running")
        two_running = int(seen[-1].id)
        assert all(e.json["entity_id"] != one or e.json["data"]["status"] != "running" for e in seen)

        slow.commit()
        after = live.events_until(lambda e: e["entity_id"] == one and e["data"]["status"] == "running")
        one_running = int(after[-1].id)
        assert one_running > two_running, "the id is drawn at commit: after every event seen before it"
        resumed = Stream(server.base_url + STREAM, {"token": token, "last_event_id": two_running})
        replay = resumed.events_until(lambda e: e["event_id"] == one_running)
        assert [int(e.id) for e in replay if e.json["entity_id"] in (one, two)] == [one_running]
    finally:
        slow.close()
        other.close()


def test_a_commit_in_flight_holds_back_later_ids_until_it_lands(
    server: Any, token: str, database: Any, new_execution: Any, commit_control: Any
) -> None:
    held_execution, quick_execution = new_execution(), new_execution()
    live = Stream(server.base_url + STREAM, {"token": token})
    ((start,),) = database.query("SELECT max(id) FROM attune.execution_event")
    release = commit_control.release
    with release.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (RELEASE_KEY,))
    held = commit_control("hold")
    _update(held, held_execution, "running")
    committed = threading.Event()
    threading.Thread(target=lambda: (held.commit(), committed.set()), daemon=True).start()
    # The held commit has drawn its id once the record's sequence moved past it.
    wait_until(lambda: database.query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                      "AND objid = %s AND NOT granted", (RELEASE_KEY,))[0][0] == 1,
               10, "the commit to wait at the test's lock, its event id drawn")
    quick = commit_control()
    _update(quick, quick_execution, "running")
    quick.commit()
    (quick_id,) = _events_of(database, quick_execution)[-1:]
    assert not _events_of(database, held_execution)[1:], "the held event is not visible yet"

    # The quick event is in the record, but a lower id is in flight: nobody may receive it yet.
    assert quick_id not in [int(e.id) for e in _drain(live, 1.0)]
    resumed = Stream(server.base_url + STREAM, {"token": token, "last_event_id": start})
    assert quick_id not in [int(e.id) for e in _drain(resumed, 0.5)]

    with release.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(%s)", (RELEASE_KEY,))
    assert committed.wait(10)
    held_id = _events_of(database, held_execution)[-1]
    assert held_id < quick_id
    for stream in (live, resumed):
        events = stream.events_until(lambda e: e["event_id"] == quick_id)
        mine = [int(e.id) for e in events if e.json["entity_id"] in (held_execution, quick_execution)]
        assert mine[-2:] == [held_id, quick_id], "in id order, the held one first"
        ids = [int(e.id) for e in stream.received]
        assert ids == sorted(set(ids))


def test_an_id_whose_commit_failed_is_passed_within_moments(
    server: Any, token: str, database: Any, new_execution: Any, commit_control: Any
) -> None:
    failing_execution, next_execution = new_execution(), new_execution()
    live = Stream(server.base_url + STREAM, {"token": token})
    ((before,),) = database.query("SELECT last_value FROM attune.execution_event_id_seq")
    _, next_id = _fail_one_then_commit_another(commit_control, database, failing_execution,
                                                        next_execution)
    assert next_id > before + 1, "the failed commit drew an id that will never be in the record"

    began = time.monotonic()
    events = live.events_until(lambda e: e["event_id"] == next_id, timeout=5)
    waited = time.monotonic() - began
    assert waited < 2.0, f"the event after a failed commit waited {waited:.2f}s"
    assert all(e.json["entity_id"] != failing_execution or e.json["data"]["status"] != "running" for e in events)
    assert "drawn by transactions that did not commit" in server.log()


def test_10000_events_from_32_writers_each_client_gets_each_once_in_order_and_resume_is_complete(
    server: Any, token: str, database: Any, new_execution: Any, commit_control: Any
) -> None:
    executions = [new_execution() for _ in range(64)]
    url = server.base_url + STREAM
    ((start,),) = database.query("SELECT max(id) FROM attune.execution_event")
    clients = [Stream(url, {"token": token, "last_event_id": start}) for _ in range(4)]
    total, writers = 10_000, 32
    failed: list[BaseException] = []
    failed_commits: list[int] = []

    def write(n: int, seed: int) -> None:
        rng = random.Random(seed)
        conn = psycopg2.connect(database.url, application_name="attune-sse-tests-writer")
        try:
            made = 0
            while made < n:
                # Transactions of one to three changes; some roll back (no event at all).
                size = min(n - made, rng.randint(1, 3))
                with conn.cursor() as cur:
                    for execution_id in sorted(rng.sample(executions, size)):  # in one order: no deadlock
                        cur.execute("UPDATE attune.execution SET result = %s WHERE id = %s",
                                    (f'{{"w": {seed}}}', execution_id))
                chance = rng.random()
                if chance < 0.05:
                    conn.rollback()  # before the commit: no id drawn
                    continue
                if chance < 0.08:  # the commit fails after its ids were drawn
                    with conn.cursor() as cur:
                        cur.execute("SET LOCAL attune_test.commit = 'fail'")
                    with contextlib.suppress(psycopg2.errors.RaiseException):
                        conn.commit()
                    failed_commits.append(size)
                    continue
                conn.commit()
                made += size
        except BaseException as exc:  # reported by the test below
            failed.append(exc)
        finally:
            conn.close()

    shares = [total // writers + (1 if i < total % writers else 0) for i in range(writers)]
    threads = [threading.Thread(target=write, args=(share, i)) for i, share in enumerate(shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failed, failed
    assert failed_commits, "some commits failed after drawing their ids"
    recorded = [r[0] for r in database.query(
        "SELECT id FROM attune.execution_event WHERE id > %s AND execution = ANY(%s) ORDER BY id",
        (start, executions))]
    assert len(recorded) == total
    for client in clients:
        client.events_until(lambda e, last=recorded[-1]: e["event_id"] == last, timeout=60)
        ids = [int(e.id) for e in client.received if e.json["entity_id"] in executions]
        assert ids == recorded, "every event once, in id order"

    rng = random.Random(9)
    for after in [start, *rng.sample(recorded[:-1], 3)]:
        resumed = Stream(url, {"token": token, "last_event_id": after})
        replay = resumed.events_until(lambda e, last=recorded[-1]: e["event_id"] == last, timeout=30)
        resumed.close()
        assert [int(e.id) for e in replay if e.json["entity_id"] in executions] == \
            [i for i in recorded if i > after], f"resume from {after} is complete"


def _drain(stream: Stream, seconds: float) -> list[Any]:
    """Every event that arrives within ``seconds``."""
    events = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            events.append(stream.next_event(left))
        except AssertionError:
            break
    return events


def _first_block_and_ids(stream: Any, seconds: float) -> tuple[int, list[int]]:
    """The id of a raw stream's first (id-only) block, and the ids of the events read for ``seconds``."""
    deadline = time.monotonic() + seconds
    stream.sock.settimeout(0.05)
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):  # nothing in this slice of time
            stream.data += stream.sock.recv(65536)
    text = stream.body()[0].decode()
    first = text.split("\n\n")[0]
    assert first.startswith("id: ") and "data:" not in first, first
    return int(first.split("\n")[0][4:]), stream.event_ids()[1:]


def test_a_new_stream_never_sends_an_event_at_or_before_the_position_it_announced(
    server: Any, token: str, database: Any, new_execution: Any
) -> None:
    """Streams opened right after a commit, while a writer keeps the listeners busy: the events a
    stream sends are all after the id its first block gave (they used to include the commit just
    before it, when the listener was a moment behind)."""
    from helpers import RawStream

    busy = new_execution()
    stop = threading.Event()

    def keep_writing() -> None:
        conn = psycopg2.connect(database.url, application_name="attune-sse-tests-busy")
        conn.autocommit = True
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("UPDATE attune.execution SET result = '{\"busy\": true}' WHERE id = %s", (busy,))
        conn.close()

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    try:
        for _ in range(20):
            new_execution()  # committed just before the stream opens
            stream = RawStream(server.base_url, {"token": token})
            position, ids = _first_block_and_ids(stream, 0.3)
            stream.close()
            assert ids, "the busy writer's events came"
            assert min(ids) > position, f"announced {position}, then sent {[i for i in ids if i <= position]}"
            assert ids == sorted(set(ids))
    finally:
        stop.set()
        writer.join(10)


@contextlib.contextmanager
def _sequence_lock_squatter(database: Any) -> Iterator[Any]:
    """A session of a role that may only connect, holding the id sequence's lock in an open
    transaction: nextval() takes the lock before it checks privileges, and a savepoint keeps it."""
    role = "attune_test_squatter"
    database.query(f"DROP ROLE IF EXISTS {role}")
    database.query(f"CREATE ROLE {role} LOGIN PASSWORD 'squatter-password'")
    ((name, seq),) = database.query("SELECT current_database(), 'attune.execution_event_id_seq'::regclass::oid")
    database.query(f'GRANT CONNECT ON DATABASE "{name}" TO {role}')
    params = psycopg2.extensions.parse_dsn(database.url)
    conn = psycopg2.connect(**{**params, "user": role, "password": "squatter-password"})
    try:
        with conn.cursor() as cur:
            cur.execute("SAVEPOINT s")
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("SELECT nextval(%s::regclass)", (seq,))
            cur.execute("ROLLBACK TO SAVEPOINT s")
        held = database.query("SELECT count(*) FROM pg_locks WHERE relation = %s AND mode = 'RowExclusiveLock'",
                              (seq,))
        assert held[0][0] >= 1, "the squatter holds the sequence's lock"
        yield conn
    finally:
        conn.close()
        database.query(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_role_that_may_not_write_cannot_stall_delivery_or_a_starting_worker(
    server: Any, token: str, database: Any, start_server: Any, new_execution: Any, commit_control: Any
) -> None:
    from conftest import server_config

    failing_execution, next_execution = new_execution(), new_execution()
    live = Stream(server.base_url + STREAM, {"token": token})
    with _sequence_lock_squatter(database):
        writer, next_id = _fail_one_then_commit_another(commit_control, database, failing_execution,
                                                                 next_execution)
        live.events_until(lambda e: e["event_id"] == next_id, timeout=3)  # past the failed commit's id

        began = time.monotonic()
        fresh = start_server(server_config(database))
        assert time.monotonic() - began < 15, "a starting worker did not wait for the squatter"
        stream = Stream(fresh.base_url + STREAM, {"token": token})
        _update(writer, next_execution, "completed")
        writer.commit()
        stream.events_until(lambda e: e["entity_id"] == next_execution and e["data"]["status"] == "completed")


def test_a_flood_of_stale_doorbells_does_not_hold_back_an_event_after_a_failed_commit(
    server: Any, token: str, database: Any, new_execution: Any, commit_control: Any
) -> None:
    failing_execution, next_execution = new_execution(), new_execution()
    ((old_id, old_execution),) = database.query(
        "SELECT id, execution FROM attune.execution_event ORDER BY id DESC LIMIT 1")
    live = Stream(server.base_url + STREAM, {"token": token})
    stale = json.dumps({"entity_type": "execution", "entity_id": old_execution, "event_id": old_id})
    stop = threading.Event()

    def ring() -> None:  # a real event's doorbell, again and again: nothing new, yet never quiet
        conn = psycopg2.connect(database.url, application_name="attune-sse-tests-bell")
        conn.autocommit = True
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("SELECT pg_notify('attune_notifications', %s)", (stale,))
                time.sleep(0.002)
        conn.close()

    bell = threading.Thread(target=ring, daemon=True)
    bell.start()
    try:
        time.sleep(0.2)
        _, next_id = _fail_one_then_commit_another(commit_control, database, failing_execution,
                                                            next_execution)
        began = time.monotonic()
        live.events_until(lambda e: e["event_id"] == next_id, timeout=5)
        assert time.monotonic() - began < 2.0
    finally:
        stop.set()
        bell.join(5)
