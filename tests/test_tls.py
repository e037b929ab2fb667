"""HTTPS: the stream over TLS, checked by a client that verifies the server's certificate."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from attune_sse.testing import ServerProcess
from conftest import make_token, server_config, token_key
from helpers import Stream, streams_on_every_worker, wait_until


@pytest.fixture
def tls_server(database: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    """A server with a throwaway self-signed certificate for 127.0.0.1, which the test's client trusts."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # requests verifies against it, and only it
    srv = ServerProcess(server_config(database, server={"certfile": str(cert), "keyfile": str(key)}),
                        tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()
        assert "Traceback" not in srv.log(), srv.log()[-3000:]


def test_streams_work_over_tls(tls_server: ServerProcess, new_execution: Any, set_status: Any) -> None:
    assert tls_server.base_url.startswith("https://")
    with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP is not spoken there
        requests.get(tls_server.base_url.replace("https", "http") + "/healthz", timeout=5)
    user = requests.post(tls_server.base_url + "/auth/register", timeout=10,
                         json={"login": "tls-user", "password": "correct horse battery"}).json()["data"]
    url = tls_server.base_url + "/api/v1/executions/stream"
    streams = streams_on_every_worker(lambda: Stream(url, {"token": user["access_token"]}), tls_server.workers)
    execution_id = new_execution()
    statuses = ["scheduling", "scheduled", "running", "completed"]
    for status in statuses:
        set_status(execution_id, status)
    for stream in streams:
        events = stream.events_until(lambda doc: doc["entity_id"] == execution_id
                                     and doc["data"]["status"] == "completed")
        assert [e.json["data"]["status"] for e in events if e.json["entity_id"] == execution_id][-4:] == statuses
    # Resume over TLS: what came after the first event, from the record.
    first = streams[0].received[0]  # the execution's insert (requested)
    resumed = Stream(url, {"token": user["access_token"], "last_event_id": first.id})
    events = resumed.events_until(lambda doc: doc["data"]["status"] == "completed")
    assert [e.json["data"]["status"] for e in events] == statuses

    # A stream the server ends (its token expires) says goodbye in TLS too, not in plain text.
    short = make_token(user["user"]["id"], expires_in=2, key=token_key(user["access_token"]))
    ending = requests.get(url, params={"token": short}, stream=True, timeout=10)
    body = b"".join(ending.iter_content(None))  # until the server closes it; raises on a TLS error
    assert b"event: token_expired" in body
    wait_until(lambda: requests.get(tls_server.base_url + "/readyz", timeout=5).status_code == 200, 5, "ready")
