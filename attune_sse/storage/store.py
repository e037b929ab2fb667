"""SQL for identities, packs, actions and executions; each function takes a cursor."""

from __future__ import annotations

import logging
from typing import Any

import psycopg2.errors
from psycopg2.extras import Json

from attune_sse.core import logins

EXECUTION_STATUSES = (
    "requested", "scheduling", "scheduled", "running", "completed",
    "failed", "canceling", "cancelled", "timeout", "abandoned",
)

Row = dict[str, Any]

log = logging.getLogger(__name__)

# -- identities ----------------------------------------------------------------

# An identity named by a login as given: the one stored with exactly that text, else the one whose
# login looks the same (login_key: the form core/logins.py compares logins in).
_ID_BY_LOGIN = """SELECT id FROM attune.identity WHERE login = %(login)s OR login_key = %(key)s
                   ORDER BY login = %(login)s DESC LIMIT 1"""
_BY_LOGIN = f"({_ID_BY_LOGIN})"


def _named(login: str) -> dict[str, Any]:
    return {"login": login, "key": logins.key_of(login)}


def identity_by_login(cur: Any, login: str) -> Row | None:
    cur.execute(f"SELECT * FROM attune.identity WHERE id = {_BY_LOGIN}", _named(login))
    return cur.fetchone()


def fill_login_keys(cur: Any, limit: int = 10_000) -> int:
    """Give the identities that have none their login_key (made before logins were compared so, or by
    another service); return how many got one. A login that looks like one already keyed keeps none
    and is logged: it is found by its exact text only, and no new look-alike of either can be made."""
    cur.execute("SELECT id, login FROM attune.identity WHERE login_key IS NULL ORDER BY id LIMIT %s", (limit,))
    filled = 0
    for row in cur.fetchall():
        identity_id, login = (row["id"], row["login"]) if isinstance(row, dict) else row
        key = logins.key_of(login)
        if key is None:
            continue  # the profile refuses it: nothing can look like it
        cur.execute("SAVEPOINT fill_login_key")
        try:
            cur.execute("UPDATE attune.identity SET login_key = %s WHERE id = %s AND login_key IS NULL",
                        (key, identity_id))
            filled += cur.rowcount
        except psycopg2.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT fill_login_key")
            log.warning("identity %s: its login %r looks like another identity's (as RFC 8265 compares "
                        "logins); it logs in by its exact login only", identity_id, login)
        cur.execute("RELEASE SAVEPOINT fill_login_key")
    return filled


def lock_login_pair(cur: Any, login: str, address: str) -> None:
    """Until the transaction ends, other logins of this pair wait here (their count comes after ours)."""
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))", (login, address))


PENDING_SECONDS = 30  # an attempt still pending after this counts as a failure (its worker died)


def recent_login_failures(cur: Any, login: str, address: str, window_seconds: int) -> tuple[int, int, float]:
    """(failed logins of this pair within the window, attempts of it being checked now,
    seconds until the oldest failure leaves the window)."""
    cur.execute(
        """SELECT count(*) FILTER (WHERE NOT in_flight) AS failures, count(*) FILTER (WHERE in_flight) AS checking,
                  coalesce(extract(epoch FROM min(at) + make_interval(secs => %s) - now()), 0) AS wait
           FROM (SELECT at, pending AND at > now() - make_interval(secs => %s) AS in_flight
                   FROM attune.login_failure
                  WHERE login = %s AND address = %s AND at > now() - make_interval(secs => %s)) recent""",
        (window_seconds, PENDING_SECONDS, login, address, window_seconds),
    )
    row = cur.fetchone()
    return int(row["failures"]), int(row["checking"]), float(row["wait"])


def begin_login_attempt(cur: Any, login: str, address: str, window_seconds: int) -> int:
    """Record an attempt as pending; its id. Rows older than the window go."""
    cur.execute("INSERT INTO attune.login_failure (login, address, pending) VALUES (%s, %s, true) RETURNING id",
                (login, address))
    attempt = cur.fetchone()["id"]
    cur.execute("DELETE FROM attune.login_failure WHERE at < now() - make_interval(secs => %s)",
                (window_seconds,))
    return attempt


def end_login_attempt(cur: Any, attempt: int, login: str, address: str, *, accepted: bool) -> None:
    """A wrong password: the attempt is a failure. A right one: it and the pair's failures go
    (attempts of others still being checked stay)."""
    if accepted:
        cur.execute("DELETE FROM attune.login_failure WHERE id = %s OR (login = %s AND address = %s AND NOT pending)",
                    (attempt, login, address))
    else:
        cur.execute("UPDATE attune.login_failure SET pending = false, at = now() WHERE id = %s", (attempt,))


