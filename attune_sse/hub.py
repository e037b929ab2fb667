"""Fan-out of execution events to the SSE clients of one worker process.

Each subscriber owns a list of pending events. ``publish`` never waits: a subscriber whose
queue already holds ``max_pending`` events is closed with reason ``overflow``
and its ``on_overflow`` callback runs (the stream view drops the connection: a
client that does not read cannot be sent a goodbye), so one slow reader costs
the others nothing; it reconnects with Last-Event-ID and misses nothing.
No Flask and no psycopg2 here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gevent.hub import Waiter, get_hub

from .event import ExecutionEvent

log = logging.getLogger(__name__)

@dataclass
class HubStats:
    published: int = 0  # events the listener handed to the hub
    delivered: int = 0  # (event, subscriber) pairs queued
    sent: int = 0  # (event, subscriber) pairs written to a client by the stream view
    overflows: int = 0  # slow clients disconnected
    subscribed_total: int = 0


class Subscription:
    """One client's place in the hub: the events pending for it, and its filter.

    Lighter than a gevent ``Queue`` (thousands are held per worker): a list the
    hub appends to, and the ``Waiter`` of the writer when it sleeps, woken once
    per batch of events rather than once per event.
    """

    __slots__ = ("_pending", "_waiter", "execution_id", "on_overflow", "reason")

    def __init__(self, execution_id: int | None, on_overflow: Callable[[], None] | None = None) -> None:
        self.execution_id = execution_id
        self.on_overflow = on_overflow
        self.reason: str | None = None  # why it was closed, once it is
        # Unbounded here: the hub enforces the bound (server.sse_queue_size).
        self._pending: list[ExecutionEvent] = []
        self._waiter: Waiter | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def next_batch(self, timeout: float) -> list[ExecutionEvent] | None:
        """Wait up to ``timeout`` s; return the events pending ([] if none came), or None once closed.

        Events queued before a close are still returned; the call after them returns None.
        """
        if not self._pending and self.reason is None and timeout > 0:
            waiter = self._waiter = Waiter()
            timer = get_hub().loop.timer(timeout)
            timer.start(waiter.switch, None)
            try:
                waiter.get()
            finally:
                timer.close()
                self._waiter = None
        if self._pending:
            batch, self._pending = self._pending, []
            return batch
        return None if self.reason is not None else []

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None  # one wake-up per wait, however many events arrive before it runs
            get_hub().loop.run_callback(waiter.switch, None)

    def _offer(self, event: ExecutionEvent) -> None:
        self._pending.append(event)
        self._wake()

    def _close(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._wake()


class Hub:
    """Subscribers of one process, indexed by their execution filter."""

    def __init__(self, max_pending: int = 1000) -> None:
        self.max_pending = max_pending
        self.stats = HubStats()
        self._all: set[Subscription] = set()
        self._by_execution: dict[int, set[Subscription]] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._all) + sum(len(s) for s in self._by_execution.values())

    @property
    def closed(self) -> bool:
        return self._closed

    def subscribe(self, execution_id: int | None = None,
                  on_overflow: Callable[[], None] | None = None) -> Subscription:
        """Register a subscriber; events published from now on reach it."""
        sub = Subscription(execution_id, on_overflow)
        if self._closed:
            sub._close("shutdown")
            return sub
        if execution_id is None:
            self._all.add(sub)
        else:
            self._by_execution.setdefault(execution_id, set()).add(sub)
        self.stats.subscribed_total += 1
        return sub

    def unsubscribe(self, sub: Subscription, reason: str = "client left") -> None:
        """Remove a subscriber; safe to call more than once."""
        if sub.execution_id is None:
            self._all.discard(sub)
        else:
            group = self._by_execution.get(sub.execution_id)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._by_execution[sub.execution_id]
        sub._close(reason)

    @contextmanager
    def subscription(self, execution_id: int | None = None,
                     on_overflow: Callable[[], None] | None = None) -> Iterator[Subscription]:
        """``subscribe`` for the length of a ``with`` block, removed however it ends."""
        sub = self.subscribe(execution_id, on_overflow)
        try:
            yield sub
        finally:
            self.unsubscribe(sub)

    def publish(self, event: ExecutionEvent) -> int:
        """Offer the event to every matching subscriber without waiting; return how many got it."""
        self.stats.published += 1
        delivered = self._offer_all(self._all, event)
        group = self._by_execution.get(event.entity_id)
        if group:
            delivered += self._offer_all(group, event)
        self.stats.delivered += delivered
        return delivered

    def _offer_all(self, subs: set[Subscription], event: ExecutionEvent) -> int:
        delivered = 0
        overflowed = []
        for sub in subs:
            if sub.pending >= self.max_pending:
                overflowed.append(sub)
            else:
                sub._offer(event)
                delivered += 1
        for sub in overflowed:
            self.stats.overflows += 1
            log.warning(
                "disconnecting a slow SSE client: %d events pending (server.sse_queue_size); "
                "it can reconnect", sub.pending,
            )
            self.unsubscribe(sub, "overflow")
            if sub.on_overflow is not None:
                try:
                    sub.on_overflow()
                except Exception:
                    log.exception("on_overflow of a slow SSE client failed")
        return delivered

    def close(self, reason: str = "shutdown") -> int:
        """End every subscription (worker shutdown); return how many were open."""
        self._closed = True
        subs = list(self._all) + [s for group in self._by_execution.values() for s in group]
        for sub in subs:
            self.unsubscribe(sub, reason)
        return len(subs)
