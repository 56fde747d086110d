"""Retrying idempotent calls through a replica loss: which failures are transient, and how long to wait.

When a replica dies, the requests it was working on fail (503 from the proxy, or ActorDiedError through a
handle), and for a few seconds the router may still pick it; its peers answer meanwhile. A call that is
safe to repeat (a score; a design with its seed; feedback, whose event ids make a resend a no-op) is
sent again after an exponential backoff with jitter, or after the server's Retry-After when it gave one,
until `RetryPolicy.deadline_s` has passed. Refusals of the request itself (4xx) are never retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# 502/504: a gateway in front of the proxy lost its upstream; 503: no replica could answer.
RETRYABLE_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries: up to `attempts` sends within `deadline_s`, waits growing from `base_s` by
    `factor` up to `max_wait_s`, each drawn uniformly in [wait/2, wait] so clients do not retry in step."""

    attempts: int = 8
    deadline_s: float = 60.0
    base_s: float = 0.2
    factor: float = 2.0
    max_wait_s: float = 5.0

    def wait_s(self, attempt: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Seconds before send number `attempt + 1` (attempt counts from 1): the server's Retry-After when
        it named one (capped at max_wait_s), else the jittered exponential backoff."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_wait_s)
        wait = min(self.base_s * self.factor ** (attempt - 1), self.max_wait_s)
        return rng.uniform(wait / 2, wait)


NO_RETRY = RetryPolicy(attempts=1)


def _next_wait(policy: RetryPolicy, exc: BaseException, attempt: int, elapsed_s: float,
               rng: random.Random) -> float | None:
    """Seconds to wait before sending again after send `attempt` failed with the transient `exc`, or None
    when the policy is spent. The server's Retry-After travels as the exception's retry_after_s."""
    if attempt >= policy.attempts:
        return None
    wait = policy.wait_s(attempt, getattr(exc, "retry_after_s", None), rng)
    return None if elapsed_s + wait > policy.deadline_s else wait


def call_with_retries(call: Callable[[], T], transient: Callable[[BaseException], bool], policy: RetryPolicy,
                      sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                      rng: random.Random | None = None) -> T:
    """call(), sent again while it raises an exception `transient` accepts, within the policy."""
    rng, started, attempt = rng or random.Random(), clock(), 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - re-raised unless transient
            wait = _next_wait(policy, exc, attempt, clock() - started, rng) if transient(exc) else None
            if wait is None:
                raise
        sleep(wait)


async def call_with_retries_async(call: Callable[[], Awaitable[T]], transient: Callable[[BaseException], bool],
                                  policy: RetryPolicy, rng: random.Random | None = None) -> T:
    """call_with_retries for coroutines: `call()` returns an awaitable, the waits do not block the loop."""
    rng, started, attempt = rng or random.Random(), time.monotonic(), 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001
            wait = _next_wait(policy, exc, attempt, time.monotonic() - started, rng) if transient(exc) else None
            if wait is None:
                raise
        await asyncio.sleep(wait)
