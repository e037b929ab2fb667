"""Pruning the event record on a schedule, and the ``prune`` settings."""

from __future__ import annotations

import logging

import gevent

from attune_sse.config import Config
from attune_sse.errors import NotReady
from attune_sse.storage import record
from attune_sse.storage.db import Pool

log = logging.getLogger(__name__)


def limits(config: Config) -> dict[str, int | None]:
    """The keyword arguments of ``record.prune`` the config asks for (0 means no limit)."""
    return {
        "max_age_seconds": config["events.retention_seconds"] or None,
        "keep_last": config["events.retention_count"] or None,
    }


def prune_now(pool: Pool, config: Config) -> tuple[int, int]:
    kwargs = limits(config)
    if not any(v is not None for v in kwargs.values()):
        return 0, 0
    with pool.cursor(dict_rows=False) as cur:
        return record.prune(cur, **kwargs)


def start_pruner(pool: Pool, config: Config) -> gevent.Greenlet | None:
    """A greenlet that prunes every ``events.prune_interval_seconds``; None when that is 0."""
    interval = config["events.prune_interval_seconds"]
    if not interval:
        return None

    def loop() -> None:
        while True:
            gevent.sleep(interval)
            try:
                deleted, horizon = prune_now(pool, config)
            except NotReady as exc:
                log.warning("pruning skipped: %s", exc.message)
                continue
            if deleted:
                log.info("pruned %d event(s); clients resuming from id <= %d get a reset", deleted, horizon)

    return gevent.spawn(loop)
