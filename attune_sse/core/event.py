"""The execution event, framed once; and what a notification on the channel claims.

An event comes from one place only: a row of ``attune.execution_event`` (the
record). It becomes one immutable ``ExecutionEvent`` whose SSE frame is
encoded here, before fan-out, so every client gets the same bytes.

A NOTIFY payload is not an event: any database role can send anything on the
channel. ``parse_notification`` only reads which event a notification says
was recorded, so the listener can count the ones the record does not bear out.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

from attune_sse.core.ids import MAX_BIGINT  # event and execution ids are PostgreSQL bigints
from attune_sse.core.sse import Frame


class PayloadError(ValueError):
    """A notification that is not one the trigger sends; ``kind`` names how (a metric label)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Pruned(Exception):
    """Events after the reader's position were pruned before it read them: it goes on after ``horizon``."""

    def __init__(self, horizon: int) -> None:
        super().__init__(f"events up to {horizon} were pruned")
        self.horizon = horizon


class UnknownEvent(Exception):
    """A position after every event this database issued (the newest is ``newest``)."""

    def __init__(self, newest: int) -> None:
        super().__init__(f"no event after {newest} was issued")
        self.newest = newest


@dataclass(frozen=True)
class ExecutionEvent:
    """One change of one execution, ready to send."""

    event_id: int
    entity_id: int
    frame: bytes = field(repr=False)
    recorded_at: float = 0.0  # epoch seconds of its commit
    action_ref: str = ""  # the execution's action: who may read the event depends on it

    @classmethod
    def from_record(cls, event_id: int, entity_id: int, payload: bytes, recorded_at: float = 0.0,
                    action_ref: str = "") -> ExecutionEvent:
        """An event from its stored payload (the JSON text, in UTF-8)."""
        frame = b"id: %d\ndata: %s\n\n" % (event_id, payload)
        return cls.from_frame(event_id, entity_id, frame, recorded_at, action_ref)

    @classmethod
    def from_frame(cls, event_id: int, entity_id: int, frame: bytes, recorded_at: float = 0.0,
                   action_ref: str = "") -> ExecutionEvent:
        """An event from ``id: N\\ndata: <payload>\\n\\n``, as the record's query builds it (no copy here)."""
        data_at = frame.index(b"\ndata: ") + 7
        if frame.find(b"\n", data_at) != len(frame) - 2 or b"\r" in frame:
            # A payload with raw line breaks (the trigger's JSON has none): one data: line per line.
            payload = frame[data_at:-2].decode("utf-8")
            frame = Frame(data=payload, id=event_id).encode()
        return cls(event_id=event_id, entity_id=entity_id, frame=frame, recorded_at=recorded_at,
                   action_ref=action_ref)


def joined(events: list[ExecutionEvent]) -> bytes:
    """The frames of ``events`` as one bytes object (a single one is not copied)."""
    return events[0].frame if len(events) == 1 else b"".join(event.frame for event in events)


class ResetReason(str, enum.Enum):
    """Why a client's history has a hole: the ``reason`` of its ``event: reset`` (DESIGN.md)."""

    PRUNED = "events you missed were pruned (retention)"
    REWOUND = "the database went back in time: reload"
    UNKNOWN_ID = "unknown event id: this server has no event after it"

    @classmethod
    def of_frame(cls, frame: bytes) -> ResetReason:
        """The reason a ``reset_frame`` gives; ValueError if it is not one."""
        data_at = frame.find(b"\ndata: ")
        if not frame.startswith(b"event: reset\n") or data_at < 0:
            raise ValueError("not a reset frame")
        doc = json.loads(frame[data_at + 7:].split(b"\n", 1)[0])
        if not isinstance(doc, dict):
            raise ValueError("not a reset frame")
        return cls(doc.get("reason"))


def reset_frame(reason: ResetReason, position: int) -> bytes:
    """``event: reset``: the client's history has a hole (pruned, or the database went back in time);
    it should reload what it shows. Its id is where the stream goes on from."""
    data = json.dumps({"reason": reason.value, "resumed_from_event_id": position}, separators=(",", ":"))
    return Frame(data=data, event="reset", id=position).encode()


def parse_notification(payload: str) -> tuple[int, int]:
    """(event id, execution id) that a notification announces, or PayloadError."""
    try:
        doc = json.loads(payload)
    except ValueError:  # JSONDecodeError
        raise PayloadError("not_json", "is not JSON") from None
    except RecursionError:
        raise PayloadError("not_json", "is JSON nested too deep") from None
    if not isinstance(doc, dict) or doc.get("entity_type") != "execution":
        raise PayloadError("not_an_event", "is not an execution event notification")
    ids = []
    for key in ("event_id", "entity_id"):
        value = doc.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BIGINT:
            raise PayloadError("not_an_event", f"has no valid {key}")
        ids.append(value)
    return ids[0], ids[1]
