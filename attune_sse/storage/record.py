"""The durable record of execution events: what clients receive, read in pages; pruning.

What a reader must act on is raised (``Pruned``, ``UnknownEvent``, core/event.py): the
reader (the feed, a resuming session) decides what its clients are told.

``attune.execution_event`` is the mailbox; NOTIFY is only the doorbell. The
trigger (``sql/20261127000001_record_events_at_commit.sql``) writes each event
as its transaction commits, with an id from a sequence, drawn inside the
INSERT: the table and the sequence are locked (ROW EXCLUSIVE) before the id
is drawn, and stay locked until the transaction has ended. So an id missing
below a visible one belongs to a commit in flight, or to a transaction that
failed while committing, and ``id_holders`` names the transactions that might
still hold one (see listener.py).

Pages are bounded by count and by bytes: a page ends with the event that
passes ``max_bytes`` of payload (one event at least), so a reader holds about
that much however large the results are. Each event arrives as its SSE frame,
in bytes (UTF-8, as stored): no decode, and no second copy in Python of a
payload that may be megabytes long.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg2.extensions

from attune_sse.core.event import ExecutionEvent, Pruned, UnknownEvent
from attune_sse.core.ids import MAX_BIGINT

if TYPE_CHECKING:
    from attune_sse.core.grants import Scope
    from attune_sse.storage.db import Pool

PAGE_EVENTS = 1000
PAGE_BYTES = 1 << 20

# Who may still hold an id the record does not show: the transactions that hold ROW EXCLUSIVE
# on both the sequence and the table, as the trigger's INSERT does from before it draws the id.
SEQUENCE, TABLE = "attune.execution_event_id_seq", "attune.execution_event"
_ID_HOLDERS = f"""
    SELECT virtualtransaction, max(pid) FROM pg_locks
     WHERE locktype = 'relation' AND mode = 'RowExclusiveLock' AND granted
       AND relation IN ('{SEQUENCE}'::regclass, '{TABLE}'::regclass)
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
     GROUP BY virtualtransaction HAVING count(DISTINCT relation) = 2"""


@dataclass(frozen=True)
class Page:
    """Events in id order, and whether the record may hold more after them (a limit was reached)."""

    events: list[ExecutionEvent]
    full: bool

    @property
    def large(self) -> bool:
        """Bigger than a page is meant to be (an event of its own larger than ``PAGE_BYTES``): the
        connection that read it holds a buffer that size from now on (libpq never shrinks it)."""
        return sum(len(e.frame) for e in self.events) > 2 * PAGE_BYTES


def _page_sql(after: str, through: str, limit: str, max_bytes: str, execution: str | None = None) -> str:
    """The page query, with these placeholders (``%(name)s`` for psycopg2, ``$n`` for PREPARE)."""
    of_execution = "" if execution is None else f"AND execution = {execution}"
    # The SSE frame is put together here: the payload crosses into Python once, as bytes.
    # `bytes` is NULL only for events recorded before it was added: those are measured.
    return f"""
        SELECT id, execution, 'id: ' || id || E'\\ndata: ' || payload::text || E'\\n\\n',
               extract(epoch FROM created)::float8, upto, payload->'data'->>'action_ref'
          FROM (SELECT id, execution, created, payload, size,
                       sum(size) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS upto
                  FROM (SELECT id, execution, created, payload,
                               coalesce(bytes, octet_length(payload::text)) AS size
                          FROM attune.execution_event
                         WHERE id > {after} AND id <= {through} {of_execution}
                         ORDER BY id LIMIT {limit}) newest) page
         WHERE upto - size < {max_bytes}
         ORDER BY id"""


PREPARED = "attune_events_after"


def prepare(cur: Any) -> None:
    """Plan the page query once on this connection, for ``events_after(..., prepared=True)``:
    the listener reads a page per doorbell, and planning it would cost more than running it."""
    cur.execute(f"PREPARE {PREPARED} (bigint, bigint, int, int) AS {_page_sql('$1', '$2', '$3', '$4')}")


def events_after(cur: Any, after_id: int, *, execution_id: int | None = None, through: int | None = None,
                 limit: int = PAGE_EVENTS, max_bytes: int = PAGE_BYTES, prepared: bool = False) -> Page:
    """Events with ``after_id`` < id (<= ``through``), oldest first, optionally of one execution."""
    params = {"after": after_id, "through": MAX_BIGINT if through is None else through, "limit": limit,
              "max_bytes": max_bytes, "execution": execution_id}
    if prepared and execution_id is None:
        sql = f"EXECUTE {PREPARED} (%(after)s, %(through)s, %(limit)s, %(max_bytes)s)"
    else:
        sql = _page_sql("%(after)s", "%(through)s", "%(limit)s", "%(max_bytes)s",
                        None if execution_id is None else "%(execution)s")
    # A cursor of its own: the typecaster that gives text as bytes applies to all its columns.
    with cur.connection.cursor() as own:
        psycopg2.extensions.register_type(psycopg2.extensions.BYTES, own)
        own.execute(sql, params)
        events, spent = [], 0
        for event_id, execution, frame, recorded_at, upto, action_ref in own:
            # The typecaster gives text as bytes; the ref is short and always ASCII-safe UTF-8.
            ref = action_ref.decode() if action_ref is not None else ""
            events.append(ExecutionEvent.from_frame(event_id, execution, frame, recorded_at, ref))
            spent = upto
    return Page(events, full=len(events) == limit or spent >= max_bytes)


def executions_of(cur: Any, event_ids: list[int]) -> dict[int, int]:
    """event id -> execution id, for those of ``event_ids`` the record holds."""
    cur.execute("SELECT id, execution FROM attune.execution_event WHERE id = ANY(%s)", (event_ids,))
    return dict(cur.fetchall())


def id_holders(cur: Any) -> list[tuple[str, int]]:
    """(virtual transaction id, backend pid) of the transactions that may have drawn event ids
    and not ended yet."""
    cur.execute(_ID_HOLDERS)
    return [(vxid, pid) for vxid, pid in cur.fetchall()]


def still_holding(cur: Any, holders: list[str]) -> int:
    """How many of ``holders`` still hold what they held."""
    cur.execute(f"SELECT count(*) FROM ({_ID_HOLDERS}) held WHERE virtualtransaction = ANY(%s)", (holders,))
    return cur.fetchone()[0]


def sequence_cache(cur: Any) -> int:
    """How many ids the sequence hands a session at a time: 1, or ids are not drawn in time order."""
    cur.execute(f"SELECT seqcache FROM pg_sequence WHERE seqrelid = '{SEQUENCE}'::regclass")
    return cur.fetchone()[0]


def recorded_at(cur: Any, event_id: int) -> float | None:
    """The commit time (epoch seconds) of an event, or None if the record does not hold it."""
    cur.execute("SELECT extract(epoch FROM created)::float8 FROM attune.execution_event WHERE id = %s", (event_id,))
    row = cur.fetchone()
    return None if row is None else row[0]


def newest_recorded_by(cur: Any, at: float) -> int:
    """The highest event id committed at or before ``at`` (epoch seconds; the horizon if none is left)."""
    cur.execute("""SELECT id FROM attune.execution_event WHERE created <= to_timestamp(%s)
                   ORDER BY id DESC LIMIT 1""", (at,))
    row = cur.fetchone()
    return row[0] if row else pruned_to(cur)


def pruned_to(cur: Any) -> int:
    """The highest event id pruning has removed (0 if none)."""
    cur.execute("SELECT pruned_to FROM attune.execution_event_horizon")
    row = cur.fetchone()
    return row[0] if row else 0


def newest(cur: Any) -> int:
    """The highest event id recorded, or pruned if pruning emptied the record (0 if none yet)."""
    cur.execute("""SELECT greatest((SELECT max(id) FROM attune.execution_event),
                                   (SELECT pruned_to FROM attune.execution_event_horizon), 0)""")
    return cur.fetchone()[0]


def prune(cur: Any, *, max_age_seconds: float | None = None, keep_last: int | None = None) -> tuple[int, int]:
    """Delete events older than ``max_age_seconds`` or beyond the newest ``keep_last``.

    Returns (events deleted, new horizon). The horizon only grows.
    """
    cutoffs = []
    if max_age_seconds is not None:
        # `created` is the commit time, taken as the id is drawn, so it grows with the id:
        # the first young event, found along the primary key, ends what is old.
        cur.execute(
            """SELECT id FROM attune.execution_event WHERE created >= now() - make_interval(secs => %s)
               ORDER BY id LIMIT 1""",
            (max_age_seconds,),
        )
        row = cur.fetchone()
        cutoffs.append(row[0] - 1 if row else newest(cur))
    if keep_last is not None:
        cur.execute("SELECT id FROM attune.execution_event ORDER BY id DESC OFFSET %s LIMIT 1", (keep_last,))
        row = cur.fetchone()
        cutoffs.append(row[0] if row else None)
    cutoff = max((c for c in cutoffs if c is not None and c > 0), default=None)
    if cutoff is None:
        return 0, pruned_to(cur)
    cur.execute("DELETE FROM attune.execution_event WHERE id <= %s", (cutoff,))
    deleted = cur.rowcount
    cur.execute(
        """UPDATE attune.execution_event_horizon SET pruned_to = greatest(pruned_to, %s), updated = now()
           RETURNING pruned_to""",
        (cutoff,),
    )
    return deleted, cur.fetchone()[0]


# -- reading page by page ---------------------------------------------------------

Cursors = Callable[[], AbstractContextManager[Any]]  # a cursor for each page (a pool's, or a connection's)


def pages(cursors: Cursors, after: int, *, through: int | None = None, execution_id: int | None = None,
          prepared: bool = False, pruned: bool = False, retire: Pool | None = None) -> Iterator[Page]:
    """The record's events after ``after`` (up to ``through``), a page at a time, each read with a
    cursor of its own (``cursors()``): the one page reader of the listener, the feed and resumes.

    With ``pruned``, each page is followed by a look at the horizon: events after the position the
    page was read from were pruned (before or while it was read) raises ``Pruned``; the caller
    decides what its clients are told, and reads on after the horizon. With ``retire``, the pool's
    connection that read an outsized page is closed when it comes back (``Page.large``).
    """
    while through is None or after < through:
        with cursors() as cur:
            page = events_after(cur, after, execution_id=execution_id, through=through, prepared=prepared)
            horizon = pruned_to(cur) if pruned else 0  # read after the page: a prune that raced with it shows
            if retire is not None and page.large:
                retire.retire(cur.connection)
        if horizon > after:
            raise Pruned(horizon if through is None else min(horizon, through))
        yield page
        if not page.full or not page.events:
            return
        after = page.events[-1].event_id


# -- what a resuming stream missed ---------------------------------------------------

def read_backlog(pool: Pool, execution_id: int | None, after: int, through: int,
                 scope: Callable[[], Scope] | None = None) -> Iterator[tuple[list[ExecutionEvent], int]]:
    """What a client resuming after ``after`` missed, up to ``through``, from the record.

    Yields (events, the client's position once it has them), a page at a time;
    the last position is where its live stream goes on from. ``through`` is the
    hub's position, so every id up to it is resolved and the live events carry on
    from there. Raises ``UnknownEvent`` for an id this database never issued, and
    ``Pruned`` when the client (or the read) is behind the retention window: the
    session tells its client, and reads on after the horizon. Events of
    executions the stream's scope (``scope()``, asked again for each page: access
    may narrow meanwhile) does not allow are left out.
    """
    with pool.cursor(dict_rows=False) as cur:
        issued = newest(cur)
    # ``through`` may be above the newest event: ids of failed commits, passed, that a stream's
    # keep-alive gave its client as its position. Those were issued too.
    if after > max(issued, through):
        raise UnknownEvent(issued)

    def cursors() -> AbstractContextManager[Any]:
        return pool.cursor(dict_rows=False)

    for page in pages(cursors, after, through=through, execution_id=execution_id, pruned=True, retire=pool):
        events = page.events
        if events:
            after = events[-1].event_id
        # Read now, not when the stream opened: a scope narrowed since applies to the rest.
        if scope is not None:
            events = scope().filter(events)
        yield events, after
        del events, page  # one page at a time: this one is not held while the next is read
    # Every id up to `through` is resolved: what the record did not hold, nobody will.
    yield [], max(after, through)
