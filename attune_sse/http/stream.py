"""The SSE view: ``GET /api/v1/executions/stream``.

The view checks the token, the identity's access, the filter and the resume
point before any byte of the stream is sent, so a bad request gets a JSON
401/400/404/429. The body is session.event_stream, given plain values (never
``request``): the hub, the client's socket (sink.py) and the record's backlog
reader (record.read_backlog).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from flask import Blueprint, Response, request
from flask_jwt_extended import get_jwt, verify_jwt_in_request

from attune_sse.core.session import event_stream
from attune_sse.errors import NotFound, NotReady, TooManyRequests
from attune_sse.http.auth import current_principal
from attune_sse.http.io import positive_int_arg
from attune_sse.http.sink import ClientSocket
from attune_sse.http.state import state
from attune_sse.http.validation import parse_int
from attune_sse.storage import store
from attune_sse.storage.record import read_backlog

log = logging.getLogger(__name__)


bp = Blueprint("stream", __name__)

HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@bp.get("/api/v1/executions/stream")
def execution_stream() -> Any:
    verify_jwt_in_request(locations=["headers", "query_string"])
    expires_at = get_jwt().get("exp")
    principal = current_principal()
    execution_id = positive_int_arg("execution_id")
    last_event_id = _last_event_id()
    app_state = state()
    if app_state.hub.closed:
        raise NotReady("This worker is shutting down; reconnect.", code="SHUTTING_DOWN")
    config = app_state.config
    readable = principal.scope("executions", "read")
    if execution_id is not None:
        with app_state.pool.cursor() as cur:
            action_ref = store.action_ref_of(cur, execution_id)
        if action_ref is None or not readable.allows_action(action_ref):
            raise NotFound(f"Execution {execution_id} does not exist.", code="EXECUTION_NOT_FOUND")
    # Counted after the last wait of this view: from here to the hub's subscribe (the body's first
    # step, run by gunicorn at once) nothing yields, so concurrent opens cannot all pass the check.
    limit = config["server.max_streams_per_identity"]
    if app_state.hub.streams_of(principal.id) >= limit:
        raise TooManyRequests(f"This identity has {limit} streams open on this worker "
                              "(server.max_streams_per_identity); close one first.", code="TOO_MANY_STREAMS")
    body = event_stream(
        app_state.hub,
        execution_id,
        retry_ms=config["server.sse_retry_ms"],
        reconnect_spread_ms=config["server.sse_reconnect_spread_ms"],
        last_event_id=last_event_id,
        expires_at=expires_at,
        identity=principal.id,
        identity_key=principal.key,
        scope=readable,
        confirm=functools.partial(app_state.access.recheck, principal.id),
        backlog=functools.partial(read_backlog, app_state.backlog_pool, execution_id),
        connection=ClientSocket.from_environ(request.environ, config["server.sse_send_buffer_bytes"]),
    )
    headers = {**HEADERS, "X-Attune-Worker": str(os.getpid())}
    # direct_passthrough: gunicorn iterates the generator itself, without werkzeug's
    # encoding and closing wrappers, so a held stream costs less stack and memory.
    return Response(body, mimetype="text/event-stream", headers=headers, direct_passthrough=True)


def _last_event_id() -> int | None:
    """Where a reconnecting client left off: the Last-Event-ID header EventSource sends, or ?last_event_id=."""
    raw = request.headers.get("Last-Event-ID")
    name = "The Last-Event-ID header"
    if raw is None:
        raw = request.args.get("last_event_id")
        name = "Query parameter 'last_event_id'"
    if raw is None or raw.strip() == "":
        return None
    return parse_int(raw, name, minimum=0)


