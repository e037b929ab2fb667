"""Load, override and validate the YAML configuration.

Every setting is declared once below, with its default and its parser. A file
gives values in the shape of DESIGN.md; the environment overrides any key with
``ATTUNE__<SECTION>__<KEY>`` (for example ``ATTUNE__DATABASE__URL``), the value
read as a YAML scalar so ``true``, ``8080`` and ``[a, b]`` keep their types.
``ATTUNE_CONFIG`` names the file when no path is given.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from attune_sse.errors import ConfigError

log = logging.getLogger(__name__)

ENV_PREFIX = "ATTUNE__"
CONFIG_ENV = "ATTUNE_CONFIG"
# The instance's relay folder, made by gunicorn's master for its workers' election (runtime/election.py).
RELAY_DIR_ENV = "ATTUNE_SSE_RELAY_DIR"
_REQUIRED = object()


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _number(low: float, high: float | None = None, *, integer: bool = False) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"must be {'a whole number' if integer else 'a number'}")
        if value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {span}, got {value}")
        return value

    return parse


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value.lower()

    return parse


def _string_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return value


def _grants(value: Any) -> list[dict[str, Any]]:
    from attune_sse.core.grants import parse_grants

    return parse_grants(value)


def _optional_path(value: Any) -> str:
    if value in ("", None):
        return ""
    if not isinstance(value, str) or not Path(value).is_file():
        raise ValueError(f"{value!r} is not a readable file")
    return value


def _secret(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _networks(value: Any) -> list[str]:
    for item in _string_list(value):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an address or network") from None
    return value


def _redis_url(value: Any) -> str:
    value = _string(value)
    if value and urlparse(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return value


def _database_url(value: Any) -> str:
    value = _string(value)
    if value == "embedded":
        return value
    parsed = urlparse(value)
    if parsed.scheme not in ("postgresql", "postgres"):
        raise ValueError("must be 'embedded' or a postgresql:// URL")
    return value


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    parse: Callable[[Any], Any]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("environment", "production", _choice("production", "development", "test"),
            "production, development or test"),
    Setting("database.url", _REQUIRED, _database_url,
            "'embedded' or postgresql://user:password@host:port/dbname"),
    Setting("database.data_dir", ".attune/pgdata", _string,
            "folder of the embedded PostgreSQL's data (database.url: embedded)"),
    Setting("database.pool_size", 10, _number(1, 1000, integer=True),
            "connections each worker keeps for REST requests"),
    Setting("database.backlog_pool_size", 3, _number(1, 1000, integer=True),
            "connections each worker may use for resuming streams' backlog reads (apart from REST's)"),
    Setting("database.auto_migrate", True, _boolean,
            "apply sql/ migrations when the server starts"),
    Setting("server.host", "127.0.0.1", _string, "address to bind"),
    Setting("server.port", 8080, _number(0, 65535, integer=True), "port to bind (0: any free port)"),
    Setting("server.workers", 2, _number(1, 64, integer=True), "gunicorn gevent worker processes"),
    Setting("server.worker_connections", 10000, _number(10, 100000, integer=True),
            "open connections (streams included) each worker holds"),
    Setting("server.cors_origins", [], _string_list, "origins allowed to call the API from a browser"),
    Setting("server.sse_keepalive_seconds", 15, _number(0.05, 3600),
            "a stream quiet this long gets a ': keep-alive' comment (within one to two periods)"),
    Setting("server.sse_queue_size", 1000, _number(1, 1_000_000, integer=True),
            "events a slow client may have pending before it is disconnected"),
    Setting("server.sse_client_buffer_bytes", 32 * 1024 * 1024, _number(0, 1024**4, integer=True),
            "bytes of events a client may have not yet written before it is disconnected (it resumes; 0: no bound)"),
    Setting("server.sse_worker_buffer_bytes", 256 * 1024 * 1024, _number(0, 1024**4, integer=True),
            "bytes of events all clients of a worker may have not yet written; past it the ones that hold "
            "the most are disconnected (0: no bound)"),
    Setting("server.sse_send_buffer_bytes", 0, _number(0, 64 * 1024 * 1024, integer=True),
            "kernel send buffer of each stream's socket (0: the kernel's autotuning, up to net.ipv4.tcp_wmem)"),
    Setting("server.max_body_bytes", 16 * 1024 * 1024, _number(1024, 1024**3, integer=True),
            "largest request body accepted; larger ones get 413"),
    Setting("server.body_timeout_seconds", 30, _number(0.1, 3600),
            "a request body must arrive within this many seconds, or the request gets 408"),
    Setting("server.body_min_rate_bytes", 1024, _number(0, integer=True),
            "after its first 5 s a request body must arrive at this many bytes/s on average, or 408 (0: off)"),
    Setting("server.max_streams_per_identity", 50, _number(1, 1_000_000, integer=True),
            "streams one identity may hold open on one worker; more get 429"),
    Setting("server.certfile", "", _optional_path,
            "PEM certificate (chain) to serve HTTPS with; empty: plain HTTP"),
    Setting("server.keyfile", "", _optional_path, "PEM private key of server.certfile"),
    Setting("server.proxy_hops", 0, _number(0, 10, integer=True),
            "reverse proxies in front that set X-Forwarded-For: the client's address is read from it "
            "(0: the TCP peer's address)"),
    Setting("server.metrics_allow", ["127.0.0.1/32", "::1/128"], _networks,
            "addresses that may read /metrics and the detailed /readyz (others: the scrape token)"),
    Setting("server.sse_retry_ms", 3000, _number(0, 600_000, integer=True),
            "reconnect delay the stream suggests to EventSource"),
    Setting("server.sse_reconnect_spread_ms", 5000, _number(0, 600_000, integer=True),
            "a closing stream's retry: is sse_retry_ms plus a random part of this, so reconnects spread out"),
    Setting("server.graceful_timeout", 3, _number(0, 600),
            "seconds a stopping worker waits for requests to finish"),
    Setting("security.jwt_secret", _REQUIRED, _string,
            "HS256 signing secret of the tokens (production: at least 32 bytes, not the test secret)"),
    Setting("security.login_max_failures", 5, _number(1, 1000, integer=True),
            "failed logins per login and address before /auth/login answers 429"),
    Setting("security.login_failure_window_seconds", 300, _number(1, 86400, integer=True),
            "how long a failed login counts against its login and address"),
    Setting("security.jwt_access_expiration", 3600, _number(1, integer=True),
            "lifetime of an access token, in seconds"),
    Setting("security.jwt_refresh_expiration", 86400, _number(1, integer=True),
            "lifetime of a refresh token, in seconds"),
    Setting("security.allow_registration", False, _boolean, "whether POST /auth/register is open"),
    Setting("security.default_grants", [], _grants,
            "grants of identities with no permission set assigned (a list of grant objects; none by default)"),
    Setting("security.access_refresh_seconds", 0.5, _number(0.05, 60),
            "how often each worker checks for changed access (freezes, deletions, grants)"),
    Setting("security.metrics_token", "", _secret,
            "bearer token that may read /metrics and the detailed /readyz from any address (empty: none)"),
    Setting("events.retention_seconds", 7 * 24 * 3600, _number(0, integer=True),
            "age after which recorded events are pruned (0: never by age)"),
    Setting("events.retention_count", 0, _number(0, integer=True),
            "newest events always kept; older ones are pruned (0: no limit by count)"),
    Setting("events.prune_interval_seconds", 300, _number(0),
            "how often each worker prunes the event record (0: only by 'attune-sse prune')"),
    Setting("events.listen_per", "instance", _choice("instance", "worker"),
            "who holds a LISTEN connection: one worker per instance, elected, serving the others "
            "(instance), or every worker (worker: only to compare)"),
    Setting("events.fanout", "postgres", _choice("postgres", "redis"),
            "how events reach the instances: each instance LISTENs (postgres), or one leader per cluster "
            "LISTENs and publishes to a Redis stream every instance reads (redis, needs events.redis_url)"),
    Setting("events.redis_url", "", _redis_url, "the Redis server of events.fanout: redis (redis://host:port/db)"),
    Setting("events.redis_stream", "attune:execution_events", _string, "the Redis stream key the leader writes"),
    Setting("events.redis_maxlen", 100000, _number(100, integer=True),
            "entries the Redis stream keeps, about (an instance further behind reads the record)"),
    Setting("log.level", "info", _choice("debug", "info", "warn", "warning", "error", "critical"),
            "debug, info, warn, error or critical"),
    Setting("listener.ping_interval", 3.0, _number(0.1, 60),
            "seconds of silence after which the listener pings PostgreSQL"),
    Setting("listener.ping_timeout", 5.0, _number(0.1, 60),
            "seconds a ping may take before the connection is taken for dead"),
    Setting("listener.reconnect_max_delay", 5.0, _number(0.1, 300),
            "upper bound of the listener's reconnect backoff, in seconds"),
)
_BY_KEY = {s.key: s for s in SETTINGS}


class Config(Mapping[str, Any]):
    """Validated settings, read by dotted key: ``config["database.url"]``."""

    def __init__(self, values: dict[str, Any], source: str = "<dict>") -> None:
        self._values = values
        self.source = source

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self, **changes: Any) -> Config:
        """A copy with some keys changed; keys use ``__`` for dots (``database__url``)."""
        values = dict(self._values)
        for name, value in changes.items():
            key = name.replace("__", ".")
            if key not in _BY_KEY:
                raise ConfigError(key, "unknown setting")
            values[key] = _parse(_BY_KEY[key], value)
        return Config(values, self.source)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower().replace("__", ".")
        try:
            overrides[key] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            overrides[key] = raw
    return overrides


def _parse(setting: Setting, value: Any) -> Any:
    try:
        return setting.parse(value)
    except ValueError as exc:
        raise ConfigError(setting.key, f"{exc} (expected: {setting.help})") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read the YAML file, apply environment overrides and validate every setting."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV)
    tree: Any = {}
    source = "<defaults>"
    if path:
        file = Path(path)
        source = str(file)
        try:
            tree = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError("config", f"file {file} does not exist; pass -c with a YAML file") from None
        except yaml.YAMLError as exc:
            raise ConfigError("config", f"{file} is not valid YAML: {exc}".replace("\n", " ")) from None
        if not isinstance(tree, Mapping):
            raise ConfigError("config", f"{file} must hold a mapping of sections")
    given = _flatten(tree)
    given.update(_env_overrides(environ))
    given.update(overrides or {})

    for key in sorted(set(given) - set(_BY_KEY)):
        log.warning("config: ignoring unknown setting %s (from %s)", key, source)

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.key in given:
            values[setting.key] = _parse(setting, given[setting.key])
        elif setting.default is _REQUIRED:
            env_name = ENV_PREFIX + setting.key.upper().replace(".", "__")
            raise ConfigError(
                setting.key,
                f"missing; set it in the config file or with {env_name} (expected: {setting.help})",
            )
        else:
            values[setting.key] = setting.default
    if values["events.fanout"] == "redis" and not values["events.redis_url"]:
        raise ConfigError("events.redis_url", "missing; events.fanout: redis needs the Redis server's URL "
                          "(redis://host:port/0), or set events.fanout: postgres")
    if values["events.fanout"] == "redis" and importlib.util.find_spec("redis") is None:
        # Found now, in one line, rather than by a leader that would retry every second for ever.
        raise ConfigError("events.fanout", "redis needs the redis package: pip install 'attune-sse[redis]' "
                          "(or set events.fanout: postgres)")
    return Config(values, source)


# Secrets that appear in this repository and its docs: never good enough for production.
KNOWN_TEST_SECRETS = frozenset({"test-secret-for-testing-only-not-secure"})
MIN_PRODUCTION_SECRET_BYTES = 32


def check_production(config: Config) -> None:
    """Refuse to serve in production with a secret anyone could have read, or guess."""
    if config["environment"] != "production":
        return
    secret = config["security.jwt_secret"]
    if secret in KNOWN_TEST_SECRETS:
        raise ConfigError("security.jwt_secret",
                          "is the published test secret; set a random one for production "
                          "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(48))')")
    if len(secret.encode()) < MIN_PRODUCTION_SECRET_BYTES:
        raise ConfigError("security.jwt_secret",
                          f"must be at least {MIN_PRODUCTION_SECRET_BYTES} bytes in production, "
                          f"got {len(secret.encode())}")


def log_level_name(config: Config) -> str:
    """The logging module's name of the level the config names (``warn`` is WARNING)."""
    name = config["log.level"].upper()
    return "WARNING" if name == "WARN" else name


def log_level(config: Config) -> int:
    """The logging level the config names."""
    return getattr(logging, log_level_name(config))


def settings_reference() -> str:
    """The "Every key" tables of docs/configuration.md, made from SETTINGS (scripts/config-docs writes
    them; a test fails when the file is stale)."""
    sections: dict[str, list[Setting]] = {}
    for setting in SETTINGS:
        section = setting.key.rpartition(".")[0] or "(top level)"
        sections.setdefault(section, []).append(setting)
    lines = []
    for section, settings in sections.items():
        lines += [f"### {section}", "", "| key | default | what it is |", "|---|---|---|"]
        lines += [f"| `{s.key}` | {_shown_default(s)} | {s.help} |" for s in settings]
        lines.append("")
    return "\n".join(lines)


def _shown_default(setting: Setting) -> str:
    value = setting.default
    if value is _REQUIRED:
        return "(required)"
    if value == "" or value is None:
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`[{', '.join(map(str, value))}]`"
    shown = f"`{value}`"
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0 and "bytes" in setting.key:
        shown += f" ({value // (1024 * 1024)} MiB)"
    elif isinstance(value, int) and value >= 86400 and value % 86400 == 0 and "seconds" in setting.key:
        shown += f" ({value // 86400} days)"
    return shown
