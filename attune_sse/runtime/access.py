"""Who may do what: grants, permission sets, and each worker's view of them.

A grant, in upstream Attune's shape::

    {"resource": "executions", "actions": ["read", "create", "update"],
     "constraints": {"pack_refs": ["core"], "refs": ["core.local"]}}

``refs`` are action refs; a constraint that is absent does not constrain. An
identity may do what the union of its permission sets grants; one with no
assignment gets ``security.default_grants``. A grant list compiles to one
``Scope`` per (resource, action): hashable, so the hub groups the streams that
share one and filters each event batch once per group.

Each worker keeps the identities it has seen (``Principal``) in memory, so
no request queries the database for them. ``AccessControl.watch`` polls
``attune.access_generation`` (one row, moved by every change of access, in
commit order; see sql/20261128000001_add_permission_sets.sql): when it moves,
the cache is dropped and the identities with open streams are reloaded, and
the hub ends or narrows their streams.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gevent

from attune_sse.core.grants import Principal, compile_grants, parse_grants
from attune_sse.errors import NotReady
from attune_sse.storage.db import Pool

log = logging.getLogger(__name__)

# -- the per-worker view -------------------------------------------------------

_PRINCIPALS_SQL = """
    SELECT i.id, i.login, i.frozen, i.token_key::text AS token_key,
           EXISTS (SELECT 1 FROM attune.permission_assignment a WHERE a.identity = i.id) AS assigned,
           (SELECT coalesce(jsonb_agg(g), '[]'::jsonb)
              FROM attune.permission_assignment a
              JOIN attune.permission_set s ON s.id = a.permission_set,
                   jsonb_array_elements(s.grants) g
             WHERE a.identity = i.id) AS grants
      FROM attune.identity i
     WHERE i.id = ANY(%s)"""


def load_principals(cur: Any, identity_ids: list[int],
                    default_grants: list[dict[str, Any]]) -> dict[int, Principal]:
    """The principals of those ids that exist; a set's grants that do not parse grant nothing."""
    cur.execute(_PRINCIPALS_SQL, (identity_ids,))
    principals = {}
    for row in cur.fetchall():
        grants = row["grants"] if row["assigned"] else default_grants
        try:
            grants = parse_grants(grants)
        except ValueError as exc:
            log.error("identity %s: its permission sets hold an invalid grant (%s); it is granted nothing",
                      row["login"], exc)
            grants = []
        principals[row["id"]] = Principal(row["id"], row["login"], row["frozen"], compile_grants(grants),
                                      row["token_key"])
    return principals


def generation(cur: Any) -> int:
    cur.execute("SELECT generation FROM attune.access_generation")
    return cur.fetchone()["generation"]


class AccessControl:
    """This worker's cache of principals, dropped whenever access changes anywhere."""

    MAX_CACHED = 10_000

    def __init__(self, pool: Pool, default_grants: list[dict[str, Any]], refresh_seconds: float = 0.5,
                 watch_pool: Pool | None = None) -> None:
        self.pool = pool  # requests load the identities they meet here
        # The watcher's own connection: a busy REST pool must not delay a revocation.
        self.watch_pool = watch_pool or pool
        self.default_grants = default_grants
        self.refresh_seconds = refresh_seconds
        self.generation: int | None = None
        self.reloads = 0  # times the cache was dropped for a change
        self.applied: int | None = None  # the generation the open streams were last brought to (watch)
        self._cache: dict[int, Principal | None] = {}  # None: no such identity

    def principal(self, identity_id: int) -> Principal | None:
        """The identity (None if it does not exist), from the cache or, once, from the database."""
        if identity_id in self._cache:
            return self._cache[identity_id]
        return self._load([identity_id]).get(identity_id)

    def recheck(self, identity_id: int) -> dict[int, Principal | None]:
        """{identity: what it may do now}, for the hub to apply to a stream it just took on;
        {} when access changed while this looked (then the watcher applies the change,
        and a stale answer must not undo it)."""
        before = self.generation
        principal = self.principal(identity_id)
        return {identity_id: principal} if before is None or self.generation == before else {}

    def _load(self, identity_ids: list[int], pool: Pool | None = None) -> dict[int, Principal]:
        generation_before = self.generation
        with (pool or self.pool).cursor() as cur:
            if self.generation is None:
                self.generation = generation_before = generation(cur)
            found = load_principals(cur, identity_ids, self.default_grants)
        # A change seen while this read was under way: what it read may be older.
        if self.generation == generation_before:
            if len(self._cache) + len(identity_ids) > self.MAX_CACHED:
                self._cache.clear()
            for identity_id in identity_ids:
                self._cache[identity_id] = found.get(identity_id)
        return found

    def refresh(self) -> bool:
        """Poll the generation; on a change drop the cache and return True."""
        with self.watch_pool.cursor() as cur:
            current = generation(cur)
        if current == self.generation:
            return False
        changed = self.generation is not None
        self.generation = current
        self._cache.clear()
        if changed:
            self.reloads += 1
        return changed

    def watch(self, streams: Callable[[], list[int]],
              apply: Callable[[dict[int, Principal | None]], Any]) -> gevent.Greenlet:
        """Every ``refresh_seconds``: on a change, reload the identities that have open
        streams (``streams()``) and hand them to ``apply`` (the hub ends or narrows them);
        None for those that no longer exist. A stream that subscribes while this runs
        checks its own identity again (stream.py), so none slips between the two."""

        def run() -> None:
            while True:
                gevent.sleep(self.refresh_seconds)
                seen = self.generation
                try:
                    if not self.refresh():
                        self.applied = self.generation
                        continue
                    ids = streams()
                    found = self._load(ids, self.watch_pool) if ids else {}
                    principals = {identity: found.get(identity) for identity in ids}
                    log.info("access changed (generation %s): %d identities with streams reloaded",
                             self.generation, len(ids))
                    apply(principals)
                    self.applied = self.generation
                except NotReady as exc:
                    self._retry_from(seen)
                    log.warning("could not check for access changes (retrying): %s", exc.message)
                except Exception:
                    self._retry_from(seen)
                    log.exception("access watcher failed; retrying")

        return gevent.spawn(run)

    def stats(self) -> dict[str, Any]:
        return {"generation": self.generation, "applied": self.applied, "reloads": self.reloads}

    def _retry_from(self, seen: int | None) -> None:
        """A change seen but not applied to the streams: look at it again on the next poll."""
        if seen is not None and self.generation != seen:
            self.generation = seen
            self._cache.clear()
