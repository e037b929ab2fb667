"""Identities and JWTs: login, registration, refresh, and the 401 answers."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
from typing import Any

from flask import Blueprint, Flask, jsonify, request
from flask_jwt_extended import (
    JWTManager,
    create_access_token,
    create_refresh_token,
    get_jwt,
    jwt_required,
)
from werkzeug.security import check_password_hash, generate_password_hash

from . import store
from .config import Config
from .errors import Conflict, Forbidden, NotFound, TooManyRequests, Unauthorized
from .web import invalid, json_body, optional_string, required_string, state

bp = Blueprint("auth", __name__, url_prefix="/auth")

log = logging.getLogger(__name__)


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the login is unknown, so both failures take as long."""
    return generate_password_hash("attune-sse timing equaliser")


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


def access_token(subject: str, login: str | None) -> dict[str, Any]:
    """A new access token, as the login and refresh bodies carry it."""
    return {
        "access_token": create_access_token(subject, additional_claims={"login": login, "token_type": "access"}),
        "token_type": "Bearer",
        "expires_in": state().config["security.jwt_access_expiration"],
    }


def issue_tokens(identity: dict[str, Any]) -> dict[str, Any]:
    """The body of a successful login or registration."""
    subject = str(identity["id"])
    refresh_claims = {"login": identity["login"], "token_type": "refresh"}
    return {
        **access_token(subject, identity["login"]),
        "refresh_token": create_refresh_token(subject, additional_claims=refresh_claims),
        "user": public_identity(identity),
    }


def public_identity(identity: dict[str, Any]) -> dict[str, Any]:
    return {"id": identity["id"], "login": identity["login"], "display_name": identity["display_name"]}


def current_identity_id() -> int:
    return int(get_jwt()["sub"])


@bp.post("/login")
def login() -> Any:
    """Check a password. Failures are counted per login and client address (in the
    database, so every worker and instance shares the count): past
    security.login_max_failures within the window, 429 until the oldest expires."""
    body = json_body()
    login_name = required_string(body, "login", max_length=255)
    password = required_string(body, "password", max_length=1024)
    config = state().config
    window = config["security.login_failure_window_seconds"]
    address = request.remote_addr or "unknown"
    with state().pool.cursor() as cur:
        failures, wait = store.recent_login_failures(cur, login_name, address, window)
        if failures >= config["security.login_max_failures"]:
            log.warning("login of %r from %s refused: %d failures in %ds", login_name, address, failures, window)
            retry_after = max(1, math.ceil(wait))
            error = TooManyRequests(f"Too many failed logins; try again in {retry_after} s.",
                                    code="TOO_MANY_LOGIN_FAILURES")
            return jsonify(error.to_dict()), 429, {"Retry-After": str(retry_after)}
        identity = store.identity_by_login(cur, login_name)
        stored_hash = identity["password_hash"] if identity and identity["password_hash"] else _dummy_hash()
        accepted = identity is not None and check_password_hash(stored_hash, password)
        if accepted:
            store.clear_login_failures(cur, login_name, address)
        else:
            store.record_login_failure(cur, login_name, address, window)  # committed: the raise comes after
    if not accepted:
        log.info("login failed for %r from %s", login_name, address)
        raise Unauthorized("Invalid login or password", code="INVALID_CREDENTIALS")
    return jsonify({"data": issue_tokens(identity)})


@bp.post("/register")
def register() -> Any:
    if not state().config["security.allow_registration"]:
        raise Forbidden("Registration is closed on this server (security.allow_registration).",
                        code="REGISTRATION_CLOSED")
    body = json_body()
    login_name = required_string(body, "login", max_length=255)
    password = required_string(body, "password", max_length=1024)
    if len(password) < 8:
        raise invalid("password", "must be at least 8 characters")
    display_name = optional_string(body, "display_name", max_length=255) or login_name
    identity = create_identity(login_name, password, display_name)
    return jsonify({"data": issue_tokens(identity)}), 201


def create_identity(login_name: str, password: str, display_name: str | None) -> dict[str, Any]:
    """Store a new identity with a hashed password; 409 if the login is taken."""
    with state().pool.cursor() as cur:
        identity = store.insert_identity(cur, login_name, display_name, generate_password_hash(password))
    if identity is None:
        raise Conflict(f"Login '{login_name}' is already taken.", code="LOGIN_TAKEN")
    return identity


@bp.post("/refresh")
@jwt_required(refresh=True)
def refresh() -> Any:
    claims = get_jwt()
    return jsonify({"data": access_token(claims["sub"], claims.get("login"))})


@bp.get("/me")
@jwt_required()
def me() -> Any:
    with state().pool.cursor() as cur:
        identity = store.identity_by_id(cur, current_identity_id())
    if identity is None:
        raise NotFound("The token's identity no longer exists.", code="IDENTITY_NOT_FOUND")
    return jsonify({"data": public_identity(identity)})
