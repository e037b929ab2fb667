"""Request bodies read before the app sees them, within a deadline.

A client that sends its body slowly holds a greenlet and a socket for as long
as it likes unless something cuts it: fifty such clients, a byte every few
seconds, were all still held after 25 s. ``BodyDeadline`` reads every body
first: the whole of it within ``server.body_timeout_seconds``, and after the
first ``GRACE`` seconds at ``server.body_min_rate_bytes`` per second on
average. A body that misses either gets a 408 JSON answer and the connection
is closed. Requests without a body (the stream, every GET) pass untouched.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent

log = logging.getLogger(__name__)

GRACE = 5.0  # seconds any body may take, whatever its rate
# Read in steps this small: a step returns only once it is full, so the rate is checked
# per step, and a large step would give a trickle a long deadline before its first check.
STEP = 4 * 1024


class _TooSlow(Exception):
    pass


def _then_close(payload: bytes, sock: socket.socket | None) -> Iterator[bytes]:
    """Send the answer, then close the connection: the rest of the body is never read.
    (gunicorn ignores a Connection header from the app; with the socket shut for
    reading, its next read ends the connection.)"""
    yield payload
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RD)  # not SSLSocket's (stream.py says why)


class BodyDeadline:
    """WSGI middleware around the Flask app."""

    def __init__(self, app: Callable[..., Iterable[bytes]], *, timeout: float, min_rate: int,
                 max_bytes: int) -> None:
        self.app = app
        self.timeout = timeout
        self.min_rate = min_rate
        self.max_bytes = max_bytes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        length = environ.get("CONTENT_LENGTH") or ""
        declared = int(length) if length.isdigit() else 0
        if (not chunked and declared == 0) or declared > self.max_bytes:
            return self.app(environ, start_response)  # nothing to read, or Flask answers 413 unread
        try:
            body = self._read(environ["wsgi.input"], declared if not chunked else None)
        except _TooSlow as exc:
            log.warning("cut a request body from %s: %s", environ.get("REMOTE_ADDR", "?"), exc)
            payload = json.dumps({"error": f"The request body arrived too slowly: {exc}.",
                                  "code": "BODY_TIMEOUT"}).encode()
            start_response("408 Request Timeout", [("Content-Type", "application/json"),
                                                   ("Content-Length", str(len(payload)))])
            return _then_close(payload, environ.get("gunicorn.socket"))
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)

    def _allowed(self, size: int) -> float:
        """Seconds from the start within which ``size`` bytes must have arrived."""
        if not self.min_rate:
            return self.timeout
        return min(self.timeout, max(GRACE, size / self.min_rate))

    def _read(self, stream: Any, length: int | None) -> bytes:
        """The body (up to max_bytes + 1, so an oversize chunked one still gets its 413)."""
        start = time.monotonic()
        parts, got = [], 0
        limit = self.max_bytes + 1 if length is None else length
        while got < limit:
            want = min(STEP, limit - got)
            left = start + self._allowed(got + want) - time.monotonic()
            if left <= 0:
                raise _TooSlow(f"{got} bytes in {time.monotonic() - start:.1f} s")
            with gevent.Timeout(left, _TooSlow(f"{got} bytes in {time.monotonic() - start + left:.1f} s")):
                data = stream.read(want)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)
