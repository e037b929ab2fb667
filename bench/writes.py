"""Write cost of the execution trigger, with the service running and listening.

    .venv/bin/python bench/writes.py                 # about 9 minutes
    .venv/bin/python bench/writes.py --quick         # about 2 minutes, to try it out

Starts its own PostgreSQL (embedded, with its default durability: fsync and
synchronous commit on; or ATTUNE_BENCH_DATABASE_URL) and attune-sse on it
(gunicorn, 2 gevent workers, so two listeners LISTEN throughout), then for
each trigger on ``attune.execution`` and each number of concurrent writers
runs pgbench: each transaction UPDATEs the status of one of 10,000 executions
chosen at random. Triggers, all in the same run, cells interleaved and
repeated (median of the rounds):

- none: no trigger at all (the ceiling);
- seed: the seed's plain NOTIFY trigger (bench/triggers/seed.sql), which
  records nothing: the reference the target is set against;
- previous: attune-sse before this design (bench/triggers/previous.sql): an
  exclusive ordering lock taken at a transaction's first change, held to its end;
- alternative: the event written at commit, ordered by an exclusive lock taken
  there (bench/triggers/commit_lock.sql), the design not chosen;
- attune-sse: what ``sql/`` installs now: ids drawn at commit, no lock of its
  own, readers wait out the commits in flight.

Then, per trigger, the wait of a write behind an open transaction:
transaction A UPDATEs execution 1 and stays open 2 s; meanwhile execution 2
is UPDATEd (autocommit, ``statement_timeout`` 5 s) and its time is taken.

Before each cell the event record is emptied and a CHECKPOINT taken, so every
cell starts alike. After each attune-sse cell the benchmark waits until both
listeners have published every event the cell recorded, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attune_sse.storage.embedded import EmbeddedPostgres  # noqa: E402
from attune_sse.testing import ServerProcess  # noqa: E402
from bench import harness  # noqa: E402

EXECUTIONS = 10_000
TRIGGERS = {
    "none": "no trigger",
    "seed": "seed: plain NOTIFY",
    "previous": "previous: lock from 1st change",
    "commit_lock": "alternative: lock at commit",
    "attune": "attune-sse: ids at commit",
}
RECORDING = ("previous", "commit_lock", "attune")  # the triggers that write the event record
TRIGGER_SQL = ROOT / "bench" / "triggers"
PGBENCH_SCRIPT = """\\set id random(1, {executions})
\\set s random(1, 4)
UPDATE attune.execution
   SET status = (CASE :s WHEN 1 THEN 'scheduled' WHEN 2 THEN 'running' WHEN 3 THEN 'completed' ELSE 'failed' END)
                ::attune.execution_status_enum
 WHERE id = :id;
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Database:
    """The benchmark's database: SQL, the trigger in place, and its processes' CPU."""

    def __init__(self, url: str, embedded: EmbeddedPostgres | None) -> None:
        self.url = url
        self.embedded = embedded
        self.conn = psycopg2.connect(url, application_name="bench-writes")
        self.conn.autocommit = True
        # What sql/ installed, to put back after the other triggers had their turn.
        self.attune_triggers = self.query(
            """SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger
               WHERE tgrelid = 'attune.execution'::regclass AND NOT tgisinternal
                 AND tgname <> 'execution_updated'""")
        if not self.attune_triggers:
            raise SystemExit("no attune-sse trigger on attune.execution: apply the migrations first")
        for name in ("seed", "previous", "commit_lock"):
            self.execute((TRIGGER_SQL / f"{name}.sql").read_text())
        self.drop_triggers()

    def execute(self, sql: str, params: tuple | None = None) -> None:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)  # no params: no % interpolation (the trigger files use format())

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def drop_triggers(self) -> None:
        for (name,) in self.query("""SELECT tgname FROM pg_trigger WHERE tgrelid = 'attune.execution'::regclass
                                     AND NOT tgisinternal AND tgname <> 'execution_updated'"""):
            self.execute(f'DROP TRIGGER "{name}" ON attune.execution')

    def use_trigger(self, trigger: str) -> None:
        self.drop_triggers()
        if trigger == "attune":
            for _, definition in self.attune_triggers:
                self.execute(definition)
        elif trigger == "commit_lock":
            self.execute("""CREATE CONSTRAINT TRIGGER bench_commit_lock_notify AFTER INSERT OR UPDATE
                            ON attune.execution DEFERRABLE INITIALLY DEFERRED
                            FOR EACH ROW EXECUTE FUNCTION attune.bench_commit_lock_notify()""")
        elif trigger != "none":
            self.execute(f"""CREATE TRIGGER bench_{trigger}_notify AFTER INSERT OR UPDATE ON attune.execution
                             FOR EACH ROW EXECUTE FUNCTION attune.bench_{trigger}_notify()""")

    def restore(self) -> None:
        self.use_trigger("attune")
        self.execute("DROP FUNCTION IF EXISTS attune.bench_seed_notify(), attune.bench_previous_notify(), "
                     "attune.bench_commit_lock_notify()")

    def fresh_cell(self) -> None:
        """Every cell starts with an empty record, right after a checkpoint."""
        self.execute("TRUNCATE attune.execution_event")
        # Not allowed to a non-superuser of an external server: the cells are a little noisier then.
        with contextlib.suppress(psycopg2.Error):
            self.execute("CHECKPOINT")


