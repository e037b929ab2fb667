"""The SSE view: ``GET /api/v1/executions/stream``.

The view checks the token, the filter and the resume point before any byte of
the stream is sent, so a bad request gets a JSON 401/400. The body is a
generator that takes plain values (never ``request``), subscribes to the hub
before its first write, sends what the client missed (``Last-Event-ID``) from
the event record, then the live events, and leaves the hub however it ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import socket
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, request
from flask_jwt_extended import get_jwt, verify_jwt_in_request

from . import record, sse
from .db import Pool
from .errors import NotReady
from .hub import TOKEN_EXPIRED, Hub
from .web import parse_int, positive_int_arg, state

log = logging.getLogger(__name__)


bp = Blueprint("stream", __name__)

HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@bp.get("/api/v1/executions/stream")
def execution_stream() -> Any:
    verify_jwt_in_request(locations=["headers", "query_string"])
    expires_at = get_jwt().get("exp")
    execution_id = positive_int_arg("execution_id")
    last_event_id = _last_event_id()
    app_state = state()
    if app_state.hub.closed:
        raise NotReady("This worker is shutting down; reconnect.", code="SHUTTING_DOWN")
    config = app_state.config
    body = event_stream(
        app_state.hub,
        execution_id,
        retry_ms=config["server.sse_retry_ms"],
        reconnect_spread_ms=config["server.sse_reconnect_spread_ms"],
        last_event_id=last_event_id,
        expires_at=expires_at,
        backlog=functools.partial(read_backlog, app_state.pool, execution_id),
        start_position=functools.partial(record_position, app_state.pool),
        connection=Connection(request.environ.get("gunicorn.socket"), config["server.sse_send_buffer_bytes"],
                              chunked=request.environ.get("SERVER_PROTOCOL") == "HTTP/1.1"),
    )
    headers = {**HEADERS, "X-Attune-Worker": str(os.getpid())}
    # direct_passthrough: gunicorn iterates the generator itself, without werkzeug's
    # encoding and closing wrappers, so a held stream costs less stack and memory.
    return Response(body, mimetype="text/event-stream", headers=headers, direct_passthrough=True)


class Connection:
    """The client's socket (gunicorn puts it in the environ; None elsewhere)."""

    __slots__ = ("fd", "sock")

    def __init__(self, sock: socket.socket | None, send_buffer: int = 0, *, chunked: bool = False) -> None:
        self.sock = sock
        # gunicorn frames an HTTP/1.1 stream as chunks: then the hub may write
        # ready-made chunks to the socket itself (hub.py, "Direct writes").
        self.fd = sock.fileno() if sock is not None and chunked else None
        if sock is not None and send_buffer:
            # A fixed kernel send buffer bounds what a stalled client can hold in the
            # kernel, and makes it overflow its queue sooner (the kernel doubles the value).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)

    def drop(self) -> None:
        """For a client that does not read: its pending write fails at once and gunicorn closes the socket."""
        self._shutdown(socket.SHUT_RDWR)

    def send_raw(self, data: bytes) -> bool:
        """Finish a chunk the hub began writing, bypassing gunicorn (it is framed already)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def last_response(self) -> None:
        """A stream is its connection's last response: once it ends, gunicorn closes the
        connection instead of holding it open for another request (which would keep a
        stopping worker waiting for its graceful timeout)."""
        self._shutdown(socket.SHUT_RD)

    def _shutdown(self, how: int) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):  # the client is gone already
                self.sock.shutdown(how)


def _last_event_id() -> int | None:
    """Where a reconnecting client left off: the Last-Event-ID header EventSource sends, or ?last_event_id=."""
    raw = request.headers.get("Last-Event-ID")
    name = "The Last-Event-ID header"
    if raw is None:
        raw = request.args.get("last_event_id")
        name = "Query parameter 'last_event_id'"
    if raw is None or raw.strip() == "":
        return None
    return parse_int(raw, name, minimum=0)


def reset_message(reason: str, resume_from: int) -> bytes:
    """Tells the client its history has a hole: it should reload what it shows."""
    data = json.dumps({"reason": reason, "resumed_from_event_id": resume_from}, separators=(",", ":"))
    return sse.Message(data=data, event="reset", id=resume_from).encode()


def record_position(pool: Pool) -> int | None:
    """The newest event id of the record (or its pruning horizon), or None if it cannot be read now."""
    try:
        with pool.cursor(dict_rows=False) as cur:
            return max(record.last_event_id(cur), record.pruned_to(cur))
    except NotReady as exc:
        log.warning("a new stream starts without its position: %s", exc.message)
        return None


def read_backlog(pool: Pool, execution_id: int | None, after: int) -> Iterator[tuple[bytes, int]]:
    """The events after ``after`` from the record, page by page, as (frames, id reached).

    A client behind the retention window, or with an id this database never
    issued, first gets a ``reset`` event.
    """
    with pool.cursor(dict_rows=False) as cur:
        newest = record.last_event_id(cur)
    if after > newest:
        yield reset_message("unknown event id: this server has no event after it", newest), newest
        after = newest
    while True:
        with pool.cursor(dict_rows=False) as cur:
            page = record.events_after(cur, after, execution_id)
            # Read after the page: a prune that raced with it shows here.
            horizon = record.pruned_to(cur)
        if horizon > after:
            yield reset_message("events you missed were pruned (retention)", horizon), horizon
            page = [e for e in page if e.event_id > horizon]
            after = horizon
        if page:
            after = page[-1].event_id
            yield b"".join(e.frame for e in page), after
        if len(page) < record.PAGE_SIZE:
            return


def event_stream(hub: Hub, execution_id: int | None, *, retry_ms: int,
                 reconnect_spread_ms: int = 0,
                 last_event_id: int | None = None,
                 expires_at: float | None = None,
                 backlog: Callable[[int], Iterator[tuple[bytes, int]]] | None = None,
                 start_position: Callable[[], int | None] | None = None,
                 connection: Connection | None = None) -> Iterator[bytes]:
    """The bytes of one client's stream, from subscription to close.

    With ``last_event_id``, ``backlog(last_event_id)`` supplies what the client
    missed, as (frames, id reached), before the live events. When the stream
    ends, its ``retry:`` is ``retry_ms`` plus a random share of
    ``reconnect_spread_ms``, so the clients of a stopping worker come back
    spread out instead of all at once.

    At ``expires_at`` (the token's ``exp``) the stream ends with a
    ``token_expired`` event: the client refreshes its token and reconnects
    with Last-Event-ID, missing nothing.
    """
    connection = connection or Connection(None)
    stats = hub.stats
    # try/finally rather than ``with hub.subscription()``: one object less per held stream.
    sub = hub.subscribe(execution_id, on_overflow=connection.drop, fd=connection.fd)
    sub.expires_at = expires_at  # the hub ends it then (checked every second, no timer per stream)
    try:
        log.debug("stream opened (execution_id=%s, %d subscribers)", execution_id, len(hub))
        # First write: tells EventSource how long to wait before a reconnect,
        # and sends the headers, so the client knows it is subscribed.
        # A new client (no Last-Event-ID) is also told where the record stands: an
        # id-only block, which sets EventSource's last event id without an event.
        # If the connection breaks before any event came, its reconnect then
        # resumes from here instead of missing what was committed in between.
        position = start_position() if last_event_id is None and start_position is not None else None
        yield sse.Message(retry=retry_ms, id=position).encode() + sse.comment("connected")
        # Subscribed before the backlog is read: an event committed meanwhile is
        # in the record or in the queue (or both: the subscription skips ids already sent).
        if last_event_id is not None and backlog is not None:
            sub.skip_through = last_event_id
            try:
                for frames, reached in backlog(last_event_id):
                    yield frames
                    sub.skip_through = reached
            except NotReady as exc:
                log.warning("ending a stream: its backlog could not be read (%s)", exc.message)
                return
        while True:
            batch = sub.next_batch()  # [] on the hub's keep-alive tick, or after a partial direct write
            raw = sub.take_raw()
            if raw and not connection.send_raw(raw):
                return  # the client is gone
            if batch is None:
                break
            if not batch:
                if not raw:
                    yield sse.KEEPALIVE
                continue
            # What piled up while the client was busy leaves in one write.
            yield batch[0].frame if len(batch) == 1 else b"".join(event.frame for event in batch)
            stats.sent += len(batch)
        log.debug("stream ended (%s)", sub.reason)
        connection.last_response()
        # Spread the reconnects of many clients instead of a storm.
        retry = retry_ms + int(random.uniform(0, reconnect_spread_ms))
        if sub.reason == TOKEN_EXPIRED:
            data = json.dumps({"reason": "the access token expired: refresh it and reconnect with Last-Event-ID"})
            yield sse.Message(data=data, event="token_expired", retry=retry).encode()
        else:
            yield sse.Message(retry=retry).encode() + sse.comment(f"stream closed: {sub.reason}")
    finally:
        hub.unsubscribe(sub)
