"""The ``attune-sse`` command: serve, demo, migrate, prune, user, permset, token."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import click

from attune_sse.config import CONFIG_ENV, ENV_PREFIX, Config, check_production, load_config, log_level
from attune_sse.core.grants import ADMIN_SET, ALL_GRANTS
from attune_sse.errors import AttuneError

config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), envvar=CONFIG_ENV,
    help=f"YAML config file (default: ${CONFIG_ENV}).",
)


def _load(config_path: str | None) -> Config:
    try:
        config = load_config(config_path)
    except AttuneError as exc:
        raise click.ClickException(str(exc)) from None
    logging.basicConfig(level=log_level(config), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return config


@contextmanager
def _migrated_cursor(config: Config, *, dict_rows: bool = False) -> Iterator[Any]:
    """A cursor on the database, migrated first, committed at the end; errors become one CLI line."""
    import psycopg2
    import psycopg2.extras

    from attune_sse.storage.db import connect, database
    from attune_sse.storage.migrate import migrate_database

    try:
        with database(config) as url:
            migrate_database(url)
            conn = connect(url)
            try:
                factory = psycopg2.extras.RealDictCursor if dict_rows else None
                with conn, conn.cursor(cursor_factory=factory) as cur:
                    yield cur
            finally:
                conn.close()
    except (AttuneError, psycopg2.Error) as exc:
        raise click.ClickException(str(exc).strip()) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """attune-sse: live execution updates, from PostgreSQL to Server-Sent Events.

    \b
    Try it:     attune-sse demo                 (embedded database, demo data, http://127.0.0.1:8080/)
    Run it:     attune-sse serve -c config.yaml
    Script it:  TOKEN=$(attune-sse token alice -c config.yaml)
                curl -N "http://127.0.0.1:8080/api/v1/executions/stream?token=$TOKEN"

    Every command reads its settings from -c FILE (or $ATTUNE_CONFIG);
    ATTUNE__SECTION__KEY variables override single keys.
    """


@main.command()
@config_option
@click.option("--host", help="Override server.host.")
@click.option("--port", type=int, help="Override server.port.")
@click.option("--workers", type=int, help="Override server.workers.")
def serve(config_path: str | None, host: str | None, port: int | None, workers: int | None) -> None:
    """Run the service under gunicorn with gevent workers."""
    env = dict(os.environ)
    if config_path:
        env[CONFIG_ENV] = str(Path(config_path).resolve())
    for key, value in (("SERVER__HOST", host), ("SERVER__PORT", port), ("SERVER__WORKERS", workers)):
        if value is not None:
            env[ENV_PREFIX + key] = str(value)
    try:
        check_production(load_config(environ=env))  # fail here, in one line, rather than inside gunicorn
    except AttuneError as exc:
        raise click.ClickException(str(exc)) from None
    from attune_sse.serve.launch import gunicorn_argv

    os.execve(sys.executable, gunicorn_argv(), env)


@main.command()
@config_option
def migrate(config_path: str | None) -> None:
    """Apply the SQL migrations of sql/ that the database has not applied yet."""
    from attune_sse.storage.db import database
    from attune_sse.storage.migrate import migrate_database

    config = _load(config_path)
    try:
        with database(config) as url:
            applied = migrate_database(url)
    except AttuneError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else "; up to date"))


@main.command()
@config_option
@click.option("--older-than", type=click.IntRange(min=0), help="Prune events older than this many seconds "
              "(default: events.retention_seconds).")
@click.option("--keep", type=click.IntRange(min=0),
              help="Keep at least the newest N events (default: events.retention_count).")
def prune(config_path: str | None, older_than: int | None, keep: int | None) -> None:
    """Delete old events from the record; clients resuming from before them get a 'reset' event."""
    from attune_sse.runtime.retention import limits
    from attune_sse.storage import record

    config = _load(config_path)
    kwargs = limits(config)
    if older_than is not None:
        kwargs["max_age_seconds"] = older_than
    if keep is not None:
        kwargs["keep_last"] = keep
    with _migrated_cursor(config) as cur:
        deleted, horizon = record.prune(cur, **kwargs)
    click.echo(f"pruned {deleted} event(s); the record now starts after event {horizon}")


def _new_login(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A new identity's login, in the form it is stored and compared in; refused as the API refuses it."""
    from attune_sse.core import logins

    try:
        return logins.enforce(value)
    except logins.InvalidLogin as exc:
        raise click.BadParameter(f"{exc.reason}: logins are compared as RFC 8265 (PRECIS) says") from None


@main.group()
def user() -> None:
    """Manage identities."""


@user.command("create")
@click.argument("login", callback=_new_login)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True,
              help="The password (asked for when not given).")
@click.option("--display-name", help="Name shown in the UI (default: the login).")
@click.option("--admin", is_flag=True, help=f"Assign the permission set {ADMIN_SET} (every grant).")
@config_option
def user_create(login: str, password: str, display_name: str | None, admin: bool, config_path: str | None) -> None:
    """Create an identity that can log in."""
    from werkzeug.security import generate_password_hash

    from attune_sse.storage import store

    config = _load(config_path)
    with _migrated_cursor(config) as cur:
        # This cursor's rows are plain tuples (assign_permission_set needs them), not store.Row's dicts.
        created = cast("tuple[Any, ...] | None",
                       store.insert_identity(cur, login, display_name or login, generate_password_hash(password)))
        if created is None:
            raise click.ClickException(f"login {login!r} is already taken")
        if admin:
            store.upsert_permission_set(cur, ADMIN_SET, "Administrators: every grant", ALL_GRANTS, replace=True)
            store.assign_permission_set(cur, login, ADMIN_SET)
    click.echo(f"created identity {created[0]} ({login})" + (f" with {ADMIN_SET}" if admin else ""))


