"""Test helpers: waiting with deadlines, an SSE client in a thread, an API client."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import sseclient

_END = object()
# Every Stream opened, so a fixture can close what a failed test left open.
OPEN_STREAMS: list[Stream | RawStream] = []


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Stream:
    """An SSE client (sseclient-py over requests) read by a background thread.

    The constructor returns once the response headers arrived, which the server
    sends with its first write, after the subscription is in place.
    """

    def __init__(self, url: str, params: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.response = requests.get(url, params=params, headers=headers, stream=True, timeout=(5, 30))
        if self.response.status_code != 200:
            raise AssertionError(f"stream refused: {self.response.status_code} {self.response.text}")
        self.worker = int(self.response.headers["X-Attune-Worker"])
        OPEN_STREAMS.append(self)
        self.received: list[Any] = []
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in sseclient.SSEClient(self.response).events():
                self._queue.put(event)
        except Exception as exc:  # the test reads it from .error; a closed stream ends here too
            self.error = exc
        finally:
            self._queue.put(_END)

    def next_event(self, timeout: float = 10.0) -> Any:
        """The next event, parsed; AssertionError if none comes in time or the stream ended."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no SSE event within {timeout}s") from None
        if item is _END:
            self._queue.put(_END)
            raise AssertionError(f"the stream ended ({self.error!r})")
        item.json = json.loads(item.data)
        self.received.append(item)
        return item

    def events_until(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> list[Any]:
        """Events up to and including the first for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        events = []
        while True:
            event = self.next_event(max(0.01, deadline - time.monotonic()))
            events.append(event)
            if predicate(event.json):
                return events

    def ended(self, timeout: float) -> bool:
        """Whether the server ended the stream within ``timeout`` seconds (events are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if item is _END:
                self._queue.put(_END)
                return True
        return False

    def close(self) -> None:
        self.response.close()


def streams_on_every_worker(open_stream: Callable[[], Stream], workers: int, per_worker: int = 1,
                            timeout: float = 20.0) -> list[Stream]:
    """Open streams until each of ``workers`` workers serves ``per_worker`` of them.

    The workers share one listening socket and the busier one tends to win
    every accept of connections made one after another, so streams are opened
    in concurrent bursts; streams beyond ``per_worker`` on a worker are closed.
    """
    by_worker: dict[int, list[Stream]] = {}
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(max_workers=4) as pool:
        while len(by_worker) < workers or any(len(s) < per_worker for s in by_worker.values()):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not reach every worker in {timeout}s: "
                                     f"{ {w: len(s) for w, s in by_worker.items()} }")
            for stream in pool.map(lambda _: open_stream(), range(4)):
                mine = by_worker.setdefault(stream.worker, [])
                if len(mine) < per_worker:
                    mine.append(stream)
                else:
                    stream.close()
    return [s for streams in by_worker.values() for s in streams]


def every_worker(server: Any, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until each of ``server``'s workers says, in its detailed /readyz, what ``check`` asks.

    Each round asks in a concurrent burst on new connections, so that every
    worker answers some (the busier one wins most accepts of serial requests).
    """
    def answer() -> tuple[int, bool] | None:
        try:
            response = requests.get(server.base_url + "/readyz", headers={"Connection": "close"}, timeout=5)
        except requests.RequestException:
            return None
        if response.status_code != 200:
            return None
        data = response.json()["data"]
        return data["pid"], bool(check(data))

    done: set[int] = set()
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(max_workers=4) as pool:
        while not (server.worker_pids() <= done):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for every worker: {what}")
            for result in pool.map(lambda _: answer(), range(8)):
                if result is not None and result[1]:
                    done.add(result[0])
            time.sleep(0.05)


def _go_back_in_time(database: Any, before: int) -> None:
    """What a restore from a backup (or a failover to a replica that was behind) does to the record: the
    events after ``before`` are gone and the sequence is back where it was."""
    database.query("DELETE FROM attune.execution_event WHERE id > %s", (before,))
    database.query("SELECT setval('attune.execution_event_id_seq', %s)", (before,))


def restore_while_streaming(database: Any, streams: list[Stream], execution_id: int, set_status: Any,
                            timeout: float = 10.0) -> None:
    """The database goes back in time under open streams (a restore, a failover to a replica that was
    behind): two events, then the record loses them and a first new event takes an id the old history
    had used, before the listeners reconnect. Each stream must get a ``reset`` to where the two
    histories part, then the new history's running and completed, once."""
    ((before,),) = database.query("SELECT max(id) FROM attune.execution_event")
    for status in ("scheduling", "scheduled"):
        set_status(execution_id, status)
    for stream in streams:
        stream.events_until(lambda e: e["entity_id"] == execution_id and e["data"]["status"] == "scheduled")
    old = database.listener_pids()
    _go_back_in_time(database, before)
    set_status(execution_id, "running")
    database.query("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (list(old),))
    wait_until(lambda: len(database.listener_pids() - old) >= 2, 10, "the listeners to reconnect")
    set_status(execution_id, "completed")
    for stream in streams:
        events = stream.events_until(lambda e: e.get("entity_id") == execution_id
                                     and e["data"]["status"] == "completed", timeout=timeout)
        assert events[0].event == "reset" and int(events[0].id) == before
        assert [(int(e.id), e.json["data"]["status"]) for e in events[1:]] == \
            [(before + 1, "running"), (before + 2, "completed")], "the new history, from where the two part"


class Api:
    """requests against the REST API with a bearer token."""

    def __init__(self, base_url: str, token: str | None) -> None:
        self.base_url = base_url
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return self.session.request(method, self.base_url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, **kwargs)


class RawStream:
    """An SSE request on a bare socket, for clients that misbehave: one that never reads.

    ``body()`` decodes the chunked transfer encoding of what was read and tells
    whether the server ended the response cleanly (the final empty chunk).
    """

    def __init__(self, base_url: str, params: dict[str, Any], *, receive_buffer: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        OPEN_STREAMS.append(self)
        if receive_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(10)
        self.sock.connect((host, int(port)))
        lines = [f"GET /api/v1/executions/stream?{urllib.parse.urlencode(params)} HTTP/1.1",
                 f"Host: {host}:{port}", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.data = b""

    def read_until_closed(self, timeout: float) -> bool:
        """Read until the server closes the connection (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            self.data += chunk
        return False

    def body(self) -> tuple[bytes, bool]:
        """(the SSE bytes received, whether the response ended with the final empty chunk)."""
        head, _, rest = self.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        out = []
        while rest:
            size_line, sep, rest = rest.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line, 16)
            if size == 0:
                return b"".join(out), True
            out.append(rest[:size])
            rest = rest[size + 2:]
        return b"".join(out), False

    def event_ids(self) -> list[int]:
        """Ids of the complete events received (an event cut short by a dropped connection is not one)."""
        text = self.body()[0].decode(errors="replace")
        complete = text[: text.rfind("\n\n") + 2]
        return [int(line[4:]) for line in complete.splitlines() if line.startswith("id: ")]

    def close(self) -> None:
        self.sock.close()


# -- access: packs, permission sets, executions made as an operator would ------------

def make_pack(database: Any, pack: str) -> str:
    """A pack with one action; returns the action's ref."""
    database.query("INSERT INTO attune.pack (ref, label) VALUES (%s, %s) ON CONFLICT DO NOTHING", (pack, pack))
    database.query(
        """INSERT INTO attune.action (ref, pack, pack_ref, label)
           SELECT %s, id, ref, 'run' FROM attune.pack WHERE ref = %s ON CONFLICT DO NOTHING""",
        (f"{pack}.run", pack),
    )
    return f"{pack}.run"


def grant(database: Any, identity: dict[str, Any], ref: str, grants: list[dict[str, Any]]) -> None:
    """Create permission set ``ref`` with ``grants`` (or replace its grants) and assign it."""
    database.query(
        """INSERT INTO attune.permission_set (ref, grants) VALUES (%s, %s)
           ON CONFLICT (ref) DO UPDATE SET grants = EXCLUDED.grants""",
        (ref, json.dumps(grants)),
    )
    database.query(
        """INSERT INTO attune.permission_assignment (identity, permission_set)
           SELECT %s, id FROM attune.permission_set WHERE ref = %s ON CONFLICT DO NOTHING""",
        (identity["id"], ref),
    )


def pack_grants(pack: str, actions: tuple[str, ...] = ("read", "create", "update")) -> list[dict[str, Any]]:
    return [{"resource": "executions", "actions": list(actions), "constraints": {"pack_refs": [pack]}},
            {"resource": "actions", "actions": ["read"], "constraints": {"pack_refs": [pack]}},
            {"resource": "packs", "actions": ["read"], "constraints": {"pack_refs": [pack]}}]


def new_execution(database: Any, action_ref: str) -> int:
    ((execution_id,),) = database.query(
        """INSERT INTO attune.execution (action, action_ref, config)
           SELECT id, ref, '{}' FROM attune.action WHERE ref = %s RETURNING id""", (action_ref,))
    return execution_id


def touch(database: Any, execution_id: int, status: str = "running") -> None:
    database.query("UPDATE attune.execution SET status = %s WHERE id = %s", (status, execution_id))
