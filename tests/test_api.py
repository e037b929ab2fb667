"""Auth and REST endpoints, and the JSON errors of every endpoint."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests

from conftest import make_token
from helpers import Api


def _error(response: requests.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "code"}, body
    assert body["error"] and "Traceback" not in body["error"]
    if code is not None:
        assert body["code"] == code, body
    return body


def test_login_refresh_and_me(server: Any, user: dict[str, Any]) -> None:
    anonymous = Api(server.base_url, None)
    login = anonymous.post("/auth/login", json={"login": user["login"], "password": user["password"]})
    assert login.status_code == 200, login.text
    data = login.json()["data"]
    assert data["token_type"] == "Bearer"
    assert data["expires_in"] == 300
    assert data["user"] == {"id": user["user"]["id"], "login": user["login"], "display_name": "Tester"}

    me = Api(server.base_url, data["access_token"]).get("/auth/me")
    assert me.json()["data"]["login"] == user["login"]

    refreshed = Api(server.base_url, data["refresh_token"]).post("/auth/refresh")
    assert refreshed.status_code == 200, refreshed.text
    new_token = refreshed.json()["data"]["access_token"]
    assert Api(server.base_url, new_token).get("/auth/me").status_code == 200

    # Each kind of token only where it belongs.
    _error(Api(server.base_url, data["refresh_token"]).get("/auth/me"), 401, "TOKEN_INVALID")
    _error(Api(server.base_url, data["access_token"]).post("/auth/refresh"), 401, "TOKEN_INVALID")


def test_token_claims(user: dict[str, Any]) -> None:
    import jwt

    claims = jwt.decode(user["access_token"], options={"verify_signature": False})
    assert claims["sub"] == str(user["user"]["id"])
    assert claims["login"] == user["login"]
    assert claims["token_type"] == "access"
    assert claims["exp"] - claims["iat"] == 300
    refresh = jwt.decode(user["refresh_token"], options={"verify_signature": False})
    assert refresh["token_type"] == "refresh"


def test_wrong_password_and_unknown_login(server: Any, user: dict[str, Any]) -> None:
    anonymous = Api(server.base_url, None)
    wrong = anonymous.post("/auth/login", json={"login": user["login"], "password": "nope-nope"})
    unknown = anonymous.post("/auth/login", json={"login": "nobody-" + uuid.uuid4().hex, "password": "x"})
    assert _error(wrong, 401, "INVALID_CREDENTIALS")["error"] == "Invalid login or password"
    assert _error(unknown, 401, "INVALID_CREDENTIALS")["error"] == "Invalid login or password"


def test_password_is_hashed(database: Any, user: dict[str, Any]) -> None:
    ((stored,),) = database.query("SELECT password_hash FROM attune.identity WHERE login = %s", (user["login"],))
    assert user["password"] not in stored
    assert stored.startswith(("scrypt:", "pbkdf2:"))


def test_register_conflict(server: Any, user: dict[str, Any]) -> None:
    again = Api(server.base_url, None).post(
        "/auth/register", json={"login": user["login"], "password": "another password", "display_name": "X"}
    )
    _error(again, 409, "LOGIN_TAKEN")


def test_pack_action_execution_lifecycle(api: Api, open_stream: Any) -> None:
    suffix = uuid.uuid4().hex[:8]
    pack = api.post("/api/v1/packs", json={"ref": f"pack_{suffix}", "label": "Pack"})
    assert pack.status_code == 201, pack.text
    _error(api.post("/api/v1/packs", json={"ref": f"pack_{suffix}"}), 409, "PACK_EXISTS")
    assert any(p["ref"] == f"pack_{suffix}" for p in api.get("/api/v1/packs").json()["data"])

    action = api.post("/api/v1/actions", json={"ref": f"pack_{suffix}.run", "entrypoint": "run.sh"})
    assert action.status_code == 201, action.text
    assert action.json()["data"]["pack_ref"] == f"pack_{suffix}"
    _error(api.post("/api/v1/actions", json={"ref": f"pack_{suffix}.run"}), 409, "ACTION_EXISTS")
    listed = api.get("/api/v1/actions", params={"pack_ref": f"pack_{suffix}"}).json()["data"]
    assert [a["ref"] for a in listed] == [f"pack_{suffix}.run"]

    stream = open_stream()
    created = api.post("/api/v1/executions", json={"action_ref": f"pack_{suffix}.run", "config": {"n": 1}})
    assert created.status_code == 201, created.text
    execution = created.json()["data"]
    assert execution["status"] == "requested"
    assert execution["config"] == {"n": 1}

    for status in ("running", "completed"):
        changed = api.patch(f"/api/v1/executions/{execution['id']}", json={"status": status, "result": {"s": status}})
        assert changed.status_code == 200, changed.text
        assert changed.json()["data"]["status"] == status

    got = api.get(f"/api/v1/executions/{execution['id']}").json()["data"]
    assert got["status"] == "completed" and got["result"] == {"s": "completed"}

    page = api.get("/api/v1/executions", params={"action_ref": f"pack_{suffix}.run", "status": "completed"}).json()
    assert [e["id"] for e in page["data"]] == [execution["id"]]
    assert page["meta"] == {"page": 1, "per_page": 50, "total": 1}

    events = stream.events_until(lambda e: e["entity_id"] == execution["id"] and e["data"]["status"] == "completed")
    mine = [e.json["data"]["status"] for e in events if e.json["entity_id"] == execution["id"]]
    assert mine == ["requested", "running", "completed"]


BAD_REQUESTS = [
    # (method, path, body or None, status, code)
    ("POST", "/auth/login", None, 400, "INVALID_JSON"),
    ("POST", "/auth/login", "[1, 2]", 400, "INVALID_JSON"),
    ("POST", "/auth/login", "{not json", 400, "INVALID_JSON"),
    ("POST", "/auth/login", {"login": "x"}, 400, "VALIDATION_ERROR"),
    ("POST", "/auth/login", {"login": 5, "password": "x"}, 400, "VALIDATION_ERROR"),
    ("POST", "/auth/register", {"login": "short-pw", "password": "123"}, 400, "VALIDATION_ERROR"),
    ("POST", "/api/v1/packs", {"ref": "Bad Ref!"}, 400, "VALIDATION_ERROR"),
    ("POST", "/api/v1/packs", {"ref": "ok_ref", "label": 7}, 400, "VALIDATION_ERROR"),
    ("POST", "/api/v1/actions", {"ref": "no-dot"}, 400, "VALIDATION_ERROR"),
    ("POST", "/api/v1/actions", {"ref": "missing_pack.act"}, 422, "PACK_NOT_FOUND"),
    ("POST", "/api/v1/actions", {"ref": "a_pack.act", "pack_ref": "other"}, 400, "VALIDATION_ERROR"),
    ("POST", "/api/v1/executions", {}, 400, "VALIDATION_ERROR"),
    ("POST", "/api/v1/executions", {"action_ref": "nope.nope"}, 422, "ACTION_NOT_FOUND"),
    ("POST", "/api/v1/executions", {"action_ref": "test_sse_pack.test_action", "config": [1]}, 400,
     "VALIDATION_ERROR"),
    ("POST", "/api/v1/executions", {"action_ref": "test_sse_pack.test_action", "parent": "x"}, 400,
     "VALIDATION_ERROR"),
    ("GET", "/api/v1/executions?status=bogus", None, 400, "VALIDATION_ERROR"),
    ("GET", "/api/v1/executions?page=0", None, 400, "VALIDATION_ERROR"),
    ("GET", "/api/v1/executions?per_page=100000", None, 400, "VALIDATION_ERROR"),
    ("GET", "/api/v1/executions/999999999", None, 404, "EXECUTION_NOT_FOUND"),
    ("GET", "/api/v1/executions/99999999999999999999999", None, 400, "VALIDATION_ERROR"),
    ("GET", "/api/v1/executions/9223372036854775808", None, 404, "EXECUTION_NOT_FOUND"),
    ("GET", "/api/v1/executions/abc", None, 404, "NOT_FOUND"),
    ("PATCH", "/api/v1/executions/999999999", {"status": "running"}, 404, "EXECUTION_NOT_FOUND"),
    ("PATCH", "/api/v1/executions/1", {"status": "exploded"}, 400, "VALIDATION_ERROR"),
    ("PATCH", "/api/v1/executions/1", {"action_ref": "x.y"}, 400, "VALIDATION_ERROR"),
    ("PATCH", "/api/v1/executions/1", {}, 400, "VALIDATION_ERROR"),
    # Found by the fuzzing: text PostgreSQL cannot store, and digits int() cannot read.
    ("POST", "/api/v1/executions", {"action_ref": "a\u0000b"}, 400, "INVALID_JSON"),
    ("POST", "/api/v1/executions", '{"action_ref": "x.y", "config": {"k": "\\ud800"}}', 400, "INVALID_JSON"),
    ("PATCH", "/api/v1/executions/1", {"result": {"deep": "\u0000"}}, 400, "INVALID_JSON"),
    ("GET", "/api/v1/executions?action_ref=a%00b", None, 400, "VALIDATION_ERROR"),
    ("GET", "/api/v1/executions?page=%C2%B2", None, 400, "VALIDATION_ERROR"),
    ("DELETE", "/api/v1/packs", None, 405, "METHOD_NOT_ALLOWED"),
    ("GET", "/no/such/page", None, 404, "NOT_FOUND"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), BAD_REQUESTS,
                         ids=[f"{m} {p} {s}" for m, p, _, s, _ in BAD_REQUESTS])
def test_bad_input_gets_json_error(api: Api, action: Any, method: str, path: str, body: Any,
                                   status: int, code: str) -> None:
    kwargs: dict[str, Any] = {}
    if isinstance(body, str):
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    _error(api.request(method, path, **kwargs), status, code)


@pytest.mark.parametrize("path", ["/api/v1/packs", "/api/v1/actions", "/api/v1/executions", "/auth/me",
                                  "/api/v1/executions/1"])
def test_rest_needs_access_token(server: Any, user: dict[str, Any], path: str) -> None:
    _error(requests.get(server.base_url + path, timeout=10), 401, "TOKEN_MISSING")
    expired = make_token(user["user"]["id"], expires_in=-5)
    _error(Api(server.base_url, expired).get(path), 401, "TOKEN_EXPIRED")
    # The stream's ?token= is for EventSource only; REST reads the header.
    _error(requests.get(server.base_url + path, params={"token": user["access_token"]}, timeout=10), 401,
           "TOKEN_MISSING")


def test_body_too_large(api: Api) -> None:
    """The session server's server.max_body_bytes is 4 MiB."""
    response = api.post("/api/v1/packs", data=b"{" + b" " * (5 * 1024 * 1024) + b"}",
                        headers={"Content-Type": "application/json"})
    _error(response, 413)
    assert api.post("/api/v1/packs", data=b"{" + b" " * (3 * 1024 * 1024) + b"}",
                    headers={"Content-Type": "application/json"}).status_code == 400, "under the limit: read"


