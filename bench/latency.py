"""Time from an UPDATE's commit to its arrival: the SSE pipeline against a raw LISTEN.

    .venv/bin/python bench/latency.py [--updates 100] [--workers 2] [--open-seconds 60]

Starts an embedded PostgreSQL (or uses ATTUNE_BENCH_DATABASE_URL) and a real
gunicorn with gevent workers, then makes UPDATEs one at a time. Each is timed
to its arrival at (a) an SSE client of the service, read with sseclient-py,
and (b) a plain psycopg2 connection LISTENing on the same channel: the floor
PostgreSQL itself sets, measured in the same run. Prints a table with the
ratio of each row to that baseline.

With ``--open-seconds S``: the same updates for S seconds with nothing else
going on, then for S seconds while a transaction that UPDATEd another
execution stays open; the writer's commit time and the delivery time, each
phase, and when the open transaction's own event arrives once it commits.
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
from typing import Any

import psycopg2
import requests
import sseclient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attune_sse.testing import ServerProcess
from bench import harness


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


def read_sse(url: str, token: str, execution_id: int | None, arrivals: Arrivals, connected: threading.Event) -> None:
    params = {"token": token} if execution_id is None else {"token": token, "execution_id": execution_id}
    response = requests.get(url, params=params, stream=True, timeout=(5, 60))
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


def timed_updates(cur: Any, execution_ids: list[int], count: int, arrivals: dict[str, Arrivals],
                  pause: float = 0.01) -> dict[str, list[float]]:
    """``count`` UPDATEs one at a time, round the executions: how long each took to commit, and
    from its commit to each arrival."""
    rows: dict[str, list[float]] = {"commit": [], **{name: [] for name in arrivals}}
    statuses = ["running", "completed"]
    for i in range(count):
        execution_id = execution_ids[i % len(execution_ids)]
        began = time.perf_counter()
        cur.execute("UPDATE attune.execution SET status = %s WHERE id = %s",
                    (statuses[i // len(execution_ids) % 2], execution_id))
        committed = time.perf_counter()
        rows["commit"].append(committed - began)
        cur.execute("SELECT currval('attune.execution_event_id_seq')")  # drawn as the UPDATE committed
        event_id = cur.fetchone()[0]
        for name, arrived in arrivals.items():
            rows[name].append(arrived.wait(event_id, 10) - committed)
        time.sleep(pause)  # a quiet machine between updates
    return rows


def print_rows(rows: dict[str, list[float]], base: str | None) -> None:
    print(f"{'':<34} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p50 ratio':>10}")
    for name, values in rows.items():
        ms = [v * 1000 for v in values]
        ratio = f"{statistics.median(values) / statistics.median(rows[base]):>9.1f}x" if base else ""
        print(f"{name:<34} {len(ms):>5} {statistics.median(ms):>8.2f} {percentile(ms, 0.9):>8.2f} "
              f"{percentile(ms, 0.99):>8.2f} {max(ms):>8.2f} {ratio}")


def new_execution(cur: Any) -> int:
    cur.execute("INSERT INTO attune.execution (action_ref) VALUES ('bench_pack.act') RETURNING id")
    return cur.fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--open-seconds", type=float, default=0,
                        help="then compare, for this long each, updates with nothing open and with a "
                             "transaction on another execution left open")
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
            execution_id, held_id = new_execution(cur), new_execution(cur)

            sse_arrivals, raw_arrivals, held_arrivals = Arrivals(), Arrivals(), Arrivals()
            ready = [threading.Event(), threading.Event(), threading.Event()]
            stream_url = server.base_url + "/api/v1/executions/stream"
            threading.Thread(target=read_sse, daemon=True,
                             args=(stream_url, token, execution_id, sse_arrivals, ready[0])).start()
            threading.Thread(target=read_listen, daemon=True,
                             args=(database_url, raw_arrivals, ready[1], stop)).start()
            threading.Thread(target=read_sse, daemon=True,
                             args=(stream_url, token, held_id, held_arrivals, ready[2])).start()
            for event in ready:
                event.wait(10)

            rows = timed_updates(cur, [execution_id], args.updates,
                                 {"raw LISTEN (baseline)": raw_arrivals, "attune-sse SSE client": sse_arrivals})
            del rows["commit"]
            print(f"\nUPDATE commit -> arrival, {args.updates} sequential updates, "
                  f"{args.workers} gevent workers, {os.cpu_count()} cores")
            print_rows(rows, "raw LISTEN (baseline)")
            if args.open_seconds:
                everything = Arrivals()
                ready = threading.Event()
                threading.Thread(target=read_sse, daemon=True,
                                 args=(stream_url, token, None, everything, ready)).start()
                ready.wait(10)
                others = [new_execution(cur) for _ in range(200)]
                compare_open_transaction(database_url, cur, others, held_id, everything, held_arrivals,
                                         args.open_seconds)
            conn.close()
        finally:
            stop.set()  # ends the LISTEN reader thread


def compare_open_transaction(database_url: str, cur: Any, execution_ids: list[int], held_id: int,
                             arrivals: Arrivals, held_arrivals: Arrivals, seconds: float) -> None:
    """Updates of other executions for ``seconds`` with nothing open, then as long again while a
    transaction that changed one execution stays open; then that transaction commits. (Round
    the executions, as real traffic goes: thousands of updates of one row behind an open
    transaction measure PostgreSQL's dead row versions, which it cannot prune meanwhile.)"""
    per_phase = max(1, int(seconds / 0.0125))  # ~12.5 ms an update: 10 ms pause, commit and arrival
    rows = {}
    began = time.monotonic()
    quiet = timed_updates(cur, execution_ids, per_phase, {"sse": arrivals})
    quiet_seconds = time.monotonic() - began
    held = psycopg2.connect(database_url, application_name="bench-open-transaction")
    try:
        with held.cursor() as held_cur:
            held_cur.execute("UPDATE attune.execution SET status = 'running' WHERE id = %s", (held_id,))
        began = time.monotonic()
        busy = timed_updates(cur, execution_ids, per_phase, {"sse": arrivals})
        while time.monotonic() - began < seconds:  # open for `seconds` at least
            time.sleep(0.05)
        open_seconds = time.monotonic() - began
        held.commit()
        committed = time.perf_counter()
        cur.execute("SELECT max(id) FROM attune.execution_event WHERE execution = %s", (held_id,))
        held_delivery = held_arrivals.wait(cur.fetchone()[0], 10) - committed
    finally:
        held.close()
    rows["other writer's commit, nothing open"] = quiet["commit"]
    rows["other writer's commit, txn open"] = busy["commit"]
    rows["commit -> client, nothing open"] = quiet["sse"]
    rows["commit -> client, txn open"] = busy["sse"]
    print(f"\nA transaction that UPDATEd one execution left open {open_seconds:.0f} s, against "
          f"{quiet_seconds:.0f} s with nothing open: {per_phase} sequential updates of {len(execution_ids)} "
          f"other executions each, one SSE client of all executions")
    print_rows(rows, None)
    print(f"the open transaction's own event reached its client {held_delivery * 1000:.1f} ms after it "
          f"committed, {open_seconds:.0f} s after the change")


@contextmanager
def start_stack(workers: int) -> Iterator[tuple[ServerProcess, str, str]]:
    """The benchmark's database and the service on it (bench/harness.py); yields (server, db url, token)."""
    work = Path(tempfile.mkdtemp(prefix="attune-bench-"))
    with harness.database(work) as (database_url, _):
        server = harness.attune(database_url, work, server={"workers": workers})
        try:
            yield server, database_url, harness.register(server.base_url)
        finally:
            server.stop()

if __name__ == "__main__":
    main()
