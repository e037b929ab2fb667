"""What every benchmark starts the same way: its database, the service on it, a token.

A benchmark is a short file of what it measures; it gets its database from
``database()`` (ATTUNE_BENCH_DATABASE_URL, or an embedded PostgreSQL of its
own, migrated, destroyed after), the service from ``attune()`` (gunicorn with
gevent workers, as the tests' ServerProcess runs it, with the benchmark's
settings over the common ones), and a token of an identity that may read
everything from ``register()``. The load comes from bench/loadclient.py
processes (scale.LoadClients), the writes from scale.Updater.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attune_sse.core.grants import ALL_GRANTS
from attune_sse.storage.embedded import EmbeddedPostgres
from attune_sse.storage.migrate import apply_migrations
from attune_sse.testing import ServerProcess

SECRET = "benchmark-secret-benchmark-secret-0123456789"


@contextmanager
def database(work: Path, settings: dict[str, str] | None = None, *,
             migrate: bool = True) -> Iterator[tuple[str, EmbeddedPostgres | None]]:
    """(URL, the embedded server or None) of the benchmark's database: ATTUNE_BENCH_DATABASE_URL,
    or a database ``attune_bench`` on an embedded PostgreSQL in ``work`` with ``settings``."""
    url = os.environ.get("ATTUNE_BENCH_DATABASE_URL")
    embedded = None
    if not url:
        embedded = EmbeddedPostgres(work / "pgdata", settings=settings or {})
        embedded.start()
        embedded.create_database("attune_bench")
        url = embedded.url("attune_bench")
    try:
        if migrate:
            apply_migrations(url)
        yield url, embedded
    finally:
        if embedded is not None:
            embedded.destroy()


def attune(database_url: str, work: Path, **sections: dict[str, Any]) -> ServerProcess:
    """The service on ``database_url``, started: 2 gevent workers, warnings only in its log, registration
    open, every identity may read everything; ``sections`` go over these, key by key."""
    config: dict[str, dict[str, Any]] = {
        "database": {"url": database_url, "pool_size": 5},
        "server": {"workers": 2, "worker_connections": 12000, "max_streams_per_identity": 20000},
        "security": {"jwt_secret": SECRET, "allow_registration": True, "default_grants": ALL_GRANTS},
        "log": {"level": "warn"},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return ServerProcess(config, work).start()


def register(base_url: str, login: str = "") -> str:
    """An access token of a new identity."""
    response = requests.post(base_url + "/auth/register",
                             json={"login": login or f"bench-{os.getpid()}", "password": "benchmark-pw"}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]["access_token"]
