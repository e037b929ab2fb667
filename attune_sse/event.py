"""The execution event: a notification parsed once and framed once.

Whatever the path an event took (a NOTIFY payload, or a row read back from
``attune.execution_event``), it becomes one immutable ``ExecutionEvent`` whose
SSE frame is encoded here, before fan-out, so every client gets the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .sse import Message


class PayloadError(ValueError):
    """A notification payload that is not an execution event."""


@dataclass(frozen=True)
class ExecutionEvent:
    """One change of one execution, ready to send."""

    event_id: int
    entity_id: int
    payload: str
    frame: bytes = field(repr=False)
    # The frame as one HTTP/1.1 chunk, for the hub's direct writes (see hub.py).
    chunk: bytes = field(repr=False, default=b"")

    @classmethod
    def from_parts(cls, event_id: int, entity_id: int, payload: str) -> ExecutionEvent:
        # The payload is one line already: JSON escapes every line break in strings.
        frame = Message(data=payload, id=event_id).encode()
        chunk = b"%X\r\n%s\r\n" % (len(frame), frame)
        return cls(event_id=event_id, entity_id=entity_id, payload=payload, frame=frame, chunk=chunk)


def parse_notification(payload: str) -> dict[str, Any]:
    """Parse and check the fields every notification carries."""
    try:
        doc = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("entity_type") != "execution":
        raise PayloadError("not an execution notification")
    for key in ("entity_id", "event_id"):
        if not isinstance(doc.get(key), int) or isinstance(doc.get(key), bool):
            raise PayloadError(f"{key} missing or not an integer")
    return doc
