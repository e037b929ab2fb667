"""Fan-out of execution events to the SSE clients of one worker process.

Each subscriber owns a list of pending events. ``publish_batch`` (called by the
worker's feed, the only one that publishes) never waits: a subscriber whose
queue already holds ``max_pending`` events, or whose events not yet written hold more
than ``max_client_bytes``, is closed with reason ``overflow`` and its ``on_overflow``
callback runs (the stream view drops the connection: a client that does not read
cannot be sent a goodbye), so one slow reader costs the others nothing; it
reconnects with Last-Event-ID and misses nothing. The bytes every subscriber
holds are summed per worker too: past ``max_worker_bytes``, the subscribers that
hold the most are dropped until the sum is below it. So slow readers hold at
most min(N x max_client_bytes, max_worker_bytes) of events (frames are shared
between subscribers, so the sum overstates what they cost), plus each one's
kernel send buffer. A client with nothing pending (its writer may be busy with
what it took) takes the next event whatever its size, so an event larger than
the limit still reaches a client that reads.
No Flask and no psycopg2 here.

Direct writes: when a subscriber's writer is idle (waiting, nothing pending)
and its stream gave a sink that takes them (``sink.direct``: sink.py, the
client's socket under gunicorn), ``publish_batch`` has the sink frame the batch once
and write it itself, without waking the writer: one non-blocking write per
client and no greenlet switch. Whatever the sink does not take at once (a
partial write) is left in ``_raw`` for the writer to finish before anything
else; a batch the sink takes none of is queued as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import gevent
import gevent.event
from gevent.hub import Waiter, get_hub

from attune_sse.core.event import ExecutionEvent
from attune_sse.core.grants import EVERYTHING, Principal, Scope

log = logging.getLogger(__name__)

TOKEN_EXPIRED = "token expired"  # the reason of a subscription closed by ``expire``
# What a stream's writer takes from its queue at once. A batch taken is written whatever
# happens next; what is left pending is re-filtered (or dropped) when access changes,
# so after a revocation a slow reader gets at most about this much that it was offered before.
BATCH_BYTES = 256 * 1024
SIGNED_OUT = "signed out"  # the reason of a subscription whose identity was frozen or deleted

@dataclass
class Buffers:
    """What the subscribers of one hub hold of events not yet written to their clients."""

    held: int = 0  # bytes: pending, in the writer's hands, or the rest of a direct write


_DETACHED = Buffers()  # where an unsubscribed subscriber's accounting goes (its bytes were given back)


@dataclass
class HubStats:
    published: int = 0  # events the feed handed to the hub
    delivered: int = 0  # (event, subscriber) pairs accepted: queued, or written directly
    sent: int = 0  # (event, subscriber) pairs written to a client: directly, or by the stream view
    overflows: int = 0  # slow clients disconnected
    subscribed_total: int = 0


class Subscription:
    """One client's place in the hub: the events pending for it, and its filter.

    Lighter than a gevent ``Queue`` (thousands are held per worker): a list the
    hub appends to, and the ``Waiter`` of the writer when it sleeps, woken once
    per batch of events rather than once per event.
    """

    __slots__ = ("_buffers", "_held", "_inflight", "_pending", "_quiet", "_raw", "_waiter", "execution_id",
                 "expires_at", "identity", "identity_key", "on_overflow", "reason", "scope", "sink", "skip_through")

    def __init__(self, execution_id: int | None, on_overflow: Callable[[], None] | None = None,
                 sink: Sink | None = None, identity: int | None = None, scope: Scope = EVERYTHING,
                 buffers: Buffers | None = None) -> None:
        self.execution_id = execution_id
        self.identity = identity  # whose stream it is (None: the tests' anonymous subscribers)
        self.identity_key: str | None = None  # its token key (Principal.key): another identity's id is not its
        self.scope = scope  # the executions it may read: events of others are not offered
        self.on_overflow = on_overflow
        self.sink = sink if sink is not None and sink.direct else None  # None: always through the writer
        self.skip_through = 0  # events up to this id were sent already (from the record, on resume)
        self.expires_at: float | None = None  # epoch seconds: the hub closes it then (its token expires)
        self.reason: str | None = None  # why it was closed, once it is
        self._raw = b""  # the rest of a chunk a direct write began
        # Unbounded here: the hub enforces the bound (server.sse_queue_size).
        self._pending: list[ExecutionEvent] = []
        self._waiter: Waiter | None = None
        self._quiet = False  # nothing offered since the hub's last keep-alive tick
        self._buffers = buffers or Buffers()
        self._held = 0  # bytes of events offered and not yet written (pending, taken, or in _raw)
        self._inflight = 0  # of which the writer took: given back when it asks for more

    @property
    def held(self) -> int:
        """Bytes of this client's events not yet written: what a slow reader costs its worker."""
        return self._held

    def _hold(self, size: int) -> None:
        self._held += size
        self._buffers.held += size

    def _detach(self) -> None:
        """Unsubscribed: its bytes no longer count against the worker (what it drains is bounded)."""
        if self._buffers is not _DETACHED:
            self._buffers.held -= self._held
            self._buffers = _DETACHED

    @property
    def pending(self) -> int:
        return len(self._pending)

    def next_batch(self, timeout: float | None = None) -> list[ExecutionEvent] | None:
        """Wait for events; return them, [] if woken without any, or None once closed.

        Without ``timeout`` the wait ends with events, the close, or the hub's
        keep-alive tick (no timer per wait: the stream view waits this way);
        with it, after ``timeout`` seconds at most. Events up to ``skip_through``
        (sent already, from the record) are left out. A batch holds about
        ``BATCH_BYTES`` at most: the rest stays pending, where a change of
        access still reaches it (``Hub.apply_access``). Events queued before a
        close are still returned (unless the close was a sign-out); the call
        after them returns None.
        """
        while True:
            if self._inflight:  # the writer wrote what it took before
                self._hold(-self._inflight)
                self._inflight = 0
            if not self._pending and self.reason is None and timeout != 0:
                self._wait(timeout)
            if not self._pending:
                return None if self.reason is not None else []
            batch = self._unsent(self._take())
            if batch or timeout is not None:
                return batch

    def _take(self) -> list[ExecutionEvent]:
        """The oldest pending events, up to about BATCH_BYTES (one at least)."""
        pending, size = self._pending, 0
        for n, event in enumerate(pending, 1):
            size += len(event.frame)
            if size >= BATCH_BYTES and n < len(pending):
                self._pending = pending[n:]
                self._inflight += size
                return pending[:n]
        self._pending = []
        self._inflight += size
        return pending

    def _wait(self, timeout: float | None) -> None:
        waiter = self._waiter = Waiter()
        timer = None
        if timeout is not None:
            timer = get_hub().loop.timer(timeout)
            timer.start(waiter.switch, None)
        try:
            waiter.get()
        finally:
            if timer is not None:
                timer.close()
            self._waiter = None

    def _unsent(self, events: list[ExecutionEvent]) -> list[ExecutionEvent]:
        """``events`` (in id order) without those up to ``skip_through``: only at the seam of a resume."""
        if events[0].event_id > self.skip_through:
            return events
        return [e for e in events if e.event_id > self.skip_through]

    def take_raw(self) -> bytes:
        """The unsent rest of a direct write: the writer sends it, as is, before anything else."""
        raw, self._raw = self._raw, b""
        self._inflight += len(raw)
        return raw

    def _wrote_part(self, chunk: bytes, written: int) -> None:
        """The sink took only ``written`` bytes of a direct write: the idle writer sends the rest before
        anything else."""
        self._raw = chunk[written:]
        self._hold(len(self._raw))
        self._wake()
        self._quiet = False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None  # one wake-up per wait, however many events arrive before it runs
            get_hub().loop.run_callback(waiter.switch, None)

    def _offer(self, events: list[ExecutionEvent], size: int) -> None:
        self._pending.extend(events)
        self._hold(size)
        self._quiet = False
        self._wake()

    def _close(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._wake()


class Sink(Protocol):
    """Where the hub may write a batch itself (sink.ClientSocket)."""

    @property
    def direct(self) -> bool: ...

    @staticmethod
    def frame(frames: list[bytes]) -> bytes: ...

    def try_write(self, data: bytes) -> int: ...


def _size(events: list[ExecutionEvent]) -> int:
    return sum(len(event.frame) for event in events)


class Hub:
    """Subscribers of one process, indexed by their execution filter."""

    def __init__(self, max_pending: int = 1000, *, max_client_bytes: int = 0, max_worker_bytes: int = 0) -> None:
        self.max_pending = max_pending
        self.max_client_bytes = max_client_bytes  # 0: no bound in bytes
        self.max_worker_bytes = max_worker_bytes
        self.buffers = Buffers()
        self.stats = HubStats()
        # Every event id up to here was published (or will never exist): where a new
        # stream starts, and how far a resuming one reads the record. The feed's position, as it told it.
        self.position: int | None = None
        self._positioned = gevent.event.Event()
        # Streams of every execution, grouped by what they may read: a batch is filtered
        # once per group (most share one scope), not once per stream.
        self._all: dict[Scope, set[Subscription]] = {}
        self._by_execution: dict[int, set[Subscription]] = {}
        self._per_identity: dict[int, int] = {}
        self._count = 0  # subscribers in both indexes: len() is asked on every stream open
        self._closed = False

    def __len__(self) -> int:
        return self._count

    @property
    def closed(self) -> bool:
        return self._closed

    def advance(self, position: int) -> None:
        """Every event id up to ``position`` is resolved (the feed says so)."""
        if self.position is None or position > self.position:
            self.position = position
            self._positioned.set()

    def reset(self, frame: bytes, position: int) -> None:
        """Every client's history has a hole up to ``position`` (events pruned before the listener
        published them, or a database that went back in time): send each the ``reset`` frame,
        and go on from ``position``, lower than before if the database went back."""
        self.position = position
        self._positioned.set()
        notice = ExecutionEvent(event_id=position, entity_id=0, frame=frame)
        for sub in self._subscribers():
            sub.skip_through = position - 1  # the notice passes; later events are all after it
            sub._offer([notice], len(frame))

    def wait_position(self, timeout: float) -> int | None:
        """The position, waiting up to ``timeout`` s for the feed's first; None if it has none yet."""
        if self.position is None:
            self._positioned.wait(timeout)
        return self.position

    def subscribe(self, execution_id: int | None = None,
                  on_overflow: Callable[[], None] | None = None, sink: Sink | None = None, *,
                  identity: int | None = None, scope: Scope = EVERYTHING) -> Subscription:
        """Register a subscriber; events published from now on that ``scope`` allows reach it."""
        sub = Subscription(execution_id, on_overflow, sink, identity, scope, self.buffers)
        if self._closed:
            sub._close("shutdown")
            return sub
        self._join_group(sub).add(sub)
        if identity is not None:
            self._per_identity[identity] = self._per_identity.get(identity, 0) + 1
        self._count += 1
        self.stats.subscribed_total += 1
        return sub

    def _group_of(self, sub: Subscription) -> set[Subscription] | None:
        """The group ``sub`` belongs in, if it exists."""
        if sub.execution_id is None:
            return self._all.get(sub.scope)
        return self._by_execution.get(sub.execution_id)

    def _join_group(self, sub: Subscription) -> set[Subscription]:
        """The group ``sub`` belongs in, created if need be."""
        if sub.execution_id is None:
            return self._all.setdefault(sub.scope, set())
        return self._by_execution.setdefault(sub.execution_id, set())

    def unsubscribe(self, sub: Subscription, reason: str = "client left") -> None:
        """Remove a subscriber; safe to call more than once."""
        group = self._group_of(sub)
        if group is not None and sub in group:
            self._remove(sub, group)
            self._count -= 1
            if sub.identity is not None:
                left = self._per_identity[sub.identity] - 1
                if left:
                    self._per_identity[sub.identity] = left
                else:
                    del self._per_identity[sub.identity]
        sub._close(reason)
        sub._detach()

    def _remove(self, sub: Subscription, group: set[Subscription]) -> None:
        group.remove(sub)
        if not group:
            if sub.execution_id is None:
                del self._all[sub.scope]
            else:
                del self._by_execution[sub.execution_id]

    def streams_of(self, identity: int) -> int:
        """How many streams of this identity the hub holds."""
        return self._per_identity.get(identity, 0)

    def identities(self) -> list[int]:
        """The identities with open streams."""
        return list(self._per_identity)

    def apply_access(self, principals: dict[int, Principal | None]) -> int:
        """Access changed for the identities in ``principals``: end the streams of those gone
        (None), frozen or replaced (another identity has the id now), and give the others the scope
        they have now; return how many ended.
        Streams of identities not in ``principals`` are left as they are."""
        ended = 0
        for sub in self._subscribers():
            if sub.identity is None or sub.identity not in principals:
                continue
            principal = principals[sub.identity]
            if principal is None or principal.frozen or (
                    sub.identity_key is not None and principal.key != sub.identity_key):
                sub._pending.clear()  # queued before the change: no longer owed
                self.unsubscribe(sub, SIGNED_OUT)
                ended += 1
                continue
            scope = principal.scope("executions", "read")
            if scope != sub.scope:
                if sub._pending:
                    kept = scope.filter(sub._pending)
                    sub._hold(_size(kept) - _size(sub._pending))
                    sub._pending = kept
                group = self._group_of(sub)
                if sub.execution_id is None and group is not None:
                    self._remove(sub, group)
                    sub.scope = scope
                    self._all.setdefault(scope, set()).add(sub)
                else:
                    sub.scope = scope
        return ended

    def publish_batch(self, events: list[ExecutionEvent]) -> int:
        """Offer events (in id order) to every matching subscriber without waiting; return the deliveries.

        The listener hands over whatever arrived together, so under load a
        subscriber gets the events that piled up in one write, and the joined
        bytes are made once per batch, not once per subscriber.
        """
        if not events:
            return 0
        self.stats.published += len(events)
        self.advance(events[-1].event_id)
        delivered = 0
        for scope, subs in list(self._all.items()):
            allowed = scope.filter(events)
            if allowed:
                delivered += self._offer_all(subs, allowed)
        if self._by_execution:
            per_execution: dict[int, list[ExecutionEvent]] = {}
            for event in events:
                if event.entity_id in self._by_execution:
                    per_execution.setdefault(event.entity_id, []).append(event)
            for execution_id, matching in per_execution.items():
                # As for _all: filtered once per scope among this execution's streams, framed once per group.
                by_scope: dict[Scope, set[Subscription]] = {}
                for sub in self._by_execution[execution_id]:
                    by_scope.setdefault(sub.scope, set()).add(sub)
                for scope, subs in by_scope.items():
                    allowed = scope.filter(matching)
                    if allowed:
                        delivered += self._offer_all(subs, allowed)
        self.stats.delivered += delivered
        return delivered

    def _offer_all(self, subs: set[Subscription], events: list[ExecutionEvent]) -> int:
        delivered = direct = 0
        overflowed = []
        chunk: bytes | None = None  # framed once per batch, when a first subscriber can take it directly
        size = _size(events)
        max_bytes = self.max_client_bytes
        first = events[0].event_id
        for sub in subs:
            # The hot loop (every event, every client): the common case in few steps.
            mine = events if first > sub.skip_through else sub._unsent(events)
            if not mine:
                continue
            sink = sub.sink
            if sink is not None and sub._waiter is not None and not sub._pending and not sub._raw:  # writer idle
                if mine is events:
                    if chunk is None:
                        chunk = sink.frame([e.frame for e in events])
                    framed = chunk
                else:
                    framed = sink.frame([e.frame for e in mine])
                written = sink.try_write(framed)
                if written == len(framed):
                    sub._quiet = False
                    direct += len(mine)
                    continue
                if written >= 0:  # partial: the writer finishes it (-1: full or gone, so it is queued)
                    sub._wrote_part(framed, written)
                    direct += len(mine)
                    continue
            mine_size = size if mine is events else _size(mine)
            if len(sub._pending) + len(mine) > self.max_pending:
                overflowed.append((sub, f"{sub.pending} events pending (server.sse_queue_size)"))
            elif max_bytes and sub._pending and sub._held + mine_size > max_bytes:
                overflowed.append((sub, f"{sub.held} bytes not yet written (server.sse_client_buffer_bytes)"))
            else:
                sub._offer(mine, mine_size)
                delivered += len(mine)
        self.stats.sent += direct
        delivered += direct
        for sub, why in overflowed:
            self._drop_slow(sub, why)
        if self.max_worker_bytes and self.buffers.held > self.max_worker_bytes:
            self._drop_heaviest()
        return delivered

    def _drop_heaviest(self) -> None:
        """The worker's clients hold more than max_worker_bytes: drop those that hold the most until they do not."""
        for sub in sorted(self._subscribers(), key=lambda s: s.held, reverse=True):
            if self.buffers.held <= self.max_worker_bytes or not sub.held:
                break
            self._drop_slow(sub, f"{sub.held} bytes not yet written, and the worker's clients hold more than "
                                 f"server.sse_worker_buffer_bytes ({self.max_worker_bytes})")

    def _drop_slow(self, sub: Subscription, why: str) -> None:
        self.stats.overflows += 1
        log.warning("disconnecting a slow SSE client: %s; it can reconnect", why)
        self.unsubscribe(sub, "overflow")
        if sub.on_overflow is not None:
            try:
                sub.on_overflow()
            except Exception:
                log.exception("on_overflow of a slow SSE client failed")

    def tick(self) -> int:
        """Wake each waiting subscriber that was offered nothing since the last tick
        (its stream sends a keep-alive); return how many were woken."""
        woken = 0
        for sub in self._subscribers():
            if sub._quiet and sub._waiter is not None:
                sub._wake()
                woken += 1
            sub._quiet = True
        return woken

    def expire(self, now: float) -> int:
        """Close the subscriptions whose ``expires_at`` has passed; return how many."""
        expired = [sub for sub in self._subscribers() if sub.expires_at is not None and sub.expires_at <= now]
        for sub in expired:
            self.unsubscribe(sub, TOKEN_EXPIRED)
        return len(expired)

    def start_keepalive(self, interval: float, expiry_check: float = 1.0) -> gevent.Greenlet:
        """Tick every ``interval`` s (a quiet stream gets a keep-alive within 1 to 2 intervals),
        and end expired subscriptions every ``expiry_check`` s: one pass over the
        subscribers, instead of a timer per stream."""
        def run() -> None:
            next_tick = time.monotonic() + interval
            while not self._closed:
                gevent.sleep(min(interval, expiry_check))
                self.expire(time.time())
                if time.monotonic() >= next_tick:
                    self.tick()
                    next_tick += interval
        return gevent.spawn(run)

    def _subscribers(self) -> list[Subscription]:
        return [s for groups in (self._all, self._by_execution) for group in groups.values() for s in group]

    def close(self, reason: str = "shutdown") -> int:
        """End every subscription (worker shutdown); return how many were open."""
        self._closed = True
        subs = self._subscribers()
        for sub in subs:
            self.unsubscribe(sub, reason)
        return len(subs)
