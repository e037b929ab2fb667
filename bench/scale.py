"""Scale benchmark: attune-sse against two baselines, in one run, on this machine.

    .venv/bin/python bench/scale.py            # the full run (a few minutes)
    .venv/bin/python bench/scale.py --quick    # smaller numbers, to try it out

Starts its own PostgreSQL (embedded, or ATTUNE_BENCH_DATABASE_URL), its own
Redis (redis-server on a free port), and for each system a gunicorn instance
with 2 gevent workers; the load comes from ``bench/loadclient.py`` processes
(one epoll loop each) on 127.0.0.1. Systems:

- attune-sse: one LISTEN per worker, fan-out in the worker (this project);
- naive: each SSE request opens its own PostgreSQL connection and LISTENs;
- flask-sse: Flask-SSE over Redis, fed by a PostgreSQL LISTEN bridge.

Per system: (1) fan-out: F streams, U updates/s for D seconds, latency from
the UPDATE's commit to each client's receipt (p50/p99/max) and events lost;
(2) saturation: the same streams at doubling update rates until p99 passes
100 ms or an event is lost; (3) hold: H streams at once, each receiving an
event, and the memory they cost; (4) for attune-sse, SIGTERM with the H
streams open: time until every worker has exited, and how many streams got a
clean end. Every phase is bounded in count and time. Prints tables and ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attune_sse.serve.launch import Gunicorn  # noqa: E402
from attune_sse.storage.embedded import free_port  # noqa: E402
from bench import harness  # noqa: E402

P99_LIMIT = 0.100  # saturation: the highest rate whose p99 stays under this, with nothing lost
EXECUTIONS = 200  # updates go round-robin over this many executions
WARMUP_SECONDS = 3


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def pss(pids: list[int]) -> int:
    """Proportional set size of these processes, in bytes (shared pages split between them)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_full_info().pss
    return total


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def tree(pid: int) -> list[int]:
    try:
        proc = psutil.Process(pid)
        return [pid] + [child.pid for child in proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


# -- the load --------------------------------------------------------------------------------


class LoadClients:
    """Several loadclient.py processes, the streams split between them."""

    def __init__(self, count: int) -> None:
        self.procs = [
            subprocess.Popen([sys.executable, str(ROOT / "bench" / "loadclient.py")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, bufsize=1)
            for _ in range(count)
        ]

    def ask(self, command: dict[str, Any], per_client: Callable[[int], dict[str, Any]] | None = None) -> list[dict]:
        for i, proc in enumerate(self.procs):
            proc.stdin.write(json.dumps({**command, **(per_client(i) if per_client else {})}) + "\n")
        return [json.loads(proc.stdout.readline()) for proc in self.procs]

    def open(self, url: str, n: int) -> tuple[int, dict[str, int]]:
        k = len(self.procs)
        replies = self.ask({"cmd": "open", "url": url}, lambda i: {"n": n // k + (1 if i < n % k else 0)})
        errors: dict[str, int] = {}
        for reply in replies:
            for name, count in reply["errors"].items():
                errors[name] = errors.get(name, 0) + count
        return sum(r["opened"] for r in replies), errors

    def stats(self) -> dict[str, Any]:
        total: dict[str, Any] = {"statuses": {}}
        for reply in self.ask({"cmd": "stats"}):
            for name, value in reply.items():
                if name == "statuses":
                    for status, count in value.items():
                        total["statuses"][status] = total["statuses"].get(status, 0) + count
                else:
                    total[name] = total.get(name, 0) + value
        return total

    def collect(self, commits: dict[int, float], work: Path) -> tuple[list[float], int, int]:
        path = work / "commits.bin"
        ids, stamps = array("q", commits.keys()), array("d", commits.values())
        with open(path, "wb") as f:
            f.write(len(ids).to_bytes(8, "little"))
            ids.tofile(f)
            stamps.tofile(f)
        replies = self.ask({"cmd": "collect", "commits": str(path)}, lambda i: {"out": str(work / f"lat{i}.bin")})
        latencies = array("d")
        for i in range(len(self.procs)):
            out = work / f"lat{i}.bin"
            latencies.frombytes(out.read_bytes())
        return sorted(latencies), sum(r["lost"] for r in replies), sum(r["duplicates"] for r in replies)

    def close(self) -> None:
        self.ask({"cmd": "close"})

    def quit(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


class Updater:
    """UPDATEs at a steady rate from a few connections; records each event's commit time."""

    def __init__(self, database_url: str, execution_ids: list[int], connections: int = 4) -> None:
        self.execution_ids = execution_ids
        self.conns = []
        for _ in range(connections):
            conn = psycopg2.connect(database_url, application_name="bench-updater")
            conn.autocommit = True
            with conn.cursor() as cur:
                # The commit is visible at once; only its flush to disk is not waited for.
                cur.execute("SET synchronous_commit TO off")
            self.conns.append(conn)
        self.round = 0

    def run(self, rate: float, seconds: float) -> dict[int, float]:
        """Make ``rate * seconds`` updates spread evenly; return {event id: time just before the commit}."""
        total = max(1, round(rate * seconds))
        commits: dict[int, float] = {}
        lock = threading.Lock()
        start = time.monotonic() + 0.05
        statuses = ("running", "scheduled")
        self.round += 1
        next_index = iter(range(total))

        def work(conn: Any) -> None:
            with conn.cursor() as cur:
                for k in next_index:
                    due = start + k / rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    execution_id = self.execution_ids[k % len(self.execution_ids)]
                    status = statuses[(k // len(self.execution_ids) + self.round) % 2]
                    began = time.monotonic()
                    cur.execute("UPDATE attune.execution SET status = %s WHERE id = %s", (status, execution_id))
                    # The event's id is drawn as the UPDATE commits, in this session.
                    cur.execute("SELECT currval('attune.execution_event_id_seq')")
                    event_id = cur.fetchone()[0]
                    with lock:
                        commits[event_id] = began

        threads = [threading.Thread(target=work, args=(conn,)) for conn in self.conns]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return commits

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


# -- the systems -----------------------------------------------------------------------------


@dataclass
class System:
    name: str
    stream_url: str
    master_pid: int
    stop: Callable[[], None]
    log_path: Path | None = None
    extra_pids: Callable[[], list[int]] = field(default=lambda: [])  # the backing store's processes
    sigterm: Callable[[], float] | None = None


def gunicorn(app: str, port: int, env: dict[str, str], work: Path, name: str) -> Gunicorn:
    """A baseline app under gunicorn (attune_sse.serve.launch), once it answers anything at all."""
    with open(work / f"{name}.log", "ab") as log_file:
        proc = Gunicorn({**os.environ, **env}, conf=str(ROOT / "bench" / "baselines" / "gunicorn.conf.py"),
                        extra=("-b", f"127.0.0.1:{port}", app), cwd=ROOT, output=log_file)
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except requests.ConnectionError:
            if proc.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{(work / f'{name}.log').read_text()[-2000:]}") from None
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_attune(database_url: str, work: Path, token_holder: dict) -> System:
    server = harness.attune(database_url, work, server={"sse_keepalive_seconds": 15})
    if "token" not in token_holder:
        token_holder["token"] = harness.register(server.base_url)

    def sigterm() -> float:
        """SIGTERM the master; seconds until it and every worker have exited."""
        workers = tree(server.process.pid)[1:]
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                  for pid in workers):
            time.sleep(0.01)
        return time.monotonic() - started

    return System("attune-sse", f"{server.base_url}/api/v1/executions/stream?token={token_holder['token']}",
                  server.process.pid, lambda: server.stop(), log_path=server.log_path, sigterm=sigterm)


def start_naive(database_url: str, work: Path, postgres_pids: Callable[[], list[int]]) -> System:
    port = free_port()
    proc = gunicorn("bench.baselines.naive_listen:create_app()", port, {"BENCH_DATABASE_URL": database_url},
                    work, "naive")
    return System("naive LISTEN", f"http://127.0.0.1:{port}/stream", proc.pid, lambda: proc.stop(),
                  log_path=work / "naive.log", extra_pids=postgres_pids)


def start_flask_sse(database_url: str, redis_url: str, redis_pid: int, work: Path) -> System:
    port = free_port()
    proc = gunicorn("bench.baselines.flask_sse_redis:create_app()", port, {"BENCH_REDIS_URL": redis_url},
                    work, "flask-sse")
    bridge = subprocess.Popen([sys.executable, "-m", "bench.baselines.flask_sse_redis", "bridge",
                               database_url, redis_url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert bridge.stdout.readline().startswith("bridge listening")

    def stop() -> None:
        stop_process(bridge)
        proc.stop()

    return System("Flask-SSE/Redis", f"http://127.0.0.1:{port}/stream", proc.pid, stop,
                  log_path=work / "flask-sse.log", extra_pids=lambda: [redis_pid])


# -- the phases ------------------------------------------------------------------------------


@dataclass
class Result:
    system: str
    fanout: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    hold: dict[str, Any] = field(default_factory=dict)
    shutdown: dict[str, Any] = field(default_factory=dict)

    @property
    def saturation(self) -> float:
        passed = [s["rate"] for s in self.steps if s["ok"]]
        return max(passed) if passed else 0.0


def subscribe(clients: LoadClients, updater: Updater, url: str, n: int, timeout: float) -> dict[str, Any]:
    """Open n streams; send an update a second until every open stream has received one."""
    started = time.monotonic()
    opened, errors = clients.open(url, n)
    deadline = time.monotonic() + timeout
    while True:
        updater.run(rate=50, seconds=0.02)
        time.sleep(1.0)
        stats = clients.stats()
        live = stats["open"]
        if stats["with_events"] >= live or time.monotonic() > deadline:
            break
    for status, count in stats["statuses"].items():
        if status != "200":
            errors[f"HTTP {status}"] = count
    return {"asked": n, "opened": opened, "errors": errors, "live": stats["with_events"],
            "seconds": time.monotonic() - started}


def settle(clients: LoadClients, quiet: float = 1.0, limit: float = 30.0) -> None:
    """Wait until no event has arrived for ``quiet`` s: an overloaded system's backlog must not
    spill into the next measurement."""
    deadline = time.monotonic() + limit
    last = clients.stats()["ids"]
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = clients.stats()["ids"]
        if now == last:
            return
        last = now


def saturation(system: System, clients: LoadClients, updater: Updater, args: argparse.Namespace, work: Path,
               cpu: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Steps of doubling rates from --rate while p99 < 100 ms with nothing lost; halving ones if the
    first step already fails. Streams a system dropped are opened again before each step."""
    steps: list[dict[str, Any]] = []
    rate, factor = args.rate, 0.0
    while args.min_rate <= rate <= args.max_rate:
        settle(clients)
        live = clients.stats()["with_events"] if not steps else clients.stats()["open"]
        if live < args.fanout_streams:
            clients.close()
            live = subscribe(clients, updater, system.stream_url, args.fanout_streams, timeout=30)["live"]
            settle(clients)
        step = window(clients, updater, rate, args.step_seconds, work, live, cpu)
        step["streams"] = live
        step["ok"] = step["p99"] < P99_LIMIT and step["lost"] == 0 and step["achieved_rate"] > 0.9 * rate
        steps.append(step)
        log(f"{system.name}: saturation step, {live} streams: {_fmt_window(step)} {'ok' if step['ok'] else 'over'}")
        if not factor:
            factor = 2.0 if step["ok"] else 0.5
        if step["ok"] != (factor == 2.0):
            break  # the first failure going up, or the first success going down
        rate *= factor
    return steps


def window(clients: LoadClients, updater: Updater, rate: float, seconds: float, work: Path,
           streams: int, cpu: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Updates at ``rate`` for ``seconds``; latency of every delivery, what was lost, and
    the CPU share of each group of processes in ``cpu`` (100% = one core)."""
    clients.ask({"cmd": "reset"})
    cpu = cpu or {}
    cpu_before = {name: cpu_seconds(pids) for name, pids in cpu.items()}
    began = time.monotonic()
    commits = updater.run(rate, seconds)
    made = time.monotonic() - began
    cpu_share = {name: (cpu_seconds(pids) - cpu_before[name]) / made for name, pids in cpu.items()}
    expected = len(commits) * streams
    # Let the last deliveries land (bounded), then collect.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if clients.stats()["ids"] >= expected:
            break
        time.sleep(0.1)
    latencies, lost, duplicates = clients.collect(commits, work)
    return {
        "rate": rate, "updates": len(commits), "achieved_rate": len(commits) / made,
        "deliveries": len(latencies), "deliveries_per_s": len(latencies) / made,
        "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
        "max": latencies[-1] if latencies else float("nan"), "lost": lost, "duplicates": duplicates,
        "cpu": cpu_share,
    }


def run_system(start: Callable[[], System], args: argparse.Namespace, database_url: str, execution_ids: list[int],
               work: Path, postgres_pids: Callable[[], list[int]]) -> Result:
    system = start()
    result = Result(system.name)
    updater = Updater(database_url, execution_ids)
    clients = LoadClients(args.clients)
    try:
        log(f"{system.name}: fan-out, {args.fanout_streams} streams at {args.rate} updates/s for {args.seconds}s")
        sub = subscribe(clients, updater, system.stream_url, args.fanout_streams, timeout=30)
        if sub["live"] < args.fanout_streams:
            log(f"{system.name}: only {sub['live']} of {args.fanout_streams} streams live ({sub['errors']})")
        cpu = {"app": tree(system.master_pid), "store": system.extra_pids(),
               "load": [p.pid for p in clients.procs], "postgres": postgres_pids()}
        # Warm-up at the measured rate: fresh TCP connections (quick ACKs, small windows) cost
        # more for a few seconds, on every system alike.
        window(clients, updater, args.rate, WARMUP_SECONDS, work, sub["live"])
        result.fanout = {**window(clients, updater, args.rate, args.seconds, work, sub["live"], cpu),
                         "streams": sub["live"]}
        log(f"{system.name}: {_fmt_window(result.fanout)}")
        result.steps = saturation(system, clients, updater, args, work, cpu)
        clients.close()

        log(f"{system.name}: hold, opening {args.hold_streams} streams")
        time.sleep(1)
        before_app, before_extra = pss(tree(system.master_pid)), pss(system.extra_pids())
        sub = subscribe(clients, updater, system.stream_url, args.hold_streams, timeout=60)
        time.sleep(1)
        after_app, after_extra = pss(tree(system.master_pid)), pss(system.extra_pids())
        held = sub["live"]
        check = window(clients, updater, 1, 1, work, held)
        result.hold = {
            **sub, "held": held, "lost": check["lost"] + (sub["opened"] - held) * 0,
            "app_total": after_app, "app_per_stream": (after_app - before_app) / held if held else float("nan"),
            "app_total_per_stream": after_app / held if held else float("nan"),
            "extra_per_stream": (after_extra - before_extra) / held if held else float("nan"),
        }
        log(f"{system.name}: held {held} of {args.hold_streams} streams in {sub['seconds']:.1f}s "
            f"({sub['errors'] or 'no errors'}); app memory {after_app / 2**20:.0f} MiB, "
            f"+{result.hold['app_per_stream'] / 1024:.1f} KiB per stream, "
            f"backing store +{result.hold['extra_per_stream'] / 1024:.1f} KiB per stream")

        if held < args.hold_streams:
            log(f"{system.name}: why streams failed, from its log: {why_failed(system)}")
        if system.sigterm is not None and held:
            seconds = system.sigterm()
            ends = clients.ask({"cmd": "ends", "timeout": 10})
            result.shutdown = {"streams": held, "seconds": seconds,
                               **{k: sum(e[k] for e in ends) for k in ("clean", "cut", "open")}}
            log(f"{system.name}: SIGTERM with {held} streams: workers gone in {seconds:.2f}s, "
                f"{result.shutdown['clean']} clean ends, {result.shutdown['cut']} cut, {result.shutdown['open']} open")
        clients.close()
    finally:
        clients.quit()
        updater.close()
        system.stop()
    return result


def why_failed(system: System) -> str:
    """The most frequent error lines of a system's log."""
    if system.log_path is None or not system.log_path.exists():
        return "no log"
    counts: dict[str, int] = {}
    for line in system.log_path.read_text(errors="replace").splitlines():
        if "Error" in line or "error" in line or "FATAL" in line:
            key = line.split("] ", 2)[-1][:160] if "] " in line else line[:160]
            counts[key] = counts.get(key, 0) + 1
    top = sorted(counts.items(), key=lambda item: -item[1])[:3]
    return "; ".join(f"{count}x {line}" for line, count in top) or "nothing logged"


def _fmt_window(w: dict[str, Any]) -> str:
    cpu = ", ".join(f"{name} {share * 100:.0f}%" for name, share in w["cpu"].items() if share)
    return (f"{w['rate']:g}/s asked, {w['achieved_rate']:.0f}/s made, {w['deliveries_per_s']:.0f} deliveries/s, "
            f"p50 {w['p50'] * 1000:.1f} ms, p99 {w['p99'] * 1000:.1f} ms, max {w['max'] * 1000:.1f} ms, "
            f"lost {w['lost']}; CPU {cpu}")


# -- the report ------------------------------------------------------------------------------


def report(results: list[Result], args: argparse.Namespace) -> None:
    cpu = os.cpu_count()
    mem = psutil.virtual_memory().total / 2**30
    print(f"\nattune-sse scale benchmark: {cpu} cores, {mem:.0f} GiB, Python {sys.version.split()[0]}, "
          f"each system on gunicorn with 2 gevent workers, load from {args.clients} epoll client process(es), "
          f"all on this machine")
    print(f"\nFan-out: {args.fanout_streams} streams, {args.rate:g} updates/s for {args.seconds:g}s "
          f"(latency: UPDATE's commit -> client's receipt)")
    print(f"{'system':<17}{'streams':>8}{'deliv/s':>9}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'lost':>8}"
          f"{'saturation upd/s':>18}")
    for r in results:
        f = r.fanout
        sat = f"{r.saturation:g}" if r.saturation else "none passed"
        print(f"{r.system:<17}{f.get('streams', 0):>8}{f.get('deliveries_per_s', 0):>9.0f}"
              f"{f.get('p50', float('nan')) * 1000:>10.1f}{f.get('p99', float('nan')) * 1000:>10.1f}"
              f"{f.get('max', float('nan')) * 1000:>10.1f}{f.get('lost', 0):>8}{sat:>18}")
    print(f"\nSaturation steps ({args.fanout_streams} streams, {args.step_seconds:g}s each; ok = p99 < "
          f"{P99_LIMIT * 1000:.0f} ms, nothing lost, rate reached)")
    print(f"{'system':<17}{'streams':>8}{'upd/s':>7}{'made/s':>8}{'deliv/s':>9}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'lost':>8}  ok   CPU (100% = one core)")
    for r in results:
        for s in r.steps:
            cpu = ", ".join(f"{name} {share * 100:.0f}%" for name, share in s["cpu"].items() if share)
            print(f"{r.system:<17}{s['streams']:>8}{s['rate']:>7g}{s['achieved_rate']:>8.0f}"
                  f"{s['deliveries_per_s']:>9.0f}{s['p50'] * 1000:>10.1f}{s['p99'] * 1000:>10.1f}{s['lost']:>8}"
                  f"  {'yes' if s['ok'] else 'no ':<4} {cpu}")
    print(f"\nHold: {args.hold_streams} streams asked, each sent one event (memory: PSS, whole gunicorn instance)")
    print(f"{'system':<17}{'held':>7}{'failed':>8}{'app MiB':>9}{'app KiB/stream':>16}{'total/stream':>14}"
          f"{'PG/Redis KiB/stream':>21}{'lost':>6}")
    for r in results:
        h = r.hold
        print(f"{r.system:<17}{h['held']:>7}{h['asked'] - h['held']:>8}{h['app_total'] / 2**20:>9.0f}"
              f"{h['app_per_stream'] / 1024:>16.1f}{h['app_total_per_stream'] / 1024:>14.1f}"
              f"{h['extra_per_stream'] / 1024:>21.1f}{h['lost']:>6}   {h['errors'] or ''}")
    for r in results:
        if r.shutdown:
            s = r.shutdown
            print(f"\nSIGTERM ({r.system}, {s['streams']} streams open): every worker exited in {s['seconds']:.2f}s; "
                  f"{s['clean']} streams ended cleanly, {s['cut']} cut, {s['open']} left open")
    ours = results[0]
    if ours.system != "attune-sse":
        return
    print("\nRatios: how many times attune-sse does better than each baseline, in this run")
    for other in results[1:]:
        sat = (f"{ours.saturation / other.saturation:.1f}x the update rate" if other.saturation
               else f"baseline passed no step down to {args.min_rate:g}/s")
        p99 = other.fanout["p99"] / ours.fanout["p99"]
        held = ours.hold["held"] / other.hold["held"] if other.hold["held"] else float("inf")
        mem = ((other.hold["app_per_stream"] + other.hold["extra_per_stream"])
               / (ours.hold["app_per_stream"] + ours.hold["extra_per_stream"]))
        print(f"  vs {other.system:<16} saturation: {sat}; fan-out p99: {p99:.0f}x lower; "
              f"streams held: {held:.1f}x; memory per stream (app + PostgreSQL/Redis): {mem:.1f}x less")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="attune,naive,flask-sse")
    parser.add_argument("--fanout-streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100, help="updates/s of the fan-out phase")
    parser.add_argument("--seconds", type=float, default=10, help="length of the fan-out phase")
    parser.add_argument("--step-seconds", type=float, default=4, help="length of each saturation step")
    parser.add_argument("--max-rate", type=float, default=3200, help="highest saturation step")
    parser.add_argument("--min-rate", type=float, default=3, help="lowest saturation step")
    parser.add_argument("--hold-streams", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=2, help="load client processes")
    parser.add_argument("--quick", action="store_true", help="200 streams, 2000 held, short phases")
    args = parser.parse_args()
    if args.quick:
        args.fanout_streams, args.seconds, args.step_seconds, args.hold_streams = 200, 3, 2, 2000
        args.max_rate = min(args.max_rate, 800)

    work = Path(tempfile.mkdtemp(prefix="attune-scale-"))
    redis = None
    results = []
    try:
        # Room for the naive design's one connection per stream, up to 1,200.
        with harness.database(work, {"fsync": "off", "max_connections": "1300"}) as (database_url, embedded):
            execution_ids = seed(database_url)
            systems = args.systems.split(",")

            def postgres_pids() -> list[int]:
                if embedded is None:
                    return []
                return tree(int((embedded.data_dir / "postmaster.pid").read_text().split()[0]))

            token: dict[str, str] = {}
            starters: dict[str, Callable[[], System]] = {
                "attune": lambda: start_attune(database_url, work, token),
                "naive": lambda: start_naive(database_url, work, postgres_pids),
            }
            if "flask-sse" in systems:
                redis_port = free_port()
                redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no", "--maxclients", "15000"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_port(redis_port)
                starters["flask-sse"] = lambda: start_flask_sse(database_url, f"redis://127.0.0.1:{redis_port}/0",
                                                                redis.pid, work)
            for name in systems:
                results.append(run_system(starters[name], args, database_url, execution_ids, work, postgres_pids))
        report(results, args)
    finally:
        if redis is not None:
            stop_process(redis)
        shutil.rmtree(work, ignore_errors=True)


def wait_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def seed(database_url: str) -> list[int]:
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO attune.pack (ref, label) VALUES ('bench_pack', 'b') ON CONFLICT DO NOTHING")
        cur.execute("""INSERT INTO attune.action (ref, pack, pack_ref, label)
                       SELECT 'bench_pack.act', id, ref, 'a' FROM attune.pack WHERE ref = 'bench_pack'
                       ON CONFLICT DO NOTHING""")
        cur.execute("""INSERT INTO attune.execution (action_ref, status)
                       SELECT 'bench_pack.act', 'requested' FROM generate_series(1, %s) RETURNING id""",
                    (EXECUTIONS,))
        ids = [row[0] for row in cur.fetchall()]
    conn.close()
    return ids


if __name__ == "__main__":
    main()
