"""When to try a failed side effect again: capped exponential backoff with full jitter.

Full jitter (a uniform draw between zero and the capped exponential) spreads the retries of many
jobs that failed together, e.g. when a receiver came back from an outage, instead of having them
hit it again in lockstep (AWS Architecture Blog, "Exponential Backoff And Jitter").
"""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_ceiling(attempt: int, *, base: float, cap: float) -> float:
    """The longest wait after failed attempt number `attempt` (1 for the first)."""
    # The exponent is bounded so that a large attempt count cannot overflow the float.
    return min(cap, base * 2.0 ** min(max(attempt - 1, 0), 62))


def retry_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    draw: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the next attempt; never less than the receiver's `retry_after`."""
    delay = draw() * backoff_ceiling(attempt, base=base, cap=cap)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
