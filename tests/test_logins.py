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
    frozen = runner.invoke(main, ["user", "freeze", login, "-c", config_file])  # as typed: found by its key
    assert frozen.exit_code == 0 and f"froze {login}" in frozen.output, frozen.output


def test_enforce_key_of_and_counted_as() -> None:
    assert logins.enforce("Admin") == logins.enforce(_fullwidth("admin")) == "admin"
    with pytest.raises(logins.InvalidLogin) as refused:
        logins.enforce("")
    assert refused.value.reason == "is empty"
    assert logins.key_of("ad\u202emin") is None, "a login the profile refuses has no key: found as it is stored"
    assert logins.counted_as(_fullwidth("ADMIN")) == logins.counted_as("admin") == "admin"


def test_identities_stored_as_typed_elsewhere_keep_their_logins_and_their_look_alikes(server: Any, database: Any,
                                                                                     config_file: str) -> None:
    """Identities made before logins were compared so, or by another service, hold logins as they were
    typed (mixed case, decomposed, fullwidth). They still log in, however the login is typed; nobody can
    register a look-alike of one; the CLI acts on the identity it names."""
    from werkzeug.security import generate_password_hash

    tag = uuid.uuid4().hex[:6]
    stored = [f"Alice-{tag}", unicodedata.normalize("NFD", f"José-{tag}"), _fullwidth(f"Bob-{tag}")]
    hashed = generate_password_hash(PASSWORD)
    ids = {}
    for login in stored:
        ((ids[login],),) = database.query(
            "INSERT INTO attune.identity (login, display_name, password_hash) VALUES (%s, %s, %s) RETURNING id",
            (login, login, hashed))
    for login in stored:
        for typed in (login, logins.enforce(login), _fullwidth(logins.enforce(login).upper())):
            answer = requests.post(server.base_url + "/auth/login", json={"login": typed, "password": PASSWORD},
                                   timeout=10)
            assert answer.status_code == 200, (login, typed, answer.text)
            assert answer.json()["data"]["user"]["id"] == ids[login]
        taken = _register(server, logins.enforce(login))
        assert taken.status_code == 409 and taken.json()["code"] == "LOGIN_TAKEN", (login, taken.text)
    runner = CliRunner()
    frozen = runner.invoke(main, ["user", "freeze", f"alice-{tag}", "-c", config_file])
    assert frozen.exit_code == 0, frozen.output
    ((is_frozen,),) = database.query("SELECT frozen FROM attune.identity WHERE id = %s", (ids[stored[0]],))
    assert is_frozen, "the CLI froze the identity stored as Alice-..., the one its login names"


def test_two_stored_look_alikes_keep_logging_in_by_their_exact_logins(server: Any, database: Any) -> None:
    """Two identities stored elsewhere as ``Dup-x`` and ``DUP-x``: one key for both cannot be, so the
    first keeps it; each still logs in by its exact login, and the look-alike names the first."""
    from werkzeug.security import generate_password_hash

    tag = uuid.uuid4().hex[:6]
    first, second = f"Dup-{tag}", f"DUP-{tag}"
    ids = [database.query("INSERT INTO attune.identity (login, password_hash) VALUES (%s, %s) RETURNING id",
                          (login, generate_password_hash(PASSWORD)))[0][0] for login in (first, second)]
    _register(server, f"trigger-{tag}")  # an identity made: the ones without a key get theirs first
    keys = dict(database.query("SELECT id, login_key FROM attune.identity WHERE id = ANY(%s)", (ids,)))
    assert keys == {ids[0]: f"dup-{tag}", ids[1]: None}
    for typed, expected in ((first, ids[0]), (second, ids[1]), (f"dup-{tag}", ids[0])):
        answer = requests.post(server.base_url + "/auth/login", json={"login": typed, "password": PASSWORD},
                               timeout=10)
        assert answer.status_code == 200 and answer.json()["data"]["user"]["id"] == expected, (typed, answer.text)
    assert f"its login '{second}' looks like another identity's" in server.log()
