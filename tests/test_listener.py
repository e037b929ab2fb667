"""The listener: in this process against the real PostgreSQL, and on the server against forged notifications."""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

import gevent
import psycopg2
import psycopg2.extensions
import requests

from attune_sse.core.hub import Hub
from attune_sse.runtime.feed import Feed
from attune_sse.runtime.listener import Listener, ListenerSettings
from attune_sse.storage.db import Pool, make_psycopg2_green
from helpers import Stream, streams_on_every_worker, wait_until


def test_listener_waits_on_a_descriptor_above_1024(database: Any, db: Any, new_execution: Any) -> None:
    """A worker holding thousands of streams gives a (re)connecting listener a descriptor
    above 1024, where select() fails: the listener must wait another way."""
    fillers = [socket.socket() for _ in range(1100)]
    make_psycopg2_green()
    hub, pool = Hub(), Pool(database.url, 1)
    listener = Listener(database.url, Feed(hub, pool), settings=ListenerSettings(ping_interval=1.0))
    try:
        sub = hub.subscribe()
        listener.start()
        with gevent.Timeout(10):
            while not listener.connected:
                gevent.sleep(0.01)
        highest_filler = max(filler.fileno() for filler in fillers)
        assert highest_filler > 1024
        assert [fd for fd in _open_fds() if fd > highest_filler], "the listener's socket came after the fillers"
        execution_id = new_execution()
        with gevent.Timeout(10):
            while True:
                batch = sub.next_batch(0.1)
                if any(event.entity_id == execution_id for event in batch):
                    break
        assert listener.connected
    finally:
        listener.stop()
        pool.close()
        psycopg2.extensions.set_wait_callback(None)
        for filler in fillers:
            filler.close()


def _open_fds() -> list[int]:
    return [int(fd) for fd in os.listdir("/proc/self/fd")]


FORGER = "attune_test_forger"


def _forger(database: Any) -> Any:
    """A session of a role that may only connect: any such role can NOTIFY on any channel."""
    database.query(f"DROP ROLE IF EXISTS {FORGER}")
    database.query(f"CREATE ROLE {FORGER} LOGIN PASSWORD 'forger-password'")
    ((name,),) = database.query("SELECT current_database()")
    database.query(f'GRANT CONNECT ON DATABASE "{name}" TO {FORGER}')
    params = psycopg2.extensions.parse_dsn(database.url)
    conn = psycopg2.connect(**{**params, "user": FORGER, "password": "forger-password"})
    conn.autocommit = True
    return conn


def _rejected(server: Any) -> dict[str, float]:
    text = requests.get(server.base_url + "/metrics", timeout=5).text
    return {kind: float(value) for kind, value in
            re.findall(r'^attune_sse_notifications_rejected_total\{kind="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def test_forged_notifications_change_nothing_clients_receive(
    database: Any, server: Any, token: str, new_execution: Any, set_status: Any
) -> None:
    execution_id = new_execution()
    ((newest,),) = database.query("SELECT max(id) FROM attune.execution_event")
    url = server.base_url + "/api/v1/executions/stream"
    streams = streams_on_every_worker(lambda: Stream(url, {"token": token, "execution_id": execution_id}),
                                      server.workers, per_worker=2)
    listens = 1  # the instance's workers share one LISTEN: it alone reads, and counts, what is on the channel
    everything = Stream(url, {"token": token})
    before = _rejected(server)
    forgeries = {
        "not_json": ["not json at all", "x" * 7999, "[" * 5000],
        "not_an_event": ["[]", '{"entity_type": "pack", "entity_id": 1, "event_id": 1}',
                         f'{{"entity_type": "execution", "entity_id": {10**30}, "event_id": 5}}'],
        "unknown_event": [
            # ahead of anything the record holds: it used to stop live delivery for everyone
            f'{{"entity_type": "execution", "entity_id": {execution_id}, "event_id": 9223372036854775807}}',
            # behind, naming an execution that has no such event
            '{"entity_type": "execution", "entity_id": 9223372036854775807, "event_id": 1}',
            # a real event's id, for another execution
            f'{{"entity_type": "execution", "entity_id": {execution_id + 1}, "event_id": {newest}, "truncated": true}}',
        ],
    }
    # The seed's shape, with the next id and made-up data: it must never reach a client.
    hacked = json.dumps({"entity_type": "execution", "entity_id": execution_id, "event_id": newest + 1,
                         "timestamp": "2026-01-01T00:00:00+00:00",
                         "data": {"id": execution_id, "status": "hacked", "result": {"owned": True}}})
    forger = _forger(database)
    try:
        with forger.cursor() as cur:
            for payloads in forgeries.values():
                for payload in payloads:
                    cur.execute("SELECT pg_notify('attune_notifications', %s)", (payload,))
            cur.execute("SELECT pg_notify('attune_notifications', %s)", (hacked,))
            for n in range(1, 101):
                set_status(execution_id, "running" if n % 2 else "scheduled")
                if n % 10 == 0:  # forgeries keep coming between the real events
                    cur.execute("SELECT pg_notify('attune_notifications', %s)", (forgeries["unknown_event"][0],))
                    cur.execute("SELECT pg_notify('attune_notifications', %s)", (hacked,))
    finally:
        forger.close()
        database.query(f"DROP OWNED BY {FORGER}; DROP ROLE {FORGER}")

    real = [r[0] for r in database.query(
        "SELECT id FROM attune.execution_event WHERE execution = %s AND id > %s ORDER BY id",
        (execution_id, newest))]
    assert len(real) == 100
    for stream in [*streams, everything]:
        events = stream.events_until(lambda e: e["event_id"] == real[-1], timeout=20)
        mine = [e for e in events if e.json["entity_id"] == execution_id and int(e.id) > newest]
        assert [int(e.id) for e in mine] == real, f"worker {stream.worker}: exactly the 100, in order"
        assert all(e.json["data"]["status"] in ("running", "scheduled") for e in mine)
        assert all(e.json["event_id"] <= real[-1] for e in events)

    wanted = {kind: before.get(kind, 0) + len(payloads) * listens for kind, payloads in forgeries.items()}
    wanted["unknown_event"] += 10 * listens  # the far-ahead one, ten times more
    wait_until(lambda: all(_rejected(server).get(k, 0) >= v for k, v in wanted.items()), 10,
               f"the rejected notifications to be counted: {wanted}, counted {_rejected(server)}")
    counted = _rejected(server)
    assert counted["not_json"] == wanted["not_json"] and counted["not_an_event"] == wanted["not_an_event"]
    # The made-up next event is counted unless the real one with that id and execution was recorded first.
    assert wanted["unknown_event"] <= counted["unknown_event"] <= wanted["unknown_event"] + 11 * listens
    log = server.log()
    for kind in forgeries:
        assert log.count(f'attune_sse_notifications_rejected_total{{kind="{kind}"}}') == listens, kind
    assert requests.get(server.base_url + "/readyz", timeout=5).status_code == 200
