"""How events reach the instances: one LISTEN per worker, per instance, or per cluster through Redis.

    .venv/bin/python bench/fanout.py            # the full run: 1, 4, 16 instances, 3 rounds (about 12 minutes)
    .venv/bin/python bench/fanout.py --quick    # 1 and 4 instances, short cells, 1 round, 300 streams

Starts its own PostgreSQL (embedded, default durability as in bench/writes.py,
``max_connections`` 400; or ATTUNE_BENCH_DATABASE_URL) and its own Redis
(/usr/bin/redis-server on a free port of 127.0.0.1, ``--save '' --appendonly
no``, stopped at the end), then for each mode and each number of instances
(gunicorn, 2 gevent workers each, all on the one database) starts the
instances, measures, and stops them. Modes:

- worker: ``events.listen_per: worker``: every worker LISTENs (the baseline);
- instance: ``events.listen_per: instance``: the workers of an instance elect
  one that LISTENs and relays to the others over a Unix socket;
- redis: ``listen_per: instance`` and ``events.fanout: redis``: one publisher
  per cluster (a PostgreSQL advisory lock) LISTENs and appends to a Redis
  stream; each instance's leader reads it.

Each cell (mode x instances):

1. writes: pgbench, 8 clients, each transaction UPDATEs the status of one of
   10,000 executions at random, for --seconds; the LISTEN connections
   (``application_name`` attune-sse-listener in pg_stat_activity) are counted
   every half second meanwhile. Then the benchmark waits until every worker of
   every instance has published every event of the cell. Rounds are
   interleaved (the instances are started afresh for every cell, the modes in
   a different order each round); the median of the rounds is shown, with its
   ratio to the same mode with 1 instance and to the worker mode with as many
   instances. During the pgbench run PostgreSQL (its postmaster and every
   backend) and pgbench are pinned to core 0 and every attune-sse process (and
   Redis) to the other core (``--no-pin`` to share both): on two cores the
   instances' own CPU would otherwise be what the figure measures, not what the
   database pays for its listeners and their reads.
2. delivery (first round only): N SSE streams of all executions (one
   identity), spread evenly over the instances, held by one epoll client
   process (bench/loadclient.py's, run by this file with --load-client, that
   reads 64 KiB at a time rather than 256 KiB: a much cheaper read); after a
   short warm-up one writer makes --rate UPDATEs/s for --delivery-seconds. Latency runs from just before an
   UPDATE (autocommit, ``synchronous_commit`` off, so the time is the
   statement and its commit) to the client's receipt, in the same
   ``time.monotonic()`` clock; each stream must receive each event exactly
   once (lost and duplicated deliveries are counted per stream and summed).
   CPU seconds of the client process and of every gunicorn process (masters
   and workers) over the window.

Before each cell the event record is pruned (what ``attune-sse prune`` does),
vacuumed and checkpointed, and the Redis stream deleted, with no instance
running. Prints progress to stderr, then the tables to stdout; the server logs'
warnings and errors are summed up at the end (``--logs DIR`` keeps the logs).
Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attune_sse.core.grants import ALL_GRANTS  # noqa: E402
from attune_sse.runtime.broker import LEADER_APPLICATION_NAME, PUBLISHER_APPLICATION_NAME  # noqa: E402
from attune_sse.runtime.listener import APPLICATION_NAME as LISTENER_APP  # noqa: E402
from attune_sse.storage import record  # noqa: E402
from attune_sse.storage.embedded import EmbeddedPostgres, free_port  # noqa: E402
from attune_sse.testing import ServerProcess  # noqa: E402
from bench import harness  # noqa: E402

SECRET = "benchmark-secret-benchmark-secret-0123456789"
EXECUTIONS = 10_000
WORKERS = 2
REDIS_SERVER = "/usr/bin/redis-server"
REDIS_STREAM = "attune:bench_fanout_events"
MODES = {  # name -> (events.listen_per, events.fanout)
    "worker": ("worker", "postgres"),
    "instance": ("instance", "postgres"),
    "redis": ("instance", "redis"),
}
PGBENCH_SCRIPT = """\\set id random(1, {executions})
\\set s random(1, 4)
UPDATE attune.execution
   SET status = (CASE :s WHEN 1 THEN 'scheduled' WHEN 2 THEN 'running' WHEN 3 THEN 'completed' ELSE 'failed' END)
                ::attune.execution_status_enum
 WHERE id = :id;
