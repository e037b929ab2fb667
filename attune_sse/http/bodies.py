"""Request bodies read before the app sees them, within a deadline.

A client that sends its body slowly holds a greenlet and a socket for as long
as it likes unless something cuts it: fifty such clients, a byte every few
seconds, were all still held after 25 s. ``BodyDeadline`` reads every body
first: the whole of it within ``server.body_timeout_seconds``, and after the
first ``GRACE`` seconds at ``server.body_min_rate_bytes`` per second on
average. A body that misses either gets a 408 JSON answer and the connection
is closed. Requests without a body (the stream, every GET) pass untouched.

A body the app will not read costs no more than what is read of it. One
declared larger than ``server.max_body_bytes`` (or a chunked one that grows
past it) gets its 413 at once, on every route and before authentication,
and so does a body that is too slow (408). gunicorn would then read the rest
of it off the keep-alive connection to find the next request, in small
reads that recopy its buffer: tens of megabytes sent at full speed held the
worker's event loop until gunicorn killed it. So such a connection is closed
after the answer (``close_after``): the answer goes out with
``Connection: close``, the sending side is shut, and at most ``LINGER_BYTES``
more are read (in ``LINGER_SECONDS``, in large reads that yield) so that the
client can read the answer before the close resets the connection.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent

from attune_sse.http.sink import shutdown_os_socket

log = logging.getLogger(__name__)

GRACE = 5.0  # seconds any body may take, whatever its rate
# A step returns only once it is full, so the rate is checked per step: the first is small, so a
# trickle is cut after the grace; then each is as large as what came so far, up to MAX_STEP. Small
# steps all the way cost a 16 MiB body 1.9 s of CPU: gunicorn's reader recopies its read-ahead
# (up to 1 MiB) on every read, and a read of data that is there already does not yield. Steps of
# 1 MiB held the loop longer each (6 bodies of 16 MiB at once: streams' p99 0.4 s, against 0.1 s).
STEP = 4 * 1024
MAX_STEP = 256 * 1024


# Routes whose bodies are small by nature: logins, registrations, refreshes (a login is 255 characters,
# a password 1,024), and the methods that take no body. A larger one gets its 413 unread, before
# authentication: an anonymous client cannot make the worker read (and parse) megabytes.
SMALL_BODY_BYTES = 64 * 1024
SMALL_BODY_PREFIXES = ("/auth/",)
BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
# The body as read, for the app (io.json_body) to take without werkzeug's copy of it.
BODY_KEY = "attune_sse.body"
# After an answer that ends a connection: what is read (and dropped) of the unread body, at most.
LINGER_BYTES = 256 * 1024
LINGER_SECONDS = 1.0
LINGER_READ = 64 * 1024


class _TooSlow(Exception):
    pass


def close_after(environ: dict[str, Any], start_response: Callable[..., Any], status: str,
                error: dict[str, str]) -> Iterator[bytes]:
    """Answer ``error`` as JSON and end the connection, reading no more of the request than the linger.

    gunicorn's Response (whose bound method ``start_response`` is) closes the
    connection after this answer once told to (``force_close``), instead of
    reading on for the next request.
    """
    payload = json.dumps(error).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
                            ("Cache-Control", "no-store")])
    response = getattr(start_response, "__self__", None)
    if response is not None and hasattr(response, "force_close"):
        response.force_close()
    return _linger_after(payload, environ.get("gunicorn.socket"))


def _linger_after(payload: bytes, sock: socket.socket | None) -> Iterator[bytes]:
    yield payload
    if sock is None:
        return
    try:
        # The client reads the answer, then EOF (sink.py says why the OS socket's shutdown).
        shutdown_os_socket(sock, socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        dropped = 0
        while dropped < LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            data = sock.recv(LINGER_READ)
            if not data:
                break
            dropped += len(data)
    except OSError:
        pass  # the client is gone or too slow: the connection closes either way, which is all that is left


class BodyStream(io.RawIOBase):
    """``wsgi.input`` over the body as read, without a copy of it (io.BytesIO would copy a bytearray)."""

    def __init__(self, body: bytearray) -> None:
        super().__init__()
        self._view = memoryview(body)
        self._at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = min(len(buffer), len(self._view) - self._at)
        buffer[:size] = self._view[self._at:self._at + size]
        self._at += size
        return size


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
        # (gunicorn has checked that it is digits; as many as a 4,300-digit one would not even convert)
        declared = (int(length) if len(length) <= 19 else self.max_bytes + 1) if length.isdigit() else 0
        if not chunked and declared == 0:
            return self.app(environ, start_response)  # nothing to read
        limit = self._limit(environ)
        if declared > limit:
            return self._too_large(environ, start_response, limit)
        try:
            body = self._read(environ["wsgi.input"], declared if not chunked else None, limit)
        except _TooSlow as exc:
            log.warning("cut a request body from %s: %s", environ.get("REMOTE_ADDR", "?"), exc)
            return close_after(environ, start_response, "408 Request Timeout",
                               {"error": f"The request body arrived too slowly: {exc}.", "code": "BODY_TIMEOUT"})
        if len(body) > limit:
            return self._too_large(environ, start_response, limit)
        environ[BODY_KEY] = body
        environ["wsgi.input"] = BodyStream(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)

    def _limit(self, environ: dict[str, Any]) -> int:
        """The largest body this request may have."""
        if environ.get("REQUEST_METHOD") in BODILESS_METHODS or \
                environ.get("PATH_INFO", "").startswith(SMALL_BODY_PREFIXES):
            return min(self.max_bytes, SMALL_BODY_BYTES)
        return self.max_bytes

    def _too_large(self, environ: dict[str, Any], start_response: Callable[..., Any],
                   limit: int) -> Iterable[bytes]:
        where = "server.max_body_bytes" if limit == self.max_bytes else "this route's bodies are small"
        log.info("refused a request body over %d bytes (%s) from %s on %s %s", limit, where,
                 environ.get("REMOTE_ADDR", "?"), environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
        return close_after(environ, start_response, "413 Request Entity Too Large", {
            "error": f"The request body is larger than the server accepts here ({limit} bytes; {where}).",
            "code": "BODY_TOO_LARGE"})

    def _allowed(self, size: int) -> float:
        """Seconds from the start within which ``size`` bytes must have arrived."""
        if not self.min_rate:
            return self.timeout
        return min(self.timeout, max(GRACE, size / self.min_rate))

    def _read(self, stream: Any, length: int | None, most: int) -> bytearray:
        """The body (up to ``most`` + 1, so an oversize chunked one still gets its 413). Copied into one
        buffer step by step (a join of the steps at the end was 26 ms of a 16 MiB body without a yield)."""
        start = time.monotonic()
        body, got = bytearray(), 0
        limit = most + 1 if length is None else length
        while got < limit:
            want = min(max(STEP, got), MAX_STEP, limit - got)
            left = start + self._allowed(got + want) - time.monotonic()
            if left <= 0:
                raise _TooSlow(f"{got} bytes in {time.monotonic() - start:.1f} s")
            with gevent.Timeout(left, _TooSlow(f"{got} bytes in {time.monotonic() - start + left:.1f} s")):
                data = stream.read(want)
            if not data:
                break
            body += data
            got += len(data)
            gevent.sleep(0)  # the worker's other greenlets (its streams) run between steps
        return body
