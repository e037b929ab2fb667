"""The one exception hierarchy of attune-sse."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An error's text on one line (the first of PostgreSQL's, say), or its class's name if it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class AttuneError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(AttuneError):
    """A setting is missing or invalid; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error: {key}: {message}")
        self.key = key
        self.message = message


class MigrationError(AttuneError):
    """A migration file failed to apply; ``filename`` names it."""

    def __init__(self, filename: str, message: str) -> None:
        super().__init__(f"migration {filename} failed: {message}")
        self.filename = filename


class EmbeddedDatabaseError(AttuneError):
    """The embedded PostgreSQL server could not be set up or started."""


class ApiError(AttuneError):
    """An error the HTTP API reports as ``{"error": ..., "code": ...}``."""

    status = 400
    code = "BAD_REQUEST"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}  # sent with the answer (Retry-After, say)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, str]:
        return {"error": self.message, "code": self.code}


class BadRequest(ApiError):
    status = 400
    code = "BAD_REQUEST"


class Unauthorized(ApiError):
    status = 401
    code = "UNAUTHORIZED"


class Forbidden(ApiError):
    status = 403
    code = "FORBIDDEN"


class NotFound(ApiError):
    status = 404
    code = "NOT_FOUND"


class Conflict(ApiError):
    status = 409
    code = "CONFLICT"


class Unprocessable(ApiError):
    status = 422
    code = "UNPROCESSABLE"


class TooManyRequests(ApiError):
    status = 429
    code = "TOO_MANY_REQUESTS"


class NotReady(ApiError):
    status = 503
    code = "NOT_READY"
