"""The Flask application factory: wires config, pool, hub, listener and views."""

from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Any

from flask import Flask, Response, request
from flask.json.provider import DefaultJSONProvider
from flask_cors import CORS
from prometheus_client import CollectorRegistry
from werkzeug.middleware.proxy_fix import ProxyFix

from attune_sse.config import RELAY_DIR_ENV, Config, check_production, load_config, log_level
from attune_sse.core.hub import Hub
from attune_sse.http import api, auth, openapi, ops, stream
from attune_sse.http.bodies import BodyDeadline
from attune_sse.http.io import IdConverter, check_query_string, register_error_handlers
from attune_sse.http.state import EXTENSION, AppState
from attune_sse.runtime.access import AccessControl
from attune_sse.runtime.election import Relay
from attune_sse.runtime.feed import Feed
from attune_sse.runtime.listener import ListenerSettings
from attune_sse.runtime.metrics import Metrics
from attune_sse.runtime.retention import start_pruner
from attune_sse.runtime.sources import MakeSource, listen
from attune_sse.storage.db import Pool, require_cooperative, service_url

log = logging.getLogger(__name__)

# On every response; they matter for the UI's pages, and cost nothing elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


# The web UI's files: the same for everyone, and hold no data.
CACHEABLE = {"static", "ui"}


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
    app.url_map.converters["id"] = IdConverter
    app.config["MAX_CONTENT_LENGTH"] = config["server.max_body_bytes"]

    require_cooperative()
    url = service_url(config)
    hub = Hub(max_pending=config["server.sse_queue_size"], max_client_bytes=config["server.sse_client_buffer_bytes"],
              max_worker_bytes=config["server.sse_worker_buffer_bytes"])
    pool = Pool(url, config["database.pool_size"])
    # Resumes wait for one of these rather than take REST's connections; each holds one for a page.
    backlog_pool = Pool(url, config["database.backlog_pool_size"], acquire_timeout=30.0)
    access = AccessControl(pool, config["security.default_grants"], config["security.access_refresh_seconds"],
                           watch_pool=Pool(url, 1, acquire_timeout=5.0))
    feed = Feed(hub, backlog_pool)
    relay = Relay(feed, _source_maker(config, url),
                  os.environ.get(RELAY_DIR_ENV) if config["events.listen_per"] == "instance" else None)
    metrics = Metrics(hub, feed, lambda: relay.listener, CollectorRegistry())
    background = []
    if start_listener:
        relay.start()
        keepalive = hub.start_keepalive(config["server.sse_keepalive_seconds"])
        watcher = access.watch(hub.identities, hub.apply_access)
        background = [g for g in (start_pruner(pool, config), metrics.start(), keepalive, watcher) if g is not None]
    app.extensions[EXTENSION] = AppState(config=config, pool=pool, hub=hub, feed=feed, relay=relay,
                                         metrics=metrics, access=access, backlog_pool=backlog_pool,
                                         background=background)

    register_error_handlers(app)
    _init_cors(app, config["server.cors_origins"])  # first: its preflight answer comes before every other hook
    app.before_request(check_query_string)
    auth.init_app(app, config)
    app.register_blueprint(api.bp)
    app.register_blueprint(stream.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(ops.bp)
    app.add_url_rule("/", view_func=lambda: app.send_static_file("index.html"), endpoint="ui")
    app.after_request(_security_headers)
    app.wsgi_app = BodyDeadline(app.wsgi_app, timeout=config["server.body_timeout_seconds"],  # type: ignore[method-assign]
                                min_rate=config["server.body_min_rate_bytes"],
                                max_bytes=config["server.max_body_bytes"])
    if config["server.proxy_hops"]:
        # Behind proxies every peer is the proxy: the login limit and the metrics allow-list
        # need the client's address, which only the trusted hops' X-Forwarded-For tells.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=config["server.proxy_hops"])  # type: ignore[method-assign]
    return app


def _source_maker(config: Config, url: str) -> MakeSource:
    """What the worker that leads its instance runs: a LISTEN, or a Redis stream reader (events.fanout)."""
    settings = ListenerSettings.of(config)
    if config["events.fanout"] == "redis":
        from attune_sse.runtime import broker

        return broker.stream(config, url, settings)
    return listen(url, settings)


def _security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.endpoint not in CACHEABLE:
        # Tokens (/auth/*) and API data must not be kept by a browser's or a proxy's cache. The stream
        # sets its own (no-cache, as DESIGN.md says), and that stays.
        response.headers.setdefault("Cache-Control", "no-store")
    return response


# What a page of a server.cors_origins origin may send (the UI's calls, and EventSource's resume header).
CORS_METHODS = ["GET", "POST", "PATCH"]
CORS_HEADERS = ["Authorization", "Content-Type", "Last-Event-ID"]


def _init_cors(app: Flask, origins: list[str]) -> None:
    """CORS by flask-cors: only the configured origins get ``Access-Control-Allow-Origin`` (with
    ``Vary: Origin``). A preflight of an existing route answers 204 here, before any view or
    blueprint hook (they would ask it for a token, which a preflight never carries)."""
    CORS(app, origins=origins, methods=CORS_METHODS, allow_headers=CORS_HEADERS, max_age=600,
         vary_header=True, send_wildcard=False)

    @app.before_request
    def preflight() -> Response | None:
        if (request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
                and request.routing_exception is None):
            response = Response(status=204)
            del response.headers["Content-Type"]
            return response
        return None

    @app.after_request
    def vary(response: Response) -> Response:
        # Whether the answer holds Access-Control-Allow-Origin depends on Origin, whatever the origin
        # (flask-cors says so only when several origins are configured): caches must not mix them up.
        if "Origin" in request.headers and "Origin" not in response.vary:
            response.vary.add("Origin")
        return response
