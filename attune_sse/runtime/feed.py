"""A worker's feed: messages in (message.py), events to its hub, in order, never twice.

The feed is the end of every path events take to a worker (its own LISTEN,
its instance's leader, the Redis stream) and the only owner of the worker's
position: every event id up to it reached the hub. It alone fills holes and
decides resets. A message after a hole (the relay restarted, the broker lost
or trimmed entries) makes it read the hole from the record first, and events
at or below its position are dropped. So a worker's clients get every event
once, in order, whichever path and however many leaders the events came
through.

A message names its history (``epoch``, ``base``; epoch 0 is a source that
knows of no reset, as a worker that leads before any message reached it, and
changes nothing): a worker that missed a reset itself (it was reconnecting, or the broker's new entries sat below where
it had read) still sees the new epoch on the next message, and resets its
clients to ``base`` before reading on from the record.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from typing import Any

from attune_sse.core.event import ExecutionEvent, Pruned, ResetReason, reset_frame
from attune_sse.core.hub import Hub
from attune_sse.runtime.message import SILENCE_LIMIT, Message
from attune_sse.storage import record
from attune_sse.storage.db import Pool

log = logging.getLogger(__name__)


class Feed:
    """A worker's end of the path (an ``Outlet``): applies messages to its hub, reading from the record
    what a hole left out."""

    def __init__(self, hub: Hub, backlog_pool: Pool) -> None:
        self.hub = hub
        self.backlog_pool = backlog_pool
        self.position: int | None = None  # every event id up to here reached the hub
        self.received = 0  # events published to the hub
        self.filled = 0  # of which read from the record after a hole
        self.resets = 0  # resets its clients were sent
        self.lag: float | None = None  # s from the last event's commit to its publication here
        self.upstream_ok = False
        self.last_message = 0.0  # time.monotonic() of the last message
        self.epoch: int | None = None  # the history of the messages applied
        self.base = 0

    @property
    def flowing(self) -> bool:
        """Messages arrive and the leader's source is connected."""
        return self.upstream_ok and time.monotonic() - self.last_message < SILENCE_LIMIT

    def send(self, message: Message) -> None:
        """Apply one message: its events after the position reach the hub, a hole before it is read first."""
        self.last_message = time.monotonic()
        self.upstream_ok = message.ok
        if self.epoch is None or self.position is None:
            self.epoch, self.base = message.epoch, message.base  # a new worker starts in its first message's
            if message.reset is not None:
                self._move_to(message.to)
                return
        elif message.epoch not in (self.epoch, 0):  # 0: a source that knows no reset (a new leader)
            self.epoch, self.base = message.epoch, message.base
            if message.reset is not None:
                self._reset(message.reset, message.to)
                return
            log.warning("feed: the history changed (a reset to event %d did not come through); telling "
                        "clients to reload", message.base)
            self._reset(ResetReason.REWOUND, message.base)
        if message.reset is not None:
            return  # this history's reset, seen again (a broker re-read): applied already
        if self.position is None:
            self.position = message.after  # a new worker starts where its first message does
        elif message.after > self.position:
            self._fill(message.after)
        events = message.events
        if events and events[0].event_id <= self.position:  # only at a seam (a new leader resent some)
            events = [e for e in events if e.event_id > self.position]
        self._publish(events)
        self._move_to(message.to)

    def heartbeat(self, ok: bool) -> Message:
        """A heartbeat where this worker is, in its history (a leader's hello to a new follower)."""
        assert self.position is not None
        return Message(after=self.position, to=self.position, ok=ok, epoch=self.epoch or 0, base=self.base)

    def _publish(self, events: list[ExecutionEvent]) -> None:
        if events:
            self.hub.publish_batch(events)
            self.received += len(events)
            self.position = events[-1].event_id
            self.lag = max(0.0, time.time() - events[-1].recorded_at)

    def _move_to(self, position: int) -> None:
        self.position = position if self.position is None else max(self.position, position)
        self.hub.advance(self.position)

    def _reset(self, reason: ResetReason, position: int) -> None:
        """Every client's history has a hole up to ``position``: they reload, and the worker goes on from it."""
        self.position = position
        self.resets += 1
        self.hub.reset(reset_frame(reason, position), position)

    def _fill(self, through: int) -> None:
        """Events after the position up to ``through`` (every id of which the leader resolved) from the record;
        a prune that overtakes the position (before or during) gives clients a reset."""
        assert self.position is not None  # a fill follows the position a first message set
        start = self.position
        while self.position < through:
            try:
                for page in record.pages(self._cursor, self.position, through=through, pruned=True,
                                         retire=self.backlog_pool):
                    self.filled += len(page.events)
                    self._publish(page.events)
                break
            except Pruned as exc:
                log.warning("feed: events %d..%d were pruned before this worker published them; "
                            "telling its clients to reload", self.position + 1, exc.horizon)
                self._reset(ResetReason.PRUNED, exc.horizon)
        self.position = through
        log.info("feed: read events %d..%d from the record (they did not come through the relay or broker)",
                 start + 1, through)

    def _cursor(self) -> AbstractContextManager[Any]:
        return self.backlog_pool.cursor(dict_rows=False)

    def stats(self) -> dict[str, Any]:
        return {"position": self.position, "received": self.received, "filled": self.filled,
                "flowing": self.flowing, "lag_seconds": self.lag}
