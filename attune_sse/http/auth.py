"""Identities and JWTs: login, registration, refresh, and the 401 answers."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import secrets
import time
from typing import Any

import gevent
from flask import Blueprint, Flask, g, jsonify, request
from flask_jwt_extended import (
    JWTManager,
    create_access_token,
    create_refresh_token,
    get_jwt,
    jwt_required,
)
from werkzeug.security import check_password_hash, generate_password_hash

from attune_sse.config import Config
from attune_sse.core import logins
from attune_sse.core.grants import Principal
from attune_sse.core.ids import MAX_BIGINT
from attune_sse.errors import Conflict, Forbidden, NotReady, TooManyRequests, Unauthorized
from attune_sse.http.io import json_body
from attune_sse.http.state import state
from attune_sse.http.validation import invalid, optional_string, required_string
from attune_sse.storage import store

bp = Blueprint("auth", __name__, url_prefix="/auth")

log = logging.getLogger(__name__)


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the login is unknown (or has no password), so every failure takes
    as long; of a random password nobody knows, and never a reason to accept."""
    return generate_password_hash(secrets.token_urlsafe(32))


# Password hashing takes a few hundred ms of CPU by design. It runs on gevent's thread
# pool (hashlib's scrypt and pbkdf2 release the GIL), so the worker's event loop, and
# every stream on it, goes on meanwhile.

def hash_password(password: str) -> str:
    return gevent.get_hub().threadpool.apply(generate_password_hash, (password,))


def password_matches(stored_hash: str, password: str) -> bool:
    try:
        return gevent.get_hub().threadpool.apply(check_password_hash, (stored_hash, password))
    except ValueError as exc:  # a hash of a method werkzeug does not know (made by another service)
        log.warning("a stored password hash could not be checked (%s): treated as a wrong password", exc)
        return False


def init_app(app: Flask, config: Config) -> None:
    """Configure flask-jwt-extended from the config and register the blueprint."""
    app.config.update(
        JWT_SECRET_KEY=config["security.jwt_secret"],
        JWT_ALGORITHM="HS256",
        JWT_DECODE_ALGORITHMS=["HS256"],
        JWT_ACCESS_TOKEN_EXPIRES=dt.timedelta(seconds=config["security.jwt_access_expiration"]),
        JWT_REFRESH_TOKEN_EXPIRES=dt.timedelta(seconds=config["security.jwt_refresh_expiration"]),
        JWT_TOKEN_LOCATION=["headers"],
        JWT_QUERY_STRING_NAME="token",
        JWT_ERROR_MESSAGE_KEY="error",
    )
    jwt = JWTManager(app)

    def deny(message: str, code: str) -> Any:
        return jsonify(Unauthorized(message, code=code).to_dict()), 401

    jwt.unauthorized_loader(
        lambda reason: deny(
            "Missing access token: send 'Authorization: Bearer <token>' (or ?token= on the stream).",
            "TOKEN_MISSING",
        )
    )
    jwt.invalid_token_loader(lambda reason: deny(f"Invalid token: {reason}.", "TOKEN_INVALID"))
    jwt.expired_token_loader(
        lambda header, payload: deny("Token has expired: refresh it or log in again.", "TOKEN_EXPIRED")
    )
    jwt.revoked_token_loader(lambda header, payload: deny("Token has been revoked.", "TOKEN_REVOKED"))
    jwt.user_lookup_error_loader(
        lambda header, payload: deny("The token's identity no longer exists.", "TOKEN_INVALID")
    )
    app.register_blueprint(bp)


def access_token(subject: str, login: str | None, key: str) -> dict[str, Any]:
    """A new access token, as the login and refresh bodies carry it (``key``: the identity's token key)."""
    claims = {"login": login, "token_type": "access", "key": key}
    return {
        "access_token": create_access_token(subject, additional_claims=claims),
        "token_type": "Bearer",
        "expires_in": state().config["security.jwt_access_expiration"],
    }


def issue_tokens(identity: dict[str, Any]) -> dict[str, Any]:
    """The body of a successful login or registration."""
    subject, key = str(identity["id"]), str(identity["token_key"])
    refresh_claims = {"login": identity["login"], "token_type": "refresh", "key": key}
    return {
        **access_token(subject, identity["login"], key),
        "refresh_token": create_refresh_token(subject, additional_claims=refresh_claims),
        "user": public_identity(identity),
    }


def public_identity(identity: dict[str, Any]) -> dict[str, Any]:
    return {"id": identity["id"], "login": identity["login"], "display_name": identity["display_name"]}


def current_principal() -> Principal:
    """The identity of the request's verified token; 401 unless it exists and is not frozen.

    From this worker's cache (access.py): no query unless the identity is new to
    it, or access changed anywhere since it was last read."""
    principal = g.get("principal")
    if principal is not None:
        return principal
    subject = get_jwt().get("sub")
    if not (isinstance(subject, str) and subject.isascii() and subject.isdigit()
            and 1 <= int(subject) <= MAX_BIGINT):
        raise Unauthorized("Invalid token: its subject is not an identity id.", code="TOKEN_INVALID")
    principal = state().access.principal(int(subject))
    # A token of a deleted identity whose id was given again (a restore, a sequence reset) names the id
    # but not the key of the identity that holds it now: it is the deleted one's, and stays dead.
    if principal is None or not principal.issued_to(get_jwt().get("key")):
        raise Unauthorized("The token's identity no longer exists; log in again.", code="IDENTITY_DELETED")
    if principal.frozen:
        raise Unauthorized("This identity is frozen; ask an administrator.", code="IDENTITY_FROZEN")
    g.principal = principal
    return principal


