"""The Flask application factory: wires config, pool, hub, listener and views."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from typing import Any

from flask import Flask, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from prometheus_client import CollectorRegistry

from . import api, auth, openapi, stream
from .config import Config, check_production, load_config, log_level
from .db import Pool, resolve_url
from .errors import NotReady
from .hub import Hub
from .listener import Listener
from .metrics import Metrics
from .retention import start_pruner
from .web import EXTENSION, AppState, check_query_string, register_error_handlers, state

log = logging.getLogger(__name__)

# On every response; they matter for the UI's pages, and cost nothing elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class JSONProvider(DefaultJSONProvider):
    """ISO 8601 timestamps (Flask's default is the HTTP date format) and keys in order."""

    sort_keys = False

    @staticmethod
    def default(o: Any) -> Any:
        if isinstance(o, dt.datetime):
            return o.isoformat()
        return DefaultJSONProvider.default(o)


def create_app(config: Config | str | os.PathLike[str] | None = None, *, start_listener: bool = True) -> Flask:
    """Build the app; with ``start_listener`` its LISTEN greenlet starts at once."""
    if not isinstance(config, Config):
        config = load_config(config)
    check_production(config)
    logging.getLogger("attune_sse").setLevel(log_level(config))

    app = Flask(__name__)
    app.json = JSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = config["server.max_body_bytes"]

    url = resolve_url(config)
    hub = Hub(max_pending=config["server.sse_queue_size"])
    listener = Listener(
        url,
        hub,
        ping_interval=config["listener.ping_interval"],
        ping_timeout=config["listener.ping_timeout"],
        reconnect_max_delay=config["listener.reconnect_max_delay"],
    )
    pool = Pool(url, config["database.pool_size"])
    metrics = Metrics(hub, listener, CollectorRegistry())
    background = []
    if start_listener:
        listener.start()
        keepalive = hub.start_keepalive(config["server.sse_keepalive_seconds"])
        background = [g for g in (start_pruner(pool, config), metrics.start(), keepalive) if g is not None]
    app.extensions[EXTENSION] = AppState(config=config, pool=pool, hub=hub, listener=listener,
                                         metrics=metrics, background=background)

    register_error_handlers(app)
    app.before_request(check_query_string)
    auth.init_app(app, config)
    app.register_blueprint(api.bp)
    app.register_blueprint(stream.bp)
    app.register_blueprint(openapi.bp)
    app.add_url_rule("/", view_func=lambda: app.send_static_file("index.html"), endpoint="ui")
    app.add_url_rule("/healthz", view_func=healthz)
    app.add_url_rule("/readyz", view_func=readyz)
    app.add_url_rule("/metrics", view_func=lambda: state().metrics.response())
    _init_cors(app, config["server.cors_origins"])
    app.after_request(_security_headers)

    return app


def healthz() -> Any:
    """Alive: the worker answers."""
    return jsonify({"data": {"status": "ok", "pid": os.getpid()}})


def readyz() -> Any:
    """Ready: the database answers and this worker's listener is connected."""
    app_state = state()
    try:
        with app_state.pool.cursor() as cur:
            cur.execute("SELECT 1")
    except NotReady as exc:
        raise NotReady(f"Not ready: {exc.message}", code="DATABASE_UNAVAILABLE") from None
    if not app_state.listener.connected:
        raise NotReady("Not ready: the LISTEN connection is down; it is reconnecting.",
                       code="LISTENER_DISCONNECTED")
    listener = app_state.listener
    return jsonify({"data": {
        "status": "ready",
        "pid": os.getpid(),
        "listener_backend_pid": listener.backend_pid,
        "listener": {
            "position": listener.position,
            "received": listener.received,
            "caught_up": listener.caught_up,
            "skipped": listener.skipped,
            "rejected": listener.rejected,
            "reconnects": listener.reconnects,
            "lag_seconds": listener.lag,
        },
        "streams": len(app_state.hub),
        "hub": dataclasses.asdict(app_state.hub.stats),
    }})


def _security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _init_cors(app: Flask, origins: list[str]) -> None:
    allowed = set(origins)

    @app.after_request
    def cors(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, Last-Event-ID"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, PATCH, OPTIONS"
            response.headers.add("Vary", "Origin")
        return response
