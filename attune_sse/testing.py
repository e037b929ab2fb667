"""Run the real service in a child process: for the test suite and the benchmarks.

Like ``flask.testing``, this is support code, not part of the pipeline: it
starts ``gunicorn -c gunicorn.conf.py`` with a config file it writes, waits
until events reach every worker (its instance's listener, or the broker, is
connected and relays to it), and stops it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import psycopg2
import requests

from attune_sse.config import CONFIG_ENV, ENV_PREFIX
from attune_sse.runtime.listener import APPLICATION_NAME
from attune_sse.serve.launch import Gunicorn
from attune_sse.storage.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


def listener_pids(database_url: str) -> set[int]:
    """Backend pids of the attune-sse listeners connected to this database."""
    conn = psycopg2.connect(database_url, application_name="attune-sse-probe")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
                (APPLICATION_NAME,),
            )
            return {pid for (pid,) in cur.fetchall()}
    finally:
        conn.close()


class ServerProcess:
    """One gunicorn instance with gevent workers serving attune-sse."""

    def __init__(self, config: dict[str, Any], work_dir: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.config = json.loads(json.dumps(config))
        self.config.setdefault("server", {}).update(host="127.0.0.1", port=self.port)
        self.workers = self.config["server"].get("workers", 2)
        self.database_url = self.config["database"]["url"]
        scheme = "https" if self.config["server"].get("certfile") else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.port}"
        self.config_path = work_dir / f"config-{self.port}.yaml"
        self.log_path = work_dir / f"gunicorn-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.config_path.write_text(json.dumps(self.config))  # JSON is YAML
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env[CONFIG_ENV] = str(self.config_path)
        with open(self.log_path, "ab") as log_file:
            self.gunicorn = Gunicorn(env, cwd=ROOT, output=log_file)
        self.process = self.gunicorn.process
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def worker_pids(self) -> set[int]:
        """The pids of the master's gunicorn workers now (its child processes, from /proc)."""
        master = self.gunicorn.pid
        pids = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process ended while this looked
            if int(fields[1]) == master and fields[0] != "Z":
                pids.add(int(stat.parent.name))
        return pids

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def listeners_connected(self) -> bool:
        """/metrics counts every worker of this instance as one whose events flow."""
        token = self.config.get("security", {}).get("metrics_token")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            metrics = requests.get(self.base_url + "/metrics", headers=headers, timeout=2).text
        except requests.ConnectionError:
            return False
        match = re.search(r"^attune_sse_listener_connected (\S+)$", metrics, re.MULTILINE)
        return match is not None and float(match.group(1)) >= self.workers

    def wait_ready(self, timeout: float = 30.0) -> None:
        """/readyz answers 200 and events reach every worker."""
        self.gunicorn.wait_ready(self.base_url + "/readyz", timeout, ready=self.listeners_connected,
                                 why=lambda: "\n" + self.log()[-3000:],
                                 cafile=self.config["server"].get("certfile") or None)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        return None if self.process is None else self.gunicorn.stop(timeout)
