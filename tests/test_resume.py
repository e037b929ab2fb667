"""Lossless delivery: Last-Event-ID resume, commit order, faults, pruning."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg2
import requests

from attune_sse.storage import record
from conftest import server_config
from helpers import Stream, restore_while_streaming, wait_until

STREAM = "/api/v1/executions/stream"


def _updater(database: Any, execution_id: int, count: int, pause: float = 0.0,
             done: threading.Event | None = None) -> threading.Thread:
    """A thread that makes ``count`` UPDATEs, retrying through database faults."""
    def run() -> None:
        made = 0
        conn = None
        while made < count:
            try:
                if conn is None or conn.closed:
                    conn = psycopg2.connect(database.url, connect_timeout=3)
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("UPDATE attune.execution SET result = %s WHERE id = %s",
                                (json.dumps({"n": made + 1}), execution_id))
                made += 1
                if pause:
                    time.sleep(pause)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                # The server is restarting: the UPDATE did not commit, so make it again.
                print(f"updater: {type(exc).__name__}: {exc}".strip())
                conn = None
                time.sleep(0.05)
        conn.close()
        if done is not None:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _numbers(events: list[Any], execution_id: int) -> list[int]:
    return [e.json["data"]["result"]["n"] for e in events
            if e.json["entity_id"] == execution_id and e.json["data"]["result"]]


def test_resume_after_disconnect_during_a_burst_of_1000(
    server: Any, token: str, new_execution: Any, database: Any
) -> None:
    execution_id = new_execution()
    url = server.base_url + STREAM
    first = Stream(url, {"token": token, "execution_id": execution_id})
    _updater(database, execution_id, 1000)
    before = [first.next_event(10) for _ in range(300)]
    first.close()

    second = Stream(url, {"token": token, "execution_id": execution_id},
                    headers={"Last-Event-ID": before[-1].id})
    after = second.events_until(lambda e: e["data"]["result"]["n"] == 1000, timeout=30)
    second.close()

    numbers = _numbers(before, execution_id) + _numbers(after, execution_id)
    assert numbers == list(range(1, 1001)), "every event exactly once, in order"
    ids = [int(e.id) for e in before + after]
    assert ids == sorted(set(ids))


def test_resume_by_query_parameter_and_bad_ids(server: Any, token: str, new_execution: Any,
                                               set_status: Any, database: Any) -> None:
    execution_id = new_execution()
    set_status(execution_id, "running")
    set_status(execution_id, "completed")
    ((first_id,),) = database.query(
        "SELECT min(id) FROM attune.execution_event WHERE execution = %s", (execution_id,))
    stream = Stream(server.base_url + STREAM,
                    {"token": token, "execution_id": execution_id, "last_event_id": first_id})
    events = stream.events_until(lambda e: e["data"]["status"] == "completed")
    stream.close()
    assert [e.json["data"]["status"] for e in events] == ["running", "completed"]

    for bad in ("abc", "-1", "1.5", "99999999999999999999999"):
        response = requests.get(server.base_url + STREAM, params={"token": token},
                                headers={"Last-Event-ID": bad}, timeout=10)
        assert response.status_code == 400, bad
        assert response.json()["code"] == "VALIDATION_ERROR"


def test_every_event_arrives_through_listener_kills_and_a_database_restart(
    database: Any, server: Any, token: str, new_execution: Any
) -> None:
    execution_id = new_execution()
    url = server.base_url + STREAM
    streams = [Stream(url, {"token": token, "execution_id": execution_id}) for _ in range(4)]
    total = 400
    done = threading.Event()
    _updater(database, execution_id, total, pause=0.01, done=done)

    for _ in range(5):
        time.sleep(0.3)
        old = database.listener_pids()
        database.query("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (list(old),))
    assert database.embedded is not None, "the restart needs the suite's own embedded server"
    database.embedded.stop("fast")
    database.embedded.start()
    assert done.wait(60), "the updater finished"

    received_by_stream = []
    for stream in streams:
        try:
            events = stream.events_until(lambda e: e["data"]["result"] and e["data"]["result"]["n"] == total,
                                         timeout=30)
            received_by_stream.append(_numbers(stream.received, execution_id))
        finally:
            stream.close()
        assert events
    # The HTTP streams stayed open throughout: only the listeners reconnected and caught up.
    for numbers in received_by_stream:
        assert numbers == list(range(1, total + 1))
    server.wait_ready()


def test_prune_then_resume_from_behind_the_window_gets_reset(
    server: Any, token: str, database: Any, new_execution: Any, set_status: Any
) -> None:
    execution_id = new_execution()
    ((old_id,),) = database.query("SELECT max(id) FROM attune.execution_event")
    for status in ("scheduling", "scheduled", "running"):
        set_status(execution_id, status)
    conn = database.connect()
    try:
        with conn.cursor() as cur:
            deleted, horizon = record.prune(cur, keep_last=1)
    finally:
        conn.close()
    assert deleted >= 3 and horizon > old_id

    stream = Stream(server.base_url + STREAM, {"token": token}, headers={"Last-Event-ID": str(old_id)})
    reset = stream.next_event()
    assert reset.event == "reset"
    assert reset.json["resumed_from_event_id"] == horizon
    assert int(reset.id) == horizon
    set_status(execution_id, "completed")
    after = stream.events_until(lambda e: e.get("entity_id") == execution_id and e["data"]["status"] == "completed")
    assert after[-1].event == "message"
    stream.close()


def test_worker_killed_costs_only_a_reconnect(
    database: Any, start_server: Any, token: str, new_execution: Any, set_status: Any
) -> None:
    srv = start_server(server_config(database))
    execution_id = new_execution()
    url = srv.base_url + STREAM
    stream = Stream(url, {"token": token, "execution_id": execution_id})
    set_status(execution_id, "running")
    last = stream.events_until(lambda e: e["data"]["status"] == "running")[-1]
    os.kill(stream.worker, signal.SIGKILL)
    assert stream.ended(10), "the killed worker's stream ended"
    set_status(execution_id, "completed")  # while the client is away
    srv.wait_ready()
    again = Stream(url, {"token": token, "execution_id": execution_id}, headers={"Last-Event-ID": last.id})
    events = again.events_until(lambda e: e["data"]["status"] == "completed")
    assert [e.json["data"]["status"] for e in events] == ["completed"]
    again.close()


def test_workers_prune_on_schedule(database: Any, start_server: Any, new_execution: Any, set_status: Any) -> None:
    execution_id = new_execution()
    for status in ("scheduling", "scheduled", "running"):
        set_status(execution_id, status)
    ((newest,),) = database.query("SELECT max(id) FROM attune.execution_event")
    config = server_config(database, events={"retention_count": 1, "prune_interval_seconds": 0.5})
    srv = start_server(config)
    wait_until(lambda: database.query("SELECT pruned_to FROM attune.execution_event_horizon")[0][0]
               >= newest - 1, 10, "a worker to prune the record")
    assert database.query("SELECT count(*) FROM attune.execution_event WHERE id < %s", (newest,))[0][0] == 0
    assert "pruned" in srv.log()


def test_a_new_stream_is_told_its_position_so_a_reconnect_before_any_event_misses_nothing(
    server: Any, token: str, db: Any, new_execution: Any, set_status: Any
) -> None:
    """A client that connected, got no event, and lost its connection (a server restart, say)
    reconnects with the Last-Event-ID the first block gave it: what was committed meanwhile comes."""
    from helpers import RawStream

    fresh = RawStream(server.base_url, {"token": token})
    fresh.sock.settimeout(5)
    while b"\r\n\r\n" not in fresh.data or b"\n\n" not in fresh.body()[0]:
        fresh.data += fresh.sock.recv(4096)
    first_block = fresh.body()[0].split(b"\n\n")[0].decode()
    position = int(first_block.split("id: ")[1].split("\n")[0])
    with db.cursor() as cur:
        cur.execute("SELECT max(id) FROM attune.execution_event")
        newest = cur.fetchone()[0] or 0
    assert 0 < position <= newest  # the worker's position: an id the record issued
    fresh.close()  # the connection breaks before any event came

    execution_id = new_execution()
    set_status(execution_id, "running")
    resumed = Stream(server.base_url + "/api/v1/executions/stream", {"token": token},
                     headers={"Last-Event-ID": str(position)})
    events = resumed.events_until(lambda doc: doc["entity_id"] == execution_id and doc["data"]["status"] == "running")
    assert [e.json["data"]["status"] for e in events if e.json["entity_id"] == execution_id] == ["requested",
                                                                                                  "running"]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class _PeakRss:
    """The highest RSS of a process while the ``with`` block runs, sampled every few milliseconds."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, _rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.003):
            self.peak = max(self.peak, _rss(self.pid))

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _resume_and_count(url: str, params: dict[str, Any], events: int) -> int:
    """Read a resumed stream until ``events`` events arrived; return the bytes read. The test
    process keeps nothing of them, so the worker's memory is what the figures show."""
    with requests.get(url, params=params, stream=True, timeout=(5, 60)) as response:
        assert response.status_code == 200, response.text
        # Each event is a block "id: N\\ndata: ...\\n\\n" after the blank line that ends the one before.
        mark = b"\n\nid: "
        seen, received, tail = 0, 0, b""
        for chunk in response.iter_content(1 << 20):
            received += len(chunk)
            seen += (tail + chunk).count(mark) - tail.count(mark)
            tail = (tail + chunk)[-len(mark) + 1:]
            if seen == events and chunk.endswith(b"\n\n"):
                return received
    raise AssertionError(f"the stream ended after {seen} of {events} events")


