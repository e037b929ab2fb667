"""The pool (storage/db.py) when the database refuses a write: a 503 that names why, never a 500.

A dedicated server connects as a role of its own, so its privileges and its
read-only setting can be changed without touching the other tests' role.
"""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from attune_sse.testing import ServerProcess
from conftest import running, server_config
from helpers import Api, wait_until

ROLE = "attune_sse_limited"


@pytest.fixture(scope="module")
def limited(database: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    password = uuid.uuid4().hex
    if not database.query("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)):
        database.query(f"CREATE ROLE {ROLE} LOGIN")
    database.query(f"ALTER ROLE {ROLE} PASSWORD %s", (password,))
    database.query(f"GRANT USAGE ON SCHEMA attune TO {ROLE}")
    database.query(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA attune TO {ROLE}")
    database.query(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA attune TO {ROLE}")
    url = urllib.parse.urlsplit(database.url)
    role_url = url._replace(netloc=f"{ROLE}:{password}@{url.hostname}:{url.port}").geturl()
    config = server_config(database, server={"workers": 1})
    config["database"].update(url=role_url, auto_migrate=False)
    try:
        with running(config, tmp_path_factory.mktemp("limited")) as srv:
            yield srv
    finally:
        database.query(f"ALTER ROLE {ROLE} CONNECTION LIMIT -1")
        database.query(f"ALTER ROLE {ROLE} RESET default_transaction_read_only")
        database.query(f"REVOKE ALL ON ALL TABLES IN SCHEMA attune FROM {ROLE}")
        database.query(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA attune FROM {ROLE}")
        database.query(f"REVOKE ALL ON SCHEMA attune FROM {ROLE}")


def _reconnect(database: Any) -> None:
    """End the role's connections: the pool opens new ones, with the role's settings as they are now."""
    database.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (ROLE,))


def test_a_write_the_database_refuses_is_a_503_that_names_why(limited: ServerProcess, database: Any,
                                                              new_execution: Any) -> None:
    login = requests.post(limited.base_url + "/auth/register", timeout=10,
                          json={"login": f"lim-{uuid.uuid4().hex[:8]}", "password": "correct horse battery"})
    assert login.status_code == 201, login.text
    api = Api(limited.base_url, login.json()["data"]["access_token"])
    execution_id = new_execution()
    assert api.patch(f"/api/v1/executions/{execution_id}", json={"status": "scheduled"}).status_code == 200

    # The role loses INSERT on the event record: the update and its event are rolled back together.
    database.query(f"REVOKE INSERT ON attune.execution_event FROM {ROLE}")
    try:
        refused = api.patch(f"/api/v1/executions/{execution_id}", json={"status": "running"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "DATABASE_PERMISSION_DENIED"
        ((status,),) = database.query("SELECT status FROM attune.execution WHERE id = %s", (execution_id,))
        assert status == "scheduled", "nothing was changed"
    finally:
        database.query(f"GRANT INSERT ON attune.execution_event TO {ROLE}")

    # The role loses USAGE on the schema: every request is refused, and so is /readyz.
    database.query(f"REVOKE USAGE ON SCHEMA attune FROM {ROLE}")
    try:
        ready = requests.get(limited.base_url + "/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["code"] == "DATABASE_PERMISSION_DENIED", ready.text
    finally:
        database.query(f"GRANT USAGE ON SCHEMA attune TO {ROLE}")
    assert requests.get(limited.base_url + "/readyz", timeout=5).status_code == 200

    # The database goes read-only for the role (as a standby would be).
    database.query(f"ALTER ROLE {ROLE} SET default_transaction_read_only = on")
    try:
        _reconnect(database)
        # (The first request may meet a connection the termination closed: 503 DATABASE_UNAVAILABLE.)
        codes = wait_until(lambda: [r.json()["code"] for r in [api.patch(f"/api/v1/executions/{execution_id}",
                                                                         json={"status": "running"})]
                                    if r.status_code == 503 and r.json()["code"] != "DATABASE_UNAVAILABLE"],
                           10, "the read-only answer", interval=0.2)
        assert codes == ["DATABASE_READ_ONLY"]
        created = api.post("/api/v1/packs", json={"ref": f"ro{uuid.uuid4().hex[:6]}"})
        assert created.status_code == 503 and created.json()["code"] == "DATABASE_READ_ONLY"
        assert api.get(f"/api/v1/executions/{execution_id}").status_code == 200, "reads still work"
    finally:
        database.query(f"ALTER ROLE {ROLE} RESET default_transaction_read_only")
        _reconnect(database)
    assert wait_until(lambda: api.patch(f"/api/v1/executions/{execution_id}",
                                        json={"status": "running"}).status_code == 200, 10, "writes again")
    log = limited.log()
    assert "Traceback" not in log
    assert log.count("the database refused a write (DATABASE_PERMISSION_DENIED)") == 1
    assert "the database refused a write (DATABASE_READ_ONLY)" in log


def test_readyz_says_not_ready_while_new_connections_are_refused(limited: ServerProcess, database: Any) -> None:
    """The role's connection limit reached: an idle pooled connection still answers, but requests that
    need a new one fail, so /readyz is 503 with the reason until connections open again."""
    login = requests.post(limited.base_url + "/auth/register", timeout=10,
                          json={"login": f"cap-{uuid.uuid4().hex[:8]}", "password": "correct horse battery"})
    api = Api(limited.base_url, login.json()["data"]["access_token"])
    assert requests.get(limited.base_url + "/readyz", timeout=5).status_code == 200
    ((held,),) = database.query("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (ROLE,))
    database.query(f"ALTER ROLE {ROLE} CONNECTION LIMIT {held}")
    try:
        # More requests at once than the pool has idle connections: some must open one, and cannot.
        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(lambda _: api.get("/api/v1/executions").status_code, range(24)))
        assert 503 in statuses, statuses
        ready = requests.get(limited.base_url + "/readyz", timeout=5)
        assert ready.status_code == 503, ready.text
        assert ready.json()["code"] == "DATABASE_UNAVAILABLE" and "too many connections" in ready.json()["error"]
    finally:
        database.query(f"ALTER ROLE {ROLE} CONNECTION LIMIT -1")
    wait_until(lambda: requests.get(limited.base_url + "/readyz", timeout=5).status_code == 200, 10,
               "ready once connections open again")
