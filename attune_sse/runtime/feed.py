"""What reaches a worker's hub: messages from its instance's listener, applied in order, never twice.

One LISTEN per instance (relay.py) or per cluster (broker.py) reads the
record; what it publishes travels as *messages*, each the same bytes for every
worker: a batch of events, a new position with no event (ids passed), a
``reset``, or a heartbeat. Each message says the position it follows
(``after``) and the one it leads to (``to``), so a worker can tell what it
missed without trusting the path it came by: a message after a hole (the
relay restarted, the broker lost or trimmed entries) makes the worker read the
hole from the record first, and events at or below its position are dropped.
So a worker's clients get every event once, in order, whichever path and
however many leaders the events came through.

Each message also names its *history*: ``epoch`` changes with every reset (a
database that went back in time, events pruned before the listener read
them), and ``base`` is the position that reset went on from. A worker that
missed the reset itself (it was reconnecting, or the broker's new entries sat
below where it had read) still sees the new epoch on the next message, and
resets its clients to ``base`` before reading on from the record.

Message bytes: a JSON header line, then the events' frames, then a reset's.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from attune_sse.core.event import ExecutionEvent, reset_frame
from attune_sse.core.hub import Hub
from attune_sse.storage import record
from attune_sse.storage.db import Pool

log = logging.getLogger(__name__)

BEAT_INTERVAL = 1.0  # s between heartbeats of a leader
SILENCE_LIMIT = 3.5  # s without any message after which a worker says its events do not flow


@dataclass
class Message:
    after: int
    to: int
    events: list[ExecutionEvent] = field(default_factory=list)
    reset: bytes = b""  # an ``event: reset`` frame: clients reload, then go on after ``to``
    ok: bool = True  # the leader's source (its LISTEN, or its broker) is connected
    sent_at: float = 0.0  # epoch seconds the leader sent it
    epoch: int = 0  # the history: changes with every reset
    base: int = 0  # the position the history's reset went on from
    source: str = ""  # the database the events come from (attune.event_source), when it leaves the instance

    @property
    def is_beat(self) -> bool:
        """A heartbeat: no event, no reset, no new position."""
        return self.after == self.to and not self.events and not self.reset


def encode(message: Message) -> bytes:
    header = {"after": message.after, "to": message.to, "ok": message.ok, "at": message.sent_at or time.time(),
              "epoch": message.epoch, "base": message.base, "source": message.source,
              "events": [[e.event_id, e.entity_id, e.recorded_at, e.action_ref, len(e.frame)]
                         for e in message.events],
              "reset": len(message.reset)}
    return b"".join([json.dumps(header, separators=(",", ":")).encode(), b"\n",
                     *(e.frame for e in message.events), message.reset])


def decode(data: bytes) -> Message:
    """The message in ``data``; ValueError if it is not one ``encode`` made."""
    line_end = data.index(b"\n")
    header = json.loads(data[:line_end])
    offset = line_end + 1
    events = []
    for event_id, entity_id, recorded_at, action_ref, length in header["events"]:
        events.append(ExecutionEvent(event_id=event_id, entity_id=entity_id, frame=data[offset:offset + length],
                                     recorded_at=recorded_at, action_ref=action_ref))
        offset += length
    reset = data[offset:offset + header["reset"]]
    if offset + header["reset"] != len(data):
        raise ValueError("message length does not match its header")
    return Message(after=header["after"], to=header["to"], events=events, reset=reset, ok=header["ok"],
                   sent_at=header["at"], epoch=header["epoch"], base=header["base"], source=header["source"])


class Feed:
    """A worker's end: applies messages to its hub, reading from the record what a hole left out."""

    def __init__(self, hub: Hub, backlog_pool: Pool) -> None:
        self.hub = hub
        self.backlog_pool = backlog_pool
        self.position: int | None = None  # every event id up to here reached the hub
        self.received = 0  # events published to the hub
        self.filled = 0  # of which read from the record after a hole
        self.lag: float | None = None  # s from the last event's commit to its publication here
        self.upstream_ok = False
        self.last_message = 0.0  # time.monotonic() of the last message
        self.epoch: int | None = None  # the history of the messages applied
        self.base = 0

    @property
    def flowing(self) -> bool:
        """Messages arrive and the leader's source is connected."""
        return self.upstream_ok and time.monotonic() - self.last_message < SILENCE_LIMIT

    def apply(self, message: Message) -> None:
        self.last_message = time.monotonic()
        self.upstream_ok = message.ok
        if self.epoch is None or self.position is None:
            self.epoch, self.base = message.epoch, message.base  # a new worker starts in its first message's
            if message.reset:
                self.position = message.to
                self.hub.advance(self.position)
                return
        elif message.epoch != self.epoch:
            self.epoch, self.base = message.epoch, message.base
            if message.reset:
                self.position = message.to
                self.hub.reset(message.reset, message.to)
                return
            log.warning("feed: the history changed (a reset to event %d did not come through); telling "
                        "clients to reload", message.base)
            self.position = message.base
            self.hub.reset(reset_frame("the database went back in time: reload", message.base), message.base)
        if message.reset:
            return  # this history's reset, seen again (a broker re-read): applied already
        if self.position is None:
            self.position = message.after  # a new worker starts where its first message does
        elif message.after > self.position:
            self._fill(message.after)
        events = [e for e in message.events if e.event_id > self.position]
        if events:
            self.hub.publish_batch(events)
            self.received += len(events)
            self.lag = max(0.0, time.time() - events[-1].recorded_at)
        self.position = max(self.position, message.to)
        self.hub.advance(self.position)

    def _fill(self, through: int) -> None:
        """Events after the position up to ``through`` (every id of which the leader resolved) from the record,
        a page at a time; a prune that overtakes the position (before or during) gives clients a reset."""
        assert self.position is not None  # apply fills only a gap after the position its first message set
        start = self.position
        while self.position < through:
            with self.backlog_pool.cursor(dict_rows=False) as cur:
                page = record.events_after(cur, self.position, through=through)
                horizon = record.pruned_to(cur)  # read after the page: a prune that raced with it shows
                if page.large:
                    self.backlog_pool.retire(cur.connection)
            events = page.events
            if horizon > self.position:
                log.warning("feed: events %d..%d were pruned before this worker published them; "
                            "telling its clients to reload", self.position + 1, min(horizon, through))
                self.position = min(horizon, through)
                self.hub.reset(reset_frame("events you missed were pruned (retention)", self.position),
                               self.position)
                events = [e for e in events if e.event_id > self.position]
            if events:
                self.hub.publish_batch(events)
                self.received += len(events)
                self.filled += len(events)
                self.position = events[-1].event_id
                self.lag = max(0.0, time.time() - events[-1].recorded_at)
            if not page.full:
                break
        self.position = through
        log.info("feed: read events %d..%d from the record (they did not come through the relay or broker)",
                 start + 1, through)

    def stats(self) -> dict[str, Any]:
        return {"position": self.position, "received": self.received, "filled": self.filled,
                "flowing": self.flowing, "lag_seconds": self.lag}
