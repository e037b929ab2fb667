"""Workers' ends of the path in the test's own process (a hub, its feed, its relay), for the relay and broker tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent

from attune_sse.core.hub import Hub
from attune_sse.runtime.election import Relay
from attune_sse.runtime.feed import Feed
from attune_sse.runtime.sources import MakeSource
from attune_sse.storage.db import Pool


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Wait (cooperatively: the relay's greenlets run meanwhile) for ``condition``, with a deadline."""
    with gevent.Timeout(timeout, AssertionError(f"timed out after {timeout}s waiting for {what}")):
        while not (result := condition()):
            gevent.sleep(0.02)
    return result


class Worker:
    """One worker's end of the path, in this process: its relay, its feed and its hub, and what reached the hub."""

    def __init__(self, url: str, relay_dir: Path | None, make_source: MakeSource) -> None:
        self.hub = Hub()
        self.pool = Pool(url, 2)
        self.feed = Feed(self.hub, self.pool)
        self.relay = Relay(self.feed, make_source, relay_dir)
        self.sub = self.hub.subscribe()
        self.events: list[tuple[int, int]] = []  # (event id, execution id) in the order the hub offered them
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        while (batch := self.sub.next_batch()) is not None:
            self.events.extend((e.event_id, e.entity_id) for e in batch)

    def ids_of(self, executions: set[int]) -> list[int]:
        return [event_id for event_id, execution_id in self.events if execution_id in executions]

    def stop(self) -> None:
        self.relay.stop()
        self.hub.close()
        self._reader.kill()
        self.pool.close()


def recorded(database: Any, executions: set[int]) -> list[int]:
    rows = database.query("SELECT id FROM attune.execution_event WHERE execution = ANY(%s) ORDER BY id",
                          (list(executions),))
    return [row[0] for row in rows]
