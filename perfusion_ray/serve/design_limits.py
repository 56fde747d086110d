"""Per-merchant rate limits of the design endpoint: a token bucket per merchant id, in each replica.

A merchant may send `burst` requests at once and `per_minute` on average; a request beyond that is refused
with the seconds until the next one would be admitted (HTTP 429 + Retry-After). The buckets live in the
replica, so with R replicas a merchant gets at most R times the rate: the limit bounds one merchant's share of
a replica, it is not a billing meter (that would need a shared store on every request).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000):
        self.rate = per_minute / 60.0  # tokens per second; 0: unlimited
        self.burst = float(burst)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float | None:
        """Take one request for `key`: None if admitted, else the seconds until one would be."""
        if self.rate <= 0:
            return None
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                self._prune(now)
                return None
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Forget merchants whose bucket has refilled (they are as if never seen)."""
        if len(self._buckets) <= self.max_keys:
            return
        full = [k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
