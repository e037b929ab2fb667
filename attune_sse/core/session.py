"""One client's stream, from subscription to goodbye: no Flask, no database, no socket.

``event_stream`` is the body of the SSE response (stream.py, the view, builds
it from the request): the preamble (``retry:``, and for a new client the
position as an id-only block), the replay of what a resuming client missed
(``backlog``, from the record), the live events the hub offers, keep-alives,
and the goodbye (``token_expired``, ``signed_out``, or a closing comment).
The tests drive it in-process with a real hub and a fake backlog
(tests/test_session.py) as well as end to end.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Generator, Iterator
from typing import Protocol

from attune_sse.core import sse
from attune_sse.core.event import ExecutionEvent, Pruned, ResetReason, UnknownEvent, joined, reset_frame
from attune_sse.core.grants import EVERYTHING, Principal, Scope
from attune_sse.core.hub import SIGNED_OUT, TOKEN_EXPIRED, Hub, Sink, Subscription
from attune_sse.errors import NotReady

log = logging.getLogger(__name__)


class Client(Sink, Protocol):
    """The client's end as the session uses it (http/sink.py's ClientSocket under gunicorn)."""

    def send_rest(self, data: bytes) -> bool: ...

    def drop(self) -> None: ...

    def last_response(self) -> None: ...


class NoClient:
    """No socket (a session driven in-process): nothing is written directly, nothing is shut."""

    direct = False

    @staticmethod
    def frame(frames: list[bytes]) -> bytes:
        return b"".join(frames)

    def try_write(self, data: bytes) -> int:
        return -1

    def send_rest(self, data: bytes) -> bool:
        return True

    def drop(self) -> None:
        pass

    def last_response(self) -> None:
        pass

# Seconds a stream waits for its worker's listener to know where the record stands (only
# right after the worker started, or while its database was unreachable since).
POSITION_WAIT = 10.0

def _keepalive(sub: Subscription, position: int | None) -> bytes:
    """The keep-alive of a quiet stream. One that is not sent every event (its identity may
    not read them all) also carries the position: everything up to it that it may read was
    sent (nothing is pending), so the client's Last-Event-ID moves past what it was not
    sent, and a reconnect does not read those events from the record again."""
    if position is None or (sub.scope.everything and sub.execution_id is None) or position <= sub.skip_through:
        return sse.KEEPALIVE
    return b"id: %d\n%s" % (position, sse.KEEPALIVE)


Backlog = Callable[[int, int, Callable[[], Scope]], Iterator[tuple[list[ExecutionEvent], int]]]


def _replay(sub: Subscription, backlog: Backlog, after: int, through: int) -> Generator[bytes, None, int]:
    """What a resuming client missed, from the record, in chunks of about CHUNK_BYTES; the position it
    reached (generator's return value). A hole in its history (pruned, or an id never issued) gets it
    a ``reset``, and the replay goes on from there."""
    client_at = after
    while True:
        try:
            for events, reached in backlog(client_at, through, lambda: sub.scope):
                if sub.reason is not None:
                    return client_at  # signed out (or the worker stops): the rest is not owed
                yield from _in_chunks(events)
                del events  # not held while the next page is read
                client_at = reached
            return client_at
        except Pruned as exc:
            client_at = exc.horizon
            yield reset_frame(ResetReason.PRUNED, client_at)
        except UnknownEvent as exc:
            client_at = exc.newest
            yield reset_frame(ResetReason.UNKNOWN_ID, client_at)


CHUNK_BYTES = 64 * 1024


def _in_chunks(events: list[ExecutionEvent]) -> Iterator[bytes]:
    """Frames joined up to about CHUNK_BYTES; a larger frame goes alone, uncopied."""
    start, size = 0, 0
    for i, event in enumerate(events):
        if i > start and size + len(event.frame) > CHUNK_BYTES:
            yield joined(events[start:i])
            start, size = i, 0
        size += len(event.frame)
    if start < len(events):
        yield joined(events[start:])


def event_stream(hub: Hub, execution_id: int | None, *, retry_ms: int,
                 reconnect_spread_ms: int = 0,
                 last_event_id: int | None = None,
                 expires_at: float | None = None,
                 identity: int | None = None,
                 identity_key: str | None = None,
                 scope: Scope = EVERYTHING,
                 confirm: Callable[[], dict[int, Principal | None]] | None = None,
                 backlog: Backlog | None = None,
                 connection: Client | None = None) -> Iterator[bytes]:
    """The bytes of one client's stream, from subscription to close.

    The stream starts at the hub's position: every event after it is sent, none
    up to it; only events of executions ``scope`` allows are sent (the hub
    narrows it if ``identity``'s access changes). With ``last_event_id``,
    ``backlog(last_event_id, position, scope_now)`` supplies what the client
    missed, as (events, id reached) a page at a time, before the live events;
    where it raises ``Pruned`` or ``UnknownEvent`` the client gets a ``reset``
    and the replay goes on from where the reset says. When the stream
    ends, its ``retry:`` is ``retry_ms`` plus a random share of
    ``reconnect_spread_ms``, so the clients of a stopping worker come back
    spread out instead of all at once.

    At ``expires_at`` (the token's ``exp``) the stream ends with a
    ``token_expired`` event: the client refreshes its token and reconnects
    with Last-Event-ID, missing nothing. If the identity is frozen or deleted,
    it ends with a ``signed_out`` event. ``confirm()`` gives the identity as
    access control knows it once the stream is subscribed (AccessControl.recheck).
    """
    connection = connection or NoClient()
    stats = hub.stats
    # try/finally rather than ``with hub.subscription()``: one object less per held stream.
    sub = hub.subscribe(execution_id, on_overflow=connection.drop, sink=connection, identity=identity, scope=scope)
    sub.expires_at = expires_at  # the hub ends it then (checked every second, no timer per stream)
    sub.identity_key = identity_key
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
            yield sse.Frame(retry=retry).encode() + sse.comment("not ready: reconnect")
            return
        # First write: tells EventSource how long to wait before a reconnect, and
        # sends the headers, so the client knows it is subscribed. A new client (no
        # Last-Event-ID) is also told the position: an id-only block, which sets
        # EventSource's last event id without an event. If the connection breaks
        # before any event came, its reconnect resumes from there.
        first_id = position if last_event_id is None else None
        yield sse.Frame(retry=retry_ms, id=first_id).encode() + sse.comment("connected")
        # Live events up to the position are not owed (or come from the record); later
        # ones are queued while the backlog is sent, and kept or left out once it is.
        sub.skip_through = position
        if last_event_id is not None and backlog is not None:
            try:
                client_at = yield from _replay(sub, backlog, last_event_id, position)
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
            yield joined(batch)
            stats.sent += len(batch)
        log.debug("stream ended (%s)", sub.reason)
        connection.last_response()
        # Spread the reconnects of many clients instead of a storm.
        if sub.reason == TOKEN_EXPIRED:
            data = json.dumps({"reason": "the access token expired: refresh it and reconnect with Last-Event-ID"})
            yield sse.Frame(data=data, event="token_expired", retry=retry).encode()
        elif sub.reason == SIGNED_OUT:
            data = json.dumps({"reason": "this identity was frozen or deleted"})
            yield sse.Frame(data=data, event="signed_out", retry=retry).encode()
        else:
            yield sse.Frame(retry=retry).encode() + sse.comment(f"stream closed: {sub.reason}")
    finally:
        hub.unsubscribe(sub)
