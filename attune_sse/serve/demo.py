"""``attune-sse demo``: the service on an embedded database, with executions that move.

Starts the embedded PostgreSQL, migrates, creates the demo identity, pack and
actions, runs gunicorn (as ``serve`` does) against that database, and in this
process makes new executions and moves each through its statuses, with a
progress line now and then. Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras
from werkzeug.security import generate_password_hash

from attune_sse.config import CONFIG_ENV, ENV_PREFIX, load_config
from attune_sse.core.grants import ALL_GRANTS
from attune_sse.serve.launch import Gunicorn
from attune_sse.storage import store
from attune_sse.storage.db import database
from attune_sse.storage.migrate import migrate_database

ACTIONS = ["demo.deploy", "demo.backup", "demo.health_check", "demo.rotate_logs", "demo.send_report"]
LOGIN, PASSWORD = "demo", "demo-password"


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def seed(url: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:  # the API's own SQL (store.py)
        store.insert_pack(cur, "demo", "Demo pack", None, "0.1.0")
        pack = store.pack_by_ref(cur, "demo")
        assert pack is not None  # inserted just now, or there from an earlier run (insert_pack skips a taken ref)
        for ref in ACTIONS:
            store.insert_action(cur, pack, ref, ref.split(".", 1)[1].replace("_", " "), None, "")
        if store.identity_by_login(cur, LOGIN) is None:
            store.insert_identity(cur, LOGIN, "Demo user", generate_password_hash(PASSWORD))
    conn.close()


def run_demo(*, port: int, rate: float, data_dir: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="attune-demo-"))
    config_path = work / "demo.yaml"
    config_path.write_text(json.dumps({
        "environment": "development",
        "database": {"url": "embedded", "data_dir": str(Path(data_dir).resolve())},
        "server": {"host": "127.0.0.1", "port": port, "workers": 2},
        # A fresh secret each run: tokens of an earlier demo stop working, passwords do not.
        "security": {"jwt_secret": secrets.token_urlsafe(48), "jwt_access_expiration": 900,
                     "default_grants": ALL_GRANTS},
        "log": {"level": "warn"},
    }))
    config = load_config(config_path, environ={})
    # Ctrl-C (or a SIGTERM) stops the demo even when it was started with SIGINT ignored,
    # as a background job of a non-interactive shell is.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    say(f"starting the embedded PostgreSQL in {data_dir} (a few seconds the first time)...")
    with database(config) as url:
        migrate_database(url)
        seed(url)
        env = {**os.environ, CONFIG_ENV: str(config_path), ENV_PREFIX + "DATABASE__URL": url}
        server = Gunicorn(env)
        try:
            server.wait_ready(f"http://127.0.0.1:{port}/readyz")
            say(f"open http://127.0.0.1:{port}/ and log in as {LOGIN} / {PASSWORD}; Ctrl-C stops the demo")
            generate(url, rate)
        except KeyboardInterrupt:
            say("stopping")
        finally:
            server.stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def generate(url: str, rate: float) -> None:
    """New executions at ``rate`` per second, each moving requested -> ... -> a final status."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    live: list[dict[str, Any]] = []
    made = moves = 0
    next_new = time.monotonic()
    last_report = time.monotonic()
    with conn.cursor() as cur:
        while True:
            now = time.monotonic()
            if now >= next_new:
                action = random.choice(ACTIONS)
                cur.execute("INSERT INTO attune.execution (action_ref, status) VALUES (%s, 'requested') "
                            "RETURNING id", (action,))
                row = cur.fetchone()
                assert row is not None  # an INSERT ... RETURNING without ON CONFLICT returns its row
                live.append({"id": row[0], "steps": _path(), "due": now + random.uniform(0.3, 1.5)})
                made += 1
                next_new = now + random.expovariate(rate)
            for execution in [e for e in live if e["due"] <= now]:
                status = execution["steps"].pop(0)
                result = json.dumps(_result(status)) if not execution["steps"] else None
                cur.execute("UPDATE attune.execution SET status = %s, result = COALESCE(%s::jsonb, result) "
                            "WHERE id = %s", (status, result, execution["id"]))
                moves += 1
                if execution["steps"]:
                    execution["due"] = now + random.uniform(0.5, 4.0)
                else:
                    live.remove(execution)
            if now - last_report >= 10:
                say(f"{made} executions made, {moves} status changes, {len(live)} in flight")
                last_report = now
            time.sleep(0.05)


def _path() -> list[str]:
    end = random.choices(["completed", "failed", "timeout", "cancelled"], weights=[80, 12, 4, 4])[0]
    return ["scheduling", "scheduled", "running", end]


def _result(status: str) -> dict[str, Any]:
    if status == "completed":
        return {"exit_code": 0, "stdout": "ok", "took_ms": random.randint(50, 5000)}
    return {"exit_code": 1, "stderr": f"the demo action ended: {status}"}
