"""Time from an UPDATE's commit to its arrival: the SSE pipeline against a raw LISTEN.

    .venv/bin/python bench/latency.py [--updates 100] [--workers 2]

Starts an embedded PostgreSQL (or uses ATTUNE_BENCH_DATABASE_URL) and a real
gunicorn with gevent workers, then makes UPDATEs one at a time. Each is timed
to its arrival at (a) an SSE client of the service, read with sseclient-py,
and (b) a plain psycopg2 connection LISTENing on the same channel: the floor
PostgreSQL itself sets, measured in the same run. Prints a table with the
ratio of each row to that baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import requests
import sseclient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attune_sse.embedded import EmbeddedPostgres
from attune_sse.migrate import apply_migrations
from attune_sse.testing import ServerProcess

SECRET = "benchmark-secret-benchmark-secret-0123456789"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Arrivals:
    """event_id -> perf_counter() at arrival, filled by a reader thread."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self.cond = threading.Condition()

    def record(self, event_id: int) -> None:
        now = time.perf_counter()
        with self.cond:
            self.times.setdefault(event_id, now)
            self.cond.notify_all()

    def wait(self, event_id: int, timeout: float) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: event_id in self.times, timeout):
                raise TimeoutError(f"event {event_id} did not arrive within {timeout}s")
            return self.times[event_id]


def read_sse(url: str, token: str, execution_id: int, arrivals: Arrivals, connected: threading.Event) -> None:
    response = requests.get(url, params={"token": token, "execution_id": execution_id}, stream=True, timeout=(5, 60))
    response.raise_for_status()
    connected.set()
    for event in sseclient.SSEClient(response).events():
        arrivals.record(int(event.id))


def read_listen(database_url: str, arrivals: Arrivals, connected: threading.Event, stop: threading.Event) -> None:
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    conn.cursor().execute("LISTEN attune_notifications")
    connected.set()
    while not stop.is_set():
        if select.select([conn], [], [], 0.2)[0]:
            conn.poll()
            while conn.notifies:
                arrivals.record(json.loads(conn.notifies.pop(0).payload)["event_id"])
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    stop = threading.Event()
    with start_stack(args.workers) as (server, database_url, token):
        try:
            conn = psycopg2.connect(database_url)
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute("INSERT INTO attune.pack (ref, label) VALUES ('bench_pack', 'b') ON CONFLICT DO NOTHING")
            cur.execute("""INSERT INTO attune.action (ref, pack, pack_ref, label)
                           SELECT 'bench_pack.act', id, ref, 'a' FROM attune.pack WHERE ref = 'bench_pack'
                           ON CONFLICT DO NOTHING""")
            cur.execute("INSERT INTO attune.execution (action_ref) VALUES ('bench_pack.act') RETURNING id")
            execution_id = cur.fetchone()[0]

            sse_arrivals, raw_arrivals = Arrivals(), Arrivals()
            ready = [threading.Event(), threading.Event()]
            threading.Thread(target=read_sse, daemon=True, args=(
                server.base_url + "/api/v1/executions/stream", token, execution_id, sse_arrivals, ready[0])).start()
            threading.Thread(target=read_listen, daemon=True,
                             args=(database_url, raw_arrivals, ready[1], stop)).start()
            for event in ready:
                event.wait(10)

            rows: dict[str, list[float]] = {"raw LISTEN (baseline)": [], "attune-sse SSE client": []}
            statuses = ["running", "completed"]
            for i in range(args.updates):
                cur.execute("UPDATE attune.execution SET status = %s WHERE id = %s", (statuses[i % 2], execution_id))
                committed = time.perf_counter()
                cur.execute("SELECT max(id) FROM attune.execution_event WHERE execution = %s", (execution_id,))
                event_id = cur.fetchone()[0]
                rows["raw LISTEN (baseline)"].append(raw_arrivals.wait(event_id, 10) - committed)
                rows["attune-sse SSE client"].append(sse_arrivals.wait(event_id, 10) - committed)
                time.sleep(0.01)  # a quiet machine between updates, as the issue asks

            base = statistics.median(rows["raw LISTEN (baseline)"])
            print(f"\nUPDATE commit -> arrival, {args.updates} sequential updates, "
                  f"{args.workers} gevent workers, {os.cpu_count()} cores")
            print(f"{'path':<24} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p50/baseline':>13}")
            for name, values in rows.items():
                ms = [v * 1000 for v in values]
                print(f"{name:<24} {len(ms):>5} {statistics.median(ms):>8.2f} {percentile(ms, 0.9):>8.2f} "
                      f"{percentile(ms, 0.99):>8.2f} {max(ms):>8.2f} {statistics.median(values) / base:>12.1f}x")
            conn.close()
        finally:
            stop.set()  # ends the LISTEN reader thread


@contextmanager
def start_stack(workers: int) -> Iterator[tuple[ServerProcess, str, str]]:
    """An embedded PostgreSQL (or ATTUNE_BENCH_DATABASE_URL) and the service; yields (server, db url, token)."""
    work = Path(tempfile.mkdtemp(prefix="attune-bench-"))
    embedded = None
    database_url = os.environ.get("ATTUNE_BENCH_DATABASE_URL")
    if not database_url:
        embedded = EmbeddedPostgres(work / "pgdata").start()
        embedded.create_database("attune_bench")
        database_url = embedded.url("attune_bench")
    apply_migrations(database_url)
    server = ServerProcess({
        "database": {"url": database_url},
        "server": {"workers": workers},
        "security": {"jwt_secret": SECRET, "allow_registration": True},
        "log": {"level": "warn"},
    }, work).start()
    try:
        registered = requests.post(server.base_url + "/auth/register",
                                   json={"login": f"bench-{os.getpid()}", "password": "benchmark-pw"}, timeout=10)
        yield server, database_url, registered.json()["data"]["access_token"]
    finally:
        server.stop()
        if embedded is not None:
            embedded.stop("immediate")


if __name__ == "__main__":
    main()
