"""What receiving events costs an instance, with no stream open: the CPU of each worker per event.

    .venv/bin/python bench/instance_cost.py              # about a minute
    .venv/bin/python bench/instance_cost.py --events 2000 --rate 200

Starts its own PostgreSQL (embedded) and, for each mode, one gunicorn instance
of 2 gevent workers on it; measures each worker's CPU for ``--idle-seconds``
with nothing happening, then while one writer makes ``--events`` UPDATEs at
``--rate`` per second (autocommit, one execution). Modes: ``worker`` (every
worker LISTENs and reads the record) and ``instance`` (one leader LISTENs,
reads and relays to the other over a Unix socket). CPU per event is the CPU
during the writes minus the idle rate, divided by the events. Prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg2
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure(url: str, mode: str, execution_id: int, args: argparse.Namespace, work: Path) -> list[tuple]:
    server = harness.attune(url, work, database={"pool_size": 2, "backlog_pool_size": 1},
                            events={"listen_per": mode})
    try:
        time.sleep(1.0)
        leader = requests.get(server.base_url + "/readyz", timeout=5).json()["data"]["relay"]["leader_pid"]
        workers = psutil.Process(server.process.pid).children()
        idle_start = {w.pid: cpu(w) for w in workers}
        time.sleep(args.idle_seconds)
        idle = {w.pid: (cpu(w) - idle_start[w.pid]) / args.idle_seconds for w in workers}
        conn = psycopg2.connect(url)
        conn.autocommit = True
        start = {w.pid: cpu(w) for w in workers}
        began = time.monotonic()
        with conn.cursor() as cur:
            for n in range(args.events):
                cur.execute("UPDATE attune.execution SET status = %s WHERE id = %s",
                            ("running" if n % 2 else "scheduled", execution_id))
                pause = began + (n + 1) / args.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
        time.sleep(1.0)  # the last events reach every worker
        elapsed = time.monotonic() - began
        conn.close()
        rows = []
        for w in workers:
            busy = cpu(w) - start[w.pid] - idle[w.pid] * elapsed
            role = "every worker" if mode == "worker" else "leader" if w.pid == leader else "follower"
            rows.append((mode, role, w.pid, idle[w.pid] * 100, busy / args.events * 1e6))
        return rows
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--idle-seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="instances measured per mode, alternating")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="attune-instance-cost-"))
    with harness.database(work) as (url, _):
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("INSERT INTO attune.execution (action_ref, status) VALUES ('bench.cost', 'requested') "
                        "RETURNING id")
            (execution_id,) = cur.fetchone()
        conn.close()
        rows = []
        for _ in range(args.rounds):
            for mode in ("worker", "instance"):
                rows += measure(url, mode, execution_id, args, work)
        print(f"\nCPU of each worker of one instance (2 gevent workers, no stream): {args.events} events at "
              f"{args.rate:g}/s, idle rate measured over {args.idle_seconds:g} s before; {args.rounds} instance(s) "
              "per mode")
        print(f"{'mode':<10} {'role':<14} {'idle % of a core':>17} {'CPU µs per event':>17}")
        for mode, role, _pid, idle, per_event in sorted(rows, key=lambda r: (r[0] != "worker", r[1])):
            print(f"{mode:<10} {role:<14} {idle:>17.2f} {per_event:>17.0f}")
        for mode in ("worker", "instance"):
            per_instance = sum(r[4] for r in rows if r[0] == mode) / args.rounds
            print(f"{mode}: {per_instance:.0f} µs of CPU per event per instance (both workers)")


if __name__ == "__main__":
    main()
