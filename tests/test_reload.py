"""Reloads and stops (serve/hooks.py, gunicorn's worker life cycle): a request in flight completes.

SIGHUP makes gunicorn start new workers and stop the old ones; SIGTERM to a
worker stops it. Writers keep PATCHing meanwhile (half on keep-alive
connections, half on a new connection each time) while 200 streams are open:
every PATCH they sent is answered and applied, none is cut.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
import requests

from attune_sse.testing import ServerProcess
from conftest import running, server_config
from helpers import RawStream, wait_until

WRITERS = 4
STREAMS = 200


@pytest.fixture
def reloading(database: Any, tmp_path: Any) -> Any:
    with running(server_config(database), tmp_path) as srv:
        yield srv


def _writer(base_url: str, token: str, execution_id: int, stop: threading.Event, out: dict[str, Any]) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    if execution_id % 2:
        session.headers["Connection"] = "close"  # half the writers connect anew for each PATCH
    n = 0
    while not stop.is_set():
        n += 1
        try:
            response = session.patch(f"{base_url}/api/v1/executions/{execution_id}",
                                     json={"result": {"n": n}}, timeout=10)
        except requests.ConnectionError as exc:
            out["errors"].append(f"PATCH {n}: {exc}")
            continue
        if response.status_code != 200:
            out["errors"].append(f"PATCH {n}: {response.status_code} {response.text[:200]}")
        else:
            out["acknowledged"] = n
    session.close()


def test_requests_in_flight_complete_through_sighup_and_sigterm(reloading: ServerProcess, database: Any,
                                                                  token: str, new_execution: Any) -> None:
    executions = [new_execution() for _ in range(WRITERS)]
    stop = threading.Event()
    outs: list[dict[str, Any]] = [{"errors": [], "acknowledged": 0} for _ in executions]
    writers = [threading.Thread(target=_writer, args=(reloading.base_url, token, e, stop, out), daemon=True)
               for e, out in zip(executions, outs, strict=True)]
    # Open streams too: a stopping worker ends them at once, while it still answers the PATCHes.
    streams = [RawStream(reloading.base_url, {"token": token}) for _ in range(STREAMS)]
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: all(out["acknowledged"] > 20 for out in outs), 20, "the writers to run")
        for _ in range(5):
            before = reloading.worker_pids()
            os.kill(reloading.process.pid, signal.SIGHUP)
            wait_until(lambda b=before: not (reloading.worker_pids() & b) and len(reloading.worker_pids()) == 2,
                       20, "the old workers to be replaced")
            time.sleep(0.5)
        # A worker told to stop on its own (as an operator's or the kernel's SIGTERM).
        victim = sorted(reloading.worker_pids())[0]
        os.kill(victim, signal.SIGTERM)
        wait_until(lambda: victim not in reloading.worker_pids() and len(reloading.worker_pids()) == 2, 20,
                   "the stopped worker to be replaced")
        time.sleep(0.5)
    finally:
        stop.set()
        for writer in writers:
            writer.join(15)
        for stream in streams:
            stream.close()
    for execution_id, out in zip(executions, outs, strict=True):
        assert out["errors"] == [], out["errors"][:5]
        ((result,),) = database.query("SELECT result FROM attune.execution WHERE id = %s", (execution_id,))
        assert result == {"n": out["acknowledged"]}, "the last acknowledged PATCH is the one applied"
    assert "Traceback" not in reloading.log()
