"""What flows from a source of events to every worker's feed: one ``Message`` type, and its bytes.

A source (the LISTEN of listener.py, or the Redis stream of broker.py) emits
messages to an ``Outlet``; the worker's feed (feed.py) is the outlet at the
end of every path, and the relay's leader (sources.py) hands each message to
its own feed and, as bytes, to its followers. Every message says the position
it follows (``after``) and the one it leads to (``to``), and the *history* it
belongs to (``epoch``, changed by every reset, and ``base``, the position that
reset went on from). There are four kinds, all of this one type:

- a batch of events (``events``), ``after`` < ids <= ``to``;
- a new position with no event (ids passed: drawn by transactions that failed);
- a reset (``reset`` names why): clients reload, then go on after ``to``;
- a heartbeat (``after == to``, nothing else): the leader is alive, and ``ok``
  says whether its source is connected.

Bytes (``encode``/``decode``): a JSON header line, then the events' frames,
then the reset's frame (what a client gets). The same bytes serve every
follower and every entry of the Redis stream.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Protocol

from attune_sse.core.event import ExecutionEvent, ResetReason, reset_frame

BEAT_INTERVAL = 1.0  # s between heartbeats of a leader
SILENCE_LIMIT = 3.5  # s without any message after which a worker says its events do not flow


@dataclass
class Message:
    after: int
    to: int
    events: list[ExecutionEvent] = field(default_factory=list)
    reset: ResetReason | None = None  # a reset: clients reload, then go on after ``to``
    ok: bool = True  # the leader's source (its LISTEN, or its broker) is connected
    sent_at: float = 0.0  # epoch seconds the leader sent it
    epoch: int = 0  # the history: changes with every reset
    base: int = 0  # the position the history's reset went on from
    source: str = ""  # the database the events come from (attune.event_source), when it leaves the instance
    wire: bytes | None = field(default=None, repr=False, compare=False)  # its bytes, once encoded or decoded

    @property
    def is_beat(self) -> bool:
        """A heartbeat: no event, no reset, no new position."""
        return self.after == self.to and not self.events and self.reset is None


class Outlet(Protocol):
    """Where a source emits its messages, in order (a worker's Feed, the leader's Fanout, the broker's stream)."""

    def send(self, message: Message) -> None: ...


def coalesce(messages: list[Message]) -> list[Message]:
    """``messages`` (in order) with each run of batches that follow one another as one batch: what a
    worker that fell behind finds waiting goes to its hub as one batch, one write per client instead of
    one per message. Resets, and messages of another history, stay as they are."""
    merged: list[Message] = []
    for message in messages:
        last = merged[-1] if merged else None
        if (last is None or message.reset is not None or last.reset is not None or message.after != last.to
                or (message.epoch, message.base, message.source) != (last.epoch, last.base, last.source)):
            merged.append(message)
            continue
        merged[-1] = Message(after=last.after, to=message.to, events=last.events + message.events, ok=message.ok,
                             sent_at=message.sent_at, epoch=last.epoch, base=last.base, source=last.source)
    return merged


def encode(message: Message) -> bytes:
    """The message's bytes (made once: a decoded message keeps those it came as)."""
    if message.wire is not None:
        return message.wire
    reset = b"" if message.reset is None else reset_frame(message.reset, message.to)
    header = {"after": message.after, "to": message.to, "ok": message.ok, "at": message.sent_at or time.time(),
              "epoch": message.epoch, "base": message.base, "source": message.source,
              "events": [[e.event_id, e.entity_id, e.recorded_at, e.action_ref, len(e.frame)]
                         for e in message.events],
              "reset": len(reset)}
    message.wire = b"".join([json.dumps(header, separators=(",", ":")).encode(), b"\n",
                             *(e.frame for e in message.events), reset])
    return message.wire


def decode(data: bytes) -> Message:
    """The message in ``data``; ValueError if it is not one ``encode`` made (bytes from Redis are anyone's)."""
    try:
        line_end = data.index(b"\n")
        header = json.loads(data[:line_end])
        after, to, epoch, base = (_count(header[key]) for key in ("after", "to", "epoch", "base"))
        offset = line_end + 1
        events = []
        for event_id, entity_id, recorded_at, action_ref, length in header["events"]:
            events.append(ExecutionEvent(event_id=_count(event_id), entity_id=_count(entity_id),
                                         frame=data[offset:offset + _count(length)], recorded_at=float(recorded_at),
                                         action_ref=str(action_ref)))
            offset += length
        reset_length = _count(header["reset"])
        if offset + reset_length != len(data):
            raise ValueError("message length does not match its header")
        reset = ResetReason.of_frame(data[offset:]) if reset_length else None
        return Message(after=after, to=to, events=events, reset=reset, ok=bool(header["ok"]),
                       sent_at=float(header["at"]), epoch=epoch, base=base, source=str(header["source"]), wire=data)
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"not a message: {type(exc).__name__}") from None


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value