def process_tree(pid: int) -> list[int]:
    try:
        return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes (children that have exited are not counted)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def machine_cpu() -> float:
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pgbench_binary(db: Database) -> str:
    if db.embedded is not None:
        candidate = db.embedded._bin / "pgbench"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("pgbench")
    if found is None:
        raise SystemExit("pgbench not found (it comes with pgserver's binaries, or apt-get install postgresql-client)")
    return found


def seed(db: Database) -> None:
    db.execute("INSERT INTO attune.pack (ref, label) VALUES ('bench_pack', 'b') ON CONFLICT DO NOTHING")
    db.execute("""INSERT INTO attune.action (ref, pack, pack_ref, label)
                  SELECT 'bench_pack.write', id, 'bench_pack', 'w' FROM attune.pack WHERE ref = 'bench_pack'
                  ON CONFLICT DO NOTHING""")
    (have,), = db.query("SELECT count(*) FROM attune.execution")
    if have < EXECUTIONS:
        db.execute("""INSERT INTO attune.execution (action, action_ref, status)
                      SELECT a.id, a.ref, 'requested' FROM attune.action a, generate_series(1, %s)
                      WHERE a.ref = 'bench_pack.write'""", (EXECUTIONS - have,))
    db.execute("VACUUM ANALYZE attune.execution")


def listeners_received(server: ServerProcess) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=5).text
    match = re.search(r"^attune_sse_events_received_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def run_cell(db: Database, server: ServerProcess, pgbench: str, script: Path, trigger: str,
             writers: int, seconds: float) -> dict[str, Any]:
    db.use_trigger(trigger)
    db.fresh_cell()
    received_before = listeners_received(server)
    service = process_tree(server.process.pid)
    cpu_before = (children_cpu(), machine_cpu(), cpu_seconds(service))
    started = time.monotonic()
    out = subprocess.run(
        [pgbench, "-n", "-f", str(script), "-c", str(writers), "-j", str(min(writers, 2)),
         "-T", str(seconds), db.url],
        capture_output=True, text=True, check=False,
    )
    wall = time.monotonic() - started
    cpu_after = (children_cpu(), machine_cpu(), cpu_seconds(service))
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out.stdout)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed ({trigger}, {writers} writers):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    pgbench_cpu, machine, service_cpu = (after - before for after, before in zip(cpu_after, cpu_before, strict=True))
    # PostgreSQL's backends come and go with pgbench's connections: counted as the rest of the machine.
    shares = (pgbench_cpu, machine - pgbench_cpu - service_cpu, service_cpu)
    cell = {"tps": float(match.group(1)), "cpu": [round(100 * s / wall) for s in shares]}
    if trigger in RECORDING:
        (recorded,), = db.query("SELECT count(*) FROM attune.execution_event")
        workers = server.workers
        deadline = time.monotonic() + 60
        while True:
            got = listeners_received(server) - received_before
            if got >= recorded * workers or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        cell["recorded"], cell["published"] = recorded, got / workers
    return cell


def blocked_write(db: Database, trigger: str, hold: float = 2.0) -> float | None:
    """Seconds an UPDATE of execution 2 takes while a transaction that UPDATEd execution 1 stays
    open ``hold`` seconds; None if it hit its 5 s statement timeout."""
    db.use_trigger(trigger)
    a = psycopg2.connect(db.url, application_name="bench-open-transaction")
    b = psycopg2.connect(db.url, application_name="bench-other-writer")
    b.autocommit = True
    try:
        with a.cursor() as cur:
            cur.execute("UPDATE attune.execution SET status = 'running' "
                        "WHERE id = (SELECT min(id) FROM attune.execution)")
        opened = time.monotonic()
        took: list[float | None] = []

        def other_writer() -> None:
            with b.cursor() as cur:
                cur.execute("SET statement_timeout = '5s'")
                began = time.monotonic()
                try:
                    cur.execute("""UPDATE attune.execution SET status = 'running'
                                   WHERE id = (SELECT min(id) + 1 FROM attune.execution)""")
                    took.append(time.monotonic() - began)
                except psycopg2.errors.QueryCanceled:
                    took.append(None)

        thread = threading.Thread(target=other_writer)
        thread.start()
        time.sleep(max(0.0, hold - (time.monotonic() - opened)))
        a.commit()
        thread.join(10)
        return took[0] if took else None
    finally:
        a.close()
        b.close()


