"""Server-Sent Events framing, as the WHATWG HTML standard defines the format.

No Flask and no database here: these are bytes in, bytes out, so the framing is
tested on its own and done once per event, not once per client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _field(name: str, value: str) -> str:
    if _LINE_BREAK.search(value):
        raise ValueError(f"SSE field {name!r} cannot contain a line break")
    return f"{name}: {value}\n"


@dataclass(frozen=True)
class Frame:
    """One SSE message (an event, a comment-free block); ``str()`` gives its wire form, ending in a blank line."""

    data: str | None = None
    id: str | int | None = None
    event: str | None = None
    retry: int | None = None

    def __str__(self) -> str:
        parts: list[str] = []
        if self.event is not None:
            parts.append(_field("event", self.event))
        if self.id is not None:
            # A NUL in the id makes browsers ignore it: refuse it here.
            value = str(self.id)
            if "\0" in value:
                raise ValueError("SSE id cannot contain NUL")
            parts.append(_field("id", value))
        if self.retry is not None:
            parts.append(f"retry: {int(self.retry)}\n")
        if self.data is not None:
            # Multi-line data becomes one data: line per line; the client joins them with \n.
            parts.extend(f"data: {line}\n" for line in _LINE_BREAK.split(self.data))
        return "".join(parts) + "\n"

    def encode(self) -> bytes:
        return str(self).encode("utf-8")


def comment(text: str = "") -> bytes:
    """A comment line: ignored by EventSource, useful to keep a stream open."""
    return "".join(f": {line}\n" for line in _LINE_BREAK.split(text)).encode("utf-8") + b"\n"


KEEPALIVE = comment("keep-alive")
