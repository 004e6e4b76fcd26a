"""Exponential backoff with full jitter: one formula for reconnects and HTTP retries."""

from __future__ import annotations

import random


def full_jitter(min_s: float, max_s: float, attempt: int) -> float:
    """Seconds to wait before retry ``attempt + 1`` (``attempt`` counts from 0): uniform
    between ``min_s`` and ``min(max_s, min_s * 2**attempt)``, so that clients that failed
    together do not all come back in the same instant."""
    ceiling = min(max_s, min_s * (2 ** min(max(attempt, 0), 20)))
    return random.uniform(min_s, max(min_s, ceiling))  # noqa: S311 - jitter, not secrecy
