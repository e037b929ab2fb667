"""The REST endpoints the UI and the smoke scripts use: packs, actions, executions.

Every endpoint acts for the token's identity (auth.current_principal) and
within its grants (access.py): lists hold only what it may read, and what it
may not read answers 404 as if it did not exist; an action it may not take on
something it may read answers 403.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from flask_jwt_extended import verify_jwt_in_request

from attune_sse.core.grants import Scope
from attune_sse.core.ids import MAX_BIGINT
from attune_sse.errors import Conflict, Forbidden, NotFound, Unprocessable
from attune_sse.http.auth import current_principal
from attune_sse.http.io import json_body, positive_int_arg
from attune_sse.http.state import state
from attune_sse.http.validation import invalid, is_pack_ref, optional_string, pack_of_action_ref, required_string
from attune_sse.storage import store

bp = Blueprint("api", __name__, url_prefix="/api/v1")

MAX_PAGE_SIZE = 500


@bp.before_request
def require_identity() -> None:
    """Every endpoint of this blueprint needs an access token of an identity that may act
    (but OPTIONS, which Flask answers itself and flask-jwt-extended lets through unverified)."""
    if request.method == "OPTIONS":
        return
    verify_jwt_in_request()
    current_principal()


def scope(resource: str, action: str) -> Scope:
    return current_principal().scope(resource, action)


def forbidden(what: str) -> Forbidden:
    return Forbidden(f"You may not {what}.", code="FORBIDDEN")


# -- packs ---------------------------------------------------------------------

@bp.get("/packs")
def list_packs() -> Any:
    readable = scope("packs", "read")
    with state().pool.cursor() as cur:
        packs = store.list_packs(cur)
    return jsonify({"data": [pack for pack in packs if readable.allows_pack(pack["ref"])]})


@bp.post("/packs")
def create_pack() -> Any:
    body = json_body()
    ref = required_string(body, "ref", max_length=100)
    if not is_pack_ref(ref):
        raise invalid("ref", "must match ^[a-z][a-z0-9_-]+$ (lower case, at least two characters)")
    if not scope("packs", "create").allows_pack(ref):
        raise forbidden(f"create pack '{ref}'")
    label = optional_string(body, "label", max_length=255) or ref
    description = optional_string(body, "description", max_length=10_000)
    version = optional_string(body, "version", max_length=50) or "0.1.0"
    with state().pool.cursor() as cur:
        pack = store.insert_pack(cur, ref, label, description, version)
    if pack is None:
        raise Conflict(f"Pack '{ref}' already exists.", code="PACK_EXISTS")
    return jsonify({"data": pack}), 201


# -- actions -------------------------------------------------------------------

@bp.get("/actions")
def list_actions() -> Any:
    pack_ref = request.args.get("pack_ref") or None
    readable = scope("actions", "read")
    with state().pool.cursor() as cur:
        actions = store.list_actions(cur, pack_ref)
    return jsonify({"data": [action for action in actions if readable.allows_action(action["ref"])]})


@bp.post("/actions")
def create_action() -> Any:
    body = json_body()
    ref = required_string(body, "ref", max_length=255)
    pack_part = pack_of_action_ref(ref)
    if pack_part is None:
        raise invalid("ref", "must look like 'pack.action' (for example test_sse_pack.test_action)")
    pack_ref = optional_string(body, "pack_ref", max_length=100) or pack_part
    if pack_ref != pack_part:
        raise invalid("pack_ref", f"must be the part of 'ref' before the first dot ({pack_part!r})")
    if not scope("actions", "create").allows_action(ref):
        raise forbidden(f"create action '{ref}'")
    label = optional_string(body, "label", max_length=255) or ref
    description = optional_string(body, "description", max_length=10_000)
    entrypoint = optional_string(body, "entrypoint", max_length=1000) or ""
    with state().pool.cursor() as cur:
        pack = store.pack_by_ref(cur, pack_ref)
        if pack is None:
            raise Unprocessable(f"Pack '{pack_ref}' does not exist; create it first.", code="PACK_NOT_FOUND")
        action = store.insert_action(cur, pack, ref, label, description, entrypoint)
    if action is None:
        raise Conflict(f"Action '{ref}' already exists.", code="ACTION_EXISTS")
    return jsonify({"data": action}), 201


# -- executions ----------------------------------------------------------------

def _status(value: Any, field: str = "status") -> str:
    if value not in store.EXECUTION_STATUSES:
        raise invalid(field, f"must be one of {', '.join(store.EXECUTION_STATUSES)}")
    return value


@bp.get("/executions")
def list_executions() -> Any:
    status = request.args.get("status") or None
    if status is not None:
        _status(status)
    action_ref = request.args.get("action_ref") or None
    page = positive_int_arg("page", 1, maximum=1_000_000)
    per_page = positive_int_arg("per_page", 50, maximum=MAX_PAGE_SIZE)
    with state().pool.cursor() as cur:
        rows, total = store.list_executions(
            cur, status=status, action_ref=action_ref, limit=per_page, offset=(page - 1) * per_page,
            visible=scope("executions", "read").sql("action_ref"),
        )
    return jsonify({"data": rows, "meta": {"page": page, "per_page": per_page, "total": total}})


def _not_found(execution_id: int) -> NotFound:
    return NotFound(f"Execution {execution_id} does not exist.", code="EXECUTION_NOT_FOUND")


@bp.get("/executions/<id:execution_id>")
def get_execution(execution_id: int) -> Any:
    if execution_id > MAX_BIGINT:
        raise _not_found(execution_id)
    with state().pool.cursor() as cur:
        execution = store.execution_by_id(cur, execution_id)
    if execution is None or not scope("executions", "read").allows_action(execution["action_ref"]):
        raise _not_found(execution_id)
    return jsonify({"data": execution})


@bp.post("/executions")
def create_execution() -> Any:
    body = json_body()
    action_ref = required_string(body, "action_ref", max_length=255)
    config = body.get("config")
    if config is not None and not isinstance(config, dict):
        raise invalid("config", "must be a JSON object or null")
    parent = body.get("parent")
    valid_parent = isinstance(parent, int) and not isinstance(parent, bool) and 1 <= parent <= MAX_BIGINT
    if parent is not None and not valid_parent:
        raise invalid("parent", "must be the id of an execution")
    principal = current_principal()
    with state().pool.cursor() as cur:
        action = store.action_by_ref(cur, action_ref)
        if action is None or not principal.scope("actions", "read").allows_action(action_ref):
            raise Unprocessable(f"Action '{action_ref}' does not exist.", code="ACTION_NOT_FOUND")
        if not principal.scope("executions", "create").allows_action(action_ref):
            raise forbidden(f"run action '{action_ref}'")
        parent_ref = store.action_ref_of(cur, parent) if parent is not None else None
        readable = principal.scope("executions", "read")
        if parent is not None and (parent_ref is None or not readable.allows_action(parent_ref)):
            raise Unprocessable(f"Parent execution {parent} does not exist.", code="EXECUTION_NOT_FOUND")
        execution = store.insert_execution(cur, action, config, principal.id, parent)
    return jsonify({"data": execution}), 201


@bp.patch("/executions/<id:execution_id>")
def update_execution(execution_id: int) -> Any:
    if execution_id > MAX_BIGINT:
        raise _not_found(execution_id)
    body = json_body()
    unknown = set(body) - {"status", "result"}
    if unknown:
        raise invalid(sorted(unknown)[0], "is not a field you can change (status, result)")
    if not body:
        raise invalid("status", "or 'result' is required")
    status = _status(body["status"]) if "status" in body else None
    changes: dict[str, Any] = {"status": status}
    if "result" in body:
        changes["result"] = body["result"]
    principal = current_principal()
    with state().pool.cursor() as cur:
        action_ref = store.action_ref_of(cur, execution_id, lock=True)
        if action_ref is None or not principal.scope("executions", "read").allows_action(action_ref):
            raise _not_found(execution_id)
        if not principal.scope("executions", "update").allows_action(action_ref):
            raise forbidden(f"change execution {execution_id}")
        execution = store.update_execution(cur, execution_id, **changes)
    return jsonify({"data": execution})
