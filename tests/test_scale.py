"""Production behaviour: metrics, a client that never reads, two instances, SIGTERM with many streams.

Load figures (10,000 streams, fan-out latency, memory) come from bench/scale.py,
not from here: these tests check behaviour, with deadlines, never timings.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Any

import requests

from conftest import server_config
from helpers import RawStream, Stream, wait_until


def metric(base_url: str, name: str) -> float:
    """One sample of /metrics (the sum over the instance's workers)."""
    response = requests.get(base_url + "/metrics", timeout=5)
    assert response.status_code == 200
    match = re.search(rf"^{name} (\S+)$", response.text, re.MULTILINE)
    assert match, f"{name} not in /metrics:\n{response.text[:3000]}"
    return float(match.group(1))


def event_ids_of(db: Any, execution_id: int) -> list[int]:
    with db.cursor() as cur:
        cur.execute("SELECT id FROM attune.execution_event WHERE execution = %s ORDER BY id", (execution_id,))
        return [row[0] for row in cur.fetchall()]


def ids_until(stream: Stream, last_id: int, after: int, timeout: float = 20) -> list[int]:
    """Ids of the events a stream receives, past ``after``, up to ``last_id``."""
    events = stream.events_until(lambda doc: doc["event_id"] >= last_id, timeout)
    return [int(event.id) for event in events if int(event.id) > after]


def test_metrics_are_in_the_prometheus_text_format(
    server: Any, open_stream: Any, new_execution: Any, set_status: Any
) -> None:
    response = requests.get(server.base_url + "/metrics", timeout=5)
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    for name in ("attune_sse_open_streams", "attune_sse_listener_connected", "attune_sse_listener_lag_seconds",
                 "attune_sse_events_received", "attune_sse_events_delivered", "attune_sse_queue_drops",
                 "attune_sse_listener_reconnects"):
        assert re.search(rf"^# TYPE {name}(_total)? (gauge|counter)$", response.text, re.MULTILINE), name
    # Both workers' feeds count, whichever worker answers: the multiprocess sum; one LISTEN serves both.
    wait_until(lambda: metric(server.base_url, "attune_sse_listener_connected") == 2, 10,
               "both workers' feeds in the sum (each syncs once a second)")
    assert metric(server.base_url, "attune_sse_listen_connections") == 1

    delivered = metric(server.base_url, "attune_sse_events_delivered_total")
    received = metric(server.base_url, "attune_sse_events_received_total")
    stream = open_stream()
    wait_until(lambda: metric(server.base_url, "attune_sse_open_streams") >= 1, 10, "the open stream to show")
    execution_id = new_execution()
    set_status(execution_id, "running")
    stream.events_until(lambda doc: doc["entity_id"] == execution_id and doc["data"]["status"] == "running")
    # Each worker's hub received both events; our stream was sent them.
    wait_until(lambda: metric(server.base_url, "attune_sse_events_received_total") >= received + 4, 10,
               "both workers to count the two events")
    wait_until(lambda: metric(server.base_url, "attune_sse_events_delivered_total") >= delivered + 2, 10,
               "the deliveries to count")
    assert metric(server.base_url, "attune_sse_listener_lag_seconds") >= 0


def test_a_client_that_never_reads_is_dropped_and_the_others_get_everything(
    database: Any, start_server: Any, token: str, db: Any, new_execution: Any, set_status: Any
) -> None:
    # One worker, so the stalled client shares it with the 100 readers; a small queue
    # and send buffer, so it stalls after a few dozen events instead of thousands.
    config = server_config(database, server={
        "workers": 1, "sse_queue_size": 20, "sse_send_buffer_bytes": 16384, "sse_keepalive_seconds": 30,
    })
    srv = start_server(config)
    execution_id = new_execution()
    inserted = event_ids_of(db, execution_id)[-1]  # before the streams: it may or may not reach them
    url = srv.base_url + "/api/v1/executions/stream"
    params = {"token": token, "execution_id": execution_id}
    stalled = RawStream(srv.base_url, params, receive_buffer=4096)
    readers = [Stream(url, params) for _ in range(100)]
    wait_until(lambda: metric(srv.base_url, "attune_sse_open_streams") == 101, 10, "101 open streams")

    statuses = ["running", "scheduled"]
    updates = 0
    while metric(srv.base_url, "attune_sse_queue_drops_total") < 1:
        assert updates < 3000, "the client that never reads was never dropped"
        for _ in range(20):
            set_status(execution_id, statuses[updates % 2])
            updates += 1
        time.sleep(0.05)
    set_status(execution_id, "completed")
    expected = [i for i in event_ids_of(db, execution_id) if i > inserted]

    # Every reader got every event, in order, the stalled one notwithstanding.
    for reader in readers:
        assert ids_until(reader, expected[-1], after=inserted) == expected
    # The stalled client left the hub (its queue is freed) and its connection was dropped.
    wait_until(lambda: metric(srv.base_url, "attune_sse_open_streams") == 100, 10, "the stalled stream to go")
    assert stalled.read_until_closed(10), "the server closed the stalled connection"
    got = [i for i in stalled.event_ids() if i > inserted]
    assert got == expected[: len(got)] and len(got) < len(expected)
    # It resumes from the last event it read and misses nothing.
    resume_from = got[-1] if got else inserted
    resumed = Stream(url, params, headers={"Last-Event-ID": str(resume_from)})
    assert got + ids_until(resumed, expected[-1], after=resume_from) == expected
    assert "disconnecting a slow SSE client" in srv.log()


def test_two_instances_on_one_database_each_deliver_every_event(
    server: Any, database: Any, start_server: Any, token: str, db: Any, new_execution: Any, set_status: Any
) -> None:
    """Scale-out: PostgreSQL is the bus; a second gunicorn instance needs nothing else."""
    second = start_server(server_config(database))
    assert second.port != server.port
    # Two instances of two workers: one LISTEN each, whatever the number of workers.
    wait_until(lambda: len(database.listener_pids()) == 2, 10, "one LISTEN per instance")
    execution_id = new_execution()
    inserted = event_ids_of(db, execution_id)[-1]
    params = {"token": token, "execution_id": execution_id}
    streams = [Stream(base + "/api/v1/executions/stream", params)
               for base in (server.base_url, second.base_url) for _ in range(4)]
    for status in ("scheduled", "running", "completed"):
        set_status(execution_id, status)
    expected = [i for i in event_ids_of(db, execution_id) if i > inserted]
    assert len(expected) == 3
    for stream in streams:
        assert ids_until(stream, expected[-1], after=inserted) == expected


def test_sigterm_ends_every_stream_cleanly_and_the_workers_exit(
    database: Any, start_server: Any, token: str
) -> None:
    config = server_config(database, server={
        "sse_keepalive_seconds": 30, "sse_retry_ms": 1000, "sse_reconnect_spread_ms": 4000,
    })
    srv = start_server(config)
    streams = []
    try:
        streams = [RawStream(srv.base_url, {"token": token}) for _ in range(200)]
        wait_until(lambda: metric(srv.base_url, "attune_sse_open_streams") == 200, 15, "200 open streams")
        started = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(10) == 0
        elapsed = time.monotonic() - started
        retries = []
        for stream in streams:
            assert stream.read_until_closed(5), "the server closed the connection"
            body, clean = stream.body()
            assert clean, "the response ended with its final chunk: a clean end, not a cut"
            assert body.endswith(b": stream closed: shutdown\n\n"), body[-200:]
            retries.append(int(re.findall(rb"^retry: (\d+)$", body, re.MULTILINE)[-1]))
        # The reconnects are spread over [retry, retry + spread), not all at one instant.
        assert all(1000 <= r < 5000 for r in retries)
        assert max(retries) - min(retries) > 2000
        assert elapsed < 5, f"gunicorn took {elapsed:.1f}s to stop with 200 open streams"
        assert "Worker graceful timeout" not in srv.log()
    finally:
        for stream in streams:
            stream.close()

