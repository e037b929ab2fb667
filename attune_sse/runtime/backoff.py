"""How long to wait before trying again: the one backoff of the listener, the relay and the broker."""

from __future__ import annotations

import random


def backoff(failures: int, max_delay: float = 5.0) -> float:
    """Seconds to wait after ``failures`` failed attempts (1 or more): doubling from 0.1 s up to
    ``max_delay``, with jitter (a random half of it at most), so that many workers that failed
    together do not all come back at the same instant."""
    return min(max_delay, 0.1 * 2 ** min(max(failures - 1, 0), 16)) * random.uniform(0.5, 1.0)
