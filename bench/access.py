"""What authorization costs on the stream: the same fan-out with and without permission sets.

    .venv/bin/python bench/access.py             # about 3 minutes
    .venv/bin/python bench/access.py --quick     # about 1 minute

Starts its own PostgreSQL (embedded, or ATTUNE_BENCH_DATABASE_URL) and one
attune-sse instance (gunicorn, 2 gevent workers, security.default_grants:
everything). The load comes from ``bench/loadclient.py`` processes, as in
scale.py. Two kinds of streams, measured in alternating rounds (the median
round is shown):

- open: F streams of one identity without a permission set (the default
  grants: every execution). All are in one group of the hub; no event is
  filtered.
- constrained: F streams of 20 identities, each with a permission set of its
  own: an executions grant constrained to six packs (the benchmark's among
  them) and one constrained to twenty action refs. 20 scopes, so the hub
  filters every batch 20 times. Every event passes every filter, so both
  kinds deliver the same events to the same number of streams: the latency
  (UPDATE's commit to each client's receipt) compares like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
from scale import WARMUP_SECONDS, LoadClients, Updater, log, seed, tree, window  # noqa: E402

IDENTITIES = 20


def register(base_url: str, login: str) -> dict[str, Any]:
    response = requests.post(base_url + "/auth/register", json={"login": login, "password": "benchmark-pw"},
                             timeout=30)
    response.raise_for_status()
    return response.json()["data"]


def constrain(database_url: str, identity_id: int, n: int) -> None:
    grants = [
        {"resource": "executions", "actions": ["read"],
         "constraints": {"pack_refs": ["bench_pack", *(f"team{n}_{k}" for k in range(5))]}},
        {"resource": "executions", "actions": ["read"],
         "constraints": {"refs": [f"team{n}_0.action{k}" for k in range(20)]}},
    ]
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO attune.permission_set (ref, grants) VALUES (%s, %s) RETURNING id",
                    (f"bench.team{n}", json.dumps(grants)))
        cur.execute("INSERT INTO attune.permission_assignment (identity, permission_set) VALUES (%s, %s)",
                    (identity_id, cur.fetchone()[0]))
    conn.close()


def subscribe(clients: LoadClients, updater: Updater, urls: list[str], total: int,
              timeout: float = 60) -> int:
    """Open ``total`` streams spread over ``urls``; wait until each has had an event; how many are live."""
    for i, url in enumerate(urls):
        clients.open(url, total // len(urls) + (1 if i < total % len(urls) else 0))
    deadline = time.monotonic() + timeout
    while True:
        updater.run(rate=50, seconds=0.02)
        time.sleep(1.0)
        stats = clients.stats()
        if stats["with_events"] >= stats["open"] or time.monotonic() > deadline:
            return stats["with_events"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100, help="updates/s")
    parser.add_argument("--seconds", type=float, default=10, help="length of each measured window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="load client processes")
    parser.add_argument("--quick", action="store_true", help="300 streams, 5 s windows, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.seconds, args.rounds = 300, 5, 2

    work = Path(tempfile.mkdtemp(prefix="attune-access-"))
    try:
        with harness.database(work, {"fsync": "off"}) as (database_url, _):
            execution_ids = seed(database_url)
            server = harness.attune(database_url, work, server={"max_streams_per_identity": args.streams})
            try:
                rows = measure(server, database_url, execution_ids, args, work)
            finally:
                server.stop()
        report(rows, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(server: Any, database_url: str, execution_ids: list[int], args: argparse.Namespace,
            work: Path) -> dict[str, list[dict[str, Any]]]:
    """Rounds of the open and the constrained streams, alternating."""
    stream_url = server.base_url + "/api/v1/executions/stream?token="
    tag = os.getpid()
    open_urls = [stream_url + harness.register(server.base_url, f"open-{tag}")]
    constrained_urls = []
    for n in range(IDENTITIES):
        data = register(server.base_url, f"team{n}-{tag}")
        constrain(database_url, data["user"]["id"], n)
        constrained_urls.append(stream_url + data["access_token"])
    time.sleep(1)  # every worker has seen the assignments (security.access_refresh_seconds)

    updater = Updater(database_url, execution_ids)
    clients = LoadClients(args.clients)
    rows: dict[str, list[dict[str, Any]]] = {"open": [], "constrained": []}
    try:
        for round_no in range(1, args.rounds + 1):
            for kind, urls in (("open", open_urls), ("constrained", constrained_urls)):
                live = subscribe(clients, updater, urls, args.streams)
                cpu = {"app": tree(server.process.pid), "load": [p.pid for p in clients.procs]}
                window(clients, updater, args.rate, WARMUP_SECONDS, work, live)
                result = window(clients, updater, args.rate, args.seconds, work, live, cpu)
                result["streams"] = live
                rows[kind].append(result)
                log(f"round {round_no}: {kind:<11} {live} streams, p50 {result['p50'] * 1000:.1f} ms, "
                    f"p99 {result['p99'] * 1000:.1f} ms, lost {result['lost']}, CPU app "
                    f"{result['cpu']['app'] * 100:.0f}% load {result['cpu']['load'] * 100:.0f}%")
                clients.close()
                time.sleep(1)
    finally:
        clients.quit()
        updater.close()
    return rows


def report(rows: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print()
    print(f"attune-sse authorization cost: {os.cpu_count()} cores, 2 gevent workers, load from {args.clients} "
          f"client process(es) on the same machine; {args.streams} streams, {args.rate:g} updates/s, "
          f"{args.seconds:g} s windows, median of {args.rounds} round(s)")
    print(f"{'streams':<34} {'deliv/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'lost':>6} "
          f"{'CPU app':>8} {'CPU load':>9}")
    medians = {}
    for kind, label in (("open", "open (default grants, 1 scope)"),
                        ("constrained", f"constrained ({IDENTITIES} scopes)")):
        runs = rows[kind]
        med = {key: statistics.median(r[key] for r in runs) for key in ("deliveries_per_s", "p50", "p99", "max")}
        med["lost"] = sum(r["lost"] for r in runs)
        med["app"] = statistics.median(r["cpu"]["app"] for r in runs)
        med["load"] = statistics.median(r["cpu"]["load"] for r in runs)
        medians[kind] = med
        print(f"{label:<34} {med['deliveries_per_s']:>9.0f} {med['p50'] * 1000:>8.1f} {med['p99'] * 1000:>8.1f} "
              f"{med['max'] * 1000:>8.1f} {med['lost']:>6} {med['app'] * 100:>7.0f}% {med['load'] * 100:>8.0f}%")
    ratio = {k: medians["constrained"][k] / medians["open"][k] for k in ("p50", "p99", "app")}
    print(f"constrained / open: p50 {ratio['p50']:.2f}x, p99 {ratio['p99']:.2f}x, app CPU {ratio['app']:.2f}x")


if __name__ == "__main__":
    main()
