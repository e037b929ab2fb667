"""Configuration: file, environment overrides, validation."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from attune_sse.config import load_config, settings_reference
from attune_sse.errors import ConfigError

FIND_SPEC = importlib.util.find_spec

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_the_shipped_test_config_loads() -> None:
    config = load_config(ROOT / "config.test.yaml", environ={})
    assert config["database.url"] == "embedded"
    assert config["server.port"] == 8080
    assert config["server.sse_keepalive_seconds"] == 15
    assert config["security.allow_registration"] is True
    assert config["log.level"] == "warn"


def test_the_design_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
environment: test
database:
  url: postgresql://postgres:postgres@localhost:5432/attune_test
server:
  host: 127.0.0.1
  port: 8080
  cors_origins: [http://localhost:3000]
  sse_keepalive_seconds: 15
security:
  jwt_secret: test-secret-for-testing-only-not-secure
  jwt_access_expiration: 300
  jwt_refresh_expiration: 3600
  allow_registration: true
log:
  level: warn
"""), environ={})
    assert config["server.cors_origins"] == ["http://localhost:3000"]
    assert config["security.jwt_access_expiration"] == 300


def test_environment_overrides_keep_types(tmp_path: Path) -> None:
    path = write(tmp_path, "database: {url: embedded}\nsecurity: {jwt_secret: s}\n")
    config = load_config(path, environ={
        "ATTUNE__DATABASE__URL": "postgresql://u@h:1/d",
        "ATTUNE__SERVER__PORT": "9090",
        "ATTUNE__SECURITY__ALLOW_REGISTRATION": "true",
        "ATTUNE__SERVER__CORS_ORIGINS": "[http://a, http://b]",
    })
    assert config["database.url"] == "postgresql://u@h:1/d"
    assert config["server.port"] == 9090
    assert config["security.allow_registration"] is True
    assert config["server.cors_origins"] == ["http://a", "http://b"]


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "database: {url: embedded}\nsecurity: {jwt_secret: s}\nserver: {port: 1234}\n")
    assert load_config(environ={"ATTUNE_CONFIG": str(path)})["server.port"] == 1234


@pytest.mark.parametrize(("text", "key"), [
    ("security: {jwt_secret: s}\n", "database.url"),
    ("database: {url: embedded}\n", "security.jwt_secret"),
    ("database: {url: mysql://x}\nsecurity: {jwt_secret: s}\n", "database.url"),
    ("database: {url: embedded}\nsecurity: {jwt_secret: s}\nserver: {port: 70000}\n", "server.port"),
    ("database: {url: embedded}\nsecurity: {jwt_secret: s}\nserver: {port: eighty}\n", "server.port"),
    ("database: {url: embedded}\nsecurity: {jwt_secret: s, allow_registration: maybe}\n",
     "security.allow_registration"),
    ("database: {url: embedded}\nsecurity: {jwt_secret: s}\nlog: {level: loud}\n", "log.level"),
    ("database: {url: embedded}\nsecurity: {jwt_secret: s}\nserver: {sse_keepalive_seconds: 0}\n",
     "server.sse_keepalive_seconds"),
    ("database: {url: embedded}\nsecurity: {jwt_secret: s}\nevents: {fanout: redis}\n", "events.redis_url"),
    ("database: {url: embedded}\nsecurity: {jwt_secret: s}\nevents: {fanout: redis, redis_url: 'http://r'}\n",
     "events.redis_url"),
    ("database: {url: embedded}\nsecurity: {jwt_secret: s}\nevents: {listen_per: machine}\n", "events.listen_per"),
    ("[1, 2]\n", "config"),
    ("a: [unclosed\n", "config"),
])
def test_invalid_settings_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert info.value.key == key
    assert "\n" not in str(info.value), "one line"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(tmp_path / "nope.yaml", environ={})
    assert info.value.key == "config"


def test_missing_required_key_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ATTUNE__DATABASE__URL"):
        load_config(write(tmp_path, "security: {jwt_secret: s}\n"), environ={})


def test_unknown_keys_are_reported_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(write(tmp_path, "database: {url: embedded, max_connections: 5}\nsecurity: {jwt_secret: s}\n"),
                         environ={})
    assert config["database.url"] == "embedded"
    assert "database.max_connections" in caplog.text


def test_the_configuration_docs_list_every_setting_as_declared() -> None:
    """docs/configuration.md's tables are SETTINGS as they are (scripts/config-docs writes them)."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    written = re.search(r"<!-- settings: .*? -->\n(.*?)<!-- end of settings -->", doc, re.S)
    assert written is not None, "docs/configuration.md lost its settings markers"
    assert written.group(1) == settings_reference(), "docs/configuration.md is stale: run scripts/config-docs"


def test_redis_fanout_without_the_redis_package_stops_start_up(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a leader retrying every second for ever: one line at start-up naming the extra to install."""
    # What the import system says of a package that is not installed.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "redis" else FIND_SPEC(name, *a))
    text = "database: {url: embedded}\nsecurity: {jwt_secret: s}\nevents: {fanout: redis, redis_url: 'redis://r'}\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert info.value.key == "events.fanout" and "attune-sse[redis]" in str(info.value)
