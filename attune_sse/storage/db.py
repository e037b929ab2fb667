"""Database access: connection settings, a small pool, and the embedded server.

Under gunicorn's gevent worker, psycopg2 is made cooperative by psycogreen
(``make_psycopg2_green``), so every wait here yields to other greenlets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent.lock
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from attune_sse.config import Config
from attune_sse.errors import AttuneError, NotReady, one_line

log = logging.getLogger(__name__)

# libpq options that let a connection notice a peer that vanished without
# closing the socket: keepalives probe an idle socket, and tcp_user_timeout
# fails a send that the peer never acknowledges.
LIVENESS_OPTIONS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 8000,
}


def make_psycopg2_green() -> None:
    """Make psycopg2 wait through gevent, so a query never blocks a worker's hub."""
    if psycopg2.extensions.get_wait_callback() is None:
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()


def connect(url: str, *, application_name: str = "attune-sse", autocommit: bool = False) -> Any:
    """Open one connection with the liveness options and UTC timestamps."""
    conn = psycopg2.connect(url, application_name=application_name, **LIVENESS_OPTIONS)
    conn.autocommit = autocommit
    with conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
    if not autocommit:
        conn.commit()
    return conn


def require_cooperative() -> None:
    """Under gevent, psycopg2 must wait through gevent (psycogreen): else one query blocks every
    greenlet of the worker, streams and listener included. AttuneError, in one line, if it does not."""
    from gevent import monkey

    if monkey.is_module_patched("socket") and psycopg2.extensions.get_wait_callback() is None:
        raise AttuneError("psycopg2 is not cooperative under gevent: call attune_sse.storage.db.make_psycopg2_green() "
                          "after forking and before create_app() (gunicorn_conf's post_fork does)")


def service_url(config: Config) -> str:
    """The database URL the app uses. It never starts a database itself: with ``embedded``, the
    process that starts the service (attune-sse serve, gunicorn with attune_sse.serve.gunicorn_conf) has
    started it and put its URL in ATTUNE__DATABASE__URL."""
    url = config["database.url"]
    if url == "embedded":
        raise AttuneError("database.url is 'embedded', but no embedded server was started for this app: run "
                          "it with attune-sse serve (or gunicorn -c python:attune_sse.serve.gunicorn_conf), "
                          "which starts it")
    return url


def start_database(config: Config) -> tuple[str, Any]:
    """(url, embedded server or None); the server is started here when the config says embedded."""
    url = config["database.url"]
    if url != "embedded":
        return url, None
    from attune_sse.storage.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(config["database.data_dir"])
    server.start()
    server.create_database("attune")
    return server.url("attune"), server


@contextmanager
def database(config: Config) -> Iterator[str]:
    """The database URL for a one-off command; an embedded server started here is stopped after."""
    from attune_sse.storage.embedded import EmbeddedPostgres

    was_running = False
    if config["database.url"] == "embedded":
        was_running = EmbeddedPostgres(config["database.data_dir"]).is_running()
    url, server = start_database(config)
    try:
        yield url
    finally:
        if server is not None and not was_running:
            server.stop()


# Errors that are the deployment's state, not the request's fault: a 503 that names it, and one log line.
REFUSALS: dict[type[Exception], tuple[str, str]] = {
    psycopg2.errors.ReadOnlySqlTransaction: (
        "DATABASE_READ_ONLY",
        "The database is read-only (a standby, or default_transaction_read_only); nothing was changed; "
        "retry once it takes writes."),
    psycopg2.errors.InsufficientPrivilege: (
        "DATABASE_PERMISSION_DENIED",
        "The service's database role may not make this change (a privilege was revoked); nothing was "
        "changed; an operator must grant it again."),
}


