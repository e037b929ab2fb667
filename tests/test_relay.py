"""The instance's relay on its own (runtime/election.py, followers.py), in this process: no gunicorn.

Each "worker" here is a hub, its feed and its relay, in one process, with a
real flock on a file in the test's relay folder, a real Unix socket between
leader and followers, and the leader's real LISTEN on the suite's database.
The tests assert on each stage's state and counters (``stats()``), and that
every event reached every hub once, in order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import psycopg2.extensions
import pytest
from gevent import socket
from inprocess import Worker, recorded, until

from attune_sse.runtime.election import SOCKET_FILE
from attune_sse.runtime.listener import ListenerSettings
from attune_sse.runtime.sources import listen
from attune_sse.storage.db import make_psycopg2_green


@pytest.fixture
def workers(database: Any, tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    """Makes workers of one instance (they share the test's relay folder); stops them after the test."""
    make_psycopg2_green()
    made: list[Worker] = []
    make_source = listen(database.url, ListenerSettings(ping_interval=1.0, ping_timeout=2.0, reconnect_max_delay=1.0))

    def make() -> Worker:
        worker = Worker(database.url, tmp_path, make_source)
        made.append(worker)
        worker.relay.start()
        return worker

    yield make
    for worker in made:
        worker.stop()
    psycopg2.extensions.set_wait_callback(None)


def leader_and_follower(make: Callable[[], Worker]) -> tuple[Worker, Worker]:
    leader = make()
    until(lambda: leader.relay.role == "leader" and leader.feed.flowing, 10, "the first worker to lead")
    follower = make()
    until(lambda: follower.relay.role == "follower" and leader.relay.stats()["followers"] == 1
          and follower.feed.flowing, 10, "the second worker to follow")
    return leader, follower


def test_one_worker_leads_and_another_takes_over_from_its_own_position(
    workers: Callable[[], Worker], database: Any, new_execution: Any, set_status: Any
) -> None:
    leader, follower = leader_and_follower(workers)
    assert leader.relay.listener is not None and follower.relay.listener is None, "one LISTEN for the instance"
    assert follower.relay.stats()["leader_pid"] == os.getpid()
    execution = new_execution()
    for status in ("scheduling", "scheduled", "running"):
        set_status(execution, status)
    executions = {execution}
    until(lambda: len(follower.ids_of(executions)) == 4, 10, "the follower to get the first four events")
    assert leader.ids_of(executions) == follower.ids_of(executions) == recorded(database, executions)

    leader.relay.stop()  # its worker stops: the follower sees the socket close and takes the lock
    until(lambda: follower.relay.role == "leader", 10, "the follower to take the lead")
    assert follower.relay.elections == 1 and follower.relay.listener is not None
    second = new_execution()
    set_status(second, "running")
    set_status(execution, "completed")
    executions.add(second)
    until(lambda: len(follower.ids_of(executions)) == 7, 10, "the new leader to publish what came after")
    assert follower.ids_of(executions) == recorded(database, executions), "each event once, in order"
    assert follower.feed.stats()["filled"] == 0, "the new leader read on from its own position: no hole to fill"


def test_a_follower_dropped_at_its_bound_comes_back_with_a_fill_from_the_record(
    workers: Callable[[], Worker], database: Any, db: Any, new_execution: Any
) -> None:
    leader, follower = leader_and_follower(workers)
    followers = leader.relay.followers
    assert followers is not None
    followers.max_messages = 3  # a follower 3 messages behind (past what the kernel buffers) is dropped
    stalled = gevent.event.Event()
    apply = follower.feed.send

    def stalled_send(message: Any) -> None:
        stalled.wait()  # the follower's worker is busy: it reads nothing from the leader meanwhile
        apply(message)

    follower.feed.send = stalled_send  # type: ignore[method-assign]
    execution = new_execution()
    executions = {execution}
    big = json.dumps({"log": "x" * 200_000})  # each event ~200 KB: a few fill the socket's buffers
    for n in range(12):
        with db.cursor() as cur:
            cur.execute("UPDATE attune.execution SET result = %s::jsonb || jsonb_build_object('n', %s) "
                        "WHERE id = %s", (big, n, execution))
        until(lambda n=n: len(leader.ids_of(executions)) == n + 2, 10, f"the leader to publish update {n}")
    until(lambda: leader.relay.stats()["followers_dropped"] == 1, 10, "the leader to drop its stalled follower")
    follower.feed.send = apply  # type: ignore[method-assign]
    stalled.set()
    until(lambda: len(follower.ids_of(executions)) == 13, 15, "the follower to come back with every event")
    assert follower.ids_of(executions) == recorded(database, executions), "each event once, in order"
    assert follower.feed.stats()["filled"] > 0, "what the dropped connection lost was read from the record"
    until(lambda: leader.relay.stats()["followers"] == 1, 10, "the follower to be back on the socket")


def test_a_leader_whose_socket_file_is_replaced_steps_down_and_the_workers_elect_again(
    workers: Callable[[], Worker], database: Any, new_execution: Any, set_status: Any, tmp_path: Path
) -> None:
    first, second = leader_and_follower(workers)
    path = tmp_path / SOCKET_FILE
    path.unlink()  # a /tmp cleaner, or another program, takes the path
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    impostor.bind(str(path))
    try:
        until(lambda: first.relay.elections + second.relay.elections == 2
              and {first.relay.role, second.relay.role} == {"leader", "follower"}
              and first.feed.flowing and second.feed.flowing, 15, "the workers to elect again")
    finally:
        impostor.close()
    execution = new_execution()
    set_status(execution, "running")
    executions = {execution}
    until(lambda: len(first.ids_of(executions)) == len(second.ids_of(executions)) == 2, 10,
          "both workers to get the events after the election")
    assert first.ids_of(executions) == second.ids_of(executions) == recorded(database, executions)
