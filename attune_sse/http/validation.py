"""Input checks that need no request: JSON bodies, strings, ids (each failure a 400 naming the field)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from attune_sse.core.ids import MAX_BIGINT
from attune_sse.errors import BadRequest


def invalid(field: str, message: str) -> BadRequest:
    return BadRequest(f"'{field}' {message}.", code="VALIDATION_ERROR")


MAX_JSON_DEPTH = 100


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def storable_problem(value: Any, depth: int = 0) -> str | None:
    """Why PostgreSQL could not store this JSON value (text and jsonb take no NUL character
    and no lone surrogate), or None."""
    if depth > MAX_JSON_DEPTH:
        return f"is nested more than {MAX_JSON_DEPTH} levels deep"
    if isinstance(value, str):
        return text_problem(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "holds a number too large to store (JSON numbers must be finite)"
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        problem = storable_problem(item, depth + 1)
        if problem:
            return problem
    return None


def text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    if text.isascii():
        return None  # no surrogate: and no need to encode a copy of a text of megabytes to know it
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate, which is not valid Unicode"
    return None


def required_string(body: dict[str, Any], field: str, *, max_length: int = 1000) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise invalid(field, "is required and must be a non-empty string")
    if len(value) > max_length:
        raise invalid(field, f"must be at most {max_length} characters")
    return value


def optional_string(body: dict[str, Any], field: str, *, max_length: int = 1000) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(field, "must be a string")
    if len(value) > max_length:
        raise invalid(field, f"must be at most {max_length} characters")
    return value


# The bigint maximum has 19 digits. Longer text is refused before it is converted: Python will not
# even convert more than 4,300 digits (ValueError), and converting a long one costs quadratic time.
MAX_ID_DIGITS = len(str(MAX_BIGINT))


def parse_int(raw: str, name: str, *, minimum: int = 1) -> int:
    """A whole number from ``minimum`` to the bigint maximum, or 400 naming ``name``."""
    raw = raw.strip()
    if not (len(raw) <= MAX_ID_DIGITS and raw.isascii() and raw.isdigit()) or not minimum <= int(raw) <= MAX_BIGINT:
        raise BadRequest(f"{name} must be a whole number from {minimum} to {MAX_BIGINT}, got {raw[:40]!r}.",
                         code="VALIDATION_ERROR")
    return int(raw)


# Refs as DESIGN.md gives them, matched in full (``$`` would let a trailing line break through).
_PACK_REF = re.compile(r"[a-z][a-z0-9_-]+")
_ACTION_REF = re.compile(r"([a-z][a-z0-9_-]+)\.[A-Za-z0-9_.-]+")


def is_pack_ref(ref: str) -> bool:
    """Whether ``ref`` is a pack ref: lower case letters, digits, ``_`` and ``-``, from a letter."""
    return _PACK_REF.fullmatch(ref) is not None


def pack_of_action_ref(ref: str) -> str | None:
    """The pack part of an action ref (``pack.action``), or None if ``ref`` is not one."""
    match = _ACTION_REF.fullmatch(ref)
    return match.group(1) if match else None


def parse_json_object(data: bytes) -> dict[str, Any]:
    """A request body's JSON object, or a 400 that says what is wrong with it."""
    try:
        body = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.",
                         code="INVALID_JSON") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and _no_constant's
        raise BadRequest(f"The request body is not valid JSON: {str(exc)[:200]}.", code="INVALID_JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="INVALID_JSON")
    problem = storable_problem(body)
    if problem:
        raise BadRequest(f"The request body {problem}.", code="INVALID_JSON")
    return body
