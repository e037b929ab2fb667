"""Logins (core/logins.py, through /auth and the CLI): one login however it is typed, none that misleads.

The outsider's probe registered ``café`` composed and decomposed, ``admin`` with
a zero-width space, with a bidi override and in fullwidth letters as five
identities. RFC 8265's UsernameCaseMapped profile makes the look-alikes one
login (409 on the second) and refuses the invisible characters (400).
"""

from __future__ import annotations

import unicodedata
import uuid
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from attune_sse.core import logins
from attune_sse.serve.cli import main

PASSWORD = "correct horse battery"


def _register(server: Any, login: str) -> requests.Response:
    return requests.post(server.base_url + "/auth/register", json={"login": login, "password": PASSWORD}, timeout=10)


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def test_look_alike_logins_are_one_login(server: Any) -> None:
    tag = uuid.uuid4().hex[:6]
    composed = unicodedata.normalize("NFC", f"café-{tag}")
    first = _register(server, composed)
    assert first.status_code == 201, first.text
    assert first.json()["data"]["user"]["login"] == composed
    for look_alike in (unicodedata.normalize("NFD", composed), composed.upper(), _fullwidth("CAFE") + "\u0301" +
                       f"-{tag}"):
        again = _register(server, look_alike)
        assert again.status_code == 409 and again.json()["code"] == "LOGIN_TAKEN", (look_alike, again.text)
    # The same identity, however the login is typed at login.
    for typed in (unicodedata.normalize("NFD", composed), _fullwidth(composed.upper())):
        login = requests.post(server.base_url + "/auth/login", json={"login": typed, "password": PASSWORD},
                              timeout=10)
        assert login.status_code == 200, (typed, login.text)
        assert login.json()["data"]["user"]["id"] == first.json()["data"]["user"]["id"]


@pytest.mark.parametrize(("login", "reason"), [
    ("admin\u200b", "invisible"), ("ad\u202emin", "invisible"), ("ad\u200dmin", "invisible"),
    ("ad min", "space"), ("ad\tmin", "control"), ("x\u0378y", "Unicode does not assign"),
])
def test_logins_with_invisible_or_unassigned_characters_are_refused(server: Any, login: str, reason: str) -> None:
    response = _register(server, login + uuid.uuid4().hex[:6])
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "VALIDATION_ERROR" and reason in response.json()["error"]


def test_a_refused_login_cannot_log_in_and_says_no_more_than_a_wrong_password(server: Any) -> None:
    response = requests.post(server.base_url + "/auth/login", json={"login": "admin\u200b", "password": PASSWORD},
                             timeout=10)
    assert response.status_code == 401 and response.json()["code"] == "INVALID_CREDENTIALS"


def test_the_cli_enforces_the_same_profile(config_file: str) -> None:
    runner = CliRunner()
    refused = runner.invoke(main, ["user", "create", "ad\u202emin", "--password", PASSWORD, "-c", config_file])
    assert refused.exit_code == 2 and "invisible" in refused.output
    login = f"Cli-{uuid.uuid4().hex[:6]}"
    created = runner.invoke(main, ["user", "create", _fullwidth(login), "--password", PASSWORD, "-c", config_file])
    assert created.exit_code == 0, created.output
    assert f"({login.lower()})" in created.output
    frozen = runner.invoke(main, ["user", "freeze", login, "-c", config_file])
    assert frozen.exit_code == 0 and f"froze {login.lower()}" in frozen.output, frozen.output


def test_enforce_and_lookup_form() -> None:
    assert logins.enforce("Admin") == logins.enforce(_fullwidth("admin")) == "admin"
    with pytest.raises(logins.InvalidLogin) as refused:
        logins.enforce("")
    assert refused.value.reason == "is empty"
    assert logins.lookup_form("ad\u202emin") == "ad\u202emin", "a login made before (or elsewhere) is found as is"
