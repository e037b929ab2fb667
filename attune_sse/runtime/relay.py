"""One listener per instance: the workers of one gunicorn instance elect a leader that reads for all.

PostgreSQL signals every listening backend on each commit that notifies, so
each LISTEN taxes every write of an execution. The workers of an instance
therefore share one: each worker tries an exclusive ``flock`` on a file in the
instance's relay folder (made by the master, hooks.py); the one that holds it
is the *leader*. It runs the source of events (the LISTEN of listener.py, or a
broker subscription, broker.py) and serves the resulting messages (feed.py)
to the other workers, the *followers*, over a Unix socket in the same folder.

The kernel drops a dead process's lock at once: when the leader exits or is
killed, its followers see the socket close, race for the lock, and the winner
leads from its own position (it reads the record after it, so nothing is
lost); the others follow it and fill any hole from the record. A follower
that hears nothing (not even the leader's heartbeat, each second) for a while
reconnects. A follower too slow to take messages is dropped and comes back
with a fill. Each worker's ``/readyz`` says whether messages reach it.

Without a relay folder (the app made outside gunicorn) or with
``events.listen_per: worker``, each worker leads itself, as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.queue
from gevent.server import StreamServer

from attune_sse.core.event import ExecutionEvent
from attune_sse.errors import one_line
from attune_sse.runtime.feed import BEAT_INTERVAL, SILENCE_LIMIT, Feed, Message, decode, encode
from attune_sse.runtime.listener import Listener

log = logging.getLogger(__name__)

RELAY_DIR_ENV = "ATTUNE_SSE_RELAY_DIR"
LOCK_FILE = "leader.lock"
SOCKET_FILE = "relay.sock"
# What a follower may be behind before it is dropped (it reconnects and fills from the record).
FOLLOWER_QUEUE = 10000  # messages
FOLLOWER_BYTES = 64 * 1024 * 1024
_LENGTH = struct.Struct("!I")


class Broadcast:
    """Where a listener publishes (it takes the hub's place): each call becomes one message, encoded
    once and handed to ``deliver``. Its position is the last one delivered."""

    def __init__(self, deliver: Callable[[Message, bytes], None], connected: Callable[[], bool],
                 position: int | None = None, epoch: int = 0, base: int = 0, source: str = "") -> None:
        self.deliver = deliver
        self.source = source
        self.connected = connected
        self.position = position
        self.epoch, self.base = epoch, base  # the history it goes on (feed.py)

    def _send(self, message: Message) -> None:
        message.epoch, message.base, message.source = self.epoch, self.base, self.source
        self.deliver(message, encode(message))
        self.position = message.to

    def publish_batch(self, events: list[ExecutionEvent]) -> None:
        after = self.position if self.position is not None else events[0].event_id - 1
        self._send(Message(after=after, to=events[-1].event_id, events=events, ok=True))

    def advance(self, position: int) -> None:
        if self.position is None or position > self.position:
            self._send(Message(after=self.position if self.position is not None else position, to=position))

    def reset(self, frame: bytes, position: int) -> None:
        """A new history, going on from ``position``."""
        self.epoch, self.base = time.time_ns(), position
        self._send(Message(after=position, to=position, reset=frame))

    def beat(self) -> None:
        """A message that only says the leader is alive, where it is, and whether its source is connected."""
        if self.position is not None:
            self._send(Message(after=self.position, to=self.position, ok=self.connected()))


class Followers:
    """The leader's side of the Unix socket: every message goes to every follower, in order."""

    def __init__(self, path: Path, hello: Callable[[], bytes | None]) -> None:
        self.path = path
        self.hello = hello  # the first message a new follower gets (where the leader is), if any yet
        self.queues: dict[gevent.queue.Queue, int] = {}  # each follower's queue, and the bytes in it
        self.dropped = 0
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(128)
        self.inode = os.stat(path).st_ino  # the leader checks the path is still its socket
        self.server = StreamServer(listener, self._serve)
        self.server.start()

    def __len__(self) -> int:
        return len(self.queues)

    def send(self, data: bytes) -> None:
        frame = _LENGTH.pack(len(data)) + data
        for q in list(self.queues):
            if self.queues[q] + len(frame) > FOLLOWER_BYTES or q.full():
                self._drop(q)
                continue
            self.queues[q] += len(frame)
            q.put_nowait(frame)

    def _drop_quietly(self, q: gevent.queue.Queue) -> None:
        self.queues.pop(q, None)
        q.queue.clear()
        q.put_nowait(None)

    def _drop(self, q: gevent.queue.Queue) -> None:
        del self.queues[q]
        q.queue.clear()
        q.put_nowait(None)  # its writer closes the connection; the follower fills from the record
        self.dropped += 1
        log.warning("relay: a follower fell more than %d messages or %d MiB behind and was dropped; it "
                    "reconnects and reads what it missed from the record", FOLLOWER_QUEUE, FOLLOWER_BYTES >> 20)

    def _serve(self, sock: socket.socket, _address: Any) -> None:
        q: gevent.queue.Queue = gevent.queue.Queue(FOLLOWER_QUEUE)
        hello = self.hello()
        self.queues[q] = 0
        if hello is not None:
            q.put_nowait(_LENGTH.pack(len(hello)) + hello)
            self.queues[q] = _LENGTH.size + len(hello)
        try:
            while True:
                frame = q.get()
                if frame is None:
                    return
                sock.sendall(frame)
                if q in self.queues:
                    self.queues[q] -= len(frame)
        except OSError:
            pass  # the follower went away
        finally:
            self.queues.pop(q, None)
            sock.close()

    def close(self) -> None:
        for q in list(self.queues):  # each writer closes its follower's connection: they elect at once
            self._drop_quietly(q)
        self.server.stop(timeout=0.5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Relay:
    """This worker's place in its instance: leader (runs the source) or follower (reads the leader)."""

    def __init__(self, feed: Feed, make_source: Callable[[Relay], Any], relay_dir: str | None) -> None:
        self.feed = feed
        self.make_source = make_source  # called once this worker leads; returns an object with stop()
        self.relay_dir = Path(relay_dir) if relay_dir else None
        self.role = "electing"
        self.followers: Followers | None = None
        self.source: Any = None  # made once this worker leads: ListenerSource, or broker.BrokerSource
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

    def deliver(self, message: Message, data: bytes) -> None:
        """The leader's way out: its own hub, then every follower."""
        self.feed.apply(message)
        if self.followers is not None:
            self.followers.send(data)

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
        self.source = self.make_source(self)
        while True:
            gevent.sleep(BEAT_INTERVAL)
            beat = getattr(self.source, "beat", None)
            if beat is not None:
                beat()
            if relay_dir is not None and not self._still_ours(relay_dir):
                log.error("relay: the instance's lock file or socket in %s was removed (a /tmp cleaner?); "
                          "worker %d steps down and the workers elect again", relay_dir, os.getpid())
                self._step_down()
                return

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
        if self.source is not None:
            try:
                self.source.stop()
            except Exception:
                log.exception("relay: worker %d could not stop its source cleanly; stepping down anyway",
                              os.getpid())
            self.source = None
        if self.followers is not None:
            try:
                self.followers.close()
            except Exception:
                log.exception("relay: worker %d could not close its followers' socket cleanly; stepping down "
                              "anyway", os.getpid())
            self.followers = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.role = "electing"

    def _hello(self) -> bytes | None:
        if self.feed.position is None:
            return None
        return encode(Message(after=self.feed.position, to=self.feed.position, ok=self.feed.upstream_ok,
                              epoch=self.feed.epoch or 0, base=self.feed.base))

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
            for data in _messages(sock):
                message = decode(data)
                try:
                    self.feed.apply(message)
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

    @property
    def listener(self) -> Listener | None:
        """This worker's LISTEN, if it holds one (it leads, and the source is PostgreSQL)."""
        return getattr(self.source, "listener", None)

    def stats(self) -> dict[str, Any]:
        return {"role": self.role, "leader_pid": self.leader_pid, "elections": self.elections,
                "followers": len(self.followers) if self.followers is not None else 0,
                "followers_dropped": self.followers.dropped if self.followers is not None else 0}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _messages(sock: socket.socket) -> Iterator[bytes]:
    """The length-prefixed messages on ``sock``, read in large chunks (one wake-up brings all that came)."""
    buffer = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("the leader closed the connection")
        buffer += chunk
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + length
            if end > len(buffer):
                break
            yield bytes(buffer[start + _LENGTH.size:end])
            start = end
        del buffer[:start]


class ListenerSource:
    """The leader's source with ``events.fanout: postgres``: a LISTEN of its own, publishing through ``relay``."""

    def __init__(self, url: str, relay: Relay, **settings: Any) -> None:
        feed = relay.feed
        self.broadcast = Broadcast(relay.deliver, lambda: self.listener.connected, feed.position, feed.epoch or 0,
                                   feed.base)
        self.listener = Listener(url, self.broadcast, **settings)  # type: ignore[arg-type]
        # A worker that followed goes on from what it has: the listener reads the record after it.
        self.listener.position = relay.feed.position
        self.listener.start()

    def beat(self) -> None:
        self.broadcast.beat()

    def stop(self) -> None:
        self.listener.stop()
