"""The over-optimization guard: a policy that games its reward model shows as the proxy (the RM's reward of
the probe set) rising while the gold (the probe set's utility by the oracle, else the judge) falls. Pure."""

from __future__ import annotations

from collections.abc import Sequence


def diverging_rounds(proxy: Sequence[float], gold: Sequence[float]) -> int:
    """How many of the latest rounds in a row saw the proxy rise and the gold fall (against the round before)."""
    count = 0
    for i in range(len(gold) - 1, 0, -1):
        if proxy[i] > proxy[i - 1] and gold[i] < gold[i - 1]:
            count += 1
        else:
            break
    return count


def should_stop(proxy: Sequence[float], gold: Sequence[float], rounds: int) -> bool:
    """True once the proxy has risen while the gold fell for `rounds` rounds in a row (never when rounds is 0)."""
    return rounds > 0 and diverging_rounds(proxy, gold) >= rounds
