"""The leader's Unix socket: every message to every follower of its instance, in order (election.py).

Each message (message.py) goes as its bytes behind a 4-byte length. The
leader keeps one bounded queue per follower: a follower that falls more than
``max_messages`` or ``max_bytes`` behind is dropped (its connection closed),
and reconnects; its feed then reads what it missed from the record. A new
follower's first message is the leader's *hello*: where it is, in which
history, so the follower fills what lies between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent.queue
from gevent import socket  # cooperative whether or not the process is patched (in-process tests)
from gevent.server import StreamServer

from attune_sse.runtime.message import Message, coalesce, decode

log = logging.getLogger(__name__)

# What a follower may be behind before it is dropped (it reconnects and fills from the record).
FOLLOWER_QUEUE = 10000  # messages
FOLLOWER_BYTES = 64 * 1024 * 1024
_LENGTH = struct.Struct("!I")


class _Link:
    """One follower's connection: the frames it has not been sent yet, and whether its writer is sending."""

    __slots__ = ("held", "queue", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queue: gevent.queue.Queue = gevent.queue.Queue()  # bounded by send(), which drops rather than waits
        self.held = 0  # bytes in the queue
        self.writing = False  # the writer took a frame and has not finished sending it


class Followers:
    """The leader's side of the socket at ``path``: ``send`` hands one message's bytes to every follower.

    A follower whose writer is idle gets them written at once, without a greenlet switch (one
    non-blocking write, as the hub writes to an idle client): so followers start their own
    fan-out while the leader does its own. What the socket does not take waits in its queue.
    """

    def __init__(self, path: Path, hello: Callable[[], bytes | None], *, max_messages: int = FOLLOWER_QUEUE,
                 max_bytes: int = FOLLOWER_BYTES) -> None:
        self.path = path
        self.hello = hello  # the first message a new follower gets (where the leader is), if any yet
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self.links: set[_Link] = set()
        self.dropped = 0  # followers dropped for falling behind
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(128)
        self.inode = os.stat(path).st_ino  # the leader checks the path is still its socket
        self.server = StreamServer(listener, self._serve)
        self.server.start()

    def __len__(self) -> int:
        return len(self.links)

    def send(self, data: bytes) -> None:
        """``data`` to every follower behind its length, uncopied (a message may hold a 16 MiB result)."""
        message: list[bytes | memoryview] = [_LENGTH.pack(len(data)), data]
        size = _LENGTH.size + len(data)
        for link in list(self.links):
            # One message larger than the bound still goes to a follower that has nothing pending.
            if (link.held and link.held + size > self.max_bytes) or link.queue.qsize() >= self.max_messages:
                self._drop(link)
                continue
            rest: list[bytes | memoryview] = message
            if not link.writing and link.queue.empty():
                try:
                    written = os.writev(link.sock.fileno(), message)
                except BlockingIOError:
                    written = 0  # its socket is full: the writer sends it when it drains
                except OSError:
                    self._end(link)  # gone: its writer sees it too
                    continue
                if written == size:
                    continue
                rest = _after(message, written)
            link.held += sum(len(part) for part in rest)
            link.queue.put_nowait(rest)

    def _end(self, link: _Link) -> None:
        """Its writer closes the follower's connection once it takes this."""
        self.links.discard(link)
        link.queue.queue.clear()
        link.held = 0
        link.queue.put_nowait(None)

    def _drop(self, link: _Link) -> None:
        self._end(link)
        with contextlib.suppress(OSError):
            # Its writer may be stuck in a send to a follower that reads nothing: that send fails now,
            # and what the follower has received already stays readable before the end.
            link.sock.shutdown(socket.SHUT_RDWR)
        self.dropped += 1
        log.warning("relay: a follower fell more than %d messages or %d MiB behind and was dropped; it "
                    "reconnects and reads what it missed from the record", self.max_messages, self.max_bytes >> 20)

    def _serve(self, sock: socket.socket, _address: Any) -> None:
        link = _Link(sock)
        hello = self.hello()
        if hello is not None:
            link.queue.put_nowait([_LENGTH.pack(len(hello)), hello])
            link.held = _LENGTH.size + len(hello)
        self.links.add(link)
        try:
            while True:
                parts = link.queue.get()
                if parts is None:
                    return
                link.writing = True
                for part in parts:
                    sock.sendall(part)
                link.writing = False
                link.held -= sum(len(part) for part in parts)
        except OSError:
            pass  # the follower went away
        finally:
            self.links.discard(link)
            sock.close()

    def close(self) -> None:
        for link in list(self.links):  # each writer closes its follower's connection: they elect at once
            self._end(link)
        self.server.stop(timeout=0.5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _after(parts: list[bytes | memoryview], written: int) -> list[bytes | memoryview]:
    """What is left of ``parts`` once ``written`` bytes of them went out (views, not copies)."""
    rest: list[bytes | memoryview] = []
    for part in parts:
        if written >= len(part):
            written -= len(part)
            continue
        rest.append(memoryview(part)[written:] if written else part)
        written = 0
    return rest


def read_messages(sock: socket.socket) -> Iterator[Message]:
    """A follower's side: the messages on ``sock``, read in large chunks (one wake-up brings all that
    came, and the batches among it that follow one another come as one: message.coalesce); EOFError
    once the leader closes it, ValueError for bytes that are not messages."""
    buffer = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("the leader closed the connection")
        buffer += chunk
        start = 0
        arrived = []
        while len(buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + length
            if end > len(buffer):
                break
            try:
                arrived.append(decode(bytes(buffer[start + _LENGTH.size:end])))
            except ValueError:
                yield from coalesce(arrived)  # what came before it is whole
                raise
            start = end
        del buffer[:start]
        yield from coalesce(arrived)