def test_health_and_readiness(server: Any) -> None:
    assert requests.get(server.base_url + "/healthz", timeout=5).json()["data"]["status"] == "ok"
    ready = requests.get(server.base_url + "/readyz", timeout=5).json()["data"]
    assert ready["status"] == "ready"
    assert set(ready["feed"]) == {"position", "received", "filled", "flowing", "lag_seconds"}
    assert isinstance(ready["feed"]["position"], int) and ready["feed"]["flowing"] is True
    # One worker of the instance LISTENs for both; the one that answered is either.
    assert ready["relay"]["role"] in ("leader", "follower")
    if ready["relay"]["role"] == "leader":
        assert isinstance(ready["listener_backend_pid"], int)
        assert set(ready["listener"]) == {"position", "published", "caught_up", "skipped", "rejected", "reconnects",
                                          "lag_seconds"}
        assert ready["relay"]["followers"] == 1
    else:
        assert ready["listener"] is None and ready["listener_backend_pid"] is None
    assert set(ready["hub"]) == {"published", "delivered", "sent", "overflows", "subscribed_total"}


def test_cors_only_for_configured_origins(server: Any, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    stranger = requests.get(server.base_url + "/api/v1/packs", headers={**headers, "Origin": "http://evil.example"},
                            timeout=5)
    assert "Access-Control-Allow-Origin" not in stranger.headers
    friend = requests.get(server.base_url + "/api/v1/packs", headers={**headers, "Origin": "http://localhost:3000"},
                          timeout=5)
    assert friend.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


def _document_routes(server: Any) -> list[tuple[str, str]]:
    """(method, path with its parameters filled in) of every operation in the OpenAPI document."""
    document = requests.get(server.base_url + "/api/v1/openapi.json", timeout=5).json()
    return [(method.upper(), path.replace("{id}", "1").replace("{execution_id}", "1"))
            for path, operations in document["paths"].items() for method in operations
            if method in ("get", "post", "patch", "put", "delete")]


def test_cors_preflight_answers_on_every_route_of_the_document(server: Any) -> None:
    routes = _document_routes(server)
    assert len(routes) >= 12 and ("PATCH", "/api/v1/executions/1") in routes
    for method, path in routes:
        asked = {"Access-Control-Request-Method": method,
                 "Access-Control-Request-Headers": "authorization, content-type"}
        friend = requests.options(server.base_url + path, headers={**asked, "Origin": "http://localhost:3000"},
                                  timeout=5)
        assert friend.status_code == 204, (method, path, friend.status_code, friend.text)
        assert friend.headers["Access-Control-Allow-Origin"] == "http://localhost:3000", (method, path)
        assert method in friend.headers["Access-Control-Allow-Methods"].split(", "), (method, path)
        assert {"authorization", "content-type"} <= {h.strip().lower() for h in
                                                     friend.headers["Access-Control-Allow-Headers"].split(",")}
        assert "Origin" in friend.headers.get("Vary", ""), (method, path)
        stranger = requests.options(server.base_url + path, headers={**asked, "Origin": "http://evil.example"},
                                    timeout=5)
        assert stranger.status_code < 500 and "Access-Control-Allow-Origin" not in stranger.headers, (method, path)
        # OPTIONS without a preflight's header is Flask's own answer (the methods in Allow), never a 500.
        plain = requests.options(server.base_url + path, timeout=5)
        assert plain.status_code == 200 and method in plain.headers["Allow"], (method, path, plain.status_code)
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("digits", [20, 3000])
def test_ids_and_offsets_longer_than_19_digits_are_400(server: Any, api: Api, token: str, digits: int) -> None:
    """In the path and the query (gunicorn answers a request line past 4,094 bytes itself, with a 414)
    and in Last-Event-ID (up to 8,190 bytes a header: past the 4,300 digits Python converts)."""
    long = "9" * digits
    _error(api.get(f"/api/v1/executions/{long}"), 400, "VALIDATION_ERROR")
    _error(api.patch(f"/api/v1/executions/{long}", json={"status": "running"}), 400, "VALIDATION_ERROR")
    _error(api.get("/api/v1/executions", params={"page": long}), 400, "VALIDATION_ERROR")
    stream = server.base_url + "/api/v1/executions/stream"
    for params, headers in (({"execution_id": long}, {}), ({}, {"Last-Event-ID": "9" * 6000}),
                            ({"last_event_id": long}, {})):
        response = requests.get(stream, params={"token": token, **params}, headers=headers, timeout=10)
        _error(response, 400, "VALIDATION_ERROR")


def test_refs_ending_in_a_line_break_are_400(api: Api) -> None:
    body = _error(api.post("/api/v1/packs", json={"ref": "trailing\n"}), 400, "VALIDATION_ERROR")
    assert "ref" in body["error"]
    _error(api.post("/api/v1/actions", json={"ref": "test_sse_pack.run\n"}), 400, "VALIDATION_ERROR")
    _error(api.post("/api/v1/actions", json={"ref": "test_sse_pack\n.run"}), 400, "VALIDATION_ERROR")


def test_responses_with_tokens_or_data_are_not_stored_by_caches(server: Any, api: Api, token: str,
                                                                 user: dict[str, Any]) -> None:
    login = requests.post(server.base_url + "/auth/login", timeout=10,
                          json={"login": user["login"], "password": user["password"]})
    refused = requests.post(server.base_url + "/auth/login", json={"login": user["login"], "password": "no"},
                            timeout=10)
    for response in (login, refused, api.get("/auth/me"), api.get("/api/v1/packs"), api.get("/api/v1/executions"),
                     api.get("/api/v1/executions/999999999"), api.get("/api/v1/nothing-here")):
        assert response.headers["Cache-Control"] == "no-store", (response.url, response.status_code)
    stream = requests.get(server.base_url + "/api/v1/executions/stream", timeout=10, stream=True,
                          headers={"Authorization": f"Bearer {token}"})
    try:
        assert stream.headers["Cache-Control"] == "no-cache", "the stream keeps DESIGN.md's header"
    finally:
        stream.close()
