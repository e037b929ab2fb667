"""The Redis broker on its own (runtime/broker.py), in this process: no gunicorn.

Two "instances" (each a worker that leads itself: a hub, its feed, a
BrokerSource) on the suite's database and a redis-server of the test's own.
One of them wins the cluster's lock and runs the only LISTEN, appending to the
stream; both read the stream. The tests break the broker's side and assert
on the sources' counters (``stats()``) and that every event reached both hubs
once, in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import gevent.socket
import psycopg2.extensions
import pytest
import redis
import redis.connection
from inprocess import Worker, recorded, until

from attune_sse.config import load_config
from attune_sse.runtime import broker
from attune_sse.runtime.listener import ListenerSettings
from attune_sse.storage.db import make_psycopg2_green

KEY = "attune:test_broker"


@pytest.fixture
def instances(database: Any, redis_server: dict[str, Any],
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[Worker]]]:
    """Makes two instances on the test's Redis; stops them after the test."""
    # gunicorn's workers are patched by gevent; this process is not: redis-py gets gevent's sockets here.
    monkeypatch.setattr(redis.connection, "socket", gevent.socket)
    make_psycopg2_green()
    config = load_config(environ={}, overrides={
        "database.url": database.url, "security.jwt_secret": "s", "events.fanout": "redis",
        "events.redis_url": redis_server["url"], "events.redis_stream": KEY})
    make_source = broker.stream(config, database.url, ListenerSettings(ping_interval=1.0, reconnect_max_delay=1.0))
    made: list[Worker] = []

    def make() -> list[Worker]:
        made.extend(Worker(database.url, None, make_source) for _ in range(2))
        for worker in made:
            worker.relay.start()
        until(lambda: all(w.relay.source is not None and w.feed.flowing for w in made), 15, "both instances to read")
        until(lambda: sum(_stats(w)["publishing"] for w in made) == 1, 15, "one publisher for the cluster")
        return made

    yield make
    for worker in made:
        worker.stop()
    psycopg2.extensions.set_wait_callback(None)


@pytest.fixture
def admin(redis_server: dict[str, Any]) -> Iterator[redis.Redis]:
    """The test's own connection to its Redis, as an operator's (or a failover's) would be."""
    client = redis.Redis.from_url(redis_server["url"])
    yield client
    client.close()


def _stats(worker: Worker) -> dict[str, Any]:
    source = worker.relay.source
    assert isinstance(source, broker.BrokerSource)
    return source.stats()


def _write(db: Any, execution: int, n: int) -> None:
    with db.cursor() as cur:
        cur.execute("UPDATE attune.execution SET result = %s WHERE id = %s", (json.dumps({"n": n}), execution))


def test_an_unblocked_read_and_a_restarted_read_lose_nothing(
    instances: Callable[[], list[Worker]], admin: redis.Redis, database: Any, db: Any, new_execution: Any
) -> None:
    """Redis ends a blocked XREAD with an error (as a failover does, ``CLIENT UNBLOCK ... ERROR``): the
    reader waits it out and reads on from where it was."""
    workers = instances()
    execution = new_execution()
    executions = {execution}
    unblocked = 0
    for n in range(30):
        _write(db, execution, n)
        if n % 10 == 5:
            for client in admin.client_list():
                if client.get("cmd") == "xread":
                    unblocked += admin.client_unblock(client["id"], error=True)
        gevent.sleep(0.02)
    assert unblocked >= 2, "the readers were blocked in XREAD, and Redis ended their reads with an error"
    until(lambda: all(len(w.ids_of(executions)) == 31 for w in workers), 15, "every event at both instances")
    for worker in workers:
        assert worker.ids_of(executions) == recorded(database, executions), "each event once, in order"
    assert sum(_stats(w)["errors"] for w in workers) >= unblocked
    assert sum(w.feed.stats()["filled"] for w in workers) == 0, "nothing was lost from the stream"


def test_an_entry_redis_refuses_starts_the_stream_over_and_readers_follow_it(
    instances: Callable[[], list[Worker]], admin: redis.Redis, database: Any, db: Any, new_execution: Any
) -> None:
    """A stray entry far above every id (not one of ours): Redis refuses the publisher's next entry,
    the publisher starts the stream over, and the readers, now above the stream's end, read it from
    its start; the feed drops what they had."""
    workers = instances()
    execution = new_execution()
    executions = {execution}
    for n in range(5):
        _write(db, execution, n)
    until(lambda: all(len(w.ids_of(executions)) == 6 for w in workers), 10, "the first events at both instances")
    (top,) = admin.xrevrange(KEY, count=1)
    position = int(top[0].decode().split("-")[0])
    admin.xadd(KEY, {"m": b"not a message"}, id=f"{position + 100_000}-0")
    until(lambda: all(_stats(w)["skipped"] == 1 for w in workers), 10, "both readers to skip the stray entry")
    for n in range(5, 10):
        _write(db, execution, n)
    publisher = next(w for w in workers if _stats(w)["publishing"])
    source = publisher.relay.source
    assert isinstance(source, broker.BrokerSource)
    until(lambda: source.publisher.refused >= 1, 10, "Redis to refuse the publisher's entry")
    until(lambda: all(_stats(w)["restarts"] >= 1 for w in workers), 15, "both readers to read the new stream")
    until(lambda: all(len(w.ids_of(executions)) == 11 for w in workers), 15, "every event at both instances")
    for worker in workers:
        assert worker.ids_of(executions) == recorded(database, executions), "each event once, in order"
