"""The LISTEN greenlet: PostgreSQL notifications in, hub publications out.

One per worker process. It owns its connection (autocommit, never shared),
waits with ``poll()`` made cooperative by gevent, drains ``conn.notifies``,
and turns each payload into an ``ExecutionEvent`` for the hub.

Faults: a lost connection is retried with capped exponential backoff and
jitter, each attempt logged. A server that vanished without closing the socket
is caught by TCP keepalives / ``tcp_user_timeout`` and by a ping sent after
``ping_interval`` seconds of silence that must answer within ``ping_timeout``.
After a reconnect the listener reads the events it missed from
``attune.execution_event`` before going live again.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import select
import time
from typing import Any

import gevent
import gevent.event
import gevent.select
import psycopg2

from . import record
from .db import connect
from .event import ExecutionEvent, PayloadError, parse_notification
from .hub import Hub

log = logging.getLogger(__name__)

CHANNEL = "attune_notifications"
APPLICATION_NAME = "attune-sse-listener"


class PingTimeout(Exception):
    """PostgreSQL did not answer a ping in time: the connection is taken for dead."""


class Listener:
    """Keeps one LISTEN connection alive and publishes what it hears."""

    def __init__(
        self,
        url: str,
        hub: Hub,
        *,
        ping_interval: float = 3.0,
        ping_timeout: float = 5.0,
        reconnect_max_delay: float = 5.0,
    ) -> None:
        self.url = url
        self.hub = hub
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.reconnect_max_delay = reconnect_max_delay
        self.reconnects = 0
        self.received = 0
        self.caught_up = 0
        self.last_event_id: int | None = None
        # Seconds from the trigger (the payload's timestamp) to this listener, for the last notification.
        self.lag: float | None = None
        self.backend_pid: int | None = None
        self._connected = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> Listener:
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)
            self._greenlet.name = "attune-sse-listener"
        return self

    def stop(self, timeout: float = 2.0) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(timeout=timeout)
            self._greenlet = None
        self._connected.clear()

    # -- the loop ----------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while True:
            conn = None
            try:
                conn = connect(self.url, application_name=APPLICATION_NAME, autocommit=True)
                self._listen(conn)
                if attempt:
                    self.reconnects += 1
                    log.warning("listener: reconnected to PostgreSQL after %d attempt(s)", attempt)
                else:
                    log.info("listener: LISTEN %s on backend %s", CHANNEL, self.backend_pid)
                attempt = 0
                self._catch_up(conn)
                self._connected.set()
                self._serve(conn)
            except Exception as exc:
                if not isinstance(exc, (psycopg2.Error, OSError, PingTimeout)):
                    # A bug, not a network fault: say so loudly, but keep the worker's stream alive.
                    log.exception("listener: unexpected error; reconnecting")
                attempt += 1
                delay = min(self.reconnect_max_delay, 0.1 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning(
                    "listener: connection lost or refused (%s); events are not being received; "
                    "reconnect attempt %d in %.2fs",
                    _one_line(exc), attempt, delay,
                )
                gevent.sleep(delay)
            finally:
                self._connected.clear()
                if conn is not None and not conn.closed:
                    conn.close()

    def _listen(self, conn: Any) -> None:
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {CHANNEL}")
            cur.execute("SELECT pg_backend_pid()")
            self.backend_pid = cur.fetchone()[0]

    def _serve(self, conn: Any) -> None:
        """Wait for notifications until the connection fails (raises) or the greenlet is killed."""
        quiet_since = time.monotonic()
        # poll(), not select(): with thousands of streams open, a reconnect's socket
        # gets a descriptor above select()'s limit of 1024.
        poller = gevent.select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        while True:
            ready = poller.poll(self.ping_interval * 1000)
            if ready:
                conn.poll()
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= self.ping_interval:
                self._ping(conn)
                quiet_since = time.monotonic()
            self._drain(conn)

    def _ping(self, conn: Any) -> None:
        timeout = gevent.Timeout(self.ping_timeout, PingTimeout(f"no answer to a ping within {self.ping_timeout}s"))
        with timeout, conn.cursor() as cur:
            cur.execute("SELECT 1")

    def _drain(self, conn: Any) -> None:
        """Publish what arrived, as one batch (see Hub.publish_batch)."""
        batch: list[ExecutionEvent] = []
        while conn.notifies:  # a truncated payload's query may bring more
            notifies = conn.notifies[:]
            del conn.notifies[:]
            for notify in notifies:
                event = self._event_of(conn, notify)
                if event is not None:
                    self._received(event)
                    batch.append(event)
        self.hub.publish_batch(batch)

    def _event_of(self, conn: Any, notify: Any) -> ExecutionEvent | None:
        """The event a notification announces, or None (another channel, malformed, a repeat)."""
        if notify.channel != CHANNEL:
            return None
        try:
            doc = parse_notification(notify.payload)
        except PayloadError as exc:
            log.error("listener: ignoring a malformed notification (%s): %.200s", exc, notify.payload)
            return None
        if self._seen(doc["event_id"]):
            return None  # published already, by the catch-up after a reconnect
        self._measure_lag(doc.get("timestamp"))
        if doc.get("truncated"):
            return self._read_event(conn, doc["event_id"])
        return ExecutionEvent.from_parts(doc["event_id"], doc["entity_id"], notify.payload)

    def _read_event(self, conn: Any, event_id: int) -> ExecutionEvent | None:
        """The whole event from the table, for payloads too large for NOTIFY."""
        with conn.cursor() as cur:
            event = record.event_by_id(cur, event_id)
        if event is None:
            log.error("listener: event %d was announced but is not in attune.execution_event", event_id)
        return event

    def _catch_up(self, conn: Any) -> None:
        """After a reconnect, publish what was recorded while the listener was away."""
        if self.last_event_id is None:
            return
        caught_up = 0
        while True:
            with conn.cursor() as cur:
                page = record.events_after(cur, self.last_event_id)
            for event in page:
                self._received(event)
            self.hub.publish_batch(page)
            caught_up += len(page)
            if len(page) < record.PAGE_SIZE:
                break
        if caught_up:
            self.caught_up += caught_up
            log.warning("listener: caught up %d event(s) missed while disconnected", caught_up)

    def _measure_lag(self, timestamp: Any) -> None:
        try:
            fired = dt.datetime.fromisoformat(timestamp)
        except (TypeError, ValueError):
            return
        self.lag = max(0.0, time.time() - fired.timestamp())

    def _seen(self, event_id: int) -> bool:
        # Event ids follow commit order (the trigger's lock), and so does NOTIFY:
        # an id at or below the last one published is a repeat, never a late event.
        return self.last_event_id is not None and event_id <= self.last_event_id

    def _received(self, event: ExecutionEvent) -> None:
        self.received += 1
        self.last_event_id = event.event_id


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
