"""The over-optimization guard: a policy that games its reward model shows as the proxy (the RM's reward of
the probe set) rising while the gold (the probe set's utility by the oracle, else the judge) falls. Both are
read against the best gold round so far, not round against round: a gaming policy's gold is noisy on its
way down (a small rebound still below the best is no recovery), and a proxy that goes on rising past the
best round is what tells gaming from a noisy plateau. Pure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rounds_past_best(proxy: Sequence[float], gold: Sequence[float], tolerance: float) -> int:
    """How many of the latest rounds in a row had the gold more than `tolerance` below its best round's and
    the proxy above that round's (0 while the latest round is the best)."""
    best = int(np.argmax(gold)) if len(gold) else 0
    count = 0
    for i in range(len(gold) - 1, best, -1):
        if gold[i] < gold[best] - tolerance and proxy[i] > proxy[best]:
            count += 1
        else:
            break
    return count


def should_stop(proxy: Sequence[float], gold: Sequence[float], rounds: int, tolerance: float) -> bool:
    """True once `rounds` rounds in a row sat past the best gold round that way (never when rounds is 0)."""
    return rounds > 0 and rounds_past_best(proxy, gold, tolerance) >= rounds
