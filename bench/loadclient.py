"""A load client that holds thousands of SSE streams: one process, one epoll loop.

Driven by ``bench/scale.py`` over stdin/stdout, one JSON object per line:

    {"cmd": "open", "url": "http://127.0.0.1:8080/path?query", "n": 5000}
        -> {"opened": 5000, "failed": 0, "errors": {}}  (connected and request sent)
    {"cmd": "stats"}                    -> {"open": ..., "with_events": ..., "statuses": {...}, "ids": ...}
    {"cmd": "reset"}                    forget what arrived so far -> {"ok": true}
    {"cmd": "collect", "commits": PATH, "out": PATH}
        PATH holds (event_id, commit time) pairs as two arrays; writes each
        delivery's latency to ``out`` -> {"deliveries": ..., "lost": ..., "duplicates": ...}
    {"cmd": "ends", "timeout": 10}      wait for the server to close every stream
        -> {"clean": ..., "cut": ..., "open": ...}
    {"cmd": "close"}                    close every stream -> {"ok": true}

A plain epoll loop rather than greenlets: the client shares the machine with
the server it measures, so each delivery should cost it as little as possible
(one recv for whatever arrived, one regular expression over it). Each stream
keeps the (event id, arrival time) of what it receives. Times are
``time.monotonic()``: one clock for every process of the machine. Traffic goes
to 127.0.0.1 only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import socket
import sys
import time
import urllib.parse
from array import array
from typing import Any

# "id: 12" (attune-sse, naive) or "id:12" (Flask-SSE), at the start of a line.
ID_LINE = re.compile(rb"^id: ?(\d+)\r?$", re.MULTILINE)
CONNECT_CONCURRENCY = 200
FINAL_CHUNK = b"\r\n0\r\n\r\n"


class Conn:
    __slots__ = ("connected", "ended", "head", "ids", "last", "request", "sock", "status", "tail", "times")

    def __init__(self, sock: socket.socket, request: bytes) -> None:
        self.sock = sock
        self.request = request
        self.connected = False
        self.head = b""  # until the response head is complete
        self.status: str | None = None  # its status code, once it arrived
        self.tail = b""  # bytes after the last newline, kept for the next read
        self.last = b""  # the last bytes received, to tell a clean end
        self.ids = array("q")
        self.times = array("d")
        self.ended: str | None = None  # "clean" (final chunk seen), "cut", or None while open

    def feed(self, data: bytes, now: float) -> None:
        if self.status is None:
            # The head may come late: Flask-SSE sends it with the first event.
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            self.status = head.split(b" ", 2)[1].decode()
            self.head = b""
        data = self.tail + data
        cut = data.rfind(b"\n") + 1
        for match in ID_LINE.finditer(data, 0, cut):
            self.ids.append(int(match.group(1)))
            self.times.append(now)
        self.tail = data[cut:] if cut else data[-4096:]
        self.last = (self.last + data)[-16:]


class Client:
    read_size = 262144  # bytes per recv (bench/fanout.py reads 64 KiB: cheaper per read on loopback)

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.all: list[Conn] = []
        self.to_open: list[tuple[tuple[str, int], bytes]] = []
        self.connecting = 0
        self.open_errors: dict[str, int] = {}
        self.pending_reply: tuple[str, Any] | None = None  # a command whose answer is waited for

    # -- opening streams
    def start_connects(self) -> None:
        while self.to_open and self.connecting < CONNECT_CONCURRENCY:
            address, request = self.to_open.pop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex(address)
            if code not in (0, errno.EINPROGRESS):
                self.fail(sock, errno.errorcode.get(code, str(code)))
                continue
            conn = Conn(sock, request)
            self.conns[sock.fileno()] = conn
            self.all.append(conn)
            self.connecting += 1
            self.epoll.register(sock.fileno(), select.EPOLLOUT)

    def fail(self, sock: socket.socket, why: str) -> None:
        self.open_errors[why] = self.open_errors.get(why, 0) + 1
        sock.close()

    def on_writable(self, fd: int, conn: Conn) -> None:
        self.connecting -= 1
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.drop(fd, conn)
            self.all.remove(conn)
            self.fail(conn.sock, errno.errorcode.get(code, str(code)))
        else:
            conn.connected = True
            conn.sock.send(conn.request)  # a few hundred bytes: fits the empty send buffer
            self.epoll.modify(fd, select.EPOLLIN)
        self.start_connects()

    def drop(self, fd: int, conn: Conn) -> None:
        self.epoll.unregister(fd)
        del self.conns[fd]

    # -- reading streams
    def on_readable(self, fd: int, conn: Conn, now: float) -> None:
        try:
            data = conn.sock.recv(self.read_size)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            conn.feed(data, now)
            return
        conn.ended = "clean" if conn.status == "200" and conn.last.endswith(FINAL_CHUNK) else "cut"
        self.drop(fd, conn)
        conn.sock.close()

    # -- commands
    def cmd_open(self, url: str, n: int) -> None:
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname == "127.0.0.1", "load goes to 127.0.0.1 only"
        target = parts.path + ("?" + parts.query if parts.query else "")
        request = (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{parts.port}\r\n"
                   "Accept: text/event-stream\r\n\r\n").encode()
        self.open_errors = {}
        self.to_open = [(("127.0.0.1", parts.port), request)] * n
        self.start_connects()
        self.pending_reply = ("open", n)

    def cmd_stats(self) -> dict:
        statuses: dict[str, int] = {}
        for conn in self.all:
            statuses[conn.status or "none"] = statuses.get(conn.status or "none", 0) + 1
        return {
            "open": sum(1 for c in self.all if c.ended is None),
            "with_events": sum(1 for c in self.all if c.ids),
            "statuses": statuses,
            "ids": sum(len(c.ids) for c in self.all),
        }

    def cmd_reset(self) -> dict:
        for conn in self.all:
            del conn.ids[:]
            del conn.times[:]
        return {"ok": True}

    def cmd_collect(self, commits: str, out: str) -> dict:
        with open(commits, "rb") as f:
            count = int.from_bytes(f.read(8), "little")
            ids, stamps = array("q"), array("d")
            ids.fromfile(f, count)
            stamps.fromfile(f, count)
        committed = dict(zip(ids, stamps, strict=True))
        latencies = array("d")
        lost = duplicates = 0
        for conn in self.all:
            if conn.status != "200":
                continue  # refused: counted as a failure to open, not as events lost
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

    def cmd_ends(self, timeout: float) -> None:
        self.pending_reply = ("ends", time.monotonic() + timeout)

    def cmd_close(self) -> dict:
        for fd, conn in list(self.conns.items()):
            self.drop(fd, conn)
            conn.sock.close()
        self.all.clear()
        return {"ok": True}

    def check_pending(self) -> dict | None:
        """The answer of the waiting command, once it is ready."""
        kind, arg = self.pending_reply
        if kind == "open" and not self.to_open and not self.connecting:
            failed = sum(self.open_errors.values())
            return {"opened": arg - failed, "failed": failed, "errors": self.open_errors}
        if kind == "ends" and (time.monotonic() > arg or all(c.ended for c in self.all)):
            states = [c.ended or "open" for c in self.all]
            return {state: states.count(state) for state in ("clean", "cut", "open")}
        return None

    def reply(self, answer: dict) -> None:
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    def execute(self, text: bytes) -> bytes:
        """Run the complete command lines of ``text`` (until one must wait); return the rest."""
        while b"\n" in text and self.pending_reply is None:
            line, text = text.split(b"\n", 1)
            request = json.loads(line)
            answer = getattr(self, "cmd_" + request.pop("cmd"))(**request)
            if answer is not None:
                self.reply(answer)
        return text

    def run(self) -> None:
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        self.epoll.register(stdin, select.EPOLLIN)
        pending_input = b""
        while True:
            events = self.epoll.poll(0.05 if self.pending_reply else 1.0)
            now = time.monotonic()
            for fd, _mask in events:
                if fd == stdin:
                    data = os.read(stdin, 65536)
                    if not data:
                        return
                    pending_input = self.execute(pending_input + data)
                    continue
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if not conn.connected:
                    self.on_writable(fd, conn)
                else:
                    self.on_readable(fd, conn, now)
            if self.pending_reply is not None:
                answer = self.check_pending()
                if answer is not None:
                    self.pending_reply = None
                    self.reply(answer)
                    pending_input = self.execute(pending_input)  # commands that came meanwhile


if __name__ == "__main__":
    Client().run()
