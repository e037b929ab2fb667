"""The client's end of a stream: the one place that knows gunicorn's socket and HTTP/1.1 chunks.

gunicorn sends a streamed HTTP/1.1 response as chunks on the socket it puts in
the environ (``gunicorn.socket``). When a stream's writer is idle, the hub may
hand this sink the next chunk to write itself (``try_write``: one non-blocking
write, no greenlet switch); what the socket does not take at once is finished
by the stream's writer (``send_rest``) before anything else. Only plain
HTTP/1.1 allows that (``direct``): over TLS the bytes must go through the TLS
socket, and HTTP/1.0 is not chunked. The hub and the event know nothing of this.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from typing import Any


class ClientSocket:
    """The client's socket (None outside gunicorn: then nothing is written directly)."""

    __slots__ = ("fd", "sock")

    def __init__(self, sock: socket.socket | None, send_buffer: int = 0, *, direct: bool = False) -> None:
        self.sock = sock
        self.fd = sock.fileno() if sock is not None and direct else None
        if sock is not None and send_buffer:
            # A fixed kernel send buffer bounds what a stalled client can hold in the
            # kernel, and makes it overflow its queue sooner (the kernel doubles the value).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any], send_buffer: int = 0) -> ClientSocket:
        """The socket of this request, writable directly only for plain HTTP/1.1."""
        direct = environ.get("SERVER_PROTOCOL") == "HTTP/1.1" and environ.get("wsgi.url_scheme") != "https"
        return cls(environ.get("gunicorn.socket"), send_buffer, direct=direct)

    @property
    def direct(self) -> bool:
        """Whether the hub may write framed chunks to it itself."""
        return self.fd is not None

    @staticmethod
    def frame(frames: list[bytes]) -> bytes:
        """SSE frames as one HTTP/1.1 chunk, in one copy (the same bytes serve every direct sink)."""
        size = sum(len(f) for f in frames)
        return b"".join([b"%X\r\n" % size, *frames, b"\r\n"])

    def try_write(self, chunk: bytes) -> int:
        """Write what the socket takes now, without waiting: the bytes written, or -1 if none
        (full, or gone: the writer's own write will tell which)."""
        fd = self.fd
        if fd is None:  # not direct: the hub never asks (a Subscription keeps only direct sinks)
            return -1
        try:
            return os.write(fd, chunk)
        except OSError:
            return -1

    def send_rest(self, data: bytes) -> bool:
        """Finish a chunk ``try_write`` began, bypassing gunicorn (it is framed already); False if gone."""
        sock = self.sock
        if sock is None:  # never asked: only a direct write (which needs the socket) leaves a rest
            return False
        try:
            sock.sendall(data)
        except OSError:
            return False
        return True

    def drop(self) -> None:
        """For a client that does not read: its pending write fails at once and gunicorn closes the socket."""
        self._shutdown(socket.SHUT_RDWR)

    def last_response(self) -> None:
        """A stream is its connection's last response: once it ends, gunicorn closes the
        connection instead of holding it open for another request (which would keep a
        stopping worker waiting for its graceful timeout)."""
        self._shutdown(socket.SHUT_RD)

    def _shutdown(self, how: int) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):  # the client is gone already
                shutdown_os_socket(self.sock, how)


def shutdown_os_socket(sock: socket.socket, how: int) -> None:
    """Shut the operating system's socket under ``sock``, whatever wraps it.

    Not ssl.SSLSocket's shutdown: it would drop the TLS state, and gunicorn's
    next write would go out unencrypted. Not gevent's either: it fails every
    greenlet waiting on the socket with EBADF ("File descriptor was closed in
    another greenlet"), and gunicorn logs a traceback for the stream whose
    write it was; the OS socket's shutdown makes that write fail with EPIPE,
    which gunicorn takes as the client gone.
    """
    os_socket = getattr(sock, "_sock", None)  # gevent's socket (and its SSLSocket) wrap it here
    if os_socket is not None:
        os_socket.shutdown(how)
    else:
        socket.socket.shutdown(sock, how)