def identity_by_id(cur: Any, identity_id: int) -> Row | None:
    cur.execute("SELECT * FROM attune.identity WHERE id = %s", (identity_id,))
    return cur.fetchone()


def insert_identity(cur: Any, login: str, display_name: str | None, password_hash: str) -> Row | None:
    """The new identity, or None when the login, or one that looks like it, is taken. ``login`` is in
    its stored form already (logins.enforce)."""
    fill_login_keys(cur)  # so that a look-alike of any login stored before is seen
    cur.execute(
        """INSERT INTO attune.identity (login, login_key, display_name, password_hash) VALUES (%s, %s, %s, %s)
           ON CONFLICT DO NOTHING RETURNING *""",
        (login, logins.key_of(login), display_name, password_hash),
    )
    return cur.fetchone()


def set_frozen(cur: Any, login: str, frozen: bool) -> bool:
    """Freeze or unfreeze; False when there is no such login."""
    cur.execute(f"UPDATE attune.identity SET frozen = %(frozen)s WHERE id = {_BY_LOGIN}",
                {**_named(login), "frozen": frozen})
    return cur.rowcount == 1


def delete_identity(cur: Any, login: str) -> bool:
    """Delete an identity (its executions stay, without an executor); False when there is no such login."""
    cur.execute(f"DELETE FROM attune.identity WHERE id = {_BY_LOGIN}", _named(login))
    return cur.rowcount == 1


# -- permission sets -----------------------------------------------------------


def upsert_permission_set(cur: Any, ref: str, label: str | None, grants: list[Any], *,
                          replace: bool = False) -> Row | None:
    """The new set (or the replaced one with ``replace``); None when the ref is taken."""
    conflict = ("DO UPDATE SET grants = EXCLUDED.grants, label = coalesce(EXCLUDED.label, permission_set.label)"
                if replace else "DO NOTHING")
    cur.execute(
        f"""INSERT INTO attune.permission_set (ref, label, grants) VALUES (%s, %s, %s)
            ON CONFLICT (ref) {conflict} RETURNING id, ref, label, grants""",
        (ref, label, Json(grants)),
    )
    return cur.fetchone()


def assign_permission_set(cur: Any, login: str, ref: str) -> str | None:
    """Assign; None on success (or if it was assigned already), else what is missing."""
    return _assignment(cur, login, ref, """
        INSERT INTO attune.permission_assignment (identity, permission_set) VALUES (%s, %s)
        ON CONFLICT DO NOTHING""")


def revoke_permission_set(cur: Any, login: str, ref: str) -> str | None:
    """Revoke; None on success, else what is missing."""
    problem = _assignment(cur, login, ref, """
        DELETE FROM attune.permission_assignment WHERE identity = %s AND permission_set = %s""")
    if problem is None and cur.rowcount == 0:
        return f"permission set {ref!r} is not assigned to {login!r}"
    return problem


def _assignment(cur: Any, login: str, ref: str, sql: str) -> str | None:
    """Run ``sql`` with (identity id, set id); ``cur`` gives plain tuples."""
    cur.execute(_ID_BY_LOGIN, _named(login))
    identity = cur.fetchone()
    if identity is None:
        return f"no identity {login!r}"
    cur.execute("SELECT id FROM attune.permission_set WHERE ref = %s", (ref,))
    permission_set = cur.fetchone()
    if permission_set is None:
        return f"no permission set {ref!r}; create it with: attune-sse permset create {ref} --grants JSON"
    cur.execute(sql, (identity[0], permission_set[0]))
    return None


# -- packs and actions ---------------------------------------------------------

_PACK_COLUMNS = "id, ref, label, description, version, created, updated"
_ACTION_COLUMNS = "id, ref, pack, pack_ref, label, description, entrypoint, created, updated"


def list_packs(cur: Any) -> list[Row]:
    cur.execute(f"SELECT {_PACK_COLUMNS} FROM attune.pack ORDER BY ref")
    return cur.fetchall()


def pack_by_ref(cur: Any, ref: str) -> Row | None:
    cur.execute(f"SELECT {_PACK_COLUMNS} FROM attune.pack WHERE ref = %s", (ref,))
    return cur.fetchone()


