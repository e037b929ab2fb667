"""What an operator asks a worker: ``/healthz``, ``/readyz`` and ``/metrics``.

``/readyz`` says ready when the database answers and events reach the worker
(its feed is flowing); for ``server.metrics_allow`` addresses, or with the
scrape token, it also gives the ``stats()`` of each stage on the path: the
feed, the relay, the source (its listener, or the broker), the hub, and access
control (the generation of access its streams were last brought to).
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import os
from typing import Any

from flask import Blueprint, Response, jsonify, request

from attune_sse.errors import Forbidden, NotReady
from attune_sse.http.state import state

bp = Blueprint("ops", __name__)

# How long /readyz waits for one of the REST pool's connections before it says the worker is not ready.
READY_POOL_WAIT = 2.0
# A read of the schema, as every request makes: a role that lost USAGE on it (or SELECT) fails it.
READY_PROBE = "SELECT generation FROM attune.access_generation"


def may_see_internals() -> bool:
    """/metrics and the detailed /readyz: for server.metrics_allow addresses, or the scrape token."""
    config = state().config
    token = config["security.metrics_token"]
    given = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return True
    try:
        address = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(net, strict=False) for net in config["server.metrics_allow"])


@bp.get("/metrics")
def metrics() -> Any:
    if not may_see_internals():
        raise Forbidden("Metrics are for the addresses in server.metrics_allow, or with the scrape token "
                        "(security.metrics_token).", code="METRICS_FORBIDDEN")
    body, content_type = state().metrics.exposition()
    return Response(body, content_type=content_type)


@bp.get("/healthz")
def healthz() -> Any:
    """Alive: the worker answers."""
    return jsonify({"data": {"status": "ok", "pid": os.getpid()}})


@bp.get("/readyz")
def readyz() -> Any:
    """Ready: the database answers and events reach this worker."""
    app_state = state()
    try:
        app_state.pool.check(READY_POOL_WAIT, READY_PROBE)
    except NotReady as exc:
        raise NotReady(f"Not ready: {exc.message}", code=exc.code) from None
    feed, relay = app_state.feed, app_state.relay
    if not feed.flowing:
        raise NotReady("Not ready: events do not reach this worker (its instance's listener, or the broker, "
                       "is disconnected or being elected); it is reconnecting.", code="LISTENER_DISCONNECTED")
    if not may_see_internals():
        return jsonify({"data": {"status": "ready"}})
    listener = relay.listener
    listener_stats = listener.stats() if listener is not None else None
    return jsonify({"data": {
        "status": "ready",
        "pid": os.getpid(),
        "feed": feed.stats(),
        "relay": relay.stats(),
        "source": relay.source.stats() if relay.source is not None else None,
        "listener_backend_pid": listener_stats.pop("backend_pid") if listener_stats else None,
        "listener": listener_stats,
        "access": app_state.access.stats(),
        "streams": len(app_state.hub),
        "hub": dataclasses.asdict(app_state.hub.stats),
    }})
