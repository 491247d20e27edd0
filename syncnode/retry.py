"""How long to wait before trying again (pure): capped exponential backoff with jitter.

The n-th consecutive failure waits a random time in [d/2, d], d = min(cap, base * 2^(n-1)):
retries of many peers or PACS spread out instead of arriving together.
"""

from __future__ import annotations

import random


def backoff(failures: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after ``failures`` consecutive failures (1 = the first)."""
    d = min(cap, base * (2 ** max(0, failures - 1)))
    return d * (0.5 + 0.5 * (rng or random).random())