"""
START_TIMEOUT = 180.0  # s for every instance of a cell to be ready
CATCH_UP_TIMEOUT = 60.0  # s after pgbench for every worker to publish the cell's events
SUBSCRIBE_TIMEOUT = 60.0  # s for every stream to be open and to have received an event
DRAIN_TIMEOUT = 10.0  # s after the last update of the delivery window for the last deliveries
# bench/loadclient.py reads with recv(262144): each such read costs ~12 us more than one of 64 KiB
# (the 256 KiB buffer, allocated and shrunk per read), more than the rest of a delivery's work.
CLIENT_READ_SIZE = 65536


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(ordered: list[float] | array, q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if len(ordered) else float("nan")


def tree(pid: int) -> list[int]:
    try:
        return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def pin(pids: list[int], cpus: set[int]) -> None:
    """Run these processes (and what they fork from now on) on ``cpus`` only."""
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            psutil.Process(pid).cpu_affinity(sorted(cpus))


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- the database and Redis ------------------------------------------------------------------


class Database:
    """The benchmark's database: its SQL connection, the seed, the fresh start of each cell."""

    def __init__(self, url: str, embedded: EmbeddedPostgres | None) -> None:
        self.url = url
        self.embedded = embedded
        self.conn = psycopg2.connect(url, application_name="bench-fanout")
        self.conn.autocommit = True

    def execute(self, sql: str, params: tuple | None = None) -> None:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def seed(self) -> list[int]:
        self.execute("INSERT INTO attune.pack (ref, label) VALUES ('bench_pack', 'b') ON CONFLICT DO NOTHING")
        self.execute("""INSERT INTO attune.action (ref, pack, pack_ref, label)
                        SELECT 'bench_pack.write', id, 'bench_pack', 'w' FROM attune.pack WHERE ref = 'bench_pack'
                        ON CONFLICT DO NOTHING""")
        (have,), = self.query("SELECT count(*) FROM attune.execution")
        if have < EXECUTIONS:
            self.execute("""INSERT INTO attune.execution (action, action_ref, status)
                            SELECT a.id, a.ref, 'requested' FROM attune.action a, generate_series(1, %s)
                            WHERE a.ref = 'bench_pack.write'""", (EXECUTIONS - have,))
        self.execute("VACUUM ANALYZE attune.execution")
        return [row[0] for row in self.query("SELECT id FROM attune.execution ORDER BY id LIMIT %s", (EXECUTIONS,))]

    def fresh_cell(self) -> None:
        """With no instance running: the record pruned as ``attune-sse prune`` would (the newest event
        kept, so a listener starts from it), vacuumed, and a checkpoint."""
        with self.conn.cursor() as cur:
            record.prune(cur, keep_last=1)
        self.execute("VACUUM attune.execution_event")
        self.execute("VACUUM attune.execution")
        with contextlib.suppress(psycopg2.Error):  # not allowed to a non-superuser of an external server
            self.execute("CHECKPOINT")

    def newest(self) -> int:
        with self.conn.cursor() as cur:
            return record.newest(cur)

    def connections(self) -> dict[str, int]:
        rows = self.query("""SELECT application_name, count(*) FROM pg_stat_activity
                             WHERE datname = current_database() GROUP BY 1""")
        return dict(rows)

    def postgres_pids(self) -> list[int]:
        if self.embedded is None:
            return []
        return tree(int((self.embedded.data_dir / "postmaster.pid").read_text().split()[0]))

    def pgbench(self) -> str:
        if self.embedded is not None and (self.embedded._bin / "pgbench").exists():
            return str(self.embedded._bin / "pgbench")
        found = shutil.which("pgbench")
        if found is None:
            raise SystemExit("pgbench not found (it comes with pgserver's binaries, or apt-get install "
                             "postgresql-client)")
        return found


class Redis:
    """A private redis-server on a free port of 127.0.0.1, nothing saved."""

    def __init__(self, work: Path) -> None:
        import redis

        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(work)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        self.client = redis.Redis.from_url(self.url)

    @property
    def pid(self) -> int:
        return self.process.pid

    def clear(self) -> None:
        self.client.delete(REDIS_STREAM)

    def stream_length(self) -> int:
        return int(self.client.xlen(REDIS_STREAM))

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- the instances -----------------------------------------------------------------------------


