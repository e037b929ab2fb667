"""The stream across workers and faults: several clients, lost LISTEN connections, departures."""

from __future__ import annotations

import os
import signal
from typing import Any

import requests

from helpers import streams_on_every_worker, wait_until


def test_two_workers_each_deliver_every_event(open_stream: Any, new_execution: Any, set_status: Any) -> None:
    streams = streams_on_every_worker(open_stream, 2, per_worker=2)
    execution_id = new_execution()
    statuses = ["scheduling", "scheduled", "running", "completed"]
    for status in statuses:
        set_status(execution_id, status)

    for stream in streams:
        events = stream.events_until(lambda e: e["entity_id"] == execution_id and e["data"]["status"] == "completed")
        mine = [e.json["data"]["status"] for e in events if e.json["entity_id"] == execution_id]
        assert mine == ["requested", *statuses], f"worker {stream.worker}"


def _restarted_listeners(database: Any, old: set[int], timeout: float) -> set[int]:
    # A stopped (SIGSTOP) backend still shows in pg_stat_activity: count the new ones.
    def fresh() -> set[int] | None:
        new = database.listener_pids() - old
        return new if len(new) >= len(old) else None

    return wait_until(fresh, timeout, "the instance's listener to reconnect with a new backend")


def test_listener_reconnects_after_pg_terminate_backend(
    database: Any, server: Any, open_stream: Any, new_execution: Any, set_status: Any
) -> None:
    streams = streams_on_every_worker(open_stream, 2)
    execution_id = new_execution()
    for stream in streams:
        stream.events_until(lambda e: e["entity_id"] == execution_id)

    old = database.listener_pids()
    assert len(old) == 1, "one LISTEN serves the instance's two workers"
    database.query("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (list(old),))
    # Changed while the listener is down: caught up from the event table after the reconnect.
    set_status(execution_id, "running")
    _restarted_listeners(database, old, timeout=10)
    set_status(execution_id, "completed")

    for stream in streams:
        events = stream.events_until(lambda e: e["entity_id"] == execution_id and e["data"]["status"] == "completed")
        assert [e.json["data"]["status"] for e in events] == ["running", "completed"]
    log = server.log()
    assert "listener: connection lost" in log
    assert "listener: reconnected" in log


def test_listener_notices_a_silent_dead_connection(
    database: Any, server: Any, open_stream: Any, new_execution: Any, set_status: Any
) -> None:
    """A backend that stops answering without closing its socket is given up within 10 s."""
    streams = streams_on_every_worker(open_stream, 2)
    old = database.listener_pids()
    for pid in old:
        os.kill(pid, signal.SIGSTOP)  # the socket stays open; nothing answers
    try:
        _restarted_listeners(database, old, timeout=10)
    finally:
        for pid in old:
            os.kill(pid, signal.SIGCONT)
    execution_id = new_execution()
    for stream in streams:
        stream.events_until(lambda e: e["entity_id"] == execution_id)
    assert "no answer to a ping" in server.log()


def _streams_per_worker(server: Any, worker: int) -> int:
    """Open streams of one worker, read from /readyz of whichever worker answers (retried)."""
    def ask() -> int | None:
        body = requests.get(server.base_url + "/readyz", timeout=5).json()["data"]
        return body["streams"] + 1 if body["pid"] == worker else None  # +1 so 0 is truthy

    return wait_until(ask, 10, f"/readyz answered by worker {worker}", interval=0.01) - 1


def test_client_that_disconnects_is_removed_from_hub(server: Any, open_stream: Any) -> None:
    stream = open_stream()
    worker = stream.worker
    # Streams of earlier tests leave within a keep-alive; then ours is the only one.
    wait_until(lambda: _streams_per_worker(server, worker) == 1, 10, "our stream to be the worker's only one")
    stream.close()
    # The server notices at its next write: the keep-alive, 1 s in the test config.
    wait_until(lambda: _streams_per_worker(server, worker) == 0, 10, "the stream to leave the hub")


def test_no_subscriber_leak_after_many_connect_disconnect_cycles(server: Any, token: str) -> None:
    url = server.base_url + "/api/v1/executions/stream"
    workers = set()
    for _ in range(300):
        response = requests.get(url, params={"token": token}, stream=True, timeout=10)
        assert response.status_code == 200
        workers.add(int(response.headers["X-Attune-Worker"]))
        response.close()
    for worker in workers:
        wait_until(lambda w=worker: _streams_per_worker(server, w) == 0, 15, f"worker {worker} to hold no stream")
