#!/usr/bin/env python3
"""Smoke test of a deployed attune-sse, as an operator runs it (requests + sseclient-py).

    scripts/smoke.py --url http://127.0.0.1:8080 --login alice --password '...'

Logs in, opens the execution stream, creates a pack, an action and an
execution through the API, moves the execution through its statuses, and checks
that each change arrives on the stream. Prints one line per step with its
timing, then PASS or FAIL; exits 0 on pass, 1 on fail, 2 if it could not run.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
import uuid
from typing import Any

import requests
import sseclient

STATUSES = ["scheduling", "scheduled", "running", "completed"]


class Failed(Exception):
    pass


def step(name: str, started: float) -> None:
    print(f"  ok   {name:<48} {1000 * (time.monotonic() - started):8.1f} ms", flush=True)


def one_line(text: str) -> str:
    return " ".join(text[:300].split())


def call(session: requests.Session, method: str, url: str, expect: int, **kwargs: Any) -> dict[str, Any]:
    response = session.request(method, url, timeout=10, **kwargs)
    if response.status_code != expect:
        raise Failed(f"{method} {url}: HTTP {response.status_code}, expected {expect}: {one_line(response.text)}")
    return response.json()


def run(url: str, login: str, password: str, timeout: float) -> None:
    session = requests.Session()
    t = time.monotonic()
    tokens = call(session, "POST", f"{url}/auth/login", 200, json={"login": login, "password": password})["data"]
    session.headers["Authorization"] = f"Bearer {tokens['access_token']}"
    step("log in", t)

    t = time.monotonic()
    stream = requests.get(f"{url}/api/v1/executions/stream", params={"token": tokens["access_token"]},
                          stream=True, timeout=(10, timeout + 30))
    if stream.status_code != 200:
        raise Failed(f"stream: HTTP {stream.status_code}: {one_line(stream.text)}")
    events: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for event in sseclient.SSEClient(stream).events():
                events.put((time.monotonic(), event))
        except Exception as exc:  # reported by the waiting step
            events.put((time.monotonic(), exc))

    threading.Thread(target=read, daemon=True).start()
    step(f"open the stream (worker {stream.headers.get('X-Attune-Worker', '?')})", t)

    suffix = uuid.uuid4().hex[:8]
    t = time.monotonic()
    pack = f"smoke_{suffix}"
    call(session, "POST", f"{url}/api/v1/packs", 201, json={"ref": pack})
    call(session, "POST", f"{url}/api/v1/actions", 201, json={"ref": f"{pack}.check"})
    step("create a pack and an action", t)
    t = time.monotonic()
    execution = call(session, "POST", f"{url}/api/v1/executions", 201,
                     json={"action_ref": f"{pack}.check", "config": {"smoke": True}})["data"]
    step(f"create execution {execution['id']}", t)
    wait_for(events, execution["id"], "requested", t, timeout)

    for status in STATUSES:
        body: dict[str, Any] = {"status": status}
        if status == "completed":
            body["result"] = {"smoke": "passed"}
        sent = time.monotonic()
        call(session, "PATCH", f"{url}/api/v1/executions/{execution['id']}", 200, json=body)
        wait_for(events, execution["id"], status, sent, timeout)
    # The stream is left to the process's exit: closing it from here would wait for the
    # reader thread's next read (up to a keep-alive interval).


def wait_for(events: queue.Queue, execution_id: int, status: str, sent: float, timeout: float) -> None:
    deadline = sent + timeout
    while True:
        try:
            arrived, event = events.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise Failed(f"no '{status}' event for execution {execution_id} within {timeout}s") from None
        if isinstance(event, Exception):
            raise Failed(f"the stream broke: {event!r}")
        data = json.loads(event.data).get("data", {})
        if data.get("id") == execution_id and data.get("status") == status:
            print(f"  ok   {'event ' + status + ' arrived (id ' + event.id + ')':<48} "
                  f"{1000 * (arrived - sent):8.1f} ms", flush=True)
            return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="base URL of the service")
    parser.add_argument("--login", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each event")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    print(f"attune-sse smoke test against {url}")
    started = time.monotonic()
    try:
        run(url, args.login, args.password, args.timeout)
    except Failed as exc:
        print(f"FAIL: {exc} ({time.monotonic() - started:.2f} s)")
        return 1
    except requests.RequestException as exc:
        print(f"FAIL: cannot reach {url}: {exc}")
        return 2
    print(f"PASS: login, stream, and {len(STATUSES) + 1} events in {time.monotonic() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
