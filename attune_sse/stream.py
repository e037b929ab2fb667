"""The SSE view: ``GET /api/v1/executions/stream``.

The view checks the token and the filter before any byte of the stream is
sent, so a bad request gets a JSON 401/400. The body is a generator that takes
plain values (never ``request``), subscribes to the hub before its first
write, and leaves the hub however the stream ends.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response
from flask_jwt_extended import verify_jwt_in_request

from . import sse
from .errors import NotReady
from .hub import Hub
from .web import positive_int_arg, state

log = logging.getLogger(__name__)

bp = Blueprint("stream", __name__)

HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@bp.get("/api/v1/executions/stream")
def execution_stream() -> Any:
    verify_jwt_in_request(locations=["headers", "query_string"])
    execution_id = positive_int_arg("execution_id")
    app_state = state()
    if app_state.hub.closed:
        raise NotReady("This worker is shutting down; reconnect.", code="SHUTTING_DOWN")
    config = app_state.config
    body = event_stream(
        app_state.hub,
        execution_id,
        keepalive=config["server.sse_keepalive_seconds"],
        retry_ms=config["server.sse_retry_ms"],
    )
    headers = {**HEADERS, "X-Attune-Worker": str(os.getpid())}
    return Response(body, mimetype="text/event-stream", headers=headers)


def event_stream(hub: Hub, execution_id: int | None, *, keepalive: float, retry_ms: int) -> Iterator[bytes]:
    """The bytes of one client's stream, from subscription to close."""
    with hub.subscription(execution_id) as sub:
        log.debug("stream opened (execution_id=%s, %d subscribers)", execution_id, len(hub))
        # First write: tells EventSource how long to wait before a reconnect,
        # and sends the headers, so the client knows it is subscribed.
        yield sse.Message(retry=retry_ms).encode() + sse.comment("connected")
        while True:
            batch = sub.next_batch(keepalive)
            if batch is None:
                break
            if not batch:
                yield sse.KEEPALIVE
                continue
            # What piled up while the client was busy leaves in one write.
            yield b"".join(event.frame for event in batch)
        log.debug("stream ended (%s)", sub.reason)
        # Spread the reconnects of many clients instead of a storm.
        jitter = int(retry_ms * random.uniform(0.5, 1.5))
        yield sse.Message(retry=jitter).encode() + sse.comment(f"stream closed: {sub.reason}")
