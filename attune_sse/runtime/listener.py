"""The LISTEN greenlet: doorbells in, the record's events out, as messages (message.py) to an outlet.

One per instance, in the worker that leads it (election.py: its outlet is the
leader's Fanout, to its own feed and its followers), or one per cluster with a
broker (broker.py: its outlet is the Redis stream). It owns its connection
(autocommit, never shared) and waits with ``poll()`` made cooperative by
gevent. Its *position* is where it has read the record to, and its history
(``epoch``, ``base``) the one its messages belong to. A notification is only
a doorbell: on each wake-up the listener reads the record after its
*position* and emits what it finds, in pages (record.pages). What a
notification says is never sent to anyone, since any database role can NOTIFY
anything on the channel; it is checked against the record afterwards, and
what the record does not bear out is counted (``rejected``, by kind) and
logged once per kind.

Order and completeness. Every event id up to the position is resolved:
published, or known never to commit. The trigger draws ids as transactions
commit, each holding locks on the record's table and sequence from before it
draws until its commit is visible (see the migration), so an id missing below
a visible one is a commit in flight. The listener stops before it and reads
again at the next doorbell, which is usually that very commit's. If it is
still missing after ``GAP_GRACE``, the listener takes the transactions holding
those locks, waits until they have ended, and reads once more: an id still
missing then was drawn by a transaction that failed while committing, and is
passed. So clients receive ids in increasing order and "every event after id
N" is a complete answer. Events pruned before the listener published them,
or a database that went back in time (a restore, a failover), make it send
its clients a ``reset``.

Faults: a lost connection is retried with capped exponential backoff and
jitter, each attempt logged. A server that vanished without closing the
socket is caught by TCP keepalives / ``tcp_user_timeout`` and by a ping sent
after ``ping_interval`` seconds of silence that must answer within
``ping_timeout``. After a reconnect the listener reads on from its position,
so what was recorded meanwhile reaches clients before anything newer.
"""

from __future__ import annotations

import logging
import select
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import gevent.select
import psycopg2

from attune_sse.config import Config
from attune_sse.core.event import ExecutionEvent, PayloadError, ResetReason, parse_notification
from attune_sse.errors import one_line
from attune_sse.runtime.backoff import backoff
from attune_sse.runtime.message import Message, Outlet
from attune_sse.storage import record
from attune_sse.storage.db import connect

log = logging.getLogger(__name__)

CHANNEL = "attune_notifications"
APPLICATION_NAME = "attune-sse-listener"
GAP_GRACE = 0.05  # s a missing id may stay missing before the transactions that drew ids are looked at
GAP_RECHECK_MAX = 1.0  # s between looks at pg_locks, at most, while a commit stays in flight
RECENT_IDS = 16384  # published ids kept to tell a late doorbell from a forged one
CHECK_LIMIT = 1000  # notifications checked against the record per wake-up, at most
READ_SPACING = 0.005  # s between reads of the record at least: under load one read brings several events


@dataclass(frozen=True)
class ListenerSettings:
    """How the listener keeps its connection (``listener.*`` in the config)."""

    ping_interval: float = 3.0  # s of silence after which it pings
    ping_timeout: float = 5.0  # s a ping may take before the connection is taken for dead
    reconnect_max_delay: float = 5.0  # s between reconnect attempts, at most

    @classmethod
    def of(cls, config: Config) -> ListenerSettings:
        return cls(ping_interval=config["listener.ping_interval"], ping_timeout=config["listener.ping_timeout"],
                   reconnect_max_delay=config["listener.reconnect_max_delay"])


class PingTimeout(Exception):
    """PostgreSQL did not answer a ping in time: the connection is taken for dead."""


class RecordMisconfigured(Exception):
    """The event record is set up so that this listener cannot keep its promises; the message says how to fix it."""


@dataclass
class _Gap:
    """The id after the position is missing while ``below`` was in the record (seen at ``since``)."""

    first: int
    below: int
    since: float
    holders: list[tuple[str, int]] | None = None  # (vxid, pid) that had drawn ids once the grace was over
    recheck: float = 0.02
    next_look: float = 0.0