def _identity_change(config_path: str | None, login: str, change: Callable[[Any], bool], done: str) -> None:
    config = _load(config_path)
    with _migrated_cursor(config) as cur:
        if not change(cur):
            raise click.ClickException(f"no identity {login!r}")
    click.echo(f"{done} {login}; every worker applies it within {config['security.access_refresh_seconds']:g} s")


@user.command("freeze")
@click.argument("login")
@config_option
def user_freeze(login: str, config_path: str | None) -> None:
    """Refuse LOGIN everywhere (its tokens, refreshes, logins and open streams) until unfrozen."""
    from attune_sse.storage import store

    _identity_change(config_path, login, lambda cur: store.set_frozen(cur, login, True), "froze")


@user.command("unfreeze")
@click.argument("login")
@config_option
def user_unfreeze(login: str, config_path: str | None) -> None:
    """Let a frozen LOGIN in again (its unexpired tokens work again)."""
    from attune_sse.storage import store

    _identity_change(config_path, login, lambda cur: store.set_frozen(cur, login, False), "unfroze")


@user.command("delete")
@click.argument("login")
@config_option
def user_delete(login: str, config_path: str | None) -> None:
    """Delete LOGIN: its tokens stop working, its streams end; its executions stay."""
    from attune_sse.storage import store

    _identity_change(config_path, login, lambda cur: store.delete_identity(cur, login), "deleted")


@main.group()
def permset() -> None:
    """Manage permission sets and who has them."""


@permset.command("create")
@click.argument("ref")
@click.option("--grants", required=True, help='A JSON list of grants, e.g. \'[{"resource": "executions", '
              '"actions": ["read"], "constraints": {"pack_refs": ["core"]}}]\'.')
@click.option("--label", help="A human name for the set.")
@click.option("--replace", is_flag=True, help="Replace the grants of an existing set of this ref.")
@config_option
def permset_create(ref: str, grants: str, label: str | None, replace: bool, config_path: str | None) -> None:
    """Create permission set REF (pack.name) with GRANTS."""
    import re

    from attune_sse.core.grants import parse_grants
    from attune_sse.storage import store

    if not re.fullmatch(r"[a-z][a-z0-9_-]+\.[A-Za-z0-9_.-]+", ref):
        raise click.ClickException(f"ref {ref!r} must look like pack.name (for example core.viewers)")
    try:
        parsed = parse_grants(grants)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    config = _load(config_path)
    with _migrated_cursor(config) as cur:
        created = store.upsert_permission_set(cur, ref, label, parsed, replace=replace)
    if created is None:
        raise click.ClickException(f"permission set {ref!r} exists; pass --replace to change its grants")
    click.echo(f"{'saved' if replace else 'created'} permission set {ref} ({len(parsed)} grant(s))")


@permset.command("assign")
@click.argument("login")
@click.argument("ref")
@config_option
def permset_assign(login: str, ref: str, config_path: str | None) -> None:
    """Give LOGIN the grants of permission set REF (on top of its other sets)."""
    from attune_sse.storage import store

    _assignment(config_path, lambda cur: store.assign_permission_set(cur, login, ref), f"assigned {ref} to {login}")


@permset.command("revoke")
@click.argument("login")
@click.argument("ref")
@config_option
def permset_revoke(login: str, ref: str, config_path: str | None) -> None:
    """Take permission set REF from LOGIN."""
    from attune_sse.storage import store

    _assignment(config_path, lambda cur: store.revoke_permission_set(cur, login, ref), f"revoked {ref} from {login}")


def _assignment(config_path: str | None, change: Callable[[Any], str | None], done: str) -> None:
    config = _load(config_path)
    with _migrated_cursor(config) as cur:
        problem = change(cur)
    if problem:
        raise click.ClickException(problem)
    click.echo(done)


@main.command()
@click.argument("login")
@click.option("--expires", "expires_in", type=click.IntRange(min=1),
              help="Lifetime in seconds (default: security.jwt_access_expiration).")
@config_option
def token(login: str, expires_in: int | None, config_path: str | None) -> None:
    """Print an access token for LOGIN (for scripts and curl), signed with the config's secret."""
    import datetime as dt

    from flask import Flask
    from flask_jwt_extended import create_access_token

    from attune_sse.http import auth
    from attune_sse.storage import store

    config = _load(config_path)
    with _migrated_cursor(config, dict_rows=True) as cur:
        identity = store.identity_by_login(cur, login)
    if identity is None:
        raise click.ClickException(f"no identity {login!r}; create it with: attune-sse user create {login}")
    app = Flask(__name__)
    auth.init_app(app, config)
    lifetime = dt.timedelta(seconds=expires_in or config["security.jwt_access_expiration"])
    with app.app_context():
        click.echo(create_access_token(str(identity["id"]), expires_delta=lifetime,
                                       additional_claims={"login": login, "token_type": "access",
                                                          "key": str(identity["token_key"])}))


@main.command()
@click.option("--port", type=int, default=8080, show_default=True, help="Port of the web UI and API.")
@click.option("--rate", type=float, default=2.0, show_default=True, help="New executions per second.")
@click.option("--data-dir", default=".attune/demo-pgdata", show_default=True,
              help="Folder of the demo's embedded PostgreSQL.")
def demo(port: int, rate: float, data_dir: str) -> None:
    """Run the service on an embedded database with a demo pack and executions moving through
    their statuses, so the web UI has something to show. Log in as demo / demo-password."""
    from attune_sse.serve.demo import run_demo

    try:
        run_demo(port=port, rate=rate, data_dir=data_dir)
    except AttuneError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
