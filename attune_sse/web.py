"""What every view shares: the app's state, JSON input checks, JSON errors."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import gevent
from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from .access import AccessControl
from .config import Config
from .db import Pool
from .errors import ApiError, BadRequest
from .event import MAX_BIGINT
from .hub import Hub
from .listener import Listener
from .metrics import Metrics

log = logging.getLogger(__name__)

EXTENSION = "attune_sse"


@dataclass
class AppState:
    """Everything one app (one worker) owns; lives in ``app.extensions["attune_sse"]``."""

    config: Config
    pool: Pool
    hub: Hub
    listener: Listener
    metrics: Metrics
    access: AccessControl
    backlog_pool: Pool  # resumes read the record here, so they cannot take REST's connections
    background: list[gevent.Greenlet] = field(default_factory=list)  # pruner, metrics, keep-alive, access

    def shutdown(self, reason: str = "shutdown") -> int:
        """End every stream and stop listening; return how many streams were open."""
        open_streams = self.hub.close(reason)
        self.listener.stop()
        for greenlet in self.background:
            greenlet.kill(block=False)
        self.pool.close()
        self.backlog_pool.close()
        self.access.watch_pool.close()
        return open_streams


def state() -> AppState:
    return current_app.extensions[EXTENSION]


# -- input -------------------------------------------------------------------

def invalid(field: str, message: str) -> BadRequest:
    return BadRequest(f"'{field}' {message}.", code="VALIDATION_ERROR")


def json_body() -> dict[str, Any]:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    if not request.is_json:
        raise BadRequest("Send a JSON object with 'Content-Type: application/json'.", code="INVALID_JSON")
    try:
        body = json.loads(request.get_data(cache=True), parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.",
                         code="INVALID_JSON") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and _no_constant's
        raise BadRequest(f"The request body is not valid JSON: {str(exc)[:200]}.", code="INVALID_JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="INVALID_JSON")
    problem = storable_problem(body)
    if problem:
        raise BadRequest(f"The request body {problem}.", code="INVALID_JSON")
    return body


MAX_JSON_DEPTH = 100


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def storable_problem(value: Any, depth: int = 0) -> str | None:
    """Why PostgreSQL could not store this JSON value (text and jsonb take no NUL character
    and no lone surrogate), or None."""
    if depth > MAX_JSON_DEPTH:
        return f"is nested more than {MAX_JSON_DEPTH} levels deep"
    if isinstance(value, str):
        return text_problem(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "holds a number too large to store (JSON numbers must be finite)"
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        problem = storable_problem(item, depth + 1)
        if problem:
            return problem
    return None


def text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate, which is not valid Unicode"
    return None


def required_string(body: dict[str, Any], field: str, *, max_length: int = 1000) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise invalid(field, "is required and must be a non-empty string")
    if len(value) > max_length:
        raise invalid(field, f"must be at most {max_length} characters")
    return value


def optional_string(body: dict[str, Any], field: str, *, max_length: int = 1000) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(field, "must be a string")
    if len(value) > max_length:
        raise invalid(field, f"must be at most {max_length} characters")
    return value


def parse_int(raw: str, name: str, *, minimum: int = 1) -> int:
    """A whole number from ``minimum`` to the bigint maximum, or 400 naming ``name``."""
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()) or not minimum <= int(raw) <= MAX_BIGINT:
        raise BadRequest(f"{name} must be a whole number >= {minimum}, got {raw[:40]!r}.",
                         code="VALIDATION_ERROR")
    return int(raw)


def positive_int_arg(name: str, default: int | None = None, *, maximum: int | None = None) -> int | None:
    """A query-string integer >= 1, or 400."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    value = parse_int(raw, f"Query parameter '{name}'")
    if maximum is not None and value > maximum:
        raise BadRequest(f"Query parameter '{name}' must be at most {maximum}.", code="VALIDATION_ERROR")
    return value


# -- errors --------------------------------------------------------------------

def check_query_string() -> None:
    """``before_request``: query values are text PostgreSQL must be able to take."""
    for name, value in request.args.items(multi=True):
        problem = text_problem(name) or text_problem(value)
        if problem:
            raise BadRequest(f"Query parameter {name[:40]!r} {problem}.", code="VALIDATION_ERROR")


def register_error_handlers(app: Flask) -> None:
    """Every error leaves as ``{"error", "code"}`` JSON; never HTML, never a traceback."""

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Any:
        return jsonify(exc.to_dict()), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        code = (exc.name or "error").upper().replace(" ", "_").replace("'", "")
        message = exc.description or exc.name
        if exc.code == 404:
            message = f"No such endpoint: {request.method} {request.path}."
        elif exc.code == 405:
            message = f"Method {request.method} is not allowed on {request.path}."
        response = jsonify({"error": message, "code": code})
        response.status_code = exc.code or 500
        if exc.code == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": "Internal server error; the server log has the details.",
                        "code": "INTERNAL_ERROR"}), 500