def insert_pack(cur: Any, ref: str, label: str, description: str | None, version: str) -> Row | None:
    """The new pack, or None when the ref is taken."""
    cur.execute(
        f"""INSERT INTO attune.pack (ref, label, description, version) VALUES (%s, %s, %s, %s)
            ON CONFLICT (ref) DO NOTHING RETURNING {_PACK_COLUMNS}""",
        (ref, label, description, version),
    )
    return cur.fetchone()


def list_actions(cur: Any, pack_ref: str | None = None) -> list[Row]:
    if pack_ref is None:
        cur.execute(f"SELECT {_ACTION_COLUMNS} FROM attune.action ORDER BY ref")
    else:
        cur.execute(f"SELECT {_ACTION_COLUMNS} FROM attune.action WHERE pack_ref = %s ORDER BY ref", (pack_ref,))
    return cur.fetchall()


def action_by_ref(cur: Any, ref: str) -> Row | None:
    cur.execute(f"SELECT {_ACTION_COLUMNS} FROM attune.action WHERE ref = %s", (ref,))
    return cur.fetchone()


def insert_action(cur: Any, pack: Row, ref: str, label: str, description: str | None,
                  entrypoint: str) -> Row | None:
    """The new action, or None when the ref is taken."""
    cur.execute(
        f"""INSERT INTO attune.action (ref, pack, pack_ref, label, description, entrypoint)
            VALUES (%s, %s, %s, %s, %s, %s)
            ON CONFLICT (ref) DO NOTHING RETURNING {_ACTION_COLUMNS}""",
        (ref, pack["id"], pack["ref"], label, description, entrypoint),
    )
    return cur.fetchone()


# -- executions ----------------------------------------------------------------

_EXECUTION_COLUMNS = (
    "id, action AS action_id, action_ref, config, parent, executor, status::text AS status, "
    "result, created, updated"
)


def list_executions(cur: Any, *, status: str | None, action_ref: str | None,
                    limit: int, offset: int,
                    visible: tuple[str, list[Any]] = ("true", [])) -> tuple[list[Row], int]:
    """A page of executions, newest first, and the total that match; ``visible`` is a
    condition (and its parameters) that limits both to what the caller may read."""
    where, params = [visible[0]], list(visible[1])
    if status is not None:
        where.append("status = %s::attune.execution_status_enum")
        params.append(status)
    if action_ref is not None:
        where.append("action_ref = %s")
        params.append(action_ref)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    cur.execute(f"SELECT count(*) AS total FROM attune.execution {clause}", params)
    total = cur.fetchone()["total"]
    cur.execute(
        f"SELECT {_EXECUTION_COLUMNS} FROM attune.execution {clause} ORDER BY id DESC LIMIT %s OFFSET %s",
        [*params, limit, offset],
    )
    return cur.fetchall(), total


def execution_by_id(cur: Any, execution_id: int) -> Row | None:
    cur.execute(f"SELECT {_EXECUTION_COLUMNS} FROM attune.execution WHERE id = %s", (execution_id,))
    return cur.fetchone()


def action_ref_of(cur: Any, execution_id: int, *, lock: bool = False) -> str | None:
    """The execution's action ref (who may see it depends on it), or None if there is no such
    execution; not the rest of the row, whose result may be megabytes. With ``lock``,
    the row is locked until the transaction ends."""
    cur.execute(f"SELECT action_ref FROM attune.execution WHERE id = %s{' FOR UPDATE' if lock else ''}",
                (execution_id,))
    row = cur.fetchone()
    return None if row is None else row["action_ref"]


def insert_execution(cur: Any, action: Row, config: Any, executor: int | None,
                     parent: int | None = None) -> Row:
    cur.execute(
        f"""INSERT INTO attune.execution (action, action_ref, config, executor, parent)
            VALUES (%s, %s, %s, %s, %s) RETURNING {_EXECUTION_COLUMNS}""",
        (action["id"], action["ref"], Json(config), executor, parent),
    )
    return cur.fetchone()


_UNSET = object()


def update_execution(cur: Any, execution_id: int, *, status: str | None = None,
                     result: Any = _UNSET) -> Row | None:
    """Change status and/or result; None when there is no such execution."""
    sets: list[str] = []
    params: list[str | Json] = []  # values for the placeholders of ``sets``
    if status is not None:
        sets.append("status = %s::attune.execution_status_enum")
        params.append(status)
    if result is not _UNSET:
        sets.append("result = %s")
        params.append(Json(result))
    cur.execute(
        f"UPDATE attune.execution SET {', '.join(sets)} WHERE id = %s RETURNING {_EXECUTION_COLUMNS}",
        [*params, execution_id],
    )
    return cur.fetchone()
