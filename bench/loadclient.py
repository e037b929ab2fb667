"""A load client that holds thousands of SSE streams: gevent sockets, one process.

Driven by ``bench/scale.py`` over stdin/stdout, one JSON object per line:

    {"cmd": "open", "url": "http://127.0.0.1:8080/path?query", "n": 5000}
        -> {"opened": 5000, "failed": 0, "errors": {}}
    {"cmd": "stats"}                    -> {"open": ..., "with_events": ..., "refused": ..., "ids": ...}
    {"cmd": "reset"}                    forget what arrived so far -> {"ok": true}
    {"cmd": "collect", "commits": PATH, "out": PATH}
        PATH holds (event_id, commit time) pairs as two arrays; writes each
        delivery's latency to ``out`` -> {"deliveries": ..., "lost": ..., "duplicates": ...}
    {"cmd": "ends", "timeout": 10}      wait for the server to close every stream
        -> {"clean": ..., "cut": ..., "open": ...}
    {"cmd": "close"}                    close every stream -> {"ok": true}

Each stream keeps the (event id, arrival time) of what it receives; parsing is
one regular expression over each read, so the client stays cheap next to the
server it measures. Times are ``time.monotonic()``: one clock for every process
of the machine. Traffic goes to 127.0.0.1 only.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
from array import array  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
from gevent.fileobject import FileObjectPosix  # noqa: E402

# "id: 12" (attune-sse, naive) or "id:12" (Flask-SSE), at the start of a line.
ID_LINE = re.compile(rb"^id: ?(\d+)\r?$", re.MULTILINE)
CONNECT_CONCURRENCY = 200


class Conn:
    __slots__ = ("buf", "ended", "greenlet", "ids", "sock", "status", "times")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ids = array("q")
        self.times = array("d")
        self.buf = b""
        self.status: str | None = None  # the response's status code, once its head arrived
        self.ended: str | None = None  # "clean" (final chunk seen), "cut", or None while open
        self.greenlet: gevent.Greenlet | None = None

    def read(self) -> None:
        sock, ids, times = self.sock, self.ids, self.times
        tail = b""
        try:
            # The head may come late: Flask-SSE sends it with the first event.
            while b"\r\n\r\n" not in tail:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError
                tail += data
            head, _, tail = tail.partition(b"\r\n\r\n")
            self.status = head.split(b" ", 2)[1].decode()
            if self.status != "200":
                raise ConnectionError
            data = tail
            tail = b""
            while True:
                if data:
                    now = time.monotonic()
                    data = tail + data
                    cut = data.rfind(b"\n") + 1
                    for match in ID_LINE.finditer(data, 0, cut):
                        ids.append(int(match.group(1)))
                        times.append(now)
                    tail = data[cut:]
                    self.buf = (self.buf + data)[-64:]
                data = sock.recv(262144)
                if not data:
                    break
        except (OSError, ConnectionError):
            pass
        self.ended = "clean" if self.buf.endswith(b"\r\n0\r\n\r\n") else "cut"


CONNS: list[Conn] = []


def open_one(host: str, port: int, request: bytes) -> str | None:
    """Connect and send the request; None on success, or why it failed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(30)
    try:
        sock.connect((host, port))
        sock.sendall(request)
    except OSError as exc:
        sock.close()
        return type(exc).__name__
    sock.settimeout(None)
    conn = Conn(sock)
    CONNS.append(conn)
    conn.greenlet = gevent.spawn(conn.read)
    return None


def cmd_open(url: str, n: int) -> dict:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "127.0.0.1", "load goes to 127.0.0.1 only"
    target = parts.path + ("?" + parts.query if parts.query else "")
    request = (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{parts.port}\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()
    pool = gevent.pool.Pool(CONNECT_CONCURRENCY)
    results = pool.imap_unordered(lambda _: open_one(parts.hostname, parts.port, request), range(n))
    errors: dict[str, int] = {}
    for error in results:
        if error is not None:
            errors[error] = errors.get(error, 0) + 1
    failed = sum(errors.values())
    return {"opened": n - failed, "failed": failed, "errors": errors}


def cmd_stats() -> dict:
    refused: dict[str, int] = {}
    for conn in CONNS:
        if conn.status not in (None, "200"):
            refused[conn.status] = refused.get(conn.status, 0) + 1
    return {
        "open": sum(1 for c in CONNS if c.ended is None),
        "with_events": sum(1 for c in CONNS if c.ids),
        "refused": sum(refused.values()),
        "ids": sum(len(c.ids) for c in CONNS),
    }


def cmd_reset() -> dict:
    for conn in CONNS:
        del conn.ids[:]
        del conn.times[:]
    return {"ok": True}


def cmd_collect(commits: str, out: str) -> dict:
    with open(commits, "rb") as f:
        count = int.from_bytes(f.read(8), "little")
        ids, stamps = array("q"), array("d")
        ids.fromfile(f, count)
        stamps.fromfile(f, count)
    committed = dict(zip(ids, stamps, strict=True))
    latencies = array("d")
    lost = duplicates = 0
    for conn in CONNS:
        seen = set()
        for event_id, arrived in zip(conn.ids, conn.times, strict=True):
            at = committed.get(event_id)
            if at is None:
                continue  # not one of this window's events
            if event_id in seen:
                duplicates += 1
                continue
            seen.add(event_id)
            latencies.append(arrived - at)
        lost += len(committed) - len(seen)
    with open(out, "wb") as f:
        latencies.tofile(f)
    return {"deliveries": len(latencies), "lost": lost, "duplicates": duplicates}


def cmd_ends(timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(c.ended is None for c in CONNS):
        gevent.sleep(0.05)
    states = [c.ended or "open" for c in CONNS]
    sample = [repr(c.buf) for c in CONNS if c.ended == "cut"][:3]
    return {**{state: states.count(state) for state in ("clean", "cut", "open")}, "sample": sample}


def cmd_close() -> dict:
    for conn in CONNS:
        conn.sock.close()
    gevent.joinall([c.greenlet for c in CONNS if c.greenlet is not None], timeout=10)
    CONNS.clear()
    return {"ok": True}


def main() -> None:
    stdin = FileObjectPosix(sys.stdin.fileno(), "rb")
    for line in stdin:
        request = json.loads(line)
        cmd = request.pop("cmd")
        handler = {"open": cmd_open, "stats": cmd_stats, "reset": cmd_reset, "collect": cmd_collect,
                   "ends": cmd_ends, "close": cmd_close}[cmd]
        reply = handler(**request)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
