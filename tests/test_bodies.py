"""Request bodies (http/bodies.py): an oversized or over-slow body costs the worker only what it reads.

One real gunicorn worker (gevent) holds 200 open streams while updates flow at
50 per second; attackers send 50 MB bodies at full speed. Each gets its 413 at
once and its connection is closed (gunicorn would otherwise read the rest off
the keep-alive connection, in small reads that hold the event loop: the
worker's streams stalled, then gunicorn killed it).
"""

from __future__ import annotations

import json
import multiprocessing
import selectors
import socket
import statistics
import threading
import time
from typing import Any

import pytest
import requests

from attune_sse.testing import ServerProcess
from conftest import server_config
from helpers import wait_until

BODY = 50 * 1024 * 1024
STREAMS = 200
RATE = 50  # updates per second


@pytest.fixture(scope="module")
def one_worker(database: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = ServerProcess(server_config(database, server={"workers": 1}), tmp_path_factory.mktemp("bodies")).start()
    try:
        yield srv
    finally:
        srv.stop()
        assert "Traceback" not in srv.log(), srv.log()[-5000:]


class Watch:
    """Many raw SSE connections read by one thread: when each event arrived, and which ended."""

    def __init__(self, port: int, token: str, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.latencies: list[tuple[float, float]] = []  # (arrival, arrival - sent)
        self.ended = 0
        self.buffers: dict[socket.socket, bytes] = {}
        self.counts: dict[socket.socket, int] = {}
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"GET /api/v1/executions/stream?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            self.buffers[sock] = b""
            self.counts[sock] = 0
        for sock in self.buffers:
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            self.buffers[sock] = head.partition(b"\r\n\r\n")[2]
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            for key, _ in self.selector.select(0.1):
                sock = key.fileobj
                try:
                    data = sock.recv(262144)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                now = time.time()
                if not data:
                    self.ended += 1
                    self.selector.unregister(sock)
                    continue
                buffer = self.buffers[sock] + data
                *lines, rest = buffer.split(b"\n")
                self.buffers[sock] = rest
                for line in lines:
                    if line.startswith(b"data: "):
                        sent = json.loads(line[6:])["data"]["result"]["sent"]
                        self.latencies.append((now, now - sent))
                        self.counts[sock] += 1

    def p99(self, since: float, until: float) -> float:
        window = [lat for at, lat in self.latencies if since <= at <= until]
        assert len(window) > 100, f"only {len(window)} deliveries in the window"
        return statistics.quantiles(window, n=100)[98]

    def close(self) -> None:
        self.stopped = True
        self.thread.join(5)
        for sock in self.buffers:
            sock.close()


def _updates(database: Any, execution_id: int, stop: threading.Event, sent: list[int]) -> None:
    conn = database.connect()
    try:
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("UPDATE attune.execution SET status = 'running', result = %s WHERE id = %s",
                            (json.dumps({"sent": time.time()}), execution_id))
                sent[0] += 1
                time.sleep(1 / RATE)
    finally:
        conn.close()


def _warm_up(seconds: float) -> None:
    """Run in each attacker process before the measurement: it imports this module once, now."""
    time.sleep(seconds)


def _attack(args: tuple[int, str, str]) -> tuple[float | None, bytes, int]:
    results: list[Any] = []
    _send_large_body(*args, results)
    return results[0]


def _send_large_body(port: int, path: str, headers: str, results: list[Any]) -> None:
    """POST a 50 MB body as fast as the socket takes it; (seconds to the answer, the answer, bytes sent)."""
    start = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
                 f"Content-Length: {BODY}\r\n\r\n".encode())
    sock.setblocking(False)
    chunk, sent, answer, answered = b"x" * 1024 * 1024, 0, b"", None
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    try:
        while time.monotonic() - start < 20:
            for _key, mask in selector.select(1):
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        results.append((answered, answer, sent))
                        return
                    answer += data
                    answered = answered or time.monotonic() - start
                if mask & selectors.EVENT_WRITE and sent < BODY:
                    try:
                        sent += sock.send(chunk[: BODY - sent])
                    except BlockingIOError:
                        pass
                    except OSError:
                        selector.modify(sock, selectors.EVENT_READ)
                        sent = sent or 1
        results.append((answered, answer, sent))
    finally:
        sock.close()


def test_a_50_mb_body_costs_the_streams_of_its_worker_nothing(one_worker: ServerProcess, database: Any,
                                                               token: str, new_execution: Any) -> None:
    pid = requests.get(one_worker.base_url + "/healthz", timeout=5).json()["data"]["pid"]
    execution_id = new_execution()
    watch = Watch(one_worker.port, token, STREAMS)
    stop, sent = threading.Event(), [0]
    writer = threading.Thread(target=_updates, args=(database, execution_id, stop, sent), daemon=True)
    # The attackers run in processes of their own, started before anything is measured: the streams'
    # reader here is not slowed by them, nor the server by ten Python start-ups.
    attackers = multiprocessing.get_context("spawn").Pool(10)
    try:
        attackers.map(_warm_up, [0.5] * 10)
        writer.start()
        wait_until(lambda: len(watch.latencies) > STREAMS * 20, 20, "deliveries to flow")
        before_start = time.time()
        time.sleep(4)  # the baseline window: 4 s of deliveries at 50 updates/s
        before = watch.p99(before_start, time.time())

        # One attacker, then ten at once, on a route that reads bodies and on one that does not, before
        # and after authentication.
        attack_start = time.time()
        results = attackers.map(_attack, [(one_worker.port, "/auth/login", "")])
        results += attackers.map(_attack, [
            (one_worker.port, "/auth/login" if n % 2 else "/api/v1/executions",
             f"Authorization: Bearer {token}\r\n" if n % 4 else "") for n in range(10)])
        time.sleep(1)  # deliveries just after the attack count too
        during = watch.p99(attack_start, time.time())
        stop.set()
        writer.join(5)
        total = sent[0]
        wait_until(lambda: all(count == total for count in watch.counts.values()), 10,
                   "every stream to get every update")
    finally:
        stop.set()
        attackers.terminate()
        watch.close()

    assert len(results) == 11
    for seconds, answer, body_sent in results:
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b'"code": "BODY_TOO_LARGE"' in answer and b"Connection: close" in answer
        assert seconds is not None and seconds < 1.0, f"the 413 came after {seconds} s"
        assert body_sent < BODY, "the connection was closed before the whole body was taken"
    assert watch.ended == 0, f"{watch.ended} streams ended"
    assert requests.get(one_worker.base_url + "/healthz", timeout=5).json()["data"]["pid"] == pid
    assert "WORKER TIMEOUT" not in one_worker.log()
    # Delivery p99 with the attack is within 2x of before. Both are a few ms, and the attackers share the
    # two cores with the server: a floor of 25 ms keeps that noise from failing the test. (Before the fix,
    # no event at all was delivered for 40 s and gunicorn killed the worker.)
    print(f"delivery p99 before {before * 1000:.1f} ms, during the attack {during * 1000:.1f} ms")
    assert during <= 2 * max(before, 0.025), (before, during)


def test_a_chunked_body_past_the_limit_gets_413_and_the_connection_closes(one_worker: ServerProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", one_worker.port), timeout=10)
    try:
        sock.sendall(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"  # 1 MiB chunks, past the 4 MiB limit of the tests
        answer = b""
        try:
            for _ in range(64):
                sock.sendall(chunk)
        except OSError:
            pass  # closed by the server, as it should: what it sent is read below
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            answer += data
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"BODY_TOO_LARGE" in answer


def test_a_declared_length_of_thousands_of_digits_is_413(one_worker: ServerProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", one_worker.port), timeout=10)
    try:
        sock.sendall(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n")
        answer = sock.recv(65536)
    finally:
        sock.close()
    # gunicorn may refuse the header line itself (400); never a 500.
    assert answer.startswith((b"HTTP/1.1 413", b"HTTP/1.1 400")), answer[:200]
