"""Fixtures: a real PostgreSQL, a real gunicorn with gevent workers, and clients.

The database is an embedded cluster the session starts (and may stop and
restart), or the server named by ATTUNE_TEST_DATABASE_URL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import psycopg2
import pytest
import requests

from attune_sse.core.grants import ALL_GRANTS
from attune_sse.storage.embedded import EmbeddedPostgres, free_port
from attune_sse.storage.migrate import apply_migrations
from attune_sse.testing import ServerProcess, listener_pids
from helpers import OPEN_STREAMS, Api, Stream, wait_until

JWT_SECRET = "test-secret-for-testing-only-not-secure"
WORKERS = 2


class Database:
    """The test database: its URL, and the embedded server when there is one."""

    def __init__(self, url: str, embedded: EmbeddedPostgres | None) -> None:
        self.url = url
        self.embedded = embedded

    def connect(self) -> Any:
        conn = psycopg2.connect(self.url, application_name="attune-sse-tests")
        conn.autocommit = True
        return conn

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def listener_pids(self) -> set[int]:
        return listener_pids(self.url)


def _reset_schema(url: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP SCHEMA IF EXISTS attune CASCADE")
        cur.execute("DROP TABLE IF EXISTS public.attune_migration")
    conn.close()


@pytest.fixture(scope="session")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    external = os.environ.get("ATTUNE_TEST_DATABASE_URL")
    if external:
        _reset_schema(external)
        apply_migrations(external)
        yield Database(external, None)
        return
    # fsync off: a test cluster need not survive a power cut, and it is much faster.
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", settings={"fsync": "off"})
    server.start()
    server.create_database("attune_test")
    url = server.url("attune_test")
    apply_migrations(url)
    try:
        yield Database(url, server)
    finally:
        server.destroy()


@pytest.fixture
def db(database: Database) -> Iterator[Any]:
    """An autocommit connection for the test's own SQL."""
    conn = database.connect()
    try:
        yield conn
    finally:
        conn.close()


SECURITY_CONFIG = {
    "jwt_secret": JWT_SECRET, "jwt_access_expiration": 300,
    "jwt_refresh_expiration": 3600, "allow_registration": True,
    "default_grants": ALL_GRANTS,  # as config.test.yaml: identities with no permission set may do all
}


