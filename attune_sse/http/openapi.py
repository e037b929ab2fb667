"""The OpenAPI 3 description of every endpoint, served at ``/api/v1/openapi.json``.

Kept true by tests: ``tests/test_openapi.py`` checks it against the app's URL
map, and fuzzes the running server from it with schemathesis.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from attune_sse.storage.store import EXECUTION_STATUSES

bp = Blueprint("openapi", __name__)

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad input", 401: "Missing, invalid or expired token", 403: "Forbidden",
            404: "Not found", 408: "Body sent too slowly", 409: "Conflict", 413: "Body too large",
            422: "Refers to something missing",
            429: "Too many failed logins, or streams of one identity", 503: "Database unreachable or busy"}
    return {str(code): {"description": text[code], **_json(_ERROR)} for code in codes}


def _data(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    body = {"type": "object", "required": ["data"], "properties": {"data": schema, **extra}}
    return {"description": description, **_json(body)}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, **_json(schema)}


# Security requirements: each maps a scheme to the scopes it needs (none).
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
STREAM_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {"queryToken": []}]
COMMON = (400, 401, 408, 413, 503)
ID_PARAM = {"name": "execution_id", "in": "path", "required": True,
            "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}}
# ECMA-262 patterns (``$`` is the end of the text there); the fuzzer reads them with Python's re, whose ``$``
# also matches before a final line break: so it sends refs ending in one, which the server must refuse.
PACK_REF = "^[a-z][a-z0-9_-]+$"
ACTION_REF = "^[a-z][a-z0-9_-]+\\.[A-Za-z0-9_.-]+$"


def spec() -> dict[str, Any]:
    """The document (built per request: it is small, and never stale)."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "attune-sse",
            "version": "1.0.0",
            "description": "The real-time execution stream of Attune: PostgreSQL NOTIFY to Server-Sent Events. "
                           "Every error is JSON: {\"error\": message, \"code\": CODE}.",
        },
        "paths": {
            "/auth/login": {"post": {
                "summary": "Log in with a password; returns an access and a refresh token",
                "security": [],
                "requestBody": _body(_ref("Credentials")),
                "responses": {"200": _data(_ref("Tokens"), "Tokens"), **_errors(400, 401, 408, 413, 429, 503)},
            }},
            "/auth/register": {"post": {
                "summary": "Create an identity (when security.allow_registration is on)",
                "security": [],
                "requestBody": _body({**_ref("Credentials")}),
                "responses": {"201": _data(_ref("Tokens"), "Registered"), **_errors(400, 403, 408, 409, 413, 503)},
            }},
            "/auth/refresh": {"post": {
                "summary": "A new access token, for a refresh token in the Authorization header",
                "security": BEARER,
                "responses": {"200": _data(_ref("AccessToken"), "A new access token"), **_errors(401, 503)},
            }},
            "/auth/me": {"get": {
                "summary": "The identity of the token",
                "security": BEARER,
                "responses": {"200": _data(_ref("Identity"), "The identity"), **_errors(401, 503)},
            }},
            "/api/v1/packs": {
                "get": {"summary": "List packs", "security": BEARER,
                        "responses": {"200": _data({"type": "array", "items": _ref("Pack")}, "Packs"),
                                      **_errors(401, 503)}},
                "post": {"summary": "Create a pack", "security": BEARER, "requestBody": _body(_ref("NewPack")),
                         "responses": {"201": _data(_ref("Pack"), "Created"), **_errors(*COMMON, 403, 409)}},
            },
            "/api/v1/actions": {
                "get": {"summary": "List actions", "security": BEARER,
                        "parameters": [{"name": "pack_ref", "in": "query", "schema": {"type": "string"}}],
                        "responses": {"200": _data({"type": "array", "items": _ref("Action")}, "Actions"),
                                      **_errors(401, 503)}},
                "post": {"summary": "Create an action in an existing pack", "security": BEARER,
                         "requestBody": _body(_ref("NewAction")),
                         "responses": {"201": _data(_ref("Action"), "Created"), **_errors(*COMMON, 403, 409, 422)}},
            },
            "/api/v1/executions": {
                "get": {
                    "summary": "List executions, newest first", "security": BEARER,
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string", "enum": [*EXECUTION_STATUSES]}},
                        {"name": "action_ref", "in": "query", "schema": {"type": "string"}},
                        {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                        {"name": "per_page", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                        "maximum": 500}},
                    ],
                    "responses": {"200": _data({"type": "array", "items": _ref("Execution")}, "A page",
                                               meta={"type": "object"}), **_errors(400, 401, 503)},
                },
                "post": {"summary": "Request an execution of an action", "security": BEARER,
                         "requestBody": _body(_ref("NewExecution")),
                         "responses": {"201": _data(_ref("Execution"), "Created"), **_errors(*COMMON, 403, 422)}},
            },
            "/api/v1/executions/{execution_id}": {
                "parameters": [ID_PARAM],
                "get": {"summary": "One execution", "security": BEARER,
                        "responses": {"200": _data(_ref("Execution"), "The execution"),
                                      **_errors(400, 401, 404, 503)}},
                "patch": {"summary": "Change an execution's status or result", "security": BEARER,
                          "requestBody": _body(_ref("ExecutionChange")),
                          "responses": {"200": _data(_ref("Execution"), "Changed"), **_errors(*COMMON, 403, 404)}},
            },
            "/api/v1/executions/stream": {"get": {
                "summary": "Server-Sent Events: every change of an execution, as it commits",
                "description": "Each event: `id:` (the event id) and `data:` (the notification JSON). Resume with "
                               "the Last-Event-ID header (EventSource sends it) or ?last_event_id=. A `reset` event "
                               "says events were missed (pruned); `token_expired` ends the stream when the token "
                               "does. `: keep-alive` comments keep idle connections open.",
                "security": STREAM_AUTH,
                "parameters": [
                    {"name": "execution_id", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    {"name": "last_event_id", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer", "minimum": 0}},
                ],
                "responses": {"200": {"description": "The stream",
                                      "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                              **_errors(400, 401, 404, 429, 503)},
            }},
            "/healthz": {"get": {"summary": "Alive", "security": [],
                                 "responses": {"200": _data({"type": "object"}, "Alive")}}},
            "/readyz": {"get": {"summary": "Database reachable and this worker's listener connected",
                                "security": [],
                                "responses": {"200": _data({"type": "object"}, "Ready"), **_errors(503)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics of the instance (server.metrics_allow addresses, "
                                            "or Authorization: Bearer <security.metrics_token>)", "security": [],
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               **_errors(403)}}},
            "/api/v1/openapi.json": {"get": {"summary": "This document", "security": [],
                                             "responses": {"200": {"description": "OpenAPI 3",
                                                                   **_json({"type": "object"})}}}},
            "/": {"get": {"summary": "The web UI", "security": [],
                          "responses": {"200": {"description": "HTML",
                                                "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "queryToken": {"type": "apiKey", "in": "query", "name": "token",
                               "description": "For EventSource, which cannot send headers; never logged"},
            },
            "schemas": SCHEMAS,
        },
    }


_TIMESTAMP = {"type": "string", "format": "date-time"}
SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "code"], "additionalProperties": False,
              "properties": {"error": {"type": "string"}, "code": {"type": "string"}}},
    "Credentials": {"type": "object", "required": ["login", "password"],
                    "properties": {"login": {"type": "string", "minLength": 1, "maxLength": 255},
                                   "password": {"type": "string", "minLength": 1, "maxLength": 1024},
                                   "display_name": {"type": "string", "maxLength": 255}}},
    "AccessToken": {"type": "object", "required": ["access_token", "token_type", "expires_in"],
                    "properties": {"access_token": {"type": "string"}, "token_type": {"type": "string"},
                                   "expires_in": {"type": "integer"}}},
    "Tokens": {"type": "object", "required": ["access_token", "refresh_token", "user"],
               "properties": {"access_token": {"type": "string"}, "refresh_token": {"type": "string"},
                              "token_type": {"type": "string"}, "expires_in": {"type": "integer"},
                              "user": {"$ref": "#/components/schemas/Identity"}}},
    "Identity": {"type": "object", "required": ["id", "login"],
                 "properties": {"id": {"type": "integer"}, "login": {"type": "string"},
                                "display_name": {"type": "string", "nullable": True}}},
    "NewPack": {"type": "object", "required": ["ref"],
                "properties": {"ref": {"type": "string", "pattern": PACK_REF, "maxLength": 100},
                               "label": {"type": "string"}, "description": {"type": "string"},
                               "version": {"type": "string"}}},
    "Pack": {"type": "object", "required": ["id", "ref"],
             "properties": {"id": {"type": "integer"}, "ref": {"type": "string"}, "label": {"type": "string"},
                            "created": _TIMESTAMP, "updated": _TIMESTAMP}},
    "NewAction": {"type": "object", "required": ["ref"],
                  "properties": {"ref": {"type": "string", "pattern": ACTION_REF, "maxLength": 255},
                                 "pack_ref": {"type": "string"},
                                 "label": {"type": "string"}, "description": {"type": "string"},
                                 "entrypoint": {"type": "string"}}},
    "Action": {"type": "object", "required": ["id", "ref"],
               "properties": {"id": {"type": "integer"}, "ref": {"type": "string"}, "pack_ref": {"type": "string"}}},
    "NewExecution": {"type": "object", "required": ["action_ref"],
                     "properties": {"action_ref": {"type": "string", "pattern": ACTION_REF, "maxLength": 255},
                                    "config": {"type": "object", "nullable": True},
                                    "parent": {"type": "integer", "minimum": 1, "nullable": True}}},
    "ExecutionChange": {"type": "object", "minProperties": 1, "additionalProperties": False,
                        "properties": {"status": {"type": "string", "enum": [*EXECUTION_STATUSES]},
                                       "result": {"nullable": True}}},
    "Execution": {"type": "object", "required": ["id", "action_ref", "status"],
                  "properties": {"id": {"type": "integer"}, "action_ref": {"type": "string"},
                                 "status": {"type": "string", "enum": [*EXECUTION_STATUSES]},
                                 "result": {"nullable": True}, "created": _TIMESTAMP, "updated": _TIMESTAMP}},
}


@bp.get("/api/v1/openapi.json")
def openapi_json() -> Response:
    return jsonify(spec())
