"""The SSE view: ``GET /api/v1/executions/stream``.

The view checks the token, the filter and the resume point before any byte of
the stream is sent, so a bad request gets a JSON 401/400. The body is a
generator that takes plain values (never ``request``), subscribes to the hub
before its first write, sends what the client missed (``Last-Event-ID``) from
the event record, then the live events, and leaves the hub however it ends.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, request
from flask_jwt_extended import get_jwt, verify_jwt_in_request

from . import record, sse, store
from .access import EVERYTHING, Principal, Scope
from .auth import current_principal
from .db import Pool
from .errors import NotFound, NotReady, TooManyRequests
from .event import ExecutionEvent, reset_frame
from .hub import SIGNED_OUT, TOKEN_EXPIRED, Hub, Subscription
from .sink import ClientSocket
from .web import parse_int, positive_int_arg, state

log = logging.getLogger(__name__)


bp = Blueprint("stream", __name__)

# Seconds a stream waits for its worker's listener to know where the record stands (only
# right after the worker started, or while its database was unreachable since).
POSITION_WAIT = 10.0

HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@bp.get("/api/v1/executions/stream")
def execution_stream() -> Any:
    verify_jwt_in_request(locations=["headers", "query_string"])
    expires_at = get_jwt().get("exp")
    principal = current_principal()
    execution_id = positive_int_arg("execution_id")
    last_event_id = _last_event_id()
    app_state = state()
    if app_state.hub.closed:
        raise NotReady("This worker is shutting down; reconnect.", code="SHUTTING_DOWN")
    config = app_state.config
    limit = config["server.max_streams_per_identity"]
    if app_state.hub.streams_of(principal.id) >= limit:
        raise TooManyRequests(f"This identity has {limit} streams open on this worker "
                              "(server.max_streams_per_identity); close one first.", code="TOO_MANY_STREAMS")
    readable = principal.scope("executions", "read")
    if execution_id is not None:
        with app_state.pool.cursor() as cur:
            action_ref = store.action_ref_of(cur, execution_id)
        if action_ref is None or not readable.allows_action(action_ref):
            raise NotFound(f"Execution {execution_id} does not exist.", code="EXECUTION_NOT_FOUND")
    body = event_stream(
        app_state.hub,
        execution_id,
        retry_ms=config["server.sse_retry_ms"],
        reconnect_spread_ms=config["server.sse_reconnect_spread_ms"],
        last_event_id=last_event_id,
        expires_at=expires_at,
        identity=principal.id,
        scope=readable,
        confirm=functools.partial(app_state.access.recheck, principal.id),
        backlog=functools.partial(read_backlog, app_state.backlog_pool, execution_id),
        connection=ClientSocket.from_environ(request.environ, config["server.sse_send_buffer_bytes"]),
    )
    headers = {**HEADERS, "X-Attune-Worker": str(os.getpid())}
    # direct_passthrough: gunicorn iterates the generator itself, without werkzeug's
    # encoding and closing wrappers, so a held stream costs less stack and memory.
    return Response(body, mimetype="text/event-stream", headers=headers, direct_passthrough=True)


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


def read_backlog(pool: Pool, execution_id: int | None, after: int, through: int,
                 scope: Callable[[], Scope] = lambda: EVERYTHING) -> Iterator[tuple[bytes, int]]:
    """What a client resuming after ``after`` missed, up to ``through``, from the record.

    Yields (frames, the client's position once it has them); the last position
    is where its live stream goes on from. ``through`` is the hub's position, so
    every id up to it is resolved and the live events carry on from there. A
    client behind the retention window, or with an id this database never
    issued, first gets a ``reset`` event. Pages are bounded in bytes
    (record.PAGE_BYTES), and frames leave in chunks of about ``CHUNK_BYTES``: a
    resume over large results holds about a page. Events of executions the
    stream's scope (``scope()``, asked again for each page: access may narrow
    meanwhile) does not allow are left out.
    """
    with pool.cursor(dict_rows=False) as cur:
        newest = record.newest(cur)
    if after > newest:
        yield reset_frame("unknown event id: this server has no event after it", newest), newest
        return
    while after < through:
        with pool.cursor(dict_rows=False) as cur:
            page = record.events_after(cur, after, execution_id=execution_id, through=through)
            # Read after the page: a prune that raced with it shows here.
            horizon = record.pruned_to(cur)
            if page.large:
                pool.retire(cur.connection)
        events, full = page.events, page.full
        del page
        if horizon > after:
            yield reset_frame("events you missed were pruned (retention)", horizon), horizon
            events = [e for e in events if e.event_id > horizon]
            after = horizon
        if events:
            after = events[-1].event_id
        # Read now, not when the stream opened: a scope narrowed since applies to the rest.
        events = scope().filter(events)
        yield from _in_chunks(events)
        del events  # one page at a time: this one is not held while the next is read
        if not full:
            break
    # Every id up to `through` is resolved: what the record did not hold, nobody will.
    yield b"", max(after, through)


CHUNK_BYTES = 64 * 1024


def _in_chunks(events: list[ExecutionEvent]) -> Iterator[tuple[bytes, int]]:
    """Frames joined up to about CHUNK_BYTES, with the last id of each; a larger frame goes alone, uncopied."""
    start, size = 0, 0
    for i, event in enumerate(events):
        if i > start and size + len(event.frame) > CHUNK_BYTES:
            yield _joined(events[start:i]), events[i - 1].event_id
            start, size = i, 0
        size += len(event.frame)
    if start < len(events):
        yield _joined(events[start:]), events[-1].event_id


def _keepalive(sub: Subscription, position: int | None) -> bytes:
    """The keep-alive of a quiet stream. One that is not sent every event (its identity may
    not read them all) also carries the position: everything up to it that it may read was
    sent (nothing is pending), so the client's Last-Event-ID moves past what it was not
    sent, and a reconnect does not read those events from the record again."""
    if position is None or (sub.scope.everything and sub.execution_id is None) or position <= sub.skip_through:
        return sse.KEEPALIVE
    return b"id: %d\n%s" % (position, sse.KEEPALIVE)


def _joined(events: list[ExecutionEvent]) -> bytes:
    return events[0].frame if len(events) == 1 else b"".join(event.frame for event in events)


def event_stream(hub: Hub, execution_id: int | None, *, retry_ms: int,
                 reconnect_spread_ms: int = 0,
                 last_event_id: int | None = None,
                 expires_at: float | None = None,
                 identity: int | None = None,
                 scope: Scope = EVERYTHING,
                 confirm: Callable[[], dict[int, Principal | None]] | None = None,
                 backlog: Callable[[int, int, Callable[[], Scope]], Iterator[tuple[bytes, int]]] | None = None,
                 connection: ClientSocket | None = None) -> Iterator[bytes]:
    """The bytes of one client's stream, from subscription to close.

    The stream starts at the hub's position: every event after it is sent, none
    up to it; only events of executions ``scope`` allows are sent (the hub
    narrows it if ``identity``'s access changes). With ``last_event_id``,
    ``backlog(last_event_id, position, scope_now)`` supplies what the client
    missed, as (frames, id reached), before the live events. When the stream
    ends, its ``retry:`` is ``retry_ms`` plus a random share of
    ``reconnect_spread_ms``, so the clients of a stopping worker come back
    spread out instead of all at once.

    At ``expires_at`` (the token's ``exp``) the stream ends with a
    ``token_expired`` event: the client refreshes its token and reconnects
    with Last-Event-ID, missing nothing. If the identity is frozen or deleted,
    it ends with a ``signed_out`` event. ``confirm()`` gives the identity as
    access control knows it once the stream is subscribed (AccessControl.recheck).
    """
    connection = connection or ClientSocket(None)
    stats = hub.stats
    # try/finally rather than ``with hub.subscription()``: one object less per held stream.
    sub = hub.subscribe(execution_id, on_overflow=connection.drop, sink=connection, identity=identity, scope=scope)
    sub.expires_at = expires_at  # the hub ends it then (checked every second, no timer per stream)
    try:
        if confirm is not None and identity is not None:
            # Access may have changed since the view looked, before the hub held this stream
            # (where the access watcher finds it): look again now that it does.
            try:
                hub.apply_access(confirm())
            except NotReady as exc:
                log.warning("ending a new stream: its identity could not be checked (%s)", exc.message)
                return
        log.debug("stream opened (execution_id=%s, %d subscribers)", execution_id, len(hub))
        # Read right after subscribing, with no wait in between: every event published
        # from now on is newer than the position, and every older one is not owed.
        position = hub.position if hub.position is not None else hub.wait_position(POSITION_WAIT)
        retry = retry_ms + int(random.uniform(0, reconnect_spread_ms))
        if position is None:
            log.warning("ending a new stream: this worker's listener has not reached the database yet")
            yield sse.Message(retry=retry).encode() + sse.comment("not ready: reconnect")
            return
        # First write: tells EventSource how long to wait before a reconnect, and
        # sends the headers, so the client knows it is subscribed. A new client (no
        # Last-Event-ID) is also told the position: an id-only block, which sets
        # EventSource's last event id without an event. If the connection breaks
        # before any event came, its reconnect resumes from there.
        first_id = position if last_event_id is None else None
        yield sse.Message(retry=retry_ms, id=first_id).encode() + sse.comment("connected")
        # Live events up to the position are not owed (or come from the record); later
        # ones are queued while the backlog is sent, and kept or left out once it is.
        sub.skip_through = position
        if last_event_id is not None and backlog is not None:
            try:
                client_at = last_event_id
                for frames, reached in backlog(last_event_id, position, lambda: sub.scope):
                    if sub.reason is not None:
                        break  # signed out (or the worker stops): the rest is not owed
                    if frames:
                        yield frames
                    del frames  # not held while the next page is read
                    client_at = reached
            except NotReady as exc:
                log.warning("ending a stream: its backlog could not be read (%s)", exc.message)
                return
            sub.skip_through = client_at  # what the client has now, whatever it claimed
        while True:
            batch = sub.next_batch()  # [] on the hub's keep-alive tick, or after a partial direct write
            raw = sub.take_raw()
            if raw and not connection.send_rest(raw):
                return  # the client is gone
            if batch is None:
                break
            if not batch:
                if not raw:
                    yield _keepalive(sub, hub.position)
                continue
            # What piled up while the client was busy leaves in one write.
            yield _joined(batch)
            stats.sent += len(batch)
        log.debug("stream ended (%s)", sub.reason)
        connection.last_response()
        # Spread the reconnects of many clients instead of a storm.
        if sub.reason == TOKEN_EXPIRED:
            data = json.dumps({"reason": "the access token expired: refresh it and reconnect with Last-Event-ID"})
            yield sse.Message(data=data, event="token_expired", retry=retry).encode()
        elif sub.reason == SIGNED_OUT:
            data = json.dumps({"reason": "this identity was frozen or deleted"})
            yield sse.Message(data=data, event="signed_out", retry=retry).encode()
        else:
            yield sse.Message(retry=retry).encode() + sse.comment(f"stream closed: {sub.reason}")
    finally:
        hub.unsubscribe(sub)
