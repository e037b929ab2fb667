"""A/B of the stream's hot path: this checkout against another commit's, in alternating rounds.

    git worktree add /tmp/base bec27aa
    .venv/bin/python bench/ab.py --base /tmp/base --rounds 2

Each side runs on a database of its own (migrated by its own code) in one
embedded PostgreSQL, as gunicorn with 2 gevent workers; one load-client process
(one epoll loop, bench/loadclient.py) serves both. Each round opens the streams
on one side, warms up, measures a window of updates (latency from just before
an UPDATE's commit to each client's receipt), and closes them; the sides
alternate, so a drift of the machine during the run falls on both. The table
gives each round, the medians of each side, and the ratio this/base; CPU is the
share of one core taken by the side's gunicorn (app) and by the load client.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attune_sse.core.grants import ALL_GRANTS
from attune_sse.storage.embedded import EmbeddedPostgres, free_port
from attune_sse.storage.migrate import apply_migrations
from bench import harness, scale

THIS = Path(__file__).resolve().parent.parent


class Side:
    """One side of the A/B: a checkout's attune-sse, served by gunicorn from that checkout."""

    def __init__(self, name: str, label: str, tree: Path, database_url: str, work: Path) -> None:
        self.name, self.label, self.tree, self.database_url = name, label, tree, database_url
        self.execution_ids: list[int] = []
        self.round = 0
        self.port = free_port()
        config = {"database": {"url": database_url, "pool_size": 5},
                  "server": {"host": "127.0.0.1", "port": self.port, "workers": 2, "worker_connections": 12000,
                             "sse_keepalive_seconds": 15, "max_streams_per_identity": 20000},
                  "security": {"jwt_secret": harness.SECRET, "allow_registration": True,
                               "default_grants": ALL_GRANTS},
                  "log": {"level": "warn"}}
        self.config_path = work / f"{name}.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = work / f"{name}.log"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("ATTUNE")},
                    "ATTUNE_CONFIG": str(self.config_path), "PYTHONPATH": str(tree)}
        self.process: subprocess.Popen[bytes] | None = None
        self.token = ""

    def migrate(self) -> None:
        """With the side's own code: each commit's triggers and tables are its own."""
        if self.tree == THIS:
            apply_migrations(self.database_url)
            return
        # Where the checkout keeps it: attune_sse.storage.migrate now, attune_sse.migrate before.
        subprocess.run([sys.executable, "-c", "import importlib, importlib.util, sys; "
                        "name = 'attune_sse.storage.migrate' if importlib.util.find_spec('attune_sse.storage') "
                        "else 'attune_sse.migrate'; importlib.import_module(name).apply_migrations(sys.argv[1])",
                        self.database_url], env=self.env, cwd=self.tree, check=True)

    def start(self) -> None:
        conf = self.tree / "gunicorn.conf.py"
        argv = [sys.executable, "-m", "gunicorn", "-c",
                str(conf) if conf.exists() else "python:attune_sse.serve.gunicorn_conf"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, env=self.env, cwd=self.tree, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{self.port}/readyz"):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} did not start; see {self.log_path}")
            time.sleep(0.2)
        if not self.token:
            self.token = harness.register(f"http://127.0.0.1:{self.port}", f"ab-{self.name}")

    @property
    def stream_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/executions/stream?token={self.token}"

    def stop(self) -> None:
        if self.process is not None:
            scale.stop_process(self.process)
            self.process = None


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def measure(side: Side, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One round on one side: open the streams, warm up, measure, close."""
    updater = scale.Updater(side.database_url, side.execution_ids)
    clients = scale.LoadClients(1)
    side.start()
    try:
        sub = scale.subscribe(clients, updater, side.stream_url, args.streams, timeout=60)
        assert side.process is not None
        cpu = {"app": scale.tree(side.process.pid), "load": [p.pid for p in clients.procs]}
        scale.window(clients, updater, args.rate, scale.WARMUP_SECONDS, work, sub["live"])
        spies = [] if args.profile is None else [
            subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
                              "--rate", "200", "--format", "raw", "--nonblocking",
                              "--output", str(args.profile / f"{side.name}-{side.round}-{pid}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for pid in scale.tree(side.process.pid)[1:]]
        result = scale.window(clients, updater, args.rate, args.seconds, work, sub["live"], cpu)
        for spy in spies:
            spy.wait(30)
        result["streams"] = sub["live"]
        return result
    finally:
        clients.quit()
        updater.close()
        side.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a checkout of the commit to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100, help="updates/s")
    parser.add_argument("--seconds", type=float, default=10, help="length of each measured window")
    parser.add_argument("--profile", type=Path, help="a folder for py-spy's samples of each worker (raw format) "
                        "during each measured window")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="attune-ab-"))
    embedded = EmbeddedPostgres(work / "pgdata", settings={"fsync": "off", "max_connections": "300"})
    embedded.start()
    base_rev = subprocess.run(["git", "-C", str(args.base), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or str(args.base)
    this_rev = subprocess.run(["git", "-C", str(THIS), "describe", "--always", "--dirty"], capture_output=True,
                              text=True).stdout.strip()
    try:
        sides = []
        for name, rev, tree in (("this", this_rev, THIS), ("base", base_rev, args.base.resolve())):
            embedded.create_database(f"ab_{name}")
            side = Side(name, f"{name} ({rev})", tree, embedded.url(f"ab_{name}"), work)
            side.migrate()
            side.execution_ids = scale.seed(side.database_url)
            sides.append(side)
        rows: list[tuple[str, int, dict[str, Any]]] = []
        for round_no in range(1, args.rounds + 1):
            order = sides if round_no % 2 else sides[::-1]
            for side in order:
                side.round = round_no
                result = measure(side, args, work)
                rows.append((side.label, round_no, result))
                scale.log(f"{side.label} round {round_no}: {scale._fmt_window(result)}")
        report(rows, sides, args)
    finally:
        embedded.destroy()


def report(rows: list[tuple[str, int, dict[str, Any]]], sides: list[Side], args: argparse.Namespace) -> None:
    print(f"\nA/B: {args.streams} streams, {args.rate:g} updates/s for {args.seconds:g}s per round, "
          f"{args.rounds} rounds alternating; 2 gevent workers per side; 1 load-client process; "
          f"{os.cpu_count()} cores shared by all")
    print(f"{'side':<18}{'round':>6}{'streams':>9}{'deliv/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'lost':>6}{'app CPU':>9}{'load CPU':>9}")
    for label, round_no, r in rows:
        print(f"{label:<18}{round_no:>6}{r['streams']:>9}{r['deliveries_per_s']:>9.0f}{r['p50'] * 1000:>9.1f}"
              f"{r['p99'] * 1000:>9.1f}{r['max'] * 1000:>9.1f}{r['lost']:>6}{r['cpu']['app'] * 100:>8.0f}%"
              f"{r['cpu']['load'] * 100:>8.0f}%")
    medians = {}
    for side in sides:
        mine = [r for label, _, r in rows if label == side.label]
        medians[side.name] = {k: statistics.median(r[k] for r in mine) * 1000 for k in ("p50", "p99")}
    this, base = medians["this"], medians["base"]
    for q in ("p50", "p99"):
        print(f"median {q}: this {this[q]:.1f} ms, base {base[q]:.1f} ms, this/base {this[q] / base[q]:.2f}")


if __name__ == "__main__":
    main()
