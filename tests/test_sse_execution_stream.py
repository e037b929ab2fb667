"""The seed's five SSE tests, every one run in CI against a real server.

The original left three of these to manual runs against a hand-started API;
here the fixtures start PostgreSQL and gunicorn with gevent workers.
"""

from __future__ import annotations

import datetime as dt
import json
import select
import time
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import make_token
from helpers import wait_until


def _iso(value: str) -> dt.datetime:
    assert value.endswith("+00:00"), f"timestamps are UTC with an explicit offset: {value}"
    return dt.datetime.fromisoformat(value)


def _next_notification(conn: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not conn.notifies:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no notification within {timeout}s"
        select.select([conn], [], [], remaining)
        conn.poll()
    return conn.notifies.pop(0)


def test_postgresql_notify_trigger_fires(database: Any, db: Any, action: dict[str, Any]) -> None:
    listener = database.connect()
    try:
        with listener.cursor() as cur:
            cur.execute("LISTEN attune_notifications")

        with db.cursor() as cur:
            cur.execute(
                """INSERT INTO attune.execution (action, action_ref, config)
                   VALUES (%s, %s, '{"x": 1}') RETURNING id""",
                (action["id"], action["ref"]),
            )
            execution_id = cur.fetchone()[0]

        notify = _next_notification(listener)
        assert notify.channel == "attune_notifications"
        payload = json.loads(notify.payload)
        assert payload["entity_type"] == "execution"
        assert payload["entity_id"] == execution_id
        assert isinstance(payload["event_id"], int)
        _iso(payload["timestamp"])
        data = payload["data"]
        assert set(data) == {"id", "status", "action_id", "action_ref", "result", "created", "updated"}
        assert data["id"] == execution_id
        assert data["status"] == "requested"
        assert data["action_id"] == action["id"]
        assert data["action_ref"] == "test_sse_pack.test_action"
        assert data["result"] is None
        created = _iso(data["created"])
        assert _iso(data["updated"]) == created

        with db.cursor() as cur:
            cur.execute(
                """UPDATE attune.execution SET status = 'running', result = '{"progress": 50}'
                   WHERE id = %s""",
                (execution_id,),
            )
        second = json.loads(_next_notification(listener).payload)
        assert second["entity_id"] == execution_id
        assert second["event_id"] > payload["event_id"]
        assert second["data"]["status"] == "running"
        assert second["data"]["result"] == {"progress": 50}
        assert _iso(second["data"]["created"]) == created
        assert _iso(second["data"]["updated"]) > created, "the BEFORE UPDATE trigger sets updated"
        assert not listener.notifies, "one notification per change"
    finally:
        listener.close()


def test_sse_stream_receives_execution_updates(open_stream: Any, new_execution: Any, set_status: Any) -> None:
    execution_id = new_execution()
    stream = open_stream(execution_id=execution_id)

    set_status(execution_id, "running")
    set_status(execution_id, "completed")

    # The INSERT's own event may still reach the stream if the worker's listener
    # was a moment behind when the client subscribed; it is not one of the updates.
    events = [e for e in stream.events_until(lambda e: e["data"]["status"] == "completed")
              if e.json["data"]["status"] != "requested"]
    assert [e.json["data"]["status"] for e in events] == ["running", "completed"]
    for event in events:
        assert event.event == "message", "no event: field, so EventSource.onmessage gets it"
        assert event.json["entity_type"] == "execution"
        assert event.json["entity_id"] == execution_id
        assert event.json["data"]["id"] == execution_id
        assert event.id == str(event.json["event_id"])
    assert int(events[1].id) > int(events[0].id)


def test_sse_stream_filters_by_execution_id(open_stream: Any, new_execution: Any, set_status: Any) -> None:
    watched = new_execution()
    other = new_execution()
    stream = open_stream(execution_id=watched)

    set_status(other, "running")
    set_status(watched, "running")
    set_status(other, "completed")
    set_status(watched, "completed")

    # Events reach a worker in commit order, so once the watched execution's last
    # update has arrived, any leaked event of the other one would be here too.
    events = [e for e in stream.events_until(lambda e: e["data"]["status"] == "completed")
              if e.json["data"]["status"] != "requested"]
    assert [e.json["entity_id"] for e in events] == [watched, watched]
    assert [e.json["data"]["status"] for e in events] == ["running", "completed"]


def test_sse_stream_all_executions(open_stream: Any, new_execution: Any, set_status: Any) -> None:
    stream = open_stream()
    first = new_execution()
    second = new_execution()
    set_status(first, "running")
    set_status(second, "running")

    expected = [(first, "requested"), (second, "requested"), (first, "running"), (second, "running")]
    seen: list[tuple[int, str]] = []

    def ours(event: dict[str, Any]) -> bool:
        if event["entity_id"] in (first, second):
            seen.append((event["entity_id"], event["data"]["status"]))
        return seen == expected or len(seen) >= len(expected)

    stream.events_until(ours)
    assert seen == expected


@pytest.mark.parametrize(
    "case",
    ["no token", "malformed token", "expired token", "wrongly signed token", "refresh token",
     "bearer header with refresh token"],
)
def test_sse_stream_requires_authentication(server: Any, user: dict[str, Any], case: str) -> None:
    identity_id = user["user"]["id"]
    params: dict[str, str] = {}
    headers: dict[str, str] = {}
    if case == "malformed token":
        params["token"] = "not-a-jwt"
    elif case == "expired token":
        params["token"] = make_token(identity_id, expires_in=-10)
    elif case == "wrongly signed token":
        params["token"] = make_token(identity_id, secret="some-other-secret-of-enough-length!")
    elif case == "refresh token":
        params["token"] = user["refresh_token"]
    elif case == "bearer header with refresh token":
        headers["Authorization"] = f"Bearer {user['refresh_token']}"

    response = requests.get(
        server.base_url + "/api/v1/executions/stream", params=params, headers=headers, timeout=10, stream=True
    )
    try:
        assert response.status_code == 401
        assert response.headers["Content-Type"].startswith("application/json"), "no stream starts"
        body = response.json()
        assert set(body) == {"error", "code"}
        expected_code = {
            "no token": "TOKEN_MISSING", "expired token": "TOKEN_EXPIRED",
        }.get(case, "TOKEN_INVALID")
        assert body["code"] == expected_code
    finally:
        response.close()

    # The same identity with a valid access token does get a stream.
    ok = requests.get(server.base_url + "/api/v1/executions/stream",
                      params={"token": make_token(identity_id, key=user["key"])}, timeout=10, stream=True)
    try:
        assert ok.status_code == 200
        assert ok.headers["Content-Type"].startswith("text/event-stream")
    finally:
        ok.close()


def test_stream_response_headers(server: Any, token: str) -> None:
    response = requests.get(server.base_url + "/api/v1/executions/stream",
                            headers={"Authorization": f"Bearer {token}"}, timeout=10, stream=True)
    try:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        # Within a keep-alive period (1 s in the test config) a comment arrives.
        lines = response.iter_lines()
        deadline = time.monotonic() + 5
        seen = []
        while time.monotonic() < deadline:
            line = next(lines)
            seen.append(line)
            if line == b": keep-alive":
                break
        assert b": keep-alive" in seen, seen
        assert seen[0].startswith(b"id: ") and seen[1].startswith(b"retry: "), seen
    finally:
        response.close()


def test_stream_rejects_bad_execution_filter(server: Any, token: str) -> None:
    for value in ("abc", "0", "-3", "1.5", "99999999999999999999999"):
        response = requests.get(server.base_url + "/api/v1/executions/stream",
                                params={"token": token, "execution_id": value}, timeout=10)
        assert response.status_code == 400, value
        assert response.json()["code"] == "VALIDATION_ERROR"


def test_token_query_value_never_logged(server: Any, token: str) -> None:
    refused = '"GET /api/v1/executions/stream HTTP/1.1" 401'
    before = server.log().count(refused)
    for value in (token + "x", "leaked-secret-value"):
        requests.get(server.base_url + "/api/v1/executions/stream", params={"token": value}, timeout=10)
    wait_until(lambda: server.log().count(refused) >= before + 2, 5, "the access log lines")
    assert token not in server.log()
    assert "leaked-secret-value" not in server.log()


def test_sse_event_matches_database_row(open_stream: Any, new_execution: Any, db: Any) -> None:
    execution_id = new_execution()
    stream = open_stream(execution_id=execution_id)
    with db.cursor() as cur:
        cur.execute("UPDATE attune.execution SET status = 'failed', result = %s WHERE id = %s",
                    (json.dumps({"error": "boom", "lines": ["a\nb", 'q"uote', "ünïcode ✓"]}), execution_id))
        cur.execute("SELECT status::text, result, created, updated FROM attune.execution WHERE id = %s",
                    (execution_id,))
        status, result, created, updated = cur.fetchone()
    event = stream.events_until(lambda e: e["data"]["status"] == "failed")[-1].json
    assert event["data"]["status"] == status
    assert event["data"]["result"] == result
    assert _iso(event["data"]["created"]) == created
    assert _iso(event["data"]["updated"]) == updated


def test_large_result_reaches_every_client(open_stream: Any, new_execution: Any, api: Any) -> None:
    execution_id = new_execution()
    streams = [open_stream(execution_id=execution_id), open_stream()]
    big = {"log": "x" * 1_000_000, "lines": [f"line {i}\n\"quoted\" ✓" for i in range(1000)]}
    response = api.patch(f"/api/v1/executions/{execution_id}", json={"status": "completed", "result": big})
    assert response.status_code == 200, response.text
    for stream in streams:
        event = stream.events_until(
            lambda e: e["entity_id"] == execution_id and e["data"]["status"] == "completed")[-1]
        assert event.json["data"]["status"] == "completed"
        assert event.json["data"]["result"] == big
        assert "truncated" not in event.json


# What a client may send as its resume point or filter: any text, digits of any length (a Last-Event-ID
# header may be 8 KB long: past the 4,300 digits Python converts), numbers in and around the bigint range.
RESUME_INPUT = st.one_of(st.text(max_size=60), st.text(alphabet="0123456789", min_size=1, max_size=6000),
                         st.integers(min_value=-2, max_value=2**64).map(str))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(value=RESUME_INPUT, where=st.sampled_from(["Last-Event-ID", "last_event_id", "execution_id"]))
@example(value="9" * 5000, where="Last-Event-ID")
def test_fuzz_the_stream_s_resume_point_and_filter(server: Any, token: str, value: str, where: str) -> None:
    """Whatever comes as the resume point or the filter: a stream (200), or a JSON 400/404 before any byte
    of one; never a 500. (The schemathesis run of test_openapi leaves the stream out: it never ends.)"""
    params, headers = {"token": token}, {}
    if where == "Last-Event-ID":
        # A header value of visible ASCII: gunicorn answers other bytes itself, before the app sees them.
        headers[where] = "".join(c for c in value if " " < c <= "~") or "x"
    else:
        params[where] = value[:3000]  # a request line past 4,094 bytes gets gunicorn's own 414
    response = requests.get(server.base_url + "/api/v1/executions/stream", params=params, headers=headers,
                            timeout=10, stream=True)
    try:
        assert response.status_code in (200, 400, 404), (where, value[:50], response.status_code)
        if response.status_code != 200:
            assert response.json()["code"] in ("VALIDATION_ERROR", "EXECUTION_NOT_FOUND"), response.text
    finally:
        response.close()
