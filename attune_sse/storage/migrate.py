"""Apply the plain SQL files of ``sql/`` in file-name order, each once.

Each file runs in its own transaction together with the row that records it in
``public.attune_migration``. An advisory lock, held for the whole run, makes a
second process that starts at the same time wait and then find nothing to do.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import psycopg2

from attune_sse.errors import MigrationError

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent / "sql"  # package data (the checkout's sql/ links here)
# Any constant works; this one spells "attune" in ASCII.
LOCK_KEY = 0x61747475_6E65

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS public.attune_migration (
    filename   text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def migration_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    """The migration files, in the order they apply."""
    if not sql_dir.is_dir():
        raise MigrationError(str(sql_dir), "the migrations folder is missing; reinstall attune-sse")
    return sorted(sql_dir.glob("*.sql"))


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def applied_migrations(conn: Any) -> dict[str, str]:
    """filename -> checksum of what this database has applied."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.attune_migration')")
        if cur.fetchone()[0] is None:
            return {}
        cur.execute("SELECT filename, checksum FROM public.attune_migration")
        return dict(cur.fetchall())


def apply_migrations(url: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply what is not applied yet; return the names of the files applied now."""
    files = migration_files(sql_dir)
    conn = psycopg2.connect(url, application_name="attune-sse-migrate", connect_timeout=10)
    applied_now: list[str] = []
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            cur.execute(_CREATE_TABLE)
        try:
            done = applied_migrations(conn)
            for path in files:
                if path.name in done:
                    if done[path.name] != _checksum(path):
                        log.warning("migration %s changed after it was applied; not applying it again", path.name)
                    continue
                _apply_one(conn, path)
                applied_now.append(path.name)
        finally:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    finally:
        conn.close()
    if applied_now:
        log.info("applied %d migration(s): %s", len(applied_now), ", ".join(applied_now))
    else:
        log.info("database schema is up to date (%d migrations)", len(files))
    return applied_now


def migrate_database(url: str) -> list[str]:
    """What the service and its commands do before they use a database: apply sql/, then key the
    logins that have no key yet; return the names of the files applied now."""
    applied = apply_migrations(url)
    key_logins(url)
    return applied


def key_logins(url: str) -> int:
    """After the migrations: the identities stored without a login_key get one (store.fill_login_keys);
    return how many did."""
    from attune_sse.storage import store

    conn = psycopg2.connect(url, application_name="attune-sse-migrate", connect_timeout=10)
    try:
        with conn, conn.cursor() as cur:
            filled = store.fill_login_keys(cur)
    finally:
        conn.close()
    if filled:
        log.info("gave %d identities made before logins were compared by RFC 8265 their login key", filled)
    return filled


def _apply_one(conn: Any, path: Path) -> None:
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute(path.read_text(encoding="utf-8"))
            cur.execute(
                "INSERT INTO public.attune_migration (filename, checksum) VALUES (%s, %s)",
                (path.name, _checksum(path)),
            )
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        raise MigrationError(path.name, str(exc).strip().splitlines()[0]) from exc
    finally:
        conn.autocommit = True
