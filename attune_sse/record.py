"""The durable record of execution events: read what a client missed, prune the old.

``attune.execution_event`` is the mailbox (NOTIFY is only the doorbell). Its ids
follow commit order (see the trigger migration), so "every event after id N"
is complete the moment it is read.
"""

from __future__ import annotations

from typing import Any

from .event import ExecutionEvent

PAGE_SIZE = 1000


def events_after(cur: Any, after_id: int, execution_id: int | None = None,
                 limit: int = PAGE_SIZE) -> list[ExecutionEvent]:
    """Up to ``limit`` events with id > ``after_id``, oldest first, optionally of one execution."""
    if execution_id is None:
        cur.execute(
            "SELECT id, execution, payload::text FROM attune.execution_event WHERE id > %s ORDER BY id LIMIT %s",
            (after_id, limit),
        )
    else:
        cur.execute(
            """SELECT id, execution, payload::text FROM attune.execution_event
               WHERE execution = %s AND id > %s ORDER BY id LIMIT %s""",
            (execution_id, after_id, limit),
        )
    return [ExecutionEvent.from_parts(i, e, p) for i, e, p in cur.fetchall()]


def event_by_id(cur: Any, event_id: int) -> ExecutionEvent | None:
    cur.execute("SELECT id, execution, payload::text FROM attune.execution_event WHERE id = %s", (event_id,))
    row = cur.fetchone()
    return None if row is None else ExecutionEvent.from_parts(*row)


def pruned_to(cur: Any) -> int:
    """The highest event id pruning has removed (0 if none)."""
    cur.execute("SELECT pruned_to FROM attune.execution_event_horizon")
    row = cur.fetchone()
    return row[0] if row else 0


def last_event_id(cur: Any) -> int:
    cur.execute("SELECT coalesce(max(id), 0) FROM attune.execution_event")
    return cur.fetchone()[0]


def prune(cur: Any, *, max_age_seconds: float | None = None, keep_last: int | None = None) -> tuple[int, int]:
    """Delete events older than ``max_age_seconds`` or beyond the newest ``keep_last``.

    Returns (events deleted, new horizon). The horizon only grows.
    """
    cutoffs = []
    if max_age_seconds is not None:
        cur.execute(
            "SELECT max(id) FROM attune.execution_event WHERE created < now() - make_interval(secs => %s)",
            (max_age_seconds,),
        )
        cutoffs.append(cur.fetchone()[0])
    if keep_last is not None:
        cur.execute("SELECT id FROM attune.execution_event ORDER BY id DESC OFFSET %s LIMIT 1", (keep_last,))
        row = cur.fetchone()
        cutoffs.append(row[0] if row else None)
    cutoff = max((c for c in cutoffs if c is not None), default=None)
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
