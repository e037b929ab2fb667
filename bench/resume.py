"""How long a client takes to resume after missing N events.

    .venv/bin/python bench/resume.py [--missed 10000]

Makes N UPDATEs while no client is connected, then times (a) an SSE client that
reconnects with Last-Event-ID and reads until it has all N, against (b) the
floor: one plain SELECT of the same N payloads from the event record.
"""

from __future__ import annotations

import argparse
import time

import psycopg2
import requests
import sseclient
from latency import start_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--missed", type=int, default=10_000)
    args = parser.parse_args()
    with start_stack(2) as (server, database_url, token):
        conn = psycopg2.connect(database_url)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("INSERT INTO attune.execution (action_ref) VALUES ('bench.act') RETURNING id")
        execution_id = cur.fetchone()[0]
        cur.execute("SELECT max(id) FROM attune.execution_event")
        start = cur.fetchone()[0]
        for i in range(args.missed):
            cur.execute("UPDATE attune.execution SET result = %s WHERE id = %s", (f'{{"n": {i}}}', execution_id))

        began = time.perf_counter()
        cur.execute("SELECT id, payload::text FROM attune.execution_event WHERE id > %s ORDER BY id", (start,))
        rows = cur.fetchall()
        select_s = time.perf_counter() - began

        began = time.perf_counter()
        response = requests.get(server.base_url + "/api/v1/executions/stream", params={"token": token},
                                headers={"Last-Event-ID": str(start)}, stream=True, timeout=(5, 60))
        received = 0
        for _ in sseclient.SSEClient(response).events():
            received += 1
            if received == args.missed:
                break
        resume_s = time.perf_counter() - began
        response.close()
        conn.close()

    print(f"\nresume of {args.missed} missed events (2 gevent workers)")
    print(f"{'path':<34} {'events':>7} {'seconds':>8} {'events/s':>9} {'ratio':>6}")
    for name, count, seconds in (("SELECT from the record (baseline)", len(rows), select_s),
                                 ("SSE client with Last-Event-ID", received, resume_s)):
        print(f"{name:<34} {count:>7} {seconds:>8.3f} {count / seconds:>9.0f} {seconds / select_s:>5.1f}x")


if __name__ == "__main__":
    main()
