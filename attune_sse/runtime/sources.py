"""What the worker that leads its instance runs: a source of messages, and the outlet it emits to.

A *source* reads events from upstream and emits them as messages (message.py):
the LISTEN of listener.py (``events.fanout: postgres``), or the Redis stream of
broker.py (``events.fanout: redis``). The leader (election.py) makes one when
it takes the lead, from where its own feed is, and beats it every second. Its
outlet is the leader's ``Fanout`` (election.py): each message to the leader's
own feed, then, as bytes, to each follower (followers.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from attune_sse.runtime.listener import Listener, ListenerSettings

if TYPE_CHECKING:
    from attune_sse.runtime.election import Fanout
    from attune_sse.runtime.feed import Feed


class Source(Protocol):
    """A source of messages, running once made; the leader beats it and stops it when it steps down."""

    @property
    def listener(self) -> Listener | None:
        """The LISTEN this worker holds, if any (for /readyz and the metrics)."""

    def beat(self) -> None:
        """Send a heartbeat (followers hear that the leader is alive while no event comes)."""

    def stats(self) -> dict[str, Any]:
        """Its counters, for /readyz."""

    def stop(self) -> None: ...


# Made by the leader once it leads: given its Fanout, and its feed (where it is, in which history).
MakeSource = Callable[["Fanout", "Feed"], Source]


class ListenerSource:
    """``events.fanout: postgres``: the leader's own LISTEN, emitting to its Fanout."""

    def __init__(self, url: str, outlet: Fanout, feed: Feed, settings: ListenerSettings) -> None:
        # A worker that followed goes on from what it has: the listener reads the record after it.
        self.listener: Listener | None = Listener(url, outlet, position=feed.position, epoch=feed.epoch or 0,
                                                  base=feed.base, settings=settings).start()

    def beat(self) -> None:
        if self.listener is not None:
            self.listener.beat()

    def stats(self) -> dict[str, Any]:
        return {"kind": "postgres"}  # its listener's counters are /readyz's "listener"

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()


def listen(url: str, settings: ListenerSettings) -> MakeSource:
    """The source maker of ``events.fanout: postgres``."""
    def make(outlet: Fanout, feed: Feed) -> Source:
        return ListenerSource(url, outlet, feed, settings)
    return make