def server_config(database: Database, **sections: dict[str, Any]) -> dict[str, Any]:
    """The test server's config: fast keep-alives and reconnects, so faults show quickly."""
    config: dict[str, Any] = {
        "environment": "test",
        "database": {"url": database.url, "pool_size": 5},
        "server": {
            "workers": WORKERS, "sse_keepalive_seconds": 1, "graceful_timeout": 3,
            "cors_origins": ["http://localhost:3000"], "max_body_bytes": 4 * 1024 * 1024,
            # Tests open hundreds of streams of one identity; the cap is tested on a server of its own.
            "max_streams_per_identity": 10_000,
        },
        "security": SECURITY_CONFIG,
        "log": {"level": "info"},
        "listener": {"ping_interval": 1.0, "ping_timeout": 2.0, "reconnect_max_delay": 1.0},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


@contextlib.contextmanager
def running(config: dict[str, Any], folder: Any) -> Iterator[ServerProcess]:
    """A server of a test's (or a module's) own: started, then stopped; a traceback in its log fails."""
    srv = ServerProcess(config, folder).start()
    try:
        yield srv
    finally:
        srv.stop()
        assert "Traceback" not in srv.log(), srv.log()[-5000:]


@pytest.fixture
def start_server(tmp_path: Any) -> Iterator[Callable[[dict[str, Any]], ServerProcess]]:
    """Servers of a test's own: ``start_server(server_config(database, ...))`` starts one (``running``);
    each is stopped after the test, and a traceback in its log fails it."""
    with contextlib.ExitStack() as stack:
        yield lambda config: stack.enter_context(running(config, tmp_path))


@pytest.fixture
def config_file(database: Database, tmp_path: Any) -> str:
    """A config file for the attune-sse command, on the test database."""
    path = tmp_path / "cli.yaml"
    path.write_text(json.dumps({"database": {"url": database.url}, "security": {"jwt_secret": "s"},
                                "log": {"level": "warn"}}))
    return str(path)


@pytest.fixture(scope="session")
def server(database: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(server_config(database), tmp_path_factory.mktemp("server")).start()
    try:
        yield srv
    finally:
        srv.stop()
        log = srv.log()
        # A traceback in the server log is a bug even when every test passed.
        assert "Traceback" not in log, log[-5000:]


@pytest.fixture(scope="session")
def user(server: ServerProcess) -> dict[str, Any]:
    """A registered identity and its tokens."""
    login = f"tester-{uuid.uuid4().hex[:8]}"
    response = requests.post(
        server.base_url + "/auth/register",
        json={"login": login, "password": "correct horse battery", "display_name": "Tester"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    return {**data, "password": "correct horse battery", "login": login, "issued": time.monotonic(),
            "key": token_key(data["access_token"])}


@pytest.fixture
def token(user: dict[str, Any], server: ServerProcess) -> str:
    """The session identity's access token; refreshed (POST /auth/refresh) once it is two minutes old,
    so no test gets one that expires (300 s) under it, however long the suite runs."""
    if time.monotonic() - user["issued"] > 120:
        response = requests.post(server.base_url + "/auth/refresh", timeout=10,
                                 headers={"Authorization": f"Bearer {user['refresh_token']}"})
        assert response.status_code == 200, response.text
        user.update(access_token=response.json()["data"]["access_token"], issued=time.monotonic())
    return user["access_token"]


@pytest.fixture
def api(server: ServerProcess, token: str) -> Api:
    return Api(server.base_url, token)


def token_key(token: str) -> str:
    """The identity's token key that a token the server issued carries."""
    return jwt.decode(token, JWT_SECRET, algorithms=["HS256"])["key"]


def make_token(identity_id: int, *, secret: str = JWT_SECRET, token_type: str = "access",
               expires_in: int = 300, key: str | None = None) -> str:
    """A token minted outside the server, for the auth tests (``key``: the identity's token key, which
    a token must carry to be its own; ``user["key"]`` is the session identity's)."""
    now = dt.datetime.now(dt.timezone.utc)
    claims = {
        "sub": str(identity_id), "login": "x", "iat": now, "nbf": now,
        "exp": now + dt.timedelta(seconds=expires_in), "jti": uuid.uuid4().hex,
        "type": token_type, "token_type": token_type, "fresh": False, "key": key,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


@pytest.fixture
def action(db: Any) -> dict[str, Any]:
    """The seed's test pack and action."""
    with db.cursor() as cur:
        cur.execute(
            """INSERT INTO attune.pack (ref, label) VALUES ('test_sse_pack', 'Test SSE Pack')
               ON CONFLICT (ref) DO UPDATE SET label = EXCLUDED.label RETURNING id"""
        )
        pack_id = cur.fetchone()[0]
        cur.execute(
            """INSERT INTO attune.action (ref, pack, pack_ref, label, entrypoint)
               VALUES ('test_sse_pack.test_action', %s, 'test_sse_pack', 'Test Action', 'echo')
               ON CONFLICT (ref) DO UPDATE SET label = EXCLUDED.label RETURNING id""",
            (pack_id,),
        )
        return {"id": cur.fetchone()[0], "ref": "test_sse_pack.test_action", "pack_id": pack_id}


@pytest.fixture
def new_execution(db: Any, action: dict[str, Any]) -> Any:
    """A factory: insert an execution in SQL, as the executor service would, and return its id."""

    def create(status: str = "requested") -> int:
        with db.cursor() as cur:
            cur.execute(
                """INSERT INTO attune.execution (action, action_ref, config, status)
                   VALUES (%s, %s, '{}', %s) RETURNING id""",
                (action["id"], action["ref"], status),
            )
            return cur.fetchone()[0]

    return create


@pytest.fixture
def set_status(db: Any) -> Any:
    def update(execution_id: int, status: str) -> None:
        with db.cursor() as cur:
            cur.execute("UPDATE attune.execution SET status = %s WHERE id = %s", (status, execution_id))
            assert cur.rowcount == 1

    return update


@pytest.fixture
def open_stream(server: ServerProcess, token: str) -> Any:
    """A factory of SSE clients on the server (closed after the test by ``_close_leftover_streams``)."""

    def open_(**params: Any) -> Stream:
        params.setdefault("token", token)
        return Stream(server.base_url + "/api/v1/executions/stream", params)

    return open_


@pytest.fixture(autouse=True)
def _close_leftover_streams() -> Iterator[None]:
    """A failed test must not leave streams open for the next one to count."""
    yield
    while OPEN_STREAMS:
        OPEN_STREAMS.pop().close()


def pytest_report_header(config: pytest.Config) -> str:
    where = os.environ.get("ATTUNE_TEST_DATABASE_URL") or "an embedded PostgreSQL started by the suite"
    return f"attune-sse tests against {where}; gunicorn with {WORKERS} gevent workers"


@pytest.fixture
def redis_server(tmp_path: Any) -> Iterator[dict[str, Any]]:
    """A redis-server of the test's own, without persistence; ``restart()`` stops and starts it on its port."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(tmp_path), "--logfile", str(tmp_path / "redis.log")]
    state: dict[str, Any] = {"url": f"redis://127.0.0.1:{port}/0"}

    def start() -> None:
        state["process"] = subprocess.Popen(command)
        wait_until(lambda: _answers(port), 10, "redis-server to answer")

    def stop() -> None:
        state["process"].send_signal(signal.SIGTERM)
        state["process"].wait(10)

    state["restart"] = lambda down: (stop(), time.sleep(down), start())
    start()
    yield state
    stop()


def _answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False
