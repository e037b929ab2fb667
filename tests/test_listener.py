"""The listener in this process, against the real PostgreSQL (no server)."""

from __future__ import annotations

import os
import socket
from typing import Any

import gevent
import psycopg2.extensions

from attune_sse.db import make_psycopg2_green
from attune_sse.hub import Hub
from attune_sse.listener import Listener


def test_listener_waits_on_a_descriptor_above_1024(database: Any, db: Any, new_execution: Any) -> None:
    """A worker holding thousands of streams gives a (re)connecting listener a descriptor
    above 1024, where select() fails: the listener must wait another way."""
    fillers = [socket.socket() for _ in range(1100)]
    make_psycopg2_green()
    listener = Listener(database.url, Hub(), ping_interval=1.0)
    try:
        sub = listener.hub.subscribe()
        listener.start()
        with gevent.Timeout(10):
            while not listener.connected:
                gevent.sleep(0.01)
        highest_filler = max(filler.fileno() for filler in fillers)
        assert highest_filler > 1024
        assert [fd for fd in _open_fds() if fd > highest_filler], "the listener's socket came after the fillers"
        execution_id = new_execution()
        with gevent.Timeout(10):
            while True:
                batch = sub.next_batch(0.1)
                if any(event.entity_id == execution_id for event in batch):
                    break
        assert listener.connected
    finally:
        listener.stop()
        psycopg2.extensions.set_wait_callback(None)
        for filler in fillers:
            filler.close()


def _open_fds() -> list[int]:
    return [int(fd) for fd in os.listdir("/proc/self/fd")]