def instance_config(database_url: str, mode: str, redis_url: str) -> dict[str, Any]:
    listen_per, fanout = MODES[mode]
    events: dict[str, Any] = {"prune_interval_seconds": 0, "listen_per": listen_per, "fanout": fanout}
    if fanout == "redis":
        events.update(redis_url=redis_url, redis_stream=REDIS_STREAM)
    return {
        # 16 instances x 2 workers on one database: small pools (they open lazily), migrations by the bench.
        "database": {"url": database_url, "pool_size": 2, "backlog_pool_size": 1, "auto_migrate": False},
        # One identity opens every stream: its cap per worker lifted, as in tests/conftest.py.
        "server": {"workers": WORKERS, "max_streams_per_identity": 10_000, "sse_keepalive_seconds": 15},
        # As tests/conftest.py: registration open, identities with no permission set may do everything.
        "security": {"jwt_secret": SECRET, "allow_registration": True, "default_grants": ALL_GRANTS,
                     "jwt_access_expiration": 4 * 3600},
        "log": {"level": "info"},
        "events": events,
    }


class Cluster:
    """``count`` gunicorn instances of one mode, started and stopped together."""

    def __init__(self, mode: str, count: int, database_url: str, redis_url: str, work: Path) -> None:
        self.mode = mode
        self.count = count
        config = instance_config(database_url, mode, redis_url)
        self.servers: list[ServerProcess] = []
        ports: set[int] = set()
        while len(self.servers) < count:
            server = ServerProcess(config, work)
            if server.port not in ports:  # free_port() may hand out a port twice in a row
                ports.add(server.port)
                self.servers.append(server)
        self.started = False
        self.redis_pids: list[int] = []  # pinned with the instances in a write cell

    def start(self) -> float:
        """Every instance started at once; the seconds until the last one was ready (every worker's
        events flowing, as ServerProcess waits for)."""
        began = time.monotonic()
        with ThreadPoolExecutor(self.count) as pool:
            futures = [pool.submit(server.start, START_TIMEOUT) for server in self.servers]
            errors = [f.exception() for f in futures]
        self.started = True
        failed = [e for e in errors if e is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} of {self.count} instance(s) did not become ready: {failed[0]}")
        return time.monotonic() - began

    def stop(self) -> None:
        if not self.started:
            return
        with ThreadPoolExecutor(self.count) as pool:
            list(pool.map(lambda server: server.stop(), self.servers))

    def pids(self) -> list[int]:
        return [pid for server in self.servers if server.process is not None for pid in tree(server.process.pid)]

    def received(self) -> list[float]:
        """attune_sse_events_received_total of each instance (the sum over its workers)."""
        totals = []
        for server in self.servers:
            text = requests.get(server.base_url + "/metrics", timeout=5).text
            match = re.search(r"^attune_sse_events_received_total (\S+)$", text, re.MULTILINE)
            totals.append(float(match.group(1)) if match else 0.0)
        return totals

    def log_lines(self) -> list[str]:
        """Warnings and errors of every instance's log (tracebacks as one line each)."""
        found = []
        for server in self.servers:
            text = server.log()
            found += [line for line in text.splitlines()
                      if re.search(r"\[(WARNING|ERROR|CRITICAL)\]", line) or line.startswith("Traceback")]
        return found


