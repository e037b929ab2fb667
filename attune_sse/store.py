"""SQL for identities, packs, actions and executions; each function takes a cursor."""

from __future__ import annotations

from typing import Any

from psycopg2.extras import Json

EXECUTION_STATUSES = (
    "requested", "scheduling", "scheduled", "running", "completed",
    "failed", "canceling", "cancelled", "timeout", "abandoned",
)

Row = dict[str, Any]

# -- identities ----------------------------------------------------------------


def identity_by_login(cur: Any, login: str) -> Row | None:
    cur.execute("SELECT * FROM attune.identity WHERE login = %s", (login,))
    return cur.fetchone()


def recent_login_failures(cur: Any, login: str, address: str, window_seconds: int) -> tuple[int, float]:
    """(failed logins of this pair within the window, seconds until the oldest of them leaves it)."""
    cur.execute(
        """SELECT count(*) AS n,
                  coalesce(extract(epoch FROM min(at) + make_interval(secs => %s) - now()), 0) AS wait
           FROM attune.login_failure
           WHERE login = %s AND address = %s AND at > now() - make_interval(secs => %s)""",
        (window_seconds, login, address, window_seconds),
    )
    row = cur.fetchone()
    return int(row["n"]), float(row["wait"])


def record_login_failure(cur: Any, login: str, address: str, window_seconds: int) -> None:
    cur.execute("INSERT INTO attune.login_failure (login, address) VALUES (%s, %s)", (login, address))
    cur.execute("DELETE FROM attune.login_failure WHERE at < now() - make_interval(secs => %s)",
                (window_seconds,))


def clear_login_failures(cur: Any, login: str, address: str) -> None:
    cur.execute("DELETE FROM attune.login_failure WHERE login = %s AND address = %s", (login, address))


def identity_by_id(cur: Any, identity_id: int) -> Row | None:
    cur.execute("SELECT * FROM attune.identity WHERE id = %s", (identity_id,))
    return cur.fetchone()


def insert_identity(cur: Any, login: str, display_name: str | None, password_hash: str) -> Row | None:
    """The new identity, or None when the login is taken."""
    cur.execute(
        """INSERT INTO attune.identity (login, display_name, password_hash) VALUES (%s, %s, %s)
           ON CONFLICT (login) DO NOTHING RETURNING *""",
        (login, display_name, password_hash),
    )
    return cur.fetchone()


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
                    limit: int, offset: int) -> tuple[list[Row], int]:
    """A page of executions, newest first, and the total that match."""
    where, params = [], []
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
    sets, params = [], []
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