MiB = 1024 * 1024


def test_a_resume_over_large_results_holds_about_a_page_and_gives_the_memory_back(
    database: Any, start_server: Any, token: str, new_execution: Any, db: Any
) -> None:
    """20 events with 4 MB results: one resuming client grows its worker by at most 64 MiB, four at
    once by at most 128 MiB, and the worker's memory comes back down after."""
    srv = start_server(server_config(database, server={"workers": 1}))
    execution_id = new_execution()
    ((start,),) = database.query("SELECT max(id) FROM attune.execution_event")
    with db.cursor() as cur:
        for n in range(20):
            cur.execute("UPDATE attune.execution SET result = jsonb_build_object('n', %s::int, 'blob', %s) "
                        "WHERE id = %s", (n, f"{n:02d}" * (2 * MiB), execution_id))
    ((last,),) = database.query("SELECT max(id) FROM attune.execution_event")
    ready = wait_until(lambda: (r := requests.get(srv.base_url + "/readyz", timeout=5).json()["data"])
                       ["feed"]["position"] >= last and r, 30, "the listener to publish the 20 events")
    worker = ready["pid"]
    url, params = srv.base_url + STREAM, {"token": token, "execution_id": execution_id, "last_event_id": start}
    baseline = _rss(worker)

    with _PeakRss(worker) as one:
        assert _resume_and_count(url, params, 20) > 20 * 4 * MiB
    with _PeakRss(worker) as four, ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda _: _resume_and_count(url, params, 20), range(4)))
    assert all(size > 20 * 4 * MiB for size in sizes)
    print(f"worker RSS: baseline {baseline / MiB:.0f} MiB, one client +{(one.peak - baseline) / MiB:.0f} MiB, "
          f"four clients +{(four.peak - baseline) / MiB:.0f} MiB")
    assert one.peak - baseline <= 64 * MiB
    assert four.peak - baseline <= 128 * MiB
    wait_until(lambda: _rss(worker) <= baseline + 16 * MiB, 10, "the worker to give the memory back")


