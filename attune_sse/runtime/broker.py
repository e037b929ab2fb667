"""``events.fanout: redis``: one LISTEN per cluster, fan-out to every instance through a Redis stream.

Each instance's leader (election.py) runs a ``BrokerSource`` (a source,
sources.py): it reads the stream and hands every message to its outlet (its
own feed and its followers), and it
stands for election as the cluster's *publisher*: the worker holding a
PostgreSQL advisory lock (on a connection of its own, so the lock goes with the
process) runs the only LISTEN of the cluster and emits its messages
(message.py) to the stream (``Publisher`` is that listener's outlet). When it dies, PostgreSQL drops the lock with its
session and another instance's leader takes it within ``ELECTION_INTERVAL``; it
goes on from the newest position in the stream, reading the record after it.

Entry ids are ``<event position>-<n>``, so the stream's order is the record's,
and Redis refuses an entry from a publisher that is behind the stream (two
publishers for a moment cost nothing). Whatever the stream loses (a broker
restarted without its data, entries trimmed past ``events.redis_maxlen``), an
instance notices from the next message's ``after`` and reads the hole from the
record; the event id stays the SSE id and resumes read the record as always.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import zlib
from typing import Any

import gevent
import psycopg2

from attune_sse.config import Config
from attune_sse.errors import one_line
from attune_sse.runtime.backoff import backoff
from attune_sse.runtime.feed import Feed
from attune_sse.runtime.listener import Listener, ListenerSettings
from attune_sse.runtime.message import SILENCE_LIMIT, Message, Outlet, decode, encode
from attune_sse.runtime.sources import MakeSource, Source
from attune_sse.storage.db import connect

log = logging.getLogger(__name__)

LEADER_APPLICATION_NAME = "attune-sse-leader"  # a candidate's connection; the winner's says publisher, its pid
PUBLISHER_APPLICATION_NAME = "attune-sse-publisher"
ELECTION_INTERVAL = 1.0  # s between tries for the cluster's lock
READ_BLOCK_MS = 1000
READ_COUNT = 500
_LAST_SEQ = 2**64 - 1


def _redis(config: Config) -> Any:
    import redis  # only with events.fanout: redis (the optional dependency)

    return redis.Redis.from_url(config["events.redis_url"], socket_connect_timeout=2.0,
                                socket_timeout=READ_BLOCK_MS / 1000 + 3.0, socket_keepalive=True)


def _entry_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def source_of(url: str) -> str:
    """This database's identity (attune.event_source), carried by every message that goes through Redis."""
    conn = connect(url, application_name=LEADER_APPLICATION_NAME, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id::text FROM attune.event_source")
            return cur.fetchone()[0]
    finally:
        conn.close()


class BrokerSource:
    """An instance leader's source: the Redis stream in, its hub and followers out; and a candidate
    for the cluster's publisher."""

    def __init__(self, config: Config, url: str, outlet: Outlet, feed: Feed, settings: ListenerSettings) -> None:
        import redis

        # Any Redis error (a lost connection, or LOADING, READONLY, a blocked read undone by a failover)
        # is waited out; the position has not moved.
        self._errors = redis.RedisError
        self.outlet = outlet
        self.feed = feed
        self.key = config["events.redis_stream"]
        self.redis = _redis(config)
        self.source = source_of(url)
        self._foreign: set[str] = set()
        self.entries = 0  # entries read from the stream
        self.skipped = 0  # entries that were not messages of this deployment
        self.errors = 0  # failed reads of Redis
        self.restarts = 0  # times the stream was found started over below this reader
        self.publisher = Publisher(config, url, self.source, settings)
        self._greenlets = [gevent.spawn(self._read), gevent.spawn(self.publisher.run)]

    @property
    def listener(self) -> Listener | None:
        return self.publisher.listener

    def beat(self) -> None:
        """While the stream is silent, followers still hear from their leader (events do not flow)."""
        feed = self.feed
        if feed.position is not None and time.monotonic() - feed.last_message >= SILENCE_LIMIT:
            self.outlet.send(feed.heartbeat(ok=False))

    def stats(self) -> dict[str, Any]:
        return {"kind": "redis", "entries": self.entries, "skipped": self.skipped, "errors": self.errors,
                "restarts": self.restarts, "publishing": self.publisher.leading,
                "appended": self.publisher.appended, "refused": self.publisher.refused}

    def _read(self) -> None:
        feed = self.feed
        # From where this worker is (it may have followed another leader); a new instance from now on.
        last_id: Any = f"{feed.position}-0" if feed.position is not None else "$"
        failures = 0
        last_entry = time.monotonic()
        while True:
            try:
                reply = self.redis.xread({self.key: last_id}, count=READ_COUNT, block=READ_BLOCK_MS)
                if not reply and time.monotonic() - last_entry > SILENCE_LIMIT and self._went_back(last_id):
                    self.restarts += 1
                    last_id = "0-0"
                    continue
            except self._errors as exc:
                failures += 1
                self.errors += 1
                if failures == 1:
                    log.warning("broker: reading %s from Redis failed (%s); events are not being received; "
                                "retrying", self.key, exc)
                gevent.sleep(backoff(failures))
                if feed.position is not None:
                    # The broker may have come back empty (entry ids restart below ours): read
                    # everything at or after our position, duplicates are dropped by the feed.
                    last_id = f"{max(feed.position - 1, 0)}-{_LAST_SEQ}"
                continue
            if failures:
                log.warning("broker: reading %s from Redis again after %d failed attempt(s)", self.key, failures)
                failures = 0
            for _key, entries in reply or ():
                for entry_id, fields in entries:
                    last_entry = time.monotonic()
                    self.entries += 1
                    data = fields.get(b"m")
                    try:
                        if data is not None:
                            self._deliver(data)
                    except (ValueError, KeyError) as exc:
                        self.skipped += 1
                        log.warning("broker: skipped entry %s of %s, not a message of ours (%s)", entry_id,
                                    self.key, exc)
                    except Exception as exc:
                        # Reading a hole from the record failed: the position has not passed it; read
                        # this entry again in a moment, and the hole with it.
                        log.warning("broker: could not read what the stream left out from the record (%s); "
                                    "retrying", one_line(exc))
                        gevent.sleep(1.0)
                        last_id = f"{max((feed.position or 1) - 1, 0)}-{_LAST_SEQ}"
                        break
                    last_id = entry_id

    def _deliver(self, data: bytes) -> None:
        message = decode(data)
        if message.source != self.source:
            if message.source not in self._foreign:
                self._foreign.add(message.source)
                log.error("broker: stream %s carries events of another database (source %s, this one is %s): "
                          "two deployments share events.redis_stream; give each its own. They are not delivered",
                          self.key, message.source or "(none)", self.source)
            return
        self.outlet.send(message)  # the bytes go on as they came (the message keeps them)

    def _went_back(self, last_id: Any) -> bool:
        """Whether the stream now ends below where this reader is: the publisher started it over after
        the database went back in time (see Publisher._append). Read from its start, then."""
        if last_id == "$":
            return False
        top = self.redis.xrevrange(self.key, count=1)
        if not top or _entry_key(top[0][0]) >= _entry_key(last_id):
            return False
        log.warning("broker: stream %s now ends at %s, below this reader (%s): it was started over; "
                    "reading it from the start", self.key, top[0][0], last_id)
        return True

    def stop(self) -> None:
        for greenlet in self._greenlets:
            greenlet.kill()
        self.publisher.stop()
        self.redis.close()


class Publisher:
    """Stands for the cluster's lock; while it holds it, LISTENs and appends every message to the stream
    (it is that listener's outlet)."""

    def __init__(self, config: Config, url: str, source: str, settings: ListenerSettings) -> None:
        import redis

        self.source = source
        self._taken_logged = -1e9
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self._refused = redis.ResponseError
        self._redis_error = redis.RedisError
        self.url = url
        self.key = config["events.redis_stream"]
        self.maxlen = config["events.redis_maxlen"]
        self.lock_key = zlib.crc32(f"attune-sse publisher of {self.key}".encode())
        self.redis = _redis(config)
        self.settings = settings
        self.listener: Listener | None = None
        self.leading = False
        self.appended = 0  # entries this worker added to the stream
        self.refused = 0  # entries Redis refused (an id at or below the stream's newest)

    def run(self) -> None:
        while True:
            conn = None
            try:
                conn = connect(self.url, application_name=LEADER_APPLICATION_NAME, autocommit=True)
                with conn.cursor() as cur:
                    # The server drops a vanished host's session, and with it the lock, within about
                    # 15 s (by default it would wait for two hours of TCP keepalive).
                    cur.execute("SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; "
                                "SET tcp_keepalives_count = 3; SET tcp_user_timeout = 10000")
                while not self._try_lock(conn):
                    gevent.sleep(ELECTION_INTERVAL * random.uniform(0.8, 1.0))
                self._lead(conn)
            except (psycopg2.Error, OSError) as exc:
                log.warning("broker: the publisher's database connection failed (%s); standing again",
                            one_line(exc))
            except self._redis_error as exc:  # MISCONF, OOM, READONLY...
                log.error("broker: Redis refused the publisher (%s); standing again in 5s", exc)
                gevent.sleep(5.0)
            finally:
                self._stop_listener()
                if conn is not None and not conn.closed:
                    conn.close()
            gevent.sleep(ELECTION_INTERVAL)

    def _try_lock(self, conn: Any) -> bool:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (self.lock_key,))
            return bool(cur.fetchone()[0])

    def _lead(self, conn: Any) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('application_name', %s, false)",
                        (f"{PUBLISHER_APPLICATION_NAME} pid={os.getpid()} host={socket.gethostname()}"[:63],))
        position, epoch, base = self._stream_position()
        log.warning("broker: this worker publishes the cluster's events to Redis stream %s, from event %s",
                    self.key, position if position is not None else "(the newest)")
        self.leading = True
        listener = self.listener = Listener(self.url, self, position=position, epoch=epoch, base=base,
                                            settings=self.settings).start()
        while True:
            gevent.sleep(1.0)
            listener.beat()
            with gevent.Timeout(5.0, OSError("the lock's connection did not answer in 5s")), conn.cursor() as cur:
                cur.execute("SELECT 1")  # a lost connection is a lost lock: stop publishing

    def _stream_position(self) -> tuple[int | None, int, int]:
        """(position, epoch, base) of the stream's newest message: where the previous publisher was."""
        failures = 0
        while True:
            try:
                top = self.redis.xrevrange(self.key, count=1)
                if not top:
                    return None, 0, 0
                try:
                    message = decode(top[0][1][b"m"])
                except (ValueError, KeyError):
                    message = None
                if message is None or message.source != self.source:
                    return None, 0, 0  # not ours: start from the newest event; _append deals with the stream
                return message.to, message.epoch, message.base
            except self._errors as exc:
                failures += 1
                if failures == 1:
                    log.warning("broker: the publisher cannot reach Redis (%s); waiting for it", exc)
                gevent.sleep(backoff(failures))

    def send(self, message: Message) -> None:
        """One entry per message. Events wait for Redis (the listener holds its position meanwhile);
        a heartbeat that cannot be written is dropped."""
        message.source = self.source
        data = encode(message)
        failures = 0
        while True:
            try:
                self.redis.xadd(self.key, {"m": data}, id=f"{message.to}-*", maxlen=self.maxlen, approximate=True)
                self.appended += 1
                if failures:
                    log.warning("broker: writing to Redis again after %d failed attempt(s)", failures)
                return
            except self._refused as exc:
                if "equal or smaller" in str(exc):
                    self.refused += 1
                    try:
                        if self._settle_refusal(message):
                            return
                        continue  # the stream was started over: write again
                    except self._errors as lost:  # lost Redis while looking at the stream: wait, write again
                        problem = f"writing to Redis failed ({lost})"
                else:
                    # READONLY, NOREPLICAS, MISCONF, OOM...: Redis cannot take writes now; wait as for a lost
                    # connection (the listener holds its position; the events wait in the record).
                    problem = f"Redis refuses writes ({exc})"
            except self._errors as exc:
                problem = f"writing to Redis failed ({exc})"
            if message.is_beat:
                return
            failures += 1
            if failures == 1:
                log.warning("broker: %s; events wait in the record until Redis takes them", problem)
            gevent.sleep(backoff(failures))

    def _settle_refusal(self, message: Message) -> bool:
        """Redis refused ``message``'s id (``equal or smaller`` than the stream's newest): True if nothing
        is to be written (an entry of ours is at or past it; or the stream is another deployment's),
        False once the stream has been started over for it."""
        why = self._why_refused(message)
        if why is None:
            return True  # another publisher of ours wrote it, or newer ones
        if why == "foreign":
            # Nothing of ours gets through, so every instance of this deployment says it is not
            # ready; its events wait in the record, to be read once the stream is its own again.
            now = time.monotonic()
            if now - self._taken_logged > 60:
                self._taken_logged = now
                log.error("broker: stream %s holds events of another database: two deployments share "
                          "events.redis_stream; give each its own (this one publishes nothing meanwhile)", self.key)
            return True
        # The database went back in time (listener.py), or something else wrote above our ids: start the
        # stream over; readers notice it ends below them (BrokerSource._went_back).
        log.error("broker: %s: starting stream %s over from event %d", why, self.key, message.to)
        self.redis.delete(self.key)
        return False

    def _why_refused(self, message: Message) -> str | None:
        """Why Redis refused ``message``'s id: None if an entry of ours at or past it is there."""
        top = self.redis.xrevrange(self.key, count=1)
        if not top:
            return "the stream is gone"
        try:
            newest = decode(top[0][1][b"m"])
        except (ValueError, KeyError):
            return f"entry {top[0][0].decode()} is not a message of attune-sse"
        if newest.source != self.source:
            return "foreign"
        if message.reset is not None:
            return f"the database went back to event {message.to}"
        return None

    def _stop_listener(self) -> None:
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        if self.leading:
            log.warning("broker: this worker no longer publishes the cluster's events")
        self.leading = False

    def stop(self) -> None:
        self._stop_listener()
        self.redis.close()


def stream(config: Config, url: str, settings: ListenerSettings) -> MakeSource:
    """The source maker of ``events.fanout: redis``."""
    def make(outlet: Outlet, feed: Feed) -> Source:
        return BrokerSource(config, url, outlet, feed, settings)
    return make
