"""Grants and what they allow: pure values, no database (the per-worker cache is runtime/access.py).

A grant, in upstream Attune's shape::

    {"resource": "executions", "actions": ["read", "create", "update"],
     "constraints": {"pack_refs": ["core"], "refs": ["core.local"]}}

``refs`` are action refs; a constraint that is absent does not constrain. An
identity may do what the union of its permission sets grants. A grant list
compiles to one ``Scope`` per (resource, action): hashable, so the hub groups
the streams that share one and filters each event batch once per group.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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
    key: str | None = None  # the identity's token key: tokens of another identity with this id carry another

    def issued_to(self, key: object) -> bool:
        """Whether a token that carries ``key`` was issued to this identity (and not to one whose id it took)."""
        return self.key is not None and key == self.key

    def scope(self, resource: str, action: str) -> Scope:
        return self.scopes.get((resource, action), NOTHING)
