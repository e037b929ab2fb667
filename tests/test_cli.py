"""The attune-sse command against the test database."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from attune_sse.cli import main


@pytest.fixture
def config_file(database: Any, tmp_path: Path) -> str:
    path = tmp_path / "cli.yaml"
    path.write_text(json.dumps({"database": {"url": database.url}, "security": {"jwt_secret": "s"},
                                "log": {"level": "warn"}}))
    return str(path)


def test_migrate_is_up_to_date(config_file: str) -> None:
    result = CliRunner().invoke(main, ["migrate", "-c", config_file])
    assert result.exit_code == 0, result.output
    assert "applied 0 migration(s); up to date" in result.output


def test_user_create_then_taken(config_file: str, database: Any) -> None:
    login = f"cli-{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    created = runner.invoke(main, ["user", "create", login, "--password", "pw-12345678", "-c", config_file])
    assert created.exit_code == 0, created.output
    ((stored,),) = database.query("SELECT password_hash FROM attune.identity WHERE login = %s", (login,))
    assert "pw-12345678" not in stored
    again = runner.invoke(main, ["user", "create", login, "--password", "x", "-c", config_file])
    assert again.exit_code == 1
    assert f"login {login!r} is already taken" in again.output


def test_prune_reports_what_it_did(config_file: str) -> None:
    result = CliRunner().invoke(main, ["prune", "-c", config_file, "--older-than", "999999999"])
    assert result.exit_code == 0, result.output
    assert "pruned 0 event(s)" in result.output
    refused = CliRunner().invoke(main, ["prune", "-c", config_file, "--keep", "-1"])
    assert refused.exit_code == 2


def test_serve_refuses_a_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("database: {url: embedded}\nsecurity: {jwt_secret: s}\nserver: {port: 70000}\n")
    result = CliRunner().invoke(main, ["serve", "-c", str(bad)])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "server.port" in result.output