def report(args: argparse.Namespace, cells: dict[tuple[str, int], list[dict[str, Any]]],
           waits: dict[str, float | None], checks: list[str]) -> None:
    writers = args.writers
    cpus = os.cpu_count()
    mem = psutil.virtual_memory().total / 2**30
    print(f"\nattune-sse write benchmark: {cpus} cores, {mem:.0f} GiB, PostgreSQL {args.server_version}, "
          f"pgbench with -j min(writers, 2) on the same cores; attune-sse listening with 2 gevent workers")
    print(f"\nUpdates/s: each transaction UPDATEs one of {EXECUTIONS:,} executions at random; "
          f"{args.seconds:g} s per cell, median of {args.rounds} round(s)")
    header = f"{'trigger':<32}" + "".join(f"{f'{w} writer' + ('s' if w > 1 else ''):>13}" for w in writers)
    print(header)

    def median(trigger: str, w: int) -> float:
        return statistics.median(c["tps"] for c in cells[(trigger, w)])

    for trigger, label in TRIGGERS.items():
        print(f"{label:<32}" + "".join(f"{median(trigger, w):>13,.0f}" for w in writers))
    for trigger in RECORDING:
        label = f"{TRIGGERS[trigger].split(':')[0]} / seed"
        print(f"{label:<32}" + "".join(f"{median(trigger, w) / median('seed', w):>12.2f}x" for w in writers))

    print("\nCPU during the cells (100% = one core; median round): pgbench / PostgreSQL and the rest / attune-sse")
    print(header)
    for trigger, label in TRIGGERS.items():
        row = ""
        for w in writers:
            shares = [statistics.median(c["cpu"][k] for c in cells[(trigger, w)]) for k in range(3)]
            row += f"{'/'.join(f'{s:.0f}' for s in shares):>13}"
        print(f"{label:<32}" + row)

    print("\nA write of execution B while a transaction that changed execution A stays open 2 s")
    print(f"{'trigger':<32}{'B waited':>13}")
    for trigger, label in TRIGGERS.items():
        wait = waits[trigger]
        shown = "> 5 s (timed out)" if wait is None else f"{wait * 1000:.1f} ms"
        print(f"{label:<32}{shown:>13}")
    print("\n" + "\n".join(checks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", default="1,8,32,64", help="concurrent writers, comma-separated")
    parser.add_argument("--seconds", type=int, default=10, help="length of each cell")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of every cell (the median is shown)")
    parser.add_argument("--quick", action="store_true", help="4 s cells, 1 round")
    args = parser.parse_args()
    args.writers = [int(w) for w in args.writers.split(",")]
    if args.quick:
        args.seconds, args.rounds = 4, 1

    work = Path(tempfile.mkdtemp(prefix="attune-writes-"))
    try:
        with harness.database(work, {"max_connections": "200"}) as (url, embedded):
            db = Database(url, embedded)
            server = None
            try:
                args.server_version = db.query("SHOW server_version")[0][0].split()[0]
                seed(db)
                server = harness.attune(url, work, database={"pool_size": 2}, events={"prune_interval_seconds": 0})
                pgbench = pgbench_binary(db)
                script = work / "update.sql"
                script.write_text(PGBENCH_SCRIPT.format(executions=EXECUTIONS))

                cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
                checks = []
                order = list(TRIGGERS)
                for rnd in range(args.rounds):
                    for w in args.writers:
                        # A different trigger goes first in each round, so drift does not favour one.
                        for trigger in order[rnd % len(order):] + order[:rnd % len(order)]:
                            cell = run_cell(db, server, pgbench, script, trigger, w, args.seconds)
                            cells.setdefault((trigger, w), []).append(cell)
                            log(f"round {rnd + 1}: {trigger:<8} {w:>2} writers: {cell['tps']:,.0f} updates/s, "
                                f"CPU pgbench/postgres/service {cell['cpu']}%")
                            if trigger in RECORDING:
                                ok = cell["published"] >= cell["recorded"]
                                checks.append(
                                    f"{trigger}, round {rnd + 1}, {w} writers: {cell['recorded']:,} events "
                                    f"recorded, each listener published {cell['published']:,.0f}"
                                    + ("" if ok else "  <-- MISSING"))
                waits = {trigger: blocked_write(db, trigger) for trigger in TRIGGERS}
                db.restore()
                report(args, cells, waits, checks)
            finally:
                if server is not None:
                    server.stop()
                db.restore()
                db.conn.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
