"""The attune-sse command against the test database."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import requests
from click.testing import CliRunner

from attune_sse.serve.cli import main
from attune_sse.storage.embedded import EmbeddedPostgres, free_port
from helpers import Stream, wait_until

ROOT = Path(__file__).resolve().parent.parent


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


def test_help_names_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "demo", "migrate", "prune", "user", "token"):
        assert f"  {command}" in result.output
    assert "attune-sse demo" in result.output, "the help starts a newcomer with the demo"


def test_token_prints_a_working_access_token(server: Any, database: Any, tmp_path: Path,
                                             user: dict[str, Any]) -> None:
    from conftest import JWT_SECRET

    path = tmp_path / "same-secret.yaml"
    path.write_text(json.dumps({"database": {"url": database.url}, "security": {"jwt_secret": JWT_SECRET}}))
    result = CliRunner().invoke(main, ["token", user["login"], "-c", str(path), "--expires", "60"])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    me = requests.get(server.base_url + "/auth/me", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert me.status_code == 200 and me.json()["data"]["login"] == user["login"]
    missing = CliRunner().invoke(main, ["token", "nobody-at-all", "-c", str(path)])
    assert missing.exit_code == 1 and "user create nobody-at-all" in missing.output


def test_smoke_script_passes_against_the_server(server: Any, user: dict[str, Any]) -> None:
    done = subprocess.run([sys.executable, "scripts/smoke.py", "--url", server.base_url, "--login", user["login"],
                           "--password", user["password"]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("PASS: ")
    assert done.stdout.count("  ok   event ") == 5


def test_smoke_script_fails_clearly(server: Any, user: dict[str, Any]) -> None:
    done = subprocess.run([sys.executable, "scripts/smoke.py", "--url", server.base_url, "--login", user["login"],
                           "--password", "wrong"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout.strip().splitlines()[-1].startswith("FAIL: POST ")


def test_demo_serves_moving_executions(tmp_path: Path) -> None:
    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "attune_sse.serve.cli", "demo", "--port", str(port), "--rate", "5",
                             "--data-dir", str(tmp_path / "pgdata")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def logged_in() -> Any:
            try:
                response = requests.post(base + "/auth/login", json={"login": "demo", "password": "demo-password"},
                                         timeout=2)
            except requests.ConnectionError:
                return None
            return response.status_code == 200 and response.json()["data"]["access_token"]

        token = wait_until(logged_in, 60, "the demo to serve and accept its demo login")
        stream = Stream(base + "/api/v1/executions/stream", {"token": token})
        statuses = {stream.next_event(10).json["data"]["status"] for _ in range(10)}
        assert statuses & {"scheduling", "scheduled", "running", "completed", "failed"}, statuses
        stream.close()
    finally:
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=30)
        EmbeddedPostgres(tmp_path / "pgdata").destroy()  # its data may live outside tmp_path (embedded.py)
    assert demo.returncode == 0, output
    assert "log in as demo / demo-password" in output and "stopping" in output
