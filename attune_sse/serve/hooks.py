"""gunicorn hooks: what the master and each worker do around the app.

Kept out of ``gunicorn.conf.py`` so the hooks are plain, importable code.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from gunicorn.glogging import Logger

from attune_sse.config import ENV_PREFIX, RELAY_DIR_ENV, Config, check_production, load_config, log_level_name
from attune_sse.storage.db import make_psycopg2_green, start_database
from attune_sse.storage.migrate import migrate_database

if TYPE_CHECKING:
    from gunicorn.glogging import _AtomsDict  # types-gunicorn's (type_check_only): what atoms() returns

log = logging.getLogger(__name__)

_URL_ENV = ENV_PREFIX + "DATABASE__URL"
# The master's embedded server, from on_starting to on_exit (hooks get no place of their own for it).
_embedded: dict[str, Any] = {}
# Set in on_starting, before any worker imports prometheus_client (see metrics.py).
_METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Folders the master made and removes on exit: metrics ("owned"), relay.
_folders: dict[str, Path] = {}


def _escape(text: str) -> str:
    """Log-safe text: control characters, quotes, backslashes and non-ASCII as \\xNN escapes, so a
    request cannot write a line of its own into the log (a path may hold any decoded byte)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in text)


class AccessLogger(Logger):
    """gunicorn's logger with every request-supplied value of the access line escaped."""

    def atoms(self, resp: Any, req: Any, environ: MutableMapping[str, Any], request_time: Any) -> _AtomsDict:
        # The same keys, and each value of the same type (a str stays a str): gunicorn's atoms, escaped.
        return cast("_AtomsDict", {key: _escape(value) if isinstance(value, str) else value
                                   for key, value in super().atoms(resp, req, environ, request_time).items()})


def logging_config(config: Config) -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: our loggers beside gunicorn's, on stderr, with the pid."""
    level = log_level_name(config)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stdout"},
        },
        "root": {"level": "WARNING", "handlers": ["stderr"]},
        "loggers": {
            "attune_sse": {"level": level, "handlers": ["stderr"], "propagate": False},
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        },
    }


def on_starting(server: Any) -> None:
    """Master, before any worker: file limits, metrics folder, embedded database, migrations."""
    config = load_config()
    check_production(config)
    _raise_open_file_limit(config["server.worker_connections"])
    _prepare_folders()
    # The instance's relay folder: its workers elect the one that LISTENs for all (runtime/election.py).
    relay_dir = tempfile.mkdtemp(prefix="attune-sse-relay-")
    _folders["relay"] = Path(relay_dir)
    os.environ[RELAY_DIR_ENV] = relay_dir
    if config["database.url"] == "embedded":
        # Printed whatever the log level: a first start takes a few seconds.
        print(f"attune-sse: starting the embedded PostgreSQL in {config['database.data_dir']}...",
              file=sys.stderr, flush=True)
    url, embedded = start_database(config)
    if embedded is not None:
        _embedded["server"] = embedded
        # Workers read the resolved URL, not 'embedded', through the environment.
        os.environ[_URL_ENV] = url
        log.info("using the embedded PostgreSQL on 127.0.0.1:%s (data and password in %s)", embedded.port,
                 embedded.data_dir)
    if config["database.auto_migrate"]:
        migrate_database(url)


def when_ready(server: Any) -> None:
    # Printed whatever the log level: it is the line a person starting the service looks for.
    for address in server.cfg.bind:
        print(
            f"attune-sse is listening on http://{address}/ "
            f"(stream: http://{address}/api/v1/executions/stream?token=...)",
            file=sys.stderr, flush=True,
        )


def on_exit(server: Any) -> None:
    embedded = _embedded.pop("server", None)
    if embedded is not None:
        embedded.stop()
    for folder in (_folders.pop("owned", None), _folders.pop("relay", None)):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def child_exit(server: Any, worker: Any) -> None:
    """Master, a worker has exited: its live gauges (open streams...) leave /metrics."""
    from attune_sse.runtime.metrics import worker_exited

    worker_exited(worker.pid)


def _raise_open_file_limit(connections: int) -> None:
    """Every stream is a socket: lift the soft open-file limit toward worker_connections (and some
    room for database connections, log files and the like)."""
    wanted = connections + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open-file limit is %d, below server.worker_connections (%d): raise it (ulimit -n) "
                    "or a worker will refuse streams", soft, connections)


def _prepare_folders() -> None:
    """prometheus_client's multiprocess folder: the operator's (emptied) or a private one."""
    given = os.environ.get(_METRICS_ENV)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):  # what a previous run left would be summed in
            stale.unlink()
    else:
        folder = Path(tempfile.mkdtemp(prefix="attune-sse-metrics-"))
        _folders["owned"] = folder
        os.environ[_METRICS_ENV] = str(folder)


def post_fork(server: Any, worker: Any) -> None:
    """Worker, right after fork: psycopg2 must wait through gevent, never block the hub."""
    make_psycopg2_green()
    _give_large_blocks_back()


# glibc's mallopt parameter, and the size from which a block gets a mapping of its own.
_M_MMAP_THRESHOLD = -3
_LARGE_BLOCK = 512 * 1024


def _give_large_blocks_back() -> None:
    """Keep every block of 512 KiB or more in its own mapping, returned to the system when freed.

    By default glibc raises that threshold each time such a block is freed, so
    the next large ones (the frames of a megabyte result, a resume's pages) come
    from the heap and stay resident after they are freed: a worker that served
    one burst of large results would keep its peak for good.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("not glibc: large blocks are returned to the system as its allocator does")
        return
    if not mallopt(_M_MMAP_THRESHOLD, _LARGE_BLOCK):
        log.warning("mallopt(M_MMAP_THRESHOLD) refused; a worker may keep the memory of large results")


def post_worker_init(worker: Any) -> None:
    """Worker, app loaded: end every stream as soon as the worker is told to stop."""
    import ssl

    import gevent

    if worker.cfg.is_ssl:
        # A client that fails the TLS handshake (plain HTTP sent to the HTTPS port, say) is the
        # client's error: gevent would print a traceback for each; it only closes the socket now.
        hub = gevent.get_hub()
        hub.NOT_ERROR = (*hub.NOT_ERROR, ssl.SSLError)

    _keep_listener_names(worker)
    app_state = worker.wsgi.extensions["attune_sse"]

    def end_streams_on_shutdown() -> None:
        while worker.alive:
            gevent.sleep(0.1)
        ended = app_state.shutdown()
        log.info("worker %s stopping: ended %d stream(s)", worker.pid, ended)

    gevent.spawn(end_streams_on_shutdown)


class _Listening:
    """A worker's listening socket whose name outlives its close."""

    __slots__ = ("_name", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._name = sock.getsockname()

    def getsockname(self) -> Any:
        return self._name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _keep_listener_names(worker: Any) -> None:
    """A connection accepted just before its worker was told to stop is served, not reset.

    A stopping gevent worker closes its listening sockets first, then serves the connections it
    has. gunicorn asks the listening socket for its name as it starts to serve each connection
    (``AsyncWorker.handle``): for one accepted a moment before the close, that raises EBADF, and
    gunicorn logs a traceback and closes the connection with its request unread (the client gets
    a connection reset; a PATCH is not applied). Seen under load during SIGHUP. Each handler is
    given the socket with its name read now, while it is open.
    """
    named = {id(sock): _Listening(sock) for sock in worker.sockets}
    handle = worker.handle

    def handle_named(listener: Any, client: Any, addr: Any) -> Any:
        return handle(named.get(id(listener), listener), client, addr)

    worker.handle = handle_named

