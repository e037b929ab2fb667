"""One listener per instance: the workers of one gunicorn instance elect a leader that reads for all.

PostgreSQL signals every listening backend on each commit that notifies, so
each LISTEN taxes every write of an execution. The workers of an instance
therefore share one: each worker tries an exclusive ``flock`` on a file in the
instance's relay folder (made by the master, hooks.py); the one that holds it
is the *leader*. It runs the source of events (sources.py: the LISTEN of
listener.py, or the Redis stream of broker.py) and serves the resulting
messages to the other workers, the *followers*, over a Unix socket in the same
folder (followers.py).

The kernel drops a dead process's lock at once: when the leader exits or is
killed, its followers see the socket close, race for the lock, and the winner
leads from its own position (its source reads the record after it, so nothing
is lost); the others follow it and fill any hole from the record (feed.py). A
follower that hears nothing (not even the leader's heartbeat, each second) for
a while reconnects. A follower too slow to take messages is dropped and comes
back with a fill. Each worker's ``/readyz`` says whether messages reach it.

Without a relay folder (the app made outside gunicorn) or with
``events.listen_per: worker``, each worker leads itself.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket  # cooperative whether or not the process is patched (in-process tests)

from attune_sse.errors import one_line
from attune_sse.runtime.followers import Followers, read_messages
from attune_sse.runtime.message import BEAT_INTERVAL, SILENCE_LIMIT, Message, encode

if TYPE_CHECKING:
    from attune_sse.runtime.feed import Feed
    from attune_sse.runtime.listener import Listener
    from attune_sse.runtime.sources import MakeSource, Source

log = logging.getLogger(__name__)

LOCK_FILE = "leader.lock"
SOCKET_FILE = "relay.sock"


class Fanout:
    """The leader's outlet: every message to each follower, then to its own feed. Followers first: their
    bytes leave at once (followers.py), so their fan-out runs beside the leader's own."""

    def __init__(self, feed: Feed, followers: Followers | None) -> None:
        self.feed = feed
        self.followers = followers

    def send(self, message: Message) -> None:
        if self.followers is not None:
            self.followers.send(encode(message))
        self.feed.send(message)


