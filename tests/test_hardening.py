"""Hardening: secrets, token misuse, login guessing, body size, token expiry on the stream, headers."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
import uuid
import warnings
from typing import Any

import jwt
import jwt.warnings
import pytest
import requests

from attune_sse.app import create_app
from attune_sse.config import load_config
from attune_sse.errors import AttuneError, ConfigError
from conftest import JWT_SECRET, make_token
from helpers import RawStream, wait_until


def _config(tmp_path: Any, secret: str, environment: str = "production") -> Any:
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"environment": environment, "database": {"url": "postgresql://x@127.0.0.1/x"},
                                "security": {"jwt_secret": secret}}))
    return load_config(path, environ={})


@pytest.mark.parametrize(("secret", "words"), [
    ("test-secret-for-testing-only-not-secure", "published test secret"),
    ("short-secret", "at least 32 bytes"),
])
def test_production_refuses_weak_secrets(tmp_path: Any, secret: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as caught:
        create_app(_config(tmp_path, secret), start_listener=False)
    assert caught.value.key == "security.jwt_secret"


def test_weak_secret_allowed_outside_production_and_strong_one_in_it(tmp_path: Any) -> None:
    """Each app is made (no ConfigError) and signs its tokens with the secret it was given."""
    for secret, environment in (("short-secret", "test"), ("x" * 32, "production")):
        app = create_app(_config(tmp_path, secret, environment=environment), start_listener=False)
        assert app.config["JWT_SECRET_KEY"] == secret


def test_serve_refuses_the_test_secret_in_production(tmp_path: Any, database: Any) -> None:
    import subprocess
    import sys

    path = tmp_path / "prod.yaml"
    path.write_text(json.dumps({"environment": "production", "database": {"url": database.url},
                                "server": {"port": 0},
                                "security": {"jwt_secret": "test-secret-for-testing-only-not-secure"}}))
    done = subprocess.run([sys.executable, "-m", "attune_sse.serve.cli", "serve", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "security.jwt_secret" in done.stderr and "published test secret" in done.stderr


def _b64(part: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


def _claims(identity_id: int, **changes: Any) -> dict[str, Any]:
    now = int(dt.datetime.now(dt.timezone.utc).timestamp())
    claims = {"sub": str(identity_id), "login": "x", "iat": now, "nbf": now, "exp": now + 300,
              "jti": uuid.uuid4().hex, "type": "access", "token_type": "access", "fresh": False}
    claims.update(changes)
    return claims


@pytest.mark.parametrize("case", ["alg none", "alg none, no signature", "HS512 with the right key",
                                  "not yet valid", "other key"])
def test_misused_tokens_are_rejected(server: Any, user: dict[str, Any], case: str) -> None:
    identity_id = user["user"]["id"]
    if case == "alg none":
        token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims(identity_id))}.x"
    elif case == "alg none, no signature":
        token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims(identity_id))}."
    elif case == "HS512 with the right key":
        with warnings.catch_warnings():  # PyJWT finds the test secret short for HS512: beside the point here
            warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
            token = jwt.encode(_claims(identity_id), JWT_SECRET, algorithm="HS512")
    elif case == "not yet valid":
        future = int(dt.datetime.now(dt.timezone.utc).timestamp()) + 3600
        token = jwt.encode(_claims(identity_id, nbf=future), JWT_SECRET, algorithm="HS256")
    else:
        token = make_token(identity_id, secret="another-key-another-key-another-key!")
    for response in (
        requests.get(server.base_url + "/auth/me", headers={"Authorization": f"Bearer {token}"}, timeout=5),
        requests.get(server.base_url + "/api/v1/executions/stream", params={"token": token}, timeout=5),
    ):
        assert response.status_code == 401, response.text
        assert set(response.json()) == {"error", "code"}
        assert response.json()["code"] == "TOKEN_INVALID"


def test_login_failures_are_rate_limited_per_login_and_address(server: Any) -> None:
    login = f"guess-{uuid.uuid4().hex[:8]}"
    password = "right-password-123"
    assert requests.post(server.base_url + "/auth/register", json={"login": login, "password": password},
                         timeout=10).status_code == 201
    url = server.base_url + "/auth/login"
    for _ in range(5):  # security.login_max_failures
        assert requests.post(url, json={"login": login, "password": "wrong"}, timeout=10).status_code == 401
    limited = requests.post(url, json={"login": login, "password": password}, timeout=10)
    assert limited.status_code == 429, "even the right password waits: the guesser must not learn it"
    assert limited.json()["code"] == "TOO_MANY_LOGIN_FAILURES"
    assert 1 <= int(limited.headers["Retry-After"]) <= 300
    # Another login from the same address is not affected.
    other = requests.post(url, json={"login": f"nobody-{uuid.uuid4().hex[:6]}", "password": "x"}, timeout=10)
    assert other.status_code == 401


def test_a_stream_ends_when_its_token_expires(server: Any, user: dict[str, Any]) -> None:
    token = make_token(user["user"]["id"], expires_in=2, key=user["key"])
    stream = RawStream(server.base_url, {"token": token})
    assert stream.read_until_closed(10), "the server ended the stream"
    body, clean = stream.body()
    assert clean
    assert b"event: token_expired\n" in body
    data = [line for line in body.decode().splitlines() if line.startswith("data: ")][-1]
    assert "refresh" in json.loads(data[6:])["reason"]
    # The token is expired now: reconnecting with it is refused; with a fresh one it works.
    wait_until(lambda: requests.get(server.base_url + "/api/v1/executions/stream", params={"token": token},
                                    timeout=5).status_code == 401, 5, "the old token to be refused")


def test_security_headers_on_the_ui(server: Any) -> None:
    response = requests.get(server.base_url + "/", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    script = requests.get(server.base_url + "/static/app.js", timeout=5)
    assert script.status_code == 200 and "EventSource" in script.text


def test_create_app_states_its_preconditions(tmp_path: Any) -> None:
    """It never starts a database itself, and refuses a psycopg2 that would block a gevent worker."""
    path = tmp_path / "embedded.yaml"
    path.write_text(json.dumps({"environment": "test", "database": {"url": "embedded"},
                                "security": {"jwt_secret": "s"}}))
    with pytest.raises(AttuneError, match="no embedded server was started for this app"):
        create_app(load_config(path, environ={}), start_listener=False)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"environment": "test", "database": {"url": "postgresql://x@127.0.0.1/x"},
                                  "security": {"jwt_secret": "s"}}))
    script = ("from gevent import monkey; monkey.patch_all()\n"
              "from attune_sse.app import create_app\n"
              f"create_app({str(config)!r}, start_listener=False)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "psycopg2 is not cooperative under gevent" in done.stderr.strip().splitlines()[-1]