class Pool:
    """A bounded set of connections, each lent to one request at a time."""

    def __init__(self, url: str, size: int, *, acquire_timeout: float = 10.0) -> None:
        self.url = url
        self.size = size
        self.acquire_timeout = acquire_timeout
        self._idle: list[Any] = []
        self._slots = gevent.lock.BoundedSemaphore(size)  # waiters wait as greenlets, in turn
        self._retired: set[int] = set()  # id() of lent connections to close when they come back
        # Why the last attempt to open a connection failed (the connection limit, say); None once one opens.
        self.connect_error: str | None = None

    @contextmanager
    def cursor(self, *, dict_rows: bool = True) -> Iterator[Any]:
        """A cursor inside one transaction: committed on success, rolled back on error."""
        if not self._slots.acquire(timeout=self.acquire_timeout):
            raise NotReady("All database connections are busy; retry shortly.", code="DATABASE_BUSY")
        conn = None
        try:
            conn = self._reuse_idle() or self._connect()
            try:
                factory = psycopg2.extras.RealDictCursor if dict_rows else None
                with conn.cursor(cursor_factory=factory) as cur:
                    yield cur
                conn.commit()
            except psycopg2.OperationalError as exc:
                log.error("database connection lost during a request: %s", str(exc).strip())
                conn.close()
                raise NotReady("The database connection was lost; retry shortly.", code="DATABASE_UNAVAILABLE") from exc
            except tuple(REFUSALS) as exc:
                conn.rollback()
                code, message = REFUSALS[type(exc)]
                log.error("the database refused a write (%s): %s", code, one_line(exc))
                raise NotReady(message, code=code) from None
            except BaseException:
                if not conn.closed:
                    conn.rollback()
                raise
        finally:
            if conn is not None and id(conn) in self._retired:
                self._retired.discard(id(conn))
                conn.close()
            elif conn is not None and not conn.closed:
                self._idle.append((conn, time.monotonic()))
            self._slots.release()

    def _connect(self) -> Any:
        try:
            conn = connect(self.url)
        except psycopg2.OperationalError as exc:
            self.connect_error = one_line(exc)
            log.error("database unreachable: %s", self.connect_error)
            raise NotReady("The database is unreachable; retry shortly.", code="DATABASE_UNAVAILABLE") from exc
        self.connect_error = None
        return conn

    def check(self, timeout: float, probe: str = "SELECT 1") -> None:
        """NotReady unless a request could get a working connection within ``timeout`` seconds, on which
        ``probe`` runs (a query of the tables the requests use: a role that lost its privileges fails it).

        An idle connection answering is not enough: when opening new ones fails
        (the server's connection limit reached, say), requests that need one fail
        while an idle one still answers. So after a failed open, the check opens
        a new connection itself (kept in the pool if it works).
        """
        if not self._slots.acquire(timeout=timeout):
            raise NotReady(f"All {self.size} database connections of this worker stayed busy for {timeout:g} s.",
                           code="DATABASE_BUSY")
        try:
            if self.connect_error is not None:
                try:
                    conn = self._connect()
                except NotReady:
                    raise NotReady(f"New database connections fail: {self.connect_error}.",
                                   code="DATABASE_UNAVAILABLE") from None
            else:
                conn = self._reuse_idle() or self._connect()
            try:
                with conn.cursor() as cur:
                    cur.execute(probe)
                conn.rollback()
            except tuple(REFUSALS) as exc:
                conn.rollback()
                self._idle.append((conn, time.monotonic()))
                raise NotReady(f"{REFUSALS[type(exc)][1]} ({one_line(exc)})", code=REFUSALS[type(exc)][0]) from None
            except psycopg2.Error as exc:
                conn.close()
                raise NotReady(f"The database does not answer: {one_line(exc)}.",
                               code="DATABASE_UNAVAILABLE") from None
            self._idle.append((conn, time.monotonic()))
        finally:
            self._slots.release()

    def retire(self, conn: Any) -> None:
        """Close this lent connection when it comes back instead of keeping it: libpq keeps a
        connection's input buffer as large as the largest row it has received."""
        self._retired.add(id(conn))

    def _reuse_idle(self) -> Any:
        """An idle connection that still answers, or None (dead ones are dropped).

        A connection idle for over a second is pinged first: after a database
        restart it would otherwise fail the request it was lent to.
        """
        while self._idle:
            conn, idle_since = self._idle.pop()
            if time.monotonic() - idle_since < 1.0:
                return conn
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                return conn
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                log.info("dropping a pooled connection the server closed")
                conn.close()
        return None

    def close(self) -> None:
        while self._idle:
            self._idle.pop()[0].close()