class Relay:
    """This worker's place in its instance: leader (runs the source) or follower (reads the leader)."""

    def __init__(self, feed: Feed, make_source: MakeSource, relay_dir: str | os.PathLike[str] | None) -> None:
        self.feed = feed
        self.make_source = make_source  # called once this worker leads
        self.relay_dir = Path(relay_dir) if relay_dir else None
        self.role = "electing"
        self.followers: Followers | None = None
        self.source: Source | None = None  # made once this worker leads
        self.elections = 0  # times this worker took the lead
        self.leader_pid: int | None = None
        self._lock_fd: int | None = None
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> Relay:
        self._greenlets.append(gevent.spawn(self._run))
        return self

    def stop(self) -> None:
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        self._step_down()

    @property
    def listener(self) -> Listener | None:
        """This worker's LISTEN, if it holds one (it leads, and the source is PostgreSQL)."""
        return self.source.listener if self.source is not None else None

    def stats(self) -> dict[str, Any]:
        return {"role": self.role, "leader_pid": self.leader_pid, "elections": self.elections,
                "followers": len(self.followers) if self.followers is not None else 0,
                "followers_dropped": self.followers.dropped if self.followers is not None else 0}

    # -- election ----------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                relay_dir = self.relay_dir
                if relay_dir is None or self._try_lock(relay_dir):
                    self._lead()  # returns only if the lock file was taken from under it
                else:
                    self._follow(relay_dir)
            except Exception:
                # A bug or a source that cannot start: say so, let another worker try, stand again.
                log.exception("relay: worker %d failed as %s; standing again in 1s", os.getpid(), self.role)
                self._step_down()
                gevent.sleep(1.0)
                continue
            gevent.sleep(random.uniform(0.02, 0.1))

    def _try_lock(self, relay_dir: Path) -> bool:
        path = relay_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        if not _same_file(fd, path):  # unlinked meanwhile (by whom?): a lock on it would be nobody's
            os.close(fd)
            return False
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())  # who leads, for followers' /readyz and for operators
        return True

    # -- leading -----------------------------------------------------------

    def _lead(self) -> None:
        self.elections += 1
        was = self.role
        self.role = "leader"
        self.leader_pid = os.getpid()
        relay_dir = self.relay_dir
        if relay_dir is not None:
            self.followers = Followers(relay_dir / SOCKET_FILE, self._hello)
            log.info("relay: worker %d leads its instance%s, from event %s", os.getpid(),
                     " (the previous leader is gone)" if was == "follower" else "", self.feed.position)
        source = self.source = self.make_source(Fanout(self.feed, self.followers), self.feed)
        while True:
            gevent.sleep(BEAT_INTERVAL)
            source.beat()
            if relay_dir is not None and not self._still_ours(relay_dir):
                log.error("relay: the instance's lock file or socket in %s was removed (a /tmp cleaner?); "
                          "worker %d steps down and the workers elect again", relay_dir, os.getpid())
                self._step_down()
                return

    def _hello(self) -> bytes | None:
        feed = self.feed
        return None if feed.position is None else encode(feed.heartbeat(feed.upstream_ok))

    def _still_ours(self, relay_dir: Path) -> bool:
        followers = self.followers
        try:
            socket_ours = followers is not None and os.stat(relay_dir / SOCKET_FILE).st_ino == followers.inode
        except FileNotFoundError:
            socket_ours = False
        return self._lock_fd is not None and _same_file(self._lock_fd, relay_dir / LOCK_FILE) and socket_ours

    def _step_down(self) -> None:
        # Each part is stopped whatever happens to the others: a worker that steps down must let go of
        # the lock below, or its instance has no leader until it dies.
        source, self.source = self.source, None
        if source is not None:
            try:
                source.stop()
            except Exception:
                log.exception("relay: worker %d could not stop its source cleanly; stepping down anyway",
                              os.getpid())
        followers, self.followers = self.followers, None
        if followers is not None:
            try:
                followers.close()
            except Exception:
                log.exception("relay: worker %d could not close its followers' socket cleanly; stepping down "
                              "anyway", os.getpid())
        lock_fd, self._lock_fd = self._lock_fd, None
        if lock_fd is not None:
            os.close(lock_fd)
        self.role = "electing"

    # -- following ---------------------------------------------------------

    def _follow(self, relay_dir: Path) -> None:
        """Read the leader until its socket closes or goes silent."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(relay_dir / SOCKET_FILE))
        except OSError:
            sock.close()  # no leader serving yet (it is starting, or just died): elect again
            return
        try:
            self.leader_pid = int((relay_dir / LOCK_FILE).read_text() or 0) or None
        except (OSError, ValueError):
            self.leader_pid = None
        if self.role != "follower":
            log.info("relay: worker %d follows its instance's leader, worker %s", os.getpid(), self.leader_pid)
        self.role = "follower"
        sock.settimeout(SILENCE_LIMIT * 2)
        try:
            for message in read_messages(sock):
                try:
                    self.feed.send(message)
                except Exception as exc:
                    # Reading a hole from the record failed (the database is down, the backlog pool
                    # busy): the position has not passed it; the next hello brings the hole back.
                    log.warning("relay: worker %d could not read what it missed from the record (%s); "
                                "reconnecting to its leader", os.getpid(), one_line(exc))
                    gevent.sleep(0.5)
                    return
        except (OSError, EOFError, ValueError) as exc:
            log.warning("relay: worker %d lost its instance's leader (%s); electing again", os.getpid(),
                        type(exc).__name__ if not str(exc) else exc)
        finally:
            sock.close()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
