"""Slow readers cost a worker a known amount of memory (core/hub.py's bounds in bytes).

The outsider's probe: four readers reading 1 byte/s while 40 events of 6 MB
went by grew each worker from about 50 to 310 MiB, none of them dropped. Here
four readers that never read hold streams of one worker while 40 events of
2 MB go by: each is dropped once it holds server.sse_client_buffer_bytes, the
worker's peak memory stays within the stated bound, and a reader that keeps up
gets every event.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from attune_sse.testing import ServerProcess
from conftest import running, server_config
from helpers import RawStream, Stream, wait_until

EVENTS = 40
RESULT_BYTES = 2 * 1024 * 1024
CLIENT_BOUND = 4 * 1024 * 1024
WORKER_BOUND = 12 * 1024 * 1024
TRICKLING = 10


@pytest.fixture(scope="module")
def bounded(database: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = server_config(database, server={
        "workers": 1, "sse_client_buffer_bytes": CLIENT_BOUND, "sse_worker_buffer_bytes": WORKER_BOUND,
        "sse_send_buffer_bytes": 65536})
    with running(config, tmp_path_factory.mktemp("slow")) as srv:
        yield srv


def _memory(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (the peak) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def _trickle(stream: RawStream) -> None:
    """Read 100 KB every 0.1 s (about 1 MB/s) until the server closes the connection."""
    stream.sock.settimeout(30)
    while True:
        try:
            if not stream.sock.recv(100_000):
                return
        except OSError:
            return
        time.sleep(0.1)


def test_slow_readers_are_dropped_before_they_cost_more_than_the_bound(bounded: ServerProcess, token: str,
                                                                       db: Any, new_execution: Any) -> None:
    (pid,) = bounded.worker_pids()
    execution_id = new_execution()
    fast = Stream(bounded.base_url + "/api/v1/executions/stream", {"token": token, "execution_id": execution_id})
    slow = [RawStream(bounded.base_url, {"token": token, "execution_id": execution_id}, receive_buffer=4096)
            for _ in range(4)]
    wait_until(lambda: requests.get(bounded.base_url + "/readyz", timeout=5).json()["data"]["streams"] == 5, 10,
               "the five streams to be held")
    before = _memory(pid, "VmRSS")
    with db.cursor() as cur:
        for n in range(1, EVENTS + 1):
            cur.execute("UPDATE attune.execution SET status = 'running', result = %s WHERE id = %s",
                        (json.dumps({"n": n, "output": "x" * RESULT_BYTES}), execution_id))
            assert fast.next_event(timeout=20).json["data"]["result"]["n"] == n
    peak = _memory(pid, "VmHWM")
    for stream in slow:
        assert stream.read_until_closed(10), "the server dropped the reader that did not read"
    hub = requests.get(bounded.base_url + "/readyz", timeout=5).json()["data"]["hub"]
    assert hub["overflows"] == 4
    # What the slow readers held (4 MiB each at most, 12 MiB for the worker) plus the work of reading
    # and framing a 2 MB event, with room for the allocator: far below the 80 MB the events add up to.
    growth = peak - before
    print(f"worker memory: {before / 2**20:.0f} MiB before, peak {peak / 2**20:.0f} MiB "
          f"(+{growth / 2**20:.0f} MiB) while {EVENTS} events of {RESULT_BYTES / 2**20:.0f} MiB went by")
    assert growth < 40 * 1024 * 1024, f"grew {growth / 2**20:.0f} MiB"


@pytest.fixture
def defaults(database: Any, tmp_path: Any) -> Any:
    """A worker with the default bounds (32 MiB a client) and the kernel's own send buffers."""
    with running(server_config(database, server={"workers": 1}), tmp_path) as srv:
        yield srv


def test_readers_dropped_while_the_server_writes_to_them_leave_no_traceback(defaults: ServerProcess, token: str,
                                                                            db: Any, new_execution: Any) -> None:
    """Readers that read, but slower than a burst comes, are dropped while the server is blocked writing
    to them. gunicorn logged a traceback for each: the drop (gevent's shutdown) failed that write with
    EBADF, "File descriptor was closed in another greenlet"; now it fails with EPIPE, the client gone."""
    execution_id = new_execution()
    before = requests.get(defaults.base_url + "/readyz", timeout=5).json()["data"]["hub"]["overflows"]
    trickling = [RawStream(defaults.base_url, {"token": token, "execution_id": execution_id}, receive_buffer=65536)
                 for _ in range(TRICKLING)]
    readers = [threading.Thread(target=_trickle, args=(stream,), daemon=True) for stream in trickling]
    for reader in readers:
        reader.start()
    wait_until(lambda: requests.get(defaults.base_url + "/readyz", timeout=5).json()["data"]["streams"]
               >= TRICKLING, 10, "the streams to be held")
    with db.cursor() as cur:
        for n in range(1, 31):
            cur.execute("UPDATE attune.execution SET status = 'running', result = %s WHERE id = %s",
                        (json.dumps({"n": n, "output": "x" * RESULT_BYTES}), execution_id))
    for reader in readers:
        reader.join(30)
        assert not reader.is_alive(), "the server dropped the reader that read too slowly"
    hub = requests.get(defaults.base_url + "/readyz", timeout=5).json()["data"]["hub"]
    assert hub["overflows"] - before == TRICKLING
    log = defaults.log()
    assert "Socket error processing request" not in log and "Traceback" not in log, log[-3000:]
