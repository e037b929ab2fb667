"""``/metrics`` in the Prometheus text format, with prometheus_client.

The hot path (hub, listener, stream view) only bumps plain integers. A greenlet
per worker copies them into prometheus_client metrics once a second, and again
on each scrape of that worker, so counting costs nothing per event.

Under gunicorn several workers answer ``/metrics``; prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, which ``serve.hooks.on_starting``
sets) sums them, so any worker's answer covers the whole instance. Without that
variable (an app made in a test) the metrics of this process are served.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest, multiprocess

from attune_sse.core.hub import Hub
from attune_sse.runtime.feed import Feed
from attune_sse.runtime.listener import Listener

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SYNC_INTERVAL = 1.0

# Counter name (prometheus_client adds _total) -> (help, how to read its running total). The
# listener's counters grow in the worker that holds the instance's (or the cluster's) LISTEN.
COUNTERS: dict[str, tuple[str, Callable[[Hub, Feed, Listener | None], int]]] = {
    "attune_sse_events_received": ("events published to the workers' hubs", lambda h, f, lis: f.received),
    "attune_sse_events_filled": ("events a worker read from the record because they did not come through "
                                 "its relay or broker", lambda h, f, lis: f.filled),
    "attune_sse_events_caught_up": ("events read from the record after a listener reconnect",
                                    lambda h, f, lis: lis.caught_up if lis else 0),
    "attune_sse_events_delivered": ("event deliveries written to SSE clients", lambda h, f, lis: h.stats.sent),
    "attune_sse_queue_drops": ("slow SSE clients disconnected because their queue was full",
                               lambda h, f, lis: h.stats.overflows),
    "attune_sse_streams_opened": ("SSE streams opened", lambda h, f, lis: h.stats.subscribed_total),
    "attune_sse_listener_reconnects": ("LISTEN connections re-established",
                                       lambda h, f, lis: lis.reconnects if lis else 0),
    "attune_sse_event_ids_skipped": ("event ids passed because their transactions did not commit",
                                     lambda h, f, lis: lis.skipped if lis else 0),
}
REJECTED = "attune_sse_notifications_rejected"


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


@dataclass
class Metrics:
    """This worker's Prometheus metrics, fed from the counters of its hub, its feed and its listener if any."""

    hub: Hub
    feed: Feed
    listener: Callable[[], Listener | None]  # this worker's LISTEN, if it holds one
    # Where the metrics live outside multiprocess mode (there, unused: the files are summed at scrape time).
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _last: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # In multiprocess mode values live in files, summed at scrape time: no registry here.
        reg = None if multiprocess_mode() else self.registry
        self.streams = Gauge("attune_sse_open_streams", "SSE streams open now",
                             multiprocess_mode="livesum", registry=reg)
        self.listeners = Gauge("attune_sse_listener_connected", "workers whose events flow (the instance's "
                               "listener, or the broker, is connected and its messages arrive)",
                               multiprocess_mode="livesum", registry=reg)
        self.listens = Gauge("attune_sse_listen_connections", "LISTEN connections held (one per instance, "
                             "or one per cluster with a broker)", multiprocess_mode="livesum", registry=reg)
        self.lag = Gauge("attune_sse_listener_lag_seconds",
                         "seconds from an event's commit to its publication in a worker, for the last event",
                         multiprocess_mode="livemax", registry=reg)
        self.last_event = Gauge("attune_sse_listener_last_event_id",
                                "a worker's position: every event up to this id is published to its hub",
                                multiprocess_mode="livemax", registry=reg)
        self.counters = {
            name: Counter(name, help_text, registry=reg) for name, (help_text, _) in COUNTERS.items()
        }
        self.rejected = Counter(REJECTED, "notifications on the channel that the event record does not bear "
                                "out (they change nothing clients receive), by kind", ["kind"], registry=reg)

    def sync(self) -> None:
        """Copy the counters' growth since the last sync into the metrics."""
        listener = self.listener()
        for name, (_, read) in COUNTERS.items():
            self._grow(self.counters[name], name, read(self.hub, self.feed, listener))
        for kind, value in list(listener.rejected.items() if listener else ()):
            self._grow(self.rejected.labels(kind=kind), f"{REJECTED}:{kind}", value)
        self.streams.set(len(self.hub))
        self.listeners.set(1 if self.feed.flowing else 0)
        self.listens.set(1 if listener is not None and listener.connected else 0)
        if self.feed.lag is not None:
            self.lag.set(self.feed.lag)
        if self.feed.position is not None:
            self.last_event.set(self.feed.position)

    def _grow(self, counter: Counter, key: str, value: int) -> None:
        """Add to ``counter`` what the running total ``value`` has grown by since the last sync."""
        grown = value - self._last.get(key, 0)
        if grown > 0:
            counter.inc(grown)
        self._last[key] = value

    def start(self) -> gevent.Greenlet:
        def run() -> None:
            while True:
                self.sync()
                gevent.sleep(SYNC_INTERVAL)
        return gevent.spawn(run)

    def exposition(self) -> tuple[bytes, str]:
        """(the Prometheus text of the instance, its content type), summed over the workers."""
        self.sync()
        if multiprocess_mode():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        for _ in range(3):
            try:
                return generate_latest(registry), CONTENT_TYPE_LATEST
            except struct.error:  # a worker's file caught as it is made (prometheus_client reads it empty)
                gevent.sleep(0.05)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """gunicorn ``child_exit``: a dead worker's live gauges leave the sums."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)
