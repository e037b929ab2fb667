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

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import gevent

from .db import Pool
from .errors import NotReady

log = logging.getLogger(__name__)

RESOURCES: dict[str, tuple[str, ...]] = {
    "executions": ("read", "create", "update"),
    "packs": ("read", "create"),
    "actions": ("read", "create"),
}
CONSTRAINTS = ("pack_refs", "refs")
ALL_GRANTS: list[dict[str, Any]] = [{"resource": r, "actions": list(a)} for r, a in RESOURCES.items()]
ADMIN_SET = "core.admin"  # the permission set ``attune-sse user create --admin`` assigns

# -- grants --------------------------------------------------------------------


def parse_grants(value: Any) -> list[dict[str, Any]]:
    """A validated grant list (from JSON text or parsed), or ValueError saying what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"grants are not valid JSON: {exc}") from None
    if not isinstance(value, list):
        raise ValueError("grants must be a JSON list of grant objects")
    for n, grant in enumerate(value, 1):
        where = f"grant {n}"
        if not isinstance(grant, dict):
            raise ValueError(f"{where} must be an object")
        unknown = set(grant) - {"resource", "actions", "constraints"}
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r} (resource, actions, constraints)")
        resource = grant.get("resource")
        if resource not in RESOURCES:
            raise ValueError(f"{where}: 'resource' must be one of {', '.join(RESOURCES)}")
        actions = grant.get("actions")
        allowed = RESOURCES[resource]
        if not isinstance(actions, list) or not actions or any(a not in allowed for a in actions):
            raise ValueError(f"{where}: 'actions' must be a non-empty list of {', '.join(allowed)}")
        constraints = grant.get("constraints")
        if constraints is not None and not isinstance(constraints, dict):
            # [] or false would read as "no constraint", which grants everything: refused, not guessed.
            raise ValueError(f"{where}: 'constraints' must be an object (or left out for no constraint)")
        constraints = constraints or {}
        if set(constraints) - set(CONSTRAINTS):
            raise ValueError(f"{where}: 'constraints' may hold only {' and '.join(CONSTRAINTS)}")
        for key, refs in constraints.items():
            if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"{where}: constraint {key!r} must be a list of strings")
    return value


def _pack_of(action_ref: str) -> str:
    return action_ref.split(".", 1)[0]


@dataclass(frozen=True)
class Rule:
    """Objects one grant covers: None = no constraint."""

    pack_refs: frozenset[str] | None = None
    refs: frozenset[str] | None = None

    def covers_action(self, action_ref: str) -> bool:
        return ((self.pack_refs is None or _pack_of(action_ref) in self.pack_refs)
                and (self.refs is None or action_ref in self.refs))

    def covers_pack(self, pack_ref: str) -> bool:
        """A pack is covered when it may be, and when an action of it is (a ``refs`` constraint)."""
        return ((self.pack_refs is None or pack_ref in self.pack_refs)
                and (self.refs is None or any(_pack_of(r) == pack_ref for r in self.refs)))


@dataclass(frozen=True)
class Scope:
    """What one (resource, action) pair allows: everything, nothing, or what a rule covers."""

    everything: bool = False
    rules: frozenset[Rule] = frozenset()

    def allows_action(self, action_ref: str) -> bool:
        """For executions and actions: by the action's ref."""
        return self.everything or any(rule.covers_action(action_ref) for rule in self.rules)

    def allows_pack(self, pack_ref: str) -> bool:
        return self.everything or any(rule.covers_pack(pack_ref) for rule in self.rules)

    def sql(self, column: str) -> tuple[str, list[Any]]:
        """A WHERE condition on an action-ref column: rows this scope allows."""
        if self.everything:
            return "true", []
        if not self.rules:
            return "false", []
        terms, params = [], []
        for rule in sorted(self.rules, key=repr):  # the same text for the same scope: one plan
            parts = []
            if rule.pack_refs is not None:
                parts.append(f"split_part({column}, '.', 1) = ANY(%s)")
                params.append(sorted(rule.pack_refs))
            if rule.refs is not None:
                parts.append(f"{column} = ANY(%s)")
                params.append(sorted(rule.refs))
            terms.append("(" + " AND ".join(parts or ["true"]) + ")")
        return "(" + " OR ".join(terms) + ")", params

    def filter(self, events: list[Any]) -> list[Any]:
        """The events (with ``action_ref``) this scope allows, the same list when it allows all."""
        if self.everything:
            return events
        seen: dict[str, bool] = {}
        kept = []
        for event in events:
            ok = seen.get(event.action_ref)
            if ok is None:
                ok = seen[event.action_ref] = self.allows_action(event.action_ref)
            if ok:
                kept.append(event)
        return kept if len(kept) < len(events) else events


EVERYTHING = Scope(everything=True)
NOTHING = Scope()


def compile_grants(grants: Iterable[dict[str, Any]]) -> dict[tuple[str, str], Scope]:
    """(resource, action) -> Scope, the union of the grants."""
    rules: dict[tuple[str, str], set[Rule]] = {}
    everything: set[tuple[str, str]] = set()
    for grant in grants:
        constraints = grant.get("constraints") or {}
        rule = Rule(*(frozenset(constraints[k]) if k in constraints else None for k in CONSTRAINTS))
        for action in grant["actions"]:
            key = (grant["resource"], action)
            if rule == Rule():
                everything.add(key)
            else:
                rules.setdefault(key, set()).add(rule)
    scopes = {key: EVERYTHING for key in everything}
    for key, found in rules.items():
        scopes.setdefault(key, Scope(rules=frozenset(found)))
    return scopes


@dataclass(frozen=True)
class Principal:
    """An identity as this worker knows it: who, whether frozen, what it may do."""

    id: int
    login: str
    frozen: bool
    scopes: dict[tuple[str, str], Scope]

    def scope(self, resource: str, action: str) -> Scope:
        return self.scopes.get((resource, action), NOTHING)


# -- the per-worker view -------------------------------------------------------

_PRINCIPALS_SQL = """
    SELECT i.id, i.login, i.frozen,
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
        principals[row["id"]] = Principal(row["id"], row["login"], row["frozen"], compile_grants(grants))
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
                        continue
                    ids = streams()
                    found = self._load(ids, self.watch_pool) if ids else {}
                    principals = {identity: found.get(identity) for identity in ids}
                    log.info("access changed (generation %s): %d identities with streams reloaded",
                             self.generation, len(ids))
                    apply(principals)
                except NotReady as exc:
                    self._retry_from(seen)
                    log.warning("could not check for access changes (retrying): %s", exc.message)
                except Exception:
                    self._retry_from(seen)
                    log.exception("access watcher failed; retrying")

        return gevent.spawn(run)

    def _retry_from(self, seen: int | None) -> None:
        """A change seen but not applied to the streams: look at it again on the next poll."""
        if seen is not None and self.generation != seen:
            self.generation = seen
            self._cache.clear()
