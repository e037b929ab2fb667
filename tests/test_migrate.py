"""The migration runner against a real PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

import attune_sse
from attune_sse.errors import MigrationError
from attune_sse.storage.migrate import SQL_DIR, applied_migrations, apply_migrations, migration_files


@pytest.fixture
def scratch_url(database: Any) -> Iterator[str]:
    """A new, empty database on the test server."""
    name = f"attune_scratch_{uuid.uuid4().hex[:8]}"
    database.query(f'CREATE DATABASE "{name}"')
    base, _, _ = database.url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        database.query(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_files_apply_in_name_order_and_the_trigger_keeps_its_name() -> None:
    names = [p.name for p in migration_files()]
    assert names == sorted(names)
    assert "20260119000001_add_execution_notify_trigger.sql" in names


def test_applying_twice_is_a_no_op(scratch_url: str) -> None:
    first = apply_migrations(scratch_url)
    assert first == [p.name for p in migration_files()]
    assert apply_migrations(scratch_url) == []
    conn = psycopg2.connect(scratch_url)
    try:
        assert set(applied_migrations(conn)) == set(first)
    finally:
        conn.close()


def test_two_processes_starting_at_once_apply_each_file_once(scratch_url: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            barrier.wait()
            results.append(apply_migrations(scratch_url))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    applied = sorted(name for result in results for name in result)
    assert applied == sorted(p.name for p in migration_files()), "each file exactly once across all runners"


def test_a_failing_file_rolls_back_and_names_itself(scratch_url: str, tmp_path: Path) -> None:
    (tmp_path / "001_ok.sql").write_text("CREATE TABLE public.ok_table (id int);")
    (tmp_path / "002_bad.sql").write_text("CREATE TABLE public.half_done (id int); SELECT * FROM no_such_table;")
    with pytest.raises(MigrationError) as info:
        apply_migrations(scratch_url, tmp_path)
    assert info.value.filename == "002_bad.sql"
    conn = psycopg2.connect(scratch_url)
    try:
        assert set(applied_migrations(conn)) == {"001_ok.sql"}
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('public.half_done')")
            assert cur.fetchone()[0] is None, "the failed file left nothing behind"
    finally:
        conn.close()


def test_sql_dir_is_the_packaged_folder() -> None:
    """The migrations ship inside the package; the checkout's sql/ is a link to them."""
    assert Path(attune_sse.__file__).parent / "storage" / "sql" == SQL_DIR and SQL_DIR.is_dir()
    checkout_sql = Path(__file__).resolve().parent.parent / "sql"
    # The same migrations (under tox the package is an installed copy, not the checkout's folder).
    assert sorted(p.name for p in checkout_sql.glob("*.sql")) == sorted(p.name for p in SQL_DIR.glob("*.sql"))
    assert (checkout_sql / "20260119000001_add_execution_notify_trigger.sql").is_file()  # the seed's path