def current_identity_id() -> int:
    return current_principal().id


@bp.post("/login")
def login() -> Any:
    """Check a password. Failures are counted per login and client address (in the
    database, so every worker and instance shares the count): past
    security.login_max_failures within the window, 429 until the oldest expires."""
    body = json_body()
    typed = required_string(body, "login", max_length=255)
    login_name = logins.counted_as(typed)  # failures of every look-alike count together
    password = required_string(body, "password", max_length=1024)
    address = request.remote_addr or "unknown"
    attempt, identity = _begin_login(login_name, typed, address)
    # The same work whether the login exists or not: its answer takes as long.
    stored_hash = identity["password_hash"] if identity is not None else None  # None: no such login
    has_password = bool(stored_hash)
    accepted = password_matches(stored_hash or _dummy_hash(), password) and has_password
    try:
        with state().pool.cursor() as cur:
            store.end_login_attempt(cur, attempt, login_name, address, accepted=accepted)
    except NotReady:
        # The attempt stays pending; it counts as a failure after store.PENDING_SECONDS.
        log.warning("could not record the end of a login attempt of %r; retry shortly", login_name)
        raise
    if identity is None or not accepted:  # (accepted implies the identity: it has a password)
        log.info("login failed for %r from %s", login_name, address)
        raise Unauthorized("Invalid login or password", code="INVALID_CREDENTIALS")
    if identity["frozen"]:
        log.info("login of frozen identity %r from %s refused", login_name, address)
        raise Unauthorized("This identity is frozen; ask an administrator.", code="IDENTITY_FROZEN")
    return jsonify({"data": issue_tokens(identity)})


LOGIN_QUEUE_SECONDS = 10.0  # how long an attempt waits for the pair's attempts in flight


def _begin_login(login_name: str, typed: str, address: str) -> tuple[int, dict[str, Any] | None]:
    """Record an attempt of the pair before its password is checked: (its id, the identity).

    Counted under a lock of the pair, with the attempts of it being checked now: of
    any number of concurrent guesses, at most login_max_failures are checked. Past
    the limit in failures: 429. Past it only with attempts in flight (a client that
    logs in many times at once): wait for them to end, then count again.
    """
    config = state().config
    window, limit = config["security.login_failure_window_seconds"], config["security.login_max_failures"]
    deadline = time.monotonic() + LOGIN_QUEUE_SECONDS
    while True:
        with state().pool.cursor() as cur:
            store.lock_login_pair(cur, login_name, address)
            failures, checking, wait = store.recent_login_failures(cur, login_name, address, window)
            if failures >= limit or (failures + checking >= limit and time.monotonic() > deadline):
                log.warning("login of %r from %s refused: %d failures in %ds", login_name, address, failures,
                            window)
                retry_after = max(1, math.ceil(wait))
                raise TooManyRequests(f"Too many failed logins; try again in {retry_after} s.",
                                      code="TOO_MANY_LOGIN_FAILURES", headers={"Retry-After": str(retry_after)})
            if failures + checking < limit:
                identity = store.identity_by_login(cur, typed)
                if identity is None and store.fill_login_keys(cur):
                    identity = store.identity_by_login(cur, typed)  # made elsewhere, as typed there
                return store.begin_login_attempt(cur, login_name, address, window), identity
        gevent.sleep(0.05)  # no connection held while waiting


@bp.post("/register")
def register() -> Any:
    if not state().config["security.allow_registration"]:
        raise Forbidden("Registration is closed on this server (security.allow_registration).",
                        code="REGISTRATION_CLOSED")
    body = json_body()
    typed = required_string(body, "login", max_length=255)
    login_name = enforced_login(typed)
    password = required_string(body, "password", max_length=1024)
    if len(password) < 8:
        raise invalid("password", "must be at least 8 characters")
    display_name = optional_string(body, "display_name", max_length=255) or typed
    identity = create_identity(login_name, password, display_name)
    return jsonify({"data": issue_tokens(identity)}), 201


def enforced_login(login_name: str) -> str:
    """A new identity's login in its stored form (core/logins.py), or 400 that says what is wrong with it."""
    try:
        return logins.enforce(login_name)
    except logins.InvalidLogin as exc:
        raise invalid("login", exc.reason) from None


def create_identity(login_name: str, password: str, display_name: str | None) -> dict[str, Any]:
    """Store a new identity with a hashed password; 409 if the login is taken."""
    password_hash = hash_password(password)
    with state().pool.cursor() as cur:
        identity = store.insert_identity(cur, login_name, display_name, password_hash)
    if identity is None:
        raise Conflict(f"Login '{login_name}' is already taken.", code="LOGIN_TAKEN")
    return identity


@bp.post("/refresh")
@jwt_required(refresh=True)
def refresh() -> Any:
    """A new access token, for an identity that still exists and is not frozen."""
    principal = current_principal()
    return jsonify({"data": access_token(str(principal.id), principal.login, str(principal.key))})


@bp.get("/me")
@jwt_required()
def me() -> Any:
    current_principal()
    with state().pool.cursor() as cur:
        identity = store.identity_by_id(cur, current_identity_id())
    if identity is None:
        raise Unauthorized("The token's identity no longer exists.", code="IDENTITY_DELETED")
    return jsonify({"data": public_identity(identity)})
