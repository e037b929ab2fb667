"""One LISTEN per instance, or per cluster through Redis: kill the one that LISTENs, restart the broker.

Each test runs four instances of two workers on the suite's database, opens
streams on every worker of every instance with clients that resume as a
browser does (Last-Event-ID), and makes 1,000 updates while it breaks
something. Every client must receive each of the 1,000 events once, in order.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import pytest
import requests
import sseclient

from attune_sse.testing import ServerProcess
from conftest import server_config
from helpers import Stream, restore_while_streaming, wait_until

# Four instances start, a thousand updates, up to three takeovers: more than the suite's 120 s when the machine is busy.
pytestmark = pytest.mark.timeout(300)

INSTANCES = 4
UPDATES = 1000
EXECUTIONS = 10
TAKEOVER_SECONDS = 5.0


class ResumingClient:
    """An SSE client in a thread that reconnects with Last-Event-ID whenever its stream ends, as EventSource does."""

    opened: ClassVar[list[ResumingClient]] = []  # closed after each test by ``_close_clients``

    def __init__(self, base_url: str, token: str) -> None:
        self.url = base_url + "/api/v1/executions/stream"
        self.token = token
        self.events: list[tuple[int, int]] = []  # (event id, execution id)
        self.workers: list[int] = []  # the worker of each connection
        self.last_id: int | None = None
        self.foreign = 0  # events the test forged as another deployment's
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        ResumingClient.opened.append(self)
        if not self._connected.wait(10):
            raise AssertionError(f"no stream from {base_url} within 10 s")

    @property
    def worker(self) -> int:
        return self.workers[0]

    def _run(self) -> None:
        while not self._stop.is_set():
            headers = {"Last-Event-ID": str(self.last_id)} if self.last_id is not None else {}
            try:
                response = requests.get(self.url, params={"token": self.token}, headers=headers, stream=True,
                                        timeout=(5, 30))
                if response.status_code == 200:
                    self._response = response
                    self.workers.append(int(response.headers["X-Attune-Worker"]))
                    self._connected.set()
                    for event in sseclient.SSEClient(response).events():
                        if event.id:
                            self.last_id = int(event.id)
                        if event.event == "message" and event.data:
                            doc = json.loads(event.data)
                            self.events.append((int(event.id), doc["entity_id"]))
                            self.foreign += "forged" in doc
                else:
                    response.close()
            except Exception:  # the stream broke (or close() closed it under the reader): reconnect, as a browser would
                pass
            time.sleep(0.05)

    def ids_of(self, executions: set[int], after: int) -> list[int]:
        return [event_id for event_id, execution in list(self.events) if execution in executions and event_id > after]

    def close(self) -> None:
        self._stop.set()
        if self._response is not None:
            self._response.close()
        self._thread.join(5)


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while ResumingClient.opened:
        ResumingClient.opened.pop().close()


@pytest.fixture
def fleet(database: Any, tmp_path: Any) -> Iterator[Callable[..., list[ServerProcess]]]:
    """Starts ``INSTANCES`` instances (in parallel) with extra config sections; stops them after the test."""
    started: list[ServerProcess] = []

    def start(count: int = INSTANCES, **sections: dict[str, Any]) -> list[ServerProcess]:
        config = server_config(database, **sections)
        config["database"].update(pool_size=3, backlog_pool_size=2)
        instances = [ServerProcess(config, tmp_path) for _ in range(count)]
        with ThreadPoolExecutor(count) as pool:
            for srv in pool.map(lambda s: s.start(timeout=60), instances):
                started.append(srv)
        return instances

    yield start
    for srv in started:
        srv.stop()


def clients_on_every_worker(instances: list[ServerProcess], token: str) -> dict[int, list[ResumingClient]]:
    """Per instance, clients until each of its workers serves two (opened four at a time: one after
    another, the busier worker tends to win every accept)."""
    clients: dict[int, list[ResumingClient]] = {}
    with ThreadPoolExecutor(4) as pool:
        for n, srv in enumerate(instances):
            mine: list[ResumingClient] = []
            deadline = time.monotonic() + 20
            while True:
                counts = Counter(c.worker for c in mine)
                if len(counts) >= srv.workers and all(v >= 2 for v in counts.values()):
                    break
                assert time.monotonic() < deadline, f"instance {n}: could not reach every worker: {counts}"
                for client in pool.map(lambda _, s=srv: ResumingClient(s.base_url, token), range(4)):
                    if counts[client.worker] < 2:
                        counts[client.worker] += 1
                        mine.append(client)
                    else:
                        client.close()
            clients[n] = mine
    return clients


def internals(srv: ServerProcess) -> dict[str, Any] | None:
    """The detailed /readyz of whichever worker answers, or None if it is not ready."""
    try:
        response = requests.get(srv.base_url + "/readyz", timeout=2)
    except requests.RequestException:
        return None
    return response.json()["data"] if response.status_code == 200 else None


def leader_of(srv: ServerProcess) -> int:
    return wait_until(lambda: (r := internals(srv)) and r["relay"]["leader_pid"], 10, "a leader's pid")


def publisher_pid(database: Any) -> int | None:
    rows = database.query("SELECT application_name FROM pg_stat_activity WHERE application_name LIKE "
                          "'attune-sse-publisher%%' AND datname = current_database()")
    return int(rows[0][0].split("pid=")[1].split()[0]) if rows else None


class Writer:
    """1,000 updates of ``EXECUTIONS`` executions, each its own commit, at about 150 per second."""

    def __init__(self, db: Any, executions: list[int]) -> None:
        self.db = db
        self.executions = executions
        self.done = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Writer:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with self.db.cursor() as cur:
                for n in range(UPDATES):
                    cur.execute("UPDATE attune.execution SET status = %s WHERE id = %s",
                                ("running" if n % 2 else "scheduled", self.executions[n % EXECUTIONS]))
                    self.done = n + 1
                    time.sleep(1 / 150)
        except BaseException as exc:  # the test reads it
            self.error = exc

    def wait_for(self, count: int) -> None:
        wait_until(lambda: self.done >= count or self.error, 30, f"{count} updates")
        assert self.error is None, self.error

    def join(self) -> None:
        self._thread.join(60)
        assert self.error is None, self.error
        assert self.done == UPDATES


def assert_everyone_got_everything(database: Any, clients: dict[int, list[ResumingClient]],
                                   executions: list[int], start: int) -> None:
    mine = set(executions)
    expected = [r[0] for r in database.query(
        "SELECT id FROM attune.execution_event WHERE execution = ANY(%s) AND id > %s ORDER BY id",
        (executions, start))]
    assert len(expected) == UPDATES
    for n, group in clients.items():
        for client in group:
            wait_until(lambda c=client: len(c.ids_of(mine, start)) >= UPDATES, 30,
                       f"instance {n}, worker {client.worker}: the 1,000 events "
                       f"(has {len(client.ids_of(mine, start))})")
            got = client.ids_of(mine, start)
            assert len(got) == len(set(got)), f"instance {n}: {len(got) - len(set(got))} duplicated"
            assert got == expected, f"instance {n}: every event once, in order"


def new_executions(new_execution: Callable[[], int], database: Any) -> tuple[list[int], int]:
    executions = [new_execution() for _ in range(EXECUTIONS)]
    ((start,),) = database.query("SELECT max(id) FROM attune.execution_event")
    return executions, start


def test_killing_each_instances_leader_loses_and_repeats_nothing(
    fleet: Any, database: Any, db: Any, token: str, new_execution: Any
) -> None:
    instances = fleet()
    wait_until(lambda: len(database.listener_pids()) >= INSTANCES, 10, "the instances' listeners")
    clients = clients_on_every_worker(instances, token)
    # One LISTEN per instance (the suite's own server holds one more).
    assert len(database.listener_pids()) == INSTANCES + 1
    executions, start = new_executions(new_execution, database)

    writer = Writer(db, executions).start()
    takeovers = []
    for n, srv in enumerate(instances):
        writer.wait_for(150 + 200 * n)
        leader = leader_of(srv)
        assert any(leader in c.workers for c in clients[n]), "the leader serves clients of its own"
        os.kill(leader, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda s=srv, k=leader: (r := internals(s)) and r["relay"]["leader_pid"] not in (None, k)
                   and r["feed"]["flowing"], TAKEOVER_SECONDS, f"instance {n}: a new leader")
        takeovers.append(time.monotonic() - killed_at)
    writer.join()

    assert_everyone_got_everything(database, clients, executions, start)
    for n, srv in enumerate(instances):
        assert "electing again" in srv.log() and "leads its instance (the previous leader is gone)" in srv.log()
        # The clients of the killed leader reconnected; the others kept their stream.
        assert any(len(c.workers) > 1 for c in clients[n]), f"instance {n}: nobody reconnected"
    wait_until(lambda: len(database.listener_pids()) == INSTANCES + 1, 10, "one LISTEN per instance again")
    print(f"takeover after SIGKILL of the leader: {', '.join(f'{t:.2f}s' for t in takeovers)}")


def test_killing_the_cluster_publisher_loses_and_repeats_nothing(
    fleet: Any, redis_server: Any, database: Any, db: Any, token: str, new_execution: Any
) -> None:
    instances = fleet(events={"fanout": "redis", "redis_url": redis_server["url"]})
    clients = clients_on_every_worker(instances, token)
    wait_until(lambda: publisher_pid(database), 10, "a publisher")
    # Four instances, one LISTEN for all of them (the suite's own server holds the other).
    wait_until(lambda: len(database.listener_pids()) == 2, 10, "one LISTEN for the four instances")
    executions, start = new_executions(new_execution, database)

    writer = Writer(db, executions).start()
    takeovers = []
    for count in (300, 700):
        writer.wait_for(count)
        publisher = publisher_pid(database)
        os.kill(publisher, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda p=publisher: publisher_pid(database) not in (None, p), TAKEOVER_SECONDS,
                   "another instance's worker to publish")
        takeovers.append(time.monotonic() - killed_at)
    writer.join()

    assert_everyone_got_everything(database, clients, executions, start)
    wait_until(lambda: len(database.listener_pids()) == 2, 10, "one LISTEN for the four instances, still")
    # The first publisher and the two that took over (of any instance: each instance's leader stands).
    assert sum(srv.log().count("publishes the cluster's events") for srv in instances) == 3
    print(f"takeover after SIGKILL of the publisher: {', '.join(f'{t:.2f}s' for t in takeovers)}")


def test_restarting_the_broker_loses_and_repeats_nothing(
    fleet: Any, redis_server: Any, database: Any, db: Any, token: str, new_execution: Any
) -> None:
    instances = fleet(events={"fanout": "redis", "redis_url": redis_server["url"]})
    clients = clients_on_every_worker(instances, token)
    wait_until(lambda: publisher_pid(database), 10, "a publisher")
    executions, start = new_executions(new_execution, database)

    writer = Writer(db, executions).start()
    writer.wait_for(300)
    redis_server["restart"](1.0)  # comes back empty: no persistence
    writer.join()

    assert_everyone_got_everything(database, clients, executions, start)
    logs = "".join(srv.log() for srv in instances)
    assert "reading attune:execution_events from Redis failed" in logs
    assert "writing to Redis failed" in logs, "the publisher had events to write while the broker was down"
    # Nobody had to reconnect: the instances waited for the broker and filled the hole.
    assert all(len(c.workers) == 1 for group in clients.values() for c in group)
    for srv in instances:
        wait_until(lambda s=srv: internals(s) is not None, 10, "the instance to be ready again")


def test_a_database_that_went_back_in_time_resets_every_instance_through_the_broker(
    fleet: Any, redis_server: Any, database: Any, token: str, new_execution: Any, set_status: Any
) -> None:
    """As tests/test_resume.py's restore, with the cluster's one LISTEN publishing to Redis: the
    stream is started over below where the readers are, and every instance follows."""
    instances = fleet(events={"fanout": "redis", "redis_url": redis_server["url"]})
    streams = [Stream(srv.base_url + "/api/v1/executions/stream", {"token": token})
               for srv in instances for _ in range(2)]
    wait_until(lambda: publisher_pid(database), 10, "a publisher")
    # The "restore", then the publisher's LISTEN reconnects to it.
    restore_while_streaming(database, streams, new_execution(), set_status, timeout=20)
    logs = "".join(srv.log() for srv in instances)
    assert "the database went back to event" in logs and "starting stream attune:execution_events over" in logs
    # Each instance learnt of the new history from the stream: its entries of the new history above
    # where it had read, or (if none came) the stream's end below it.
    assert "the history changed" in logs or "it was started over; reading it from the start" in logs


def test_what_else_writes_to_the_stream_or_does_to_redis_changes_nothing_clients_receive(
    fleet: Any, redis_server: Any, database: Any, db: Any, token: str, new_execution: Any
) -> None:
    """Redis is shared infrastructure: a stray entry above every id, a message of another deployment
    (another database, the same stream key), a failover that turns the server into a replica and back."""
    import redis

    from attune_sse.core.event import ExecutionEvent
    from attune_sse.runtime.message import Message, encode

    instances = fleet(2, events={"fanout": "redis", "redis_url": redis_server["url"]})
    clients = clients_on_every_worker(instances, token)
    wait_until(lambda: publisher_pid(database), 10, "a publisher")
    executions, start = new_executions(new_execution, database)
    broker = redis.Redis.from_url(redis_server["url"])
    key = "attune:execution_events"

    writer = Writer(db, executions).start()
    writer.wait_for(200)
    (top,) = broker.xrevrange(key, count=1)
    position = int(top[0].decode().split("-")[0])
    # Another deployment's publisher: a well-formed message naming one of our executions, from elsewhere.
    forged = ExecutionEvent.from_record(position + 1, executions[0], b'{"entity_type":"execution","forged":true}')
    broker.xadd(key, {"m": encode(Message(after=position, to=position + 1, events=[forged],
                                          source="00000000-0000-0000-0000-000000000000"))}, id=f"{position + 1}-*")
    writer.wait_for(400)
    broker.xadd(key, {"m": b"garbage"}, id=f"{position + 100_000}-0")  # far above every id: blocks our writes
    writer.wait_for(600)
    broker.execute_command("REPLICAOF", "127.0.0.1", "1")  # unblocks every XREAD with an error
    time.sleep(1.0)
    broker.execute_command("REPLICAOF", "NO", "ONE")
    writer.join()

    assert_everyone_got_everything(database, clients, executions, start)
    assert not [c for group in clients.values() for c in group if c.foreign], "another deployment's event"
    logs = "".join(srv.log() for srv in instances)
    assert "carries events of another database" in logs
    assert "is not a message of attune-sse: starting stream" in logs
    assert "Traceback" not in logs
    for srv in instances:
        wait_until(lambda s=srv: internals(s) is not None, 15, "every instance ready again")
