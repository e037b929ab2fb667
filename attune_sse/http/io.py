"""The request side of every view: reading the body and the query string, and every error as JSON."""

from __future__ import annotations

import logging
from typing import Any, overload

import gevent
import gevent.lock
from flask import Flask, jsonify, request
from werkzeug import exceptions
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter

from attune_sse.errors import ApiError, BadRequest
from attune_sse.http.bodies import BODY_KEY
from attune_sse.http.validation import MAX_ID_DIGITS, parse_int, parse_json_object, text_problem


class IdTooLong(exceptions.BadRequest):
    api_code = "VALIDATION_ERROR"


class IdConverter(BaseConverter):
    """``<id:name>``: an id in a path, ASCII digits; more than 19 of them is a 400 before any conversion
    (werkzeug's ``int`` converter gave a 500 past 4,300 digits, and takes ``\\d``'s other scripts' digits)."""

    regex = r"[0-9]+"

    def to_python(self, value: str) -> int:
        if len(value) > MAX_ID_DIGITS:
            raise IdTooLong(f"An id has at most {MAX_ID_DIGITS} digits; got {len(value)}.")
        return int(value)

    def to_url(self, value: Any) -> str:
        return str(int(value))

log = logging.getLogger(__name__)


# A body this large is parsed on gevent's thread pool, one at a time: the worker's event loop (its
# streams) gets the interpreter between parses and every few milliseconds of a check, instead of
# waiting for them all (json's C parser holds the interpreter for a whole body: 30 ms for 16 MiB).
PARSE_APART_BYTES = 256 * 1024
_LARGE_PARSE = gevent.lock.Semaphore(1)


def json_body() -> dict[str, Any]:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    if not request.is_json:
        raise BadRequest("Send a JSON object with 'Content-Type: application/json'.", code="INVALID_JSON")
    data = request.environ.get(BODY_KEY)  # as bodies.py read it: no second copy
    if data is None:
        data = request.get_data(cache=True)
    if len(data) < PARSE_APART_BYTES:
        return parse_json_object(data)
    with _LARGE_PARSE:
        return gevent.get_hub().threadpool.apply(parse_json_object, (data,))


@overload
def positive_int_arg(name: str, default: int, *, maximum: int | None = None) -> int: ...


@overload
def positive_int_arg(name: str, default: None = None, *, maximum: int | None = None) -> int | None: ...


def positive_int_arg(name: str, default: int | None = None, *, maximum: int | None = None) -> int | None:
    """A query-string integer >= 1, or 400."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    value = parse_int(raw, f"Query parameter '{name}'")
    if maximum is not None and value > maximum:
        raise BadRequest(f"Query parameter '{name}' must be at most {maximum}.", code="VALIDATION_ERROR")
    return value


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
        code = getattr(exc, "api_code", None) or (exc.name or "error").upper().replace(" ", "_").replace("'", "")
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