class Listener:
    """Keeps one LISTEN connection alive and publishes the record's events in order."""

    def __init__(
        self,
        url: str,
        outlet: Outlet,
        *,
        position: int | None = None,
        epoch: int = 0,
        base: int = 0,
        settings: ListenerSettings = ListenerSettings(),
    ) -> None:
        self.url = url
        self.outlet = outlet
        self.ping_interval = settings.ping_interval
        self.ping_timeout = settings.ping_timeout
        self.reconnect_max_delay = settings.reconnect_max_delay
        # Every event id up to here is resolved; None: from the newest once it starts. A worker that
        # followed another leader goes on from where its feed is, in the history it is in.
        self.position: int | None = position
        self.epoch, self.base = epoch, base
        self.reconnects = 0
        self.published = 0  # events published
        self.caught_up = 0  # of which read after a reconnect
        self.skipped = 0  # ids passed: drawn by transactions that did not commit
        self.rejected: dict[str, int] = {}  # notifications the record does not bear out, by kind
        # Seconds from an event's commit to its publication, for the last one published.
        self.lag: float | None = None
        self.backend_pid: int | None = None
        self._recent: OrderedDict[int, int] = OrderedDict()  # event id -> execution id
        self._gap: _Gap | None = None
        self._last_read = 0.0  # time.monotonic() of the last page read
        self._last_published: tuple[int, float] | None = None  # (id, commit time) of the last event published
        self._connected = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def _position(self) -> int:
        """The position where it is known: ``_run`` starts it (``_start_position``) before the first
        read, and nothing sets it back to None, so every read and doorbell finds it set."""
        position = self.position
        assert position is not None, "the listener read before it had a position"
        return position

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

    def beat(self) -> None:
        """A heartbeat: followers hear where it is, and whether its LISTEN is connected, while no event comes."""
        if self.position is not None:
            self._emit(Message(after=self.position, to=self.position, ok=self.connected))

    def stats(self) -> dict[str, Any]:
        return {"position": self.position, "published": self.published, "caught_up": self.caught_up,
                "skipped": self.skipped, "rejected": dict(self.rejected), "reconnects": self.reconnects,
                "lag_seconds": self.lag, "backend_pid": self.backend_pid}

    def _emit(self, message: Message) -> None:
        message.epoch, message.base = self.epoch, self.base
        self.outlet.send(message)

    # -- the loop ----------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while True:
            conn = None
            try:
                conn = connect(self.url, application_name=APPLICATION_NAME, autocommit=True)
                self._listen(conn)
                if self.position is None:
                    self._start_position(conn)
                    log.info("listener: LISTEN %s on backend %s, from event %d",
                             CHANNEL, self.backend_pid, self.position)
                elif attempt:
                    self.reconnects += 1
                    log.warning("listener: reconnected to PostgreSQL after %d attempt(s)", attempt)
                    self._check_not_rewound(conn)
                caught_up = self._read(conn)
                if attempt and caught_up:
                    self.caught_up += caught_up
                    log.warning("listener: caught up %d event(s) recorded while disconnected", caught_up)
                attempt = 0
                self._connected.set()
                self._serve(conn)
            except Exception as exc:
                if not isinstance(exc, (psycopg2.Error, OSError, PingTimeout, RecordMisconfigured)):
                    # A bug, not a network fault: say so loudly, but keep the worker's stream alive.
                    log.exception("listener: unexpected error; reconnecting")
                attempt += 1
                delay = backoff(attempt, self.reconnect_max_delay)
                log.warning(
                    "listener: connection lost or refused (%s); events are not being received; "
                    "reconnect attempt %d in %.2fs",
                    f"{type(exc).__name__}: {one_line(exc)}", attempt, delay,
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
            record.prepare(cur)

    def _start_position(self, conn: Any) -> None:
        """Start after the newest event, once the commits in flight have ended (their ids may be lower)."""
        with conn.cursor() as cur:
            if record.sequence_cache(cur) != 1:
                raise RecordMisconfigured(
                    f"{record.SEQUENCE} hands out ids in blocks (CACHE > 1), so they are not drawn in time "
                    f"order and this listener could pass events that commit later: "
                    f"ALTER SEQUENCE {record.SEQUENCE} CACHE 1")
            newest = record.newest(cur)
            holders = record.id_holders(cur)
        waited_since = time.monotonic()
        pause, warned = 0.01, 0.0
        while holders:
            with conn.cursor() as cur:
                if not record.still_holding(cur, [vxid for vxid, _ in holders]):
                    break
            del conn.notifies[:]  # doorbells of what precedes the position: nothing to read
            waited = time.monotonic() - waited_since
            if waited - warned >= 10:
                warned = waited
                log.warning("listener: waiting %.0fs to start, for %d transaction(s) that drew execution event "
                            "ids and have not ended (backend pids %s); new streams on this worker wait meanwhile",
                            waited, len(holders), ", ".join(str(pid) for _, pid in holders))
            gevent.sleep(pause)
            pause = min(1.0, pause * 2)
        self.position = newest
        self._emit(Message(after=newest, to=newest))

    def _check_not_rewound(self, conn: Any) -> None:
        """After a reconnect: a database restored from a backup, or a replica promoted, may not hold
        the last event this listener published, and may have given its id to a new one. Then the
        clients are told to reload, and delivery goes on after the last event both histories share."""
        if self._last_published is None:
            return
        event_id, at = self._last_published
        with conn.cursor() as cur:
            now_at = record.recorded_at(cur, event_id)
            if now_at is not None and abs(now_at - at) < 1e-5:
                return  # the same event: the same history
            if now_at is None and record.pruned_to(cur) >= event_id:
                return  # pruned meanwhile: nothing to compare, nothing went back
            shared = record.newest_recorded_by(cur, at)
        log.error("listener: the database no longer holds event %d as this worker published it: it was restored "
                  "or failed over; telling clients to reload, and going on after event %d", event_id, shared)
        self._last_published = None
        self._gap = None
        self._recent.clear()
        self._reset(ResetReason.REWOUND, shared)

    def _serve(self, conn: Any) -> None:
        """Wait for doorbells until the connection fails (raises) or the greenlet is killed."""
        quiet_since = time.monotonic()
        # poll(), not select(): with thousands of streams open, a reconnect's socket
        # gets a descriptor above select()'s limit of 1024.
        poller = gevent.select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        while True:
            if not conn.notifies:  # a query of ours may have brought some in already
                wait = self.ping_interval if self._gap is None else self._gap.recheck
                if poller.poll(wait * 1000):
                    conn.poll()
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= self.ping_interval:
                    self._ping(conn)
                    quiet_since = time.monotonic()
            notifies = conn.notifies[:]
            del conn.notifies[:]
            claims = self._claims(notifies)
            if claims:
                # Only a doorbell for an event after the position says something new: under load
                # most of them are for events a read for an earlier one brought in already.
                position = self._position
                if any(event_id > position for event_id, _, _ in claims):
                    claims += self._gather(conn)
                    self._read(conn)
                self._check(conn, claims)
            # Whatever rang (a flood of stale doorbells too), an open gap is looked at on time.
            if self._gap is not None and self._look_at_gap(conn):
                self._read(conn)  # what was recorded after the gap

    def _gather(self, conn: Any) -> list[tuple[int, int, Any]]:
        """Right after a read, wait out ``READ_SPACING`` and take the doorbells that rang meanwhile:
        under load one read brings several events, at no cost in latency when events are sparse."""
        pause = self._last_read + READ_SPACING - time.monotonic()
        if pause <= 0:
            return []
        gevent.sleep(pause)
        conn.poll()
        notifies = conn.notifies[:]
        del conn.notifies[:]
        return self._claims(notifies)

    def _ping(self, conn: Any) -> None:
        timeout = gevent.Timeout(self.ping_timeout, PingTimeout(f"no answer to a ping within {self.ping_timeout}s"))
        with timeout, conn.cursor() as cur:
            cur.execute("SELECT 1")

    # -- reading the record ------------------------------------------------

    def _read(self, conn: Any) -> int:
        """Publish the record's events after the position, up to a missing id; return how many."""
        published = 0
        while True:
            gap = self._gap
            # While an id is missing, only up to the event seen after it: the rest was read already.
            through = None if gap is None else gap.below
            hole = False
            self._last_read = time.monotonic()
            for page in record.pages(conn.cursor, self._position, through=through, prepared=True):
                events, position = page.events, self._position
                run = 0  # the events that follow the position without a hole
                while run < len(events) and events[run].event_id == position + 1 + run:
                    run += 1
                self._publish(events[:run])
                published += run
                if run < len(events):  # an id is missing before events[run]
                    self._gap_before(events[run].event_id)
                    hole = True
                    break
            if hole:
                if not self._look_at_gap(conn):
                    return published
            elif gap is not None:
                self._gap = None  # filled: read on, unbounded
            else:
                return published

    def _publish(self, events: list[ExecutionEvent]) -> None:
        if not events:
            return
        self._emit(Message(after=self._position, to=events[-1].event_id, events=events))
        self.position = events[-1].event_id
        self._last_published = (events[-1].event_id, events[-1].recorded_at)
        self.published += len(events)
        self.lag = max(0.0, time.time() - events[-1].recorded_at)
        recent = self._recent
        for event in events:
            recent[event.event_id] = event.entity_id
        while len(recent) > RECENT_IDS:
            recent.popitem(last=False)

    def _gap_before(self, below: int) -> None:
        first = self._position + 1
        if self._gap is None or self._gap.first != first:
            now = time.monotonic()
            self._gap = _Gap(first=first, below=below, since=now, next_look=now + GAP_GRACE)

    def _look_at_gap(self, conn: Any) -> bool:
        """Settle the open gap if its transactions have ended; True if the position moved past it."""
        gap = self._gap
        now = time.monotonic()
        if gap is None or now < gap.next_look:
            return False
        with conn.cursor() as cur:
            horizon = record.pruned_to(cur)
            if horizon >= gap.first:
                passed = min(horizon, gap.below - 1)
                log.warning("listener: events %d..%d were pruned before this listener published them "
                            "(events.retention_*); telling its clients to reload", gap.first, passed)
                self._gap = None
                self._reset(ResetReason.PRUNED, passed)
                return True
            if gap.holders is None:
                gap.holders = record.id_holders(cur)  # looked at after the gap was seen: see the module doc
            if gap.holders and record.still_holding(cur, [vxid for vxid, _ in gap.holders]):
                gap.recheck = min(GAP_RECHECK_MAX, gap.recheck * 2)
                gap.next_look = now + gap.recheck
                return False
        # Whoever drew the missing ids has ended: what the record holds up to `below` is all there will be.
        # Read it all first (a few events: `below` is the first one seen after the gap), so the log says
        # what was passed before any client gets the events after it.
        start = self._position
        found = [e for page in record.pages(conn.cursor, start, through=gap.below, prepared=True)
                 for e in page.events]
        missing = gap.below - start - len(found)
        if missing:
            self.skipped += missing
            log.info("listener: passed %d event id(s) after %d: drawn by transactions that did not commit",
                     missing, start)
        self._publish(found)
        self._pass(gap.below)
        return True

    def _pass(self, position: int) -> None:
        """Every id up to ``position`` is resolved, whether or not an event had it."""
        if position > self._position:
            self._emit(Message(after=self._position, to=position))
            self.position = position
        self._gap = None

    def _reset(self, reason: ResetReason, position: int) -> None:
        """A new history, going on from ``position``: every client reloads."""
        self.epoch, self.base = time.time_ns(), position
        self.position = position
        self._emit(Message(after=position, to=position, reset=reason))

    # -- checking what the doorbells said -----------------------------------

    def _claims(self, notifies: list[Any]) -> list[tuple[int, int, Any]]:
        """(event id, execution id, notification) of each notification shaped like the trigger's;
        the others are rejected at once, and ring no bell."""
        claims = []
        for notify in notifies:
            try:
                event_id, execution_id = parse_notification(notify.payload)
            except PayloadError as exc:
                self._reject(exc.kind, str(exc), notify)
                continue
            claims.append((event_id, execution_id, notify))
        return claims

    def _check(self, conn: Any, claims: list[tuple[int, int, Any]]) -> None:
        """Count the notifications the record does not bear out (they changed nothing)."""
        unknown = []
        for event_id, execution_id, notify in claims:
            published = self._recent.get(event_id)
            if published is None:
                unknown.append((event_id, execution_id, notify))
            elif published != execution_id:
                self._reject("unknown_event", "names an event of another execution", notify)
        if not unknown:
            return
        unknown = unknown[:CHECK_LIMIT]
        with conn.cursor() as cur:
            recorded = record.executions_of(cur, [event_id for event_id, _, _ in unknown])
        for event_id, execution_id, notify in unknown:
            if recorded.get(event_id) != execution_id:
                self._reject("unknown_event", "names an event the record does not hold", notify)

    def _reject(self, kind: str, reason: str, notify: Any) -> None:
        seen = self.rejected.get(kind, 0)
        self.rejected[kind] = seen + 1
        if not seen:
            log.warning(
                "listener: a notification on %s from backend %s %s, so it changed nothing clients receive "
                "(events come from the record); it and any like it are counted in "
                "attune_sse_notifications_rejected_total{kind=\"%s\"}: %.120r",
                CHANNEL, notify.pid, reason, kind, notify.payload,
            )
