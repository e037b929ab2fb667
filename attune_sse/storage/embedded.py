"""A private PostgreSQL server for ``database.url: embedded`` and for the tests.

The server binaries come from the pip package ``pgserver``; this module only
runs them (initdb, pg_ctl) so that it owns the life cycle: start, stop and
restart on a fixed TCP port of 127.0.0.1, which the fault tests need.
PostgreSQL refuses to run as root, so under root the server runs as the
system user ``attune-pg`` (created on first use). No permission of the user's
folders is changed for it: binaries it cannot reach (a venv under a private
folder, such as tox's ``.tox``) are copied once to ``/var/lib/attune-pg``, and a
data folder it cannot reach is kept there too, with ``data_dir`` a link to it
(``destroy()`` removes both).

Only the service gets in: the superuser has a random password, kept in
``<data_dir>/attune-password`` (mode 0600, in the 0700 data folder), and the
server asks every connection for it (scram-sha-256, TCP and socket alike). A
cluster made by an older version with trust authentication is given a
password on its next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from attune_sse.errors import EmbeddedDatabaseError

log = logging.getLogger(__name__)

SYSTEM_USER = "attune-pg"
SYSTEM_HOME = Path("/var/lib/attune-pg")  # under root: what the server's user must reach and cannot elsewhere
PASSWORD_FILE = "attune-password"
HBA = """# attune-sse embedded server: every connection needs the superuser's password
local all all scram-sha-256
host  all all 127.0.0.1/32 scram-sha-256
host  all all ::1/128 scram-sha-256
"""


def _bin_dir() -> Path:
    # find_spec, not import: pgserver's own import does work we do not need.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedDatabaseError(
            "database.url is 'embedded' but the package pgserver is not installed; "
            "run: pip install pgserver"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedDatabaseError(f"pgserver has no PostgreSQL binaries under {path}")
    return path


def _reachable(path: Path) -> bool:
    """Whether another user can walk down to ``path``: every folder above it lets others through
    (folders yet to be made are made so, with the usual umask)."""
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents if parent.exists())


def _shared_binaries(pginstall: Path) -> Path:
    """pgserver's PostgreSQL, copied once to a folder the server's user can reach; its bin/.

    The binaries find their libraries relative to themselves (``$ORIGIN/../../../pgserver.libs``),
    so the package and its ``pgserver.libs`` are copied side by side, as in site-packages."""
    package = pginstall.parent
    source = pginstall / "bin" / "postgres"
    # Named by the server binary's content: every venv with the same pgserver shares one copy.
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = SYSTEM_HOME / f"pgserver-{digest}"
    if not (target / package.name / pginstall.name / "bin" / "postgres").exists():
        SYSTEM_HOME.mkdir(mode=0o755, parents=True, exist_ok=True)
        log.info("copying PostgreSQL's binaries to %s, where %s can run them", target, SYSTEM_USER)
        staging = Path(tempfile.mkdtemp(prefix=".pgserver-", dir=SYSTEM_HOME))
        tree = staging / "tree"
        tree.mkdir()
        shutil.copytree(pginstall, tree / package.name / pginstall.name, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, tree / libs.name, symlinks=True)
        for folder in (tree, tree / package.name):
            folder.chmod(0o755)
        with contextlib.suppress(OSError):  # atomic: a concurrent copy may have won, which is as good
            tree.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return target / package.name / pginstall.name / "bin"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        # As PostgreSQL binds: connections of a stopped server in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir``, reachable on 127.0.0.1:``port``."""

    def __init__(self, data_dir: str | os.PathLike[str], *, settings: dict[str, str] | None = None) -> None:
        given = Path(data_dir).absolute()
        self.data_dir = given.parent.resolve() / given.name  # a link to the cluster stays a link
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "''",
            "max_connections": "300",
            **(settings or {}),
        }
        self.port: int | None = None
        self._bin = _bin_dir()
        self._user = SYSTEM_USER if os.geteuid() == 0 else None
        if self._user is not None and not _reachable(self._bin / "initdb"):
            self._bin = _shared_binaries(self._bin.parent)
        # The folder the server runs on: data_dir, or where data_dir links to (_prepare_dirs).
        self.cluster_dir = self.data_dir.resolve() if self.data_dir.is_symlink() else self.data_dir

    @property
    def log_file(self) -> Path:
        return self.cluster_dir / "server.log"  # pg_ctl opens it as the server's user

    def url(self, dbname: str = "postgres") -> str:
        if self.port is None:
            raise EmbeddedDatabaseError("the embedded server has not been started")
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{dbname}"

    @property
    def password(self) -> str:
        """The superuser's password (token_urlsafe: safe in a URL as it is)."""
        try:
            return (self.data_dir / PASSWORD_FILE).read_text().strip()
        except FileNotFoundError:
            raise EmbeddedDatabaseError(f"{self.data_dir / PASSWORD_FILE} is missing: start the server once "
                                        "to make it") from None

    # -- life cycle --------------------------------------------------------

    def start(self) -> EmbeddedPostgres:
        """Initialise the cluster if new, then start it (or find it running)."""
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        running = self._running_port()
        if running is not None:
            self.port = running
            log.info("embedded PostgreSQL already running in %s on port %d", self.data_dir, running)
            self._require_password()
            return self
        self.port = self._choose_port()
        started = time.monotonic()
        self._pg_ctl("start", "-w", "-t", "30", "-l", str(self.log_file), "-o", f"-p {self.port}")
        log.info(
            "embedded PostgreSQL started in %s on 127.0.0.1:%d (%.1fs)",
            self.data_dir, self.port, time.monotonic() - started,
        )
        self._require_password()
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``mode`` is pg_ctl's (smart, fast, immediate)."""
        if self._running_port() is None:
            return
        self._pg_ctl("stop", "-w", "-t", "30", "-m", mode)
        log.info("embedded PostgreSQL in %s stopped", self.data_dir)

    def is_running(self) -> bool:
        return self._running_port() is not None

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists."""
        import psycopg2

        conn = psycopg2.connect(self.url(), connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    # -- internals ---------------------------------------------------------

    def destroy(self) -> None:
        """Stop the server and delete its data (and the folder data_dir links to)."""
        self.stop("immediate")
        if self.data_dir.is_symlink():
            shutil.rmtree(self.data_dir.resolve(), ignore_errors=True)
            self.data_dir.unlink()
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _prepare_dirs(self) -> None:
        if self._user is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            return
        entry = self._system_user()
        if self.data_dir.is_symlink() or (not self.data_dir.exists() and not _reachable(self.data_dir)):
            # The server's user cannot walk down to data_dir: its data lives where it can.
            name = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
            clusters = SYSTEM_HOME / "clusters"
            clusters.mkdir(mode=0o711, parents=True, exist_ok=True)
            self.cluster_dir = clusters / name
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            if not self.data_dir.is_symlink():
                self.data_dir.symlink_to(self.cluster_dir, target_is_directory=True)
        elif not _reachable(self.data_dir):
            raise EmbeddedDatabaseError(
                f"{self.data_dir} is in a folder the server's user {SYSTEM_USER} cannot reach; move it "
                f"(or delete it: a new one is kept under {SYSTEM_HOME})")
        self.cluster_dir.mkdir(parents=True, exist_ok=True)
        if self.cluster_dir.stat().st_uid != entry.pw_uid:
            shutil.chown(self.cluster_dir, entry.pw_uid, entry.pw_gid)
        self.cluster_dir.chmod(0o700)

    def _system_user(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                check=True, capture_output=True, text=True,
            )
            return pwd.getpwnam(SYSTEM_USER)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        # Under root, drop the root group too: a folder's group bits would otherwise
        # apply to the server instead of the "other" bits that _prepare_dirs opens.
        # (None for all three, subprocess's defaults, when not root: as ourselves.)
        user = self._user
        try:
            return subprocess.run(
                list(args), check=True, capture_output=True, text=True, timeout=60,
                user=user, group=user, extra_groups=[] if user else None,
            )
        except subprocess.CalledProcessError as exc:
            tail = ""
            if self.log_file.exists():
                tail = " | server log: " + " / ".join(self.log_file.read_text().splitlines()[-5:])
            raise EmbeddedDatabaseError(
                f"{Path(args[0]).name} failed ({exc.returncode}): {exc.stderr.strip() or exc.stdout.strip()}{tail}"
            ) from None

    def _initdb(self) -> None:
        log.info("initialising embedded PostgreSQL cluster in %s", self.data_dir)
        password = secrets.token_urlsafe(32)
        # initdb wants an empty folder: the password goes in once it is made.
        fd, name = tempfile.mkstemp(prefix=f".{self.cluster_dir.name}-", suffix=".pw", dir=self.cluster_dir.parent)
        os.close(fd)
        pwfile = Path(name)
        self._write_private(pwfile, password)
        try:
            self._run(
                str(self._bin / "initdb"), "-D", str(self.cluster_dir), "-U", "postgres",
                "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-locale",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        self._write_private(self.data_dir / PASSWORD_FILE, password)
        (self.data_dir / "pg_hba.conf").write_text(HBA)
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# attune-sse embedded server\n")
            for name, value in self.settings.items():
                conf.write(f"{name} = {value}\n")

    def _write_private(self, path: Path, text: str) -> None:
        """A file only its owner reads: the server's user under root, else us."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(text + "\n")
        os.chmod(path, 0o600)
        if self._user is not None:
            entry = self._system_user()
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _require_password(self) -> None:
        """Checked on every start: the superuser has a password in its file, and pg_hba.conf asks
        every connection for it. A cluster an older attune-sse made with trust authentication
        gets both; so does one whose set-up was cut short between the two."""
        import psycopg2

        if not (self.data_dir / PASSWORD_FILE).exists():
            log.warning("embedded PostgreSQL in %s let any local user in (trust); giving it a password",
                        self.data_dir)
            password = secrets.token_urlsafe(32)
            try:
                conn = psycopg2.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=10)
            except psycopg2.OperationalError as exc:
                raise EmbeddedDatabaseError(
                    f"{self.data_dir / PASSWORD_FILE} is missing and the server asks for a password: "
                    f"set one with ALTER ROLE postgres PASSWORD and write it there ({str(exc).strip()})") from None
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("SET password_encryption = 'scram-sha-256'")
                    cur.execute("ALTER ROLE postgres PASSWORD %s", (password,))
            finally:
                conn.close()
            self._write_private(self.data_dir / PASSWORD_FILE, password)
        hba = self.data_dir / "pg_hba.conf"
        if hba.read_text() != HBA:
            hba.write_text(HBA)
            self._pg_ctl("reload")

    def _pg_ctl(self, *args: str) -> None:
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.cluster_dir), *args)

    def _running_port(self) -> int | None:
        """The port of a live postmaster of this data folder, if there is one."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        try:
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (IndexError, ValueError, ProcessLookupError):
            return None
        return port

    def _choose_port(self) -> int:
        record = self.data_dir.parent / f".{self.data_dir.name}.port"
        if self.port is not None and _port_is_free(self.port):
            port = self.port
        elif record.exists() and record.read_text().strip().isdigit() and _port_is_free(int(record.read_text())):
            port = int(record.read_text())
        else:
            port = free_port()
        record.write_text(str(port))
        return port