def test_a_resume_from_an_id_never_issued_gets_a_reset_then_live_events(
    server: Any, token: str, database: Any, new_execution: Any, set_status: Any
) -> None:
    ((newest,),) = database.query("SELECT coalesce(max(id), 0) FROM attune.execution_event")
    stream = Stream(server.base_url + STREAM, {"token": token}, headers={"Last-Event-ID": str(newest + 10**9)})
    reset = stream.next_event()
    assert reset.event == "reset" and reset.json["reason"].startswith("unknown event id")
    execution_id = new_execution()
    set_status(execution_id, "running")
    events = stream.events_until(lambda e: e.get("entity_id") == execution_id and e["data"]["status"] == "running")
    assert int(events[-1].id) > int(reset.id)


def test_a_database_that_went_back_in_time_resets_the_streams_and_delivery_goes_on(
    database: Any, start_server: Any, token: str, new_execution: Any, set_status: Any
) -> None:
    """As after a restore from a backup, or a failover to a replica that was behind: the listeners
    reconnect to a record whose newest event is below what they published."""
    srv = start_server(server_config(database))
    url = srv.base_url + STREAM
    streams = [Stream(url, {"token": token}) for _ in range(4)]
    restore_while_streaming(database, streams, new_execution(), set_status)
    assert "it was restored or failed over; telling clients to reload" in srv.log()
