"""What one app (one worker) owns, and how a view reaches it.

Apart from the factory (app.py) so the views can reach it without importing
the factory that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:  # the views need the types only: the runtime is the factory's to import (app.py)
    import gevent

    from attune_sse.config import Config
    from attune_sse.core.hub import Hub
    from attune_sse.runtime.access import AccessControl
    from attune_sse.runtime.election import Relay
    from attune_sse.runtime.feed import Feed
    from attune_sse.runtime.metrics import Metrics
    from attune_sse.storage.db import Pool

EXTENSION = "attune_sse"


@dataclass
class AppState:
    """Everything one app (one worker) owns; lives in ``app.extensions["attune_sse"]``."""

    config: Config
    pool: Pool
    hub: Hub
    feed: Feed  # messages in, to the hub
    relay: Relay  # this worker's place in its instance: leader (runs the listener) or follower
    metrics: Metrics
    access: AccessControl
    backlog_pool: Pool  # resumes read the record here, so they cannot take REST's connections
    background: list[gevent.Greenlet] = field(default_factory=list)  # pruner, metrics, keep-alive, access

    def shutdown(self, reason: str = "shutdown") -> int:
        """End every stream and stop listening; return how many streams were open."""
        open_streams = self.hub.close(reason)
        self.relay.stop()
        for greenlet in self.background:
            greenlet.kill(block=False)
        self.pool.close()
        self.backlog_pool.close()
        self.access.watch_pool.close()
        return open_streams


def state() -> AppState:
    return current_app.extensions[EXTENSION]