class ListenCounter(threading.Thread):
    """Counts the listeners' connections, and the publisher's and its candidates', every half second."""

    def __init__(self, database_url: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg2.connect(database_url, application_name="bench-fanout-probe")
        self.conn.autocommit = True
        self.stop_event = threading.Event()
        self.listens: list[int] = []
        self.leaders: list[int] = []  # the cluster's publisher and the candidates for it (events.fanout: redis)
        self.publishers: list[int] = []
        self.total: list[int] = []  # every connection to the database

    def sample(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute("""SELECT count(*) FILTER (WHERE application_name = %s),
                                  count(*) FILTER (WHERE application_name = %s),
                                  count(*) FILTER (WHERE starts_with(application_name, %s)), count(*)
                           FROM pg_stat_activity WHERE datname = current_database()""",
                        (LISTENER_APP, LEADER_APPLICATION_NAME, PUBLISHER_APPLICATION_NAME))
            listens, candidates, publishers, total = cur.fetchone()
        self.total.append(total)
        self.listens.append(listens)
        self.leaders.append(candidates + publishers)
        self.publishers.append(publishers)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(0.5)

    def __enter__(self) -> ListenCounter:
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.join(5)
        self.sample()
        self.conn.close()


# -- the load ----------------------------------------------------------------------------------


class LoadClient:
    """One load client process (bench/loadclient.py's epoll loop and protocol, reads of CLIENT_READ_SIZE)
    holding every stream."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--load-client"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(command) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the load client exited")
        return json.loads(line)

    def cpu(self) -> float:
        return cpu_seconds([self.proc.pid])

    def collect(self, commits: dict[int, float], work: Path) -> tuple[array, int, int]:
        path, out = work / "commits.bin", work / "latencies.bin"
        ids, stamps = array("q", commits.keys()), array("d", commits.values())
        with open(path, "wb") as f:
            f.write(len(ids).to_bytes(8, "little"))
            ids.tofile(f)
            stamps.tofile(f)
        reply = self.ask({"cmd": "collect", "commits": str(path), "out": str(out)})
        latencies = array("d")
        latencies.frombytes(out.read_bytes())
        return array("d", sorted(latencies)), reply["lost"], reply["duplicates"]

    def quit(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Writer:
    """One connection making paced UPDATEs; records each event's id and the time its UPDATE was sent."""

    def __init__(self, database_url: str, execution_ids: list[int]) -> None:
        self.execution_ids = execution_ids
        self.conn = psycopg2.connect(database_url, application_name="bench-fanout-writer")
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute("SET synchronous_commit TO off")  # the commit is visible at once; its flush not waited
        self.made = 0

    def update(self) -> tuple[int, float]:
        execution_id = self.execution_ids[self.made % len(self.execution_ids)]
        status = ("running", "scheduled")[self.made // len(self.execution_ids) % 2]
        self.made += 1
        with self.conn.cursor() as cur:
            began = time.monotonic()
            cur.execute("UPDATE attune.execution SET status = %s WHERE id = %s", (status, execution_id))
            cur.execute("SELECT currval('attune.execution_event_id_seq')")  # drawn as the UPDATE committed
            return cur.fetchone()[0], began

    def run(self, rate: float, seconds: float) -> dict[int, float]:
        commits: dict[int, float] = {}
        start = time.monotonic() + 0.02
        for k in range(max(1, round(rate * seconds))):
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            event_id, began = self.update()
            commits[event_id] = began
        return commits

    def close(self) -> None:
        self.conn.close()


# -- the cells ---------------------------------------------------------------------------------


def write_cell(db: Database, cluster: Cluster, pgbench: str, script: Path, writers: int,
               seconds: float, pinned: bool) -> dict[str, Any]:
    received_before = cluster.received()
    newest_before = db.newest()
    pids = cluster.pids()
    cpu_before = cpu_seconds(pids)
    everything = set(range(os.cpu_count() or 1))
    if pinned:
        # The database and pgbench on core 0, attune-sse (and Redis) on the other core(s): the figure
        # shows what the database pays for the listeners and their reads, not the CPU the instances'
        # processes would take from it on a shared two-core machine.
        pin(db.postgres_pids(), {0})
        pin(pids + cluster.redis_pids, everything - {0})
    try:
        with ListenCounter(db.url) as counter:
            out = subprocess.run(
                [pgbench, "-n", "-f", str(script), "-c", str(writers), "-j", str(min(writers, 2)), "-T",
                 str(seconds), db.url],
                capture_output=True, text=True, check=False,
                preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if pinned else None)
    finally:
        if pinned:
            pin(db.postgres_pids() + pids + cluster.redis_pids, everything)
    server_cpu = cpu_seconds(pids) - cpu_before
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out.stdout)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    # Every worker of every instance publishes every event of the cell (ids with no event: none here,
    # pgbench's transactions all commit).
    recorded = db.newest() - newest_before
    began = time.monotonic()
    while True:
        published = [(after - before) / WORKERS
                     for after, before in zip(cluster.received(), received_before, strict=True)]
        if min(published) >= recorded or time.monotonic() - began > CATCH_UP_TIMEOUT:
            break
        time.sleep(0.25)
    return {"tps": float(match.group(1)), "listens": (min(counter.listens), max(counter.listens)),
            "leaders": max(counter.leaders), "publishers": (min(counter.publishers), max(counter.publishers)),
            "connections": max(counter.total), "server_cpu": server_cpu, "recorded": recorded,
            "published_min": min(published), "caught_up": time.monotonic() - began}


def delivery_cell(db: Database, cluster: Cluster, redis: Redis | None, writer: Writer, token: str,
                  args: argparse.Namespace, work: Path) -> dict[str, Any]:
    client = LoadClient()
    try:
        # Open the streams, spread evenly over the instances.
        began = time.monotonic()
        errors: dict[str, int] = {}
        for i, server in enumerate(cluster.servers):
            n = args.streams // cluster.count + (1 if i < args.streams % cluster.count else 0)
            reply = client.ask({"cmd": "open", "url": f"{server.base_url}/api/v1/executions/stream?token={token}",
                                "n": n})
            for name, count in reply["errors"].items():
                errors[name] = errors.get(name, 0) + count
        # An update every half second until every stream that answered 200 has an event.
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
        while True:
            writer.update()
            time.sleep(0.5)
            stats = client.ask({"cmd": "stats"})
            # "none": no answer yet (still connecting), not refused: wait for it.
            refused = sum(count for status, count in stats["statuses"].items() if status not in ("200", "none"))
            waiting = stats["statuses"].get("none", 0)
            if (not waiting and stats["with_events"] >= stats["open"] - refused) or time.monotonic() > deadline:
                break
        for status, count in stats["statuses"].items():
            if status != "200":
                errors[f"HTTP {status}"] = count
        live = stats["with_events"]
        subscribed = time.monotonic() - began
        log(f"  {live} of {args.streams} streams live in {subscribed:.1f} s" + (f", errors {errors}" if errors else ""))

        # Warm-up at the measured rate (fresh connections cost more at first), then the window.
        client.ask({"cmd": "reset"})
        writer.run(args.rate, args.warmup_seconds)
        time.sleep(1.0)
        client.ask({"cmd": "reset"})
        pids, postgres, redis_pids = cluster.pids(), db.postgres_pids(), [redis.pid] if redis else []
        cpu_before = (client.cpu(), cpu_seconds(pids), cpu_seconds(postgres), cpu_seconds(redis_pids))
        with ListenCounter(db.url) as counter:
            window_began = time.monotonic()
            commits = writer.run(args.rate, args.delivery_seconds)
            made = time.monotonic() - window_began
            expected = len(commits) * live
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while time.monotonic() < deadline and client.ask({"cmd": "stats"})["ids"] < expected:
                time.sleep(0.1)
        cpu_after = (client.cpu(), cpu_seconds(pids), cpu_seconds(postgres), cpu_seconds(redis_pids))
        latencies, lost, duplicates = client.collect(commits, work)
        still_open = client.ask({"cmd": "stats"})["open"]
        client.ask({"cmd": "close"})
        client_cpu, server_cpu, postgres_cpu, redis_cpu = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
        return {
            "streams": live, "asked": args.streams, "errors": errors, "subscribe_s": subscribed,
            "events": len(commits), "rate": len(commits) / made, "deliveries": len(latencies),
            "lost": lost, "dup": duplicates, "open_after": still_open,
            "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
            "max": latencies[-1] if len(latencies) else float("nan"),
            "client_cpu": client_cpu, "server_cpu": server_cpu, "postgres_cpu": postgres_cpu, "redis_cpu": redis_cpu,
            "listens": (min(counter.listens), max(counter.listens)), "connections": max(counter.total),
        }
    finally:
        client.quit()


def register(server: ServerProcess) -> str:
    response = requests.post(server.base_url + "/auth/register",
                             json={"login": f"bench-fanout-{os.getpid()}", "password": "benchmark-pw"}, timeout=10)
    if response.status_code != 201:
        raise RuntimeError(f"POST /auth/register answered {response.status_code}: {response.text[:500]}")
    return response.json()["data"]["access_token"]


# -- the report --------------------------------------------------------------------------------


def span(values: tuple[int, int] | list[tuple[int, int]]) -> str:
    pairs = values if isinstance(values, list) else [values]
    low, high = min(p[0] for p in pairs), max(p[1] for p in pairs)
    return f"{low}" if low == high else f"{low}-{high}"


def expected_listens(mode: str, count: int) -> int:
    return {"worker": count * WORKERS, "instance": count, "redis": 1}[mode]


def report(args: argparse.Namespace, writes: dict[tuple[str, int], list[dict[str, Any]]],
           deliveries: dict[tuple[str, int], dict[str, Any]], starts: dict[tuple[str, int], list[float]],
           failures: dict[tuple[str, int], list[str]], logs: dict[tuple[str, int], list[str]], elapsed: float) -> None:
    def median_tps(mode: str, count: int) -> float | None:
        cells = writes.get((mode, count))
        return statistics.median(c["tps"] for c in cells) if cells else None

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    def ms(value: float) -> str:
        return f"{value * 1000:.1f}"

    mem = psutil.virtual_memory().total / 2**30
    print(f"\nattune-sse fan-out benchmark: {os.cpu_count()} cores, {mem:.0f} GiB, PostgreSQL {args.server_version}, "
          f"instances of {WORKERS} gevent workers, pgbench and the load client on the same cores; "
          f"{elapsed / 60:.1f} min in all")
    print(f"writes: pgbench, {args.writers} clients, UPDATE of one of {EXECUTIONS:,} executions at random, "
          f"{args.seconds:g} s per cell, median of {args.rounds} round(s), "
          f"{'PostgreSQL and pgbench pinned to core 0, attune-sse and Redis to the rest' if args.pin else 'unpinned'}"
          f"; delivery: {args.streams} streams over "
          f"the instances, {args.rate:g} updates/s for {args.delivery_seconds:g} s from one writer "
          f"(latency: UPDATE sent -> client's receipt)\n")
    header = ["mode", "instances", "LISTEN conns", "updates/s (median)", "vs 1 instance", "vs worker mode",
              "streams", "events", "lost", "dup", "p50 ms", "p99 ms", "max ms", "client CPU s", "server CPU s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for count in args.instances:
        for mode in args.modes:
            key = (mode, count)
            cells = writes.get(key, [])
            tps = median_tps(mode, count)
            listens = span([c["listens"] for c in cells]) if cells else "-"
            if cells and span([c["listens"] for c in cells]) != str(expected_listens(mode, count)):
                listens += f" (expected {expected_listens(mode, count)})"
            d = deliveries.get(key)
            row = [mode, str(count), listens, f"{tps:,.0f}" if tps else "failed",
                   ratio(tps, median_tps(mode, args.instances[0])) if args.instances[0] == 1 else "-",
                   ratio(tps, median_tps("worker", count)) if "worker" in args.modes else "-"]
            if d:
                streams = f"{d['streams']}" + (f" of {d['asked']}" if d["streams"] < d["asked"] else "")
                row += [streams, str(d["events"]), str(d["lost"]), str(d["dup"]), ms(d["p50"]), ms(d["p99"]),
                        ms(d["max"]), f"{d['client_cpu']:.1f}", f"{d['server_cpu']:.1f}"]
            else:
                row += ["-"] * 9
            print("| " + " | ".join(row) + " |")

    print("\nDetails: start = seconds until every instance was ready (each round); catch-up = seconds after pgbench "
          "until every worker had published the cell's events (worst round); server CPU during writes = gunicorn "
          "processes, seconds per cell (median); during delivery: PostgreSQL and Redis CPU seconds; publishers / "
          "candidates: connections of the cluster's Redis publisher (attune-sse-publisher ...) / of it and the "
          "instances' leaders standing for it (attune-sse-leader), during the write cells; PG conns: the most "
          f"connections to the database seen in the cell (max_connections {args.max_connections}).\n")
    header = ["mode", "instances", "start s", "catch-up s", "server CPU s, writes", "PostgreSQL CPU s, delivery",
              "Redis CPU s, delivery", "publishers / candidates", "PG conns", "deliveries/s", "updates/s made",
              "log warnings"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for count in args.instances:
        for mode in args.modes:
            key = (mode, count)
            cells, d = writes.get(key, []), deliveries.get(key)
            row = [mode, str(count), "/".join(f"{s:.1f}" for s in starts.get(key, [])) or "-",
                   f"{max(c['caught_up'] for c in cells):.1f}" if cells else "-",
                   f"{statistics.median(c['server_cpu'] for c in cells):.1f}" if cells else "-",
                   f"{d['postgres_cpu']:.1f}" if d else "-",
                   f"{d['redis_cpu']:.1f}" if d and mode == "redis" else "-",
                   f"{span([c['publishers'] for c in cells])} / {max(c['leaders'] for c in cells)}" if cells else "-",
                   str(max([c["connections"] for c in cells] + ([d["connections"]] if d else []))) if cells else "-",
                   f"{d['deliveries'] / args.delivery_seconds:,.0f}" if d else "-",
                   f"{d['rate']:.0f}" if d else "-",
                   str(len(logs.get(key, [])))]
            print("| " + " | ".join(row) + " |")

    checks = []
    for (mode, count), cells in sorted(writes.items()):
        for i, c in enumerate(cells):
            if c["published_min"] < c["recorded"]:
                checks.append(f"writes {mode} x{count} round {i + 1}: {c['recorded']} events recorded, a worker "
                              f"published only {c['published_min']:.0f} within {CATCH_UP_TIMEOUT:.0f} s")
        if cells and span([c["publishers"] for c in cells]) != ("1" if mode == "redis" else "0"):
            checks.append(f"writes {mode} x{count}: {span([c['publishers'] for c in cells])} Redis publisher(s)")
    for (mode, count), d in sorted(deliveries.items()):
        if d["lost"] or d["dup"] or d["streams"] < d["asked"] or d["errors"] or d["open_after"] < d["streams"]:
            checks.append(f"delivery {mode} x{count}: {d['streams']} of {d['asked']} streams live "
                          f"(errors {d['errors'] or 'none'}), {d['open_after']} open after the window, "
                          f"{d['lost']} lost, {d['dup']} duplicated")
        if span(d["listens"]) != str(expected_listens(mode, count)):
            checks.append(f"delivery {mode} x{count}: {span(d['listens'])} LISTEN connections during the window")
    for key, reasons in sorted(failures.items()):
        checks += [f"{key[0]} x{key[1]}: FAILED: {reason}" for reason in reasons]
    print("\nChecks: " + ("every worker published every event of each write cell; every stream received every "
                          "delivery event once" if not checks else "PROBLEMS"))
    for line in checks:
        print(f"  {line}")

    counted: dict[str, int] = {}
    for lines in logs.values():
        for line in lines:
            # Without the time, pid and numbers: one entry per kind of message.
            key = re.sub(r"\d+", "N", line.split("] ", 2)[-1] if "] " in line else line)[:200]
            counted[key] = counted.get(key, 0) + 1
    print("\nServer logs, warnings and errors (numbers as N), all cells:" + ("" if counted else " none"))
    for line, count in sorted(counted.items(), key=lambda item: -item[1]):
        print(f"  {count:>5}x {line}")


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="worker,instance,redis", help="comma-separated: worker, instance, redis")
    parser.add_argument("--instances", default="1,4,16", help="instance counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=8, help="pgbench time of each write cell")
    parser.add_argument("--rounds", type=int, default=3, help="write cells of each mode and count (median shown)")
    parser.add_argument("--writers", type=int, default=8, help="pgbench clients")
    parser.add_argument("--streams", type=int, default=1000, help="SSE streams of the delivery cells")
    parser.add_argument("--rate", type=float, default=100, help="updates/s of the delivery cells")
    parser.add_argument("--delivery-seconds", type=float, default=10, help="length of each delivery window")
    parser.add_argument("--warmup-seconds", type=float, default=2, help="updates at --rate before each window")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let the write cells' processes share every core (by default the database and "
                             "pgbench get core 0, attune-sse and Redis the others)")
    parser.add_argument("--logs", type=Path, help="copy every instance's gunicorn log into this folder (per cell)")
    parser.add_argument("--quick", action="store_true",
                        help="to try it out: instances 1,4, 4 s cells, 1 round, 300 streams (given options win)")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(instances="1,4", seconds=4, rounds=1, streams=300, delivery_seconds=4, warmup_seconds=1)
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    args.instances = [int(n) for n in str(args.instances).split(",")]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    if "redis" in args.modes and not Path(REDIS_SERVER).exists():
        parser.error(f"{REDIS_SERVER} not found: the redis mode needs it")

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="attune-fanout-"))
    db: Database | None = None
    redis: Redis | None = None
    writer: Writer | None = None
    writes: dict[tuple[str, int], list[dict[str, Any]]] = {}
    deliveries: dict[tuple[str, int], dict[str, Any]] = {}
    starts: dict[tuple[str, int], list[float]] = {}
    failures: dict[tuple[str, int], list[str]] = {}
    logs: dict[tuple[str, int], list[str]] = {}
    stack = contextlib.ExitStack()
    try:
        # 16 instances x 2 workers: each worker holds up to pool_size + backlog_pool_size + 1 (access watch)
        # + its LISTEN, and each instance's leader one lock connection with the redis mode: about 160.
        database = stack.enter_context(harness.database(work, {"max_connections": "400"}))
        url, embedded = database
        db = Database(url, embedded)
        args.server_version = db.query("SHOW server_version")[0][0].split()[0]
        (args.max_connections,), = db.query("SHOW max_connections")
        log(f"PostgreSQL {args.server_version}, max_connections {args.max_connections}; "
            f"seeding {EXECUTIONS:,} executions")
        execution_ids = db.seed()
        if "redis" in args.modes:
            redis = Redis(work)
            log(f"redis-server on 127.0.0.1:{redis.port}")
        pgbench = db.pgbench()
        script = work / "update.sql"
        script.write_text(PGBENCH_SCRIPT.format(executions=EXECUTIONS))
        writer = Writer(url, execution_ids)
        token: str | None = None

        for ci, count in enumerate(args.instances):
            for rnd in range(args.rounds):
                # A different mode goes first in each round (and for each count), so drift favours none.
                shift = (rnd + ci) % len(args.modes)
                for mode in args.modes[shift:] + args.modes[:shift]:
                    key = (mode, count)
                    db.fresh_cell()
                    if redis is not None:
                        redis.clear()
                    cell_dir = work / f"{mode}-{count}-{rnd + 1}"  # its config and log files
                    cell_dir.mkdir()
                    cluster = Cluster(mode, count, url, redis.url if redis else "", cell_dir)
                    try:
                        seconds = cluster.start()
                        starts.setdefault(key, []).append(seconds)
                        log(f"{mode} x{count}, round {rnd + 1}: {count} instance(s) ready in {seconds:.1f} s")
                        if token is None:
                            token = register(cluster.servers[0])
                        cluster.redis_pids = [redis.pid] if redis is not None and mode == "redis" else []
                        cell = write_cell(db, cluster, pgbench, script, args.writers, args.seconds, args.pin)
                        writes.setdefault(key, []).append(cell)
                        log(f"  writes: {cell['tps']:,.0f} updates/s, LISTEN connections {span(cell['listens'])}, "
                            f"server CPU {cell['server_cpu']:.1f} s; every worker published "
                            f"{cell['published_min']:.0f} of {cell['recorded']} events, "
                            f"{cell['caught_up']:.1f} s after pgbench")
                        if rnd == 0:
                            d = delivery_cell(db, cluster, redis, writer, token, args, work)
                            deliveries[key] = d
                            log(f"  delivery: {d['streams']} streams, {d['events']} events at {d['rate']:.0f}/s: "
                                f"p50 {d['p50'] * 1000:.1f} ms, p99 {d['p99'] * 1000:.1f} ms, "
                                f"max {d['max'] * 1000:.1f} ms, lost {d['lost']}, dup {d['dup']}; CPU s: client "
                                f"{d['client_cpu']:.1f}, servers {d['server_cpu']:.1f}, PostgreSQL "
                                f"{d['postgres_cpu']:.1f}, Redis {d['redis_cpu']:.1f}")
                    except Exception as exc:  # a failed cell is reported, the others still run
                        failures.setdefault(key, []).append(f"round {rnd + 1}: {exc}"[:2000])
                        log(f"{mode} x{count}, round {rnd + 1}: FAILED: {exc}"[:3000])
                    finally:
                        cluster.stop()
                        if args.logs is not None:
                            shutil.copytree(cell_dir, args.logs / cell_dir.name, dirs_exist_ok=True,
                                            ignore=shutil.ignore_patterns("*.yaml", "*.bin"))
                        lines = cluster.log_lines()
                        logs.setdefault(key, []).extend(lines)
                        if lines:
                            log(f"  {len(lines)} warning/error line(s) in the server logs, e.g. {lines[0][:300]}")
        report(args, writes, deliveries, starts, failures, logs, time.monotonic() - started)
    finally:
        if writer is not None:
            writer.close()
        if redis is not None:
            redis.stop()
        if db is not None:
            db.conn.close()
        stack.close()  # the database
        shutil.rmtree(work, ignore_errors=True)


def run_load_client() -> None:
    """bench/loadclient.py's client, reading CLIENT_READ_SIZE bytes at a time."""
    sys.path.insert(0, str(ROOT / "bench"))
    import loadclient

    loadclient.Client.read_size = CLIENT_READ_SIZE
    loadclient.Client().run()


if __name__ == "__main__":
    if sys.argv[1:] == ["--load-client"]:
        run_load_client()
    else:
        main()
