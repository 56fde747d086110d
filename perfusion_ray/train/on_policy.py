"""On-policy groups of a round: the reward model's ranking of a generated group -> P/N labels, and the
mix of on-policy and logged groups in each optimizer step, and the moving average of the round-end
policies that is exported. Pure functions; no Ray, no I/O."""

from __future__ import annotations

import numpy as np


def reward_labels(scores: np.ndarray, split: str = "top_m", top_m: int = 1, margin: float = 0.5) -> np.ndarray:
    """Labels [B, K] from RM scores [B, K].

    top_m: binary, the m best of each group (ties broken by position, so exactly m); margin: binary, every
    candidate within `margin` of its group's best score, so a group whose candidates all score alike has no
    N and carries no gradient (the objective counts it as skipped); ranking: graded, the candidate's rank
    in its group (0 for the worst, K-1 for the best), so pl ranks the whole group; scores: the scores
    themselves, so an objective that weighs margins (dgpo) sees how much better a candidate is.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [groups, K >= 2], got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    if split == "top_m":
        if not 1 <= top_m < scores.shape[1]:
            raise ValueError(f"top_m must be in [1, K): {top_m} for K={scores.shape[1]}")
        order = np.argsort(-scores, axis=1, kind="stable")
        labels = np.zeros_like(scores, dtype=np.float32)
        np.put_along_axis(labels, order[:, :top_m], 1.0, axis=1)
        return labels
    if split == "margin":
        return (scores >= scores.max(axis=1, keepdims=True) - margin).astype(np.float32)
    if split == "ranking":
        return np.argsort(np.argsort(scores, axis=1, kind="stable"), axis=1).astype(np.float32)
    if split == "scores":
        return scores.astype(np.float32)
    raise ValueError(f"unknown split {split!r} (top_m, margin, ranking or scores)")


def mix_sizes(batch_groups: int, logged_fraction: float, logged_available: int, policy_available: int) -> tuple[int, int]:
    """(logged, on-policy) groups in one step of `batch_groups`: the configured share, falling back to the
    other source when one is empty."""
    if logged_available == 0 and policy_available == 0:
        raise ValueError("no groups to train on: neither logged nor on-policy")
    logged = int(round(batch_groups * logged_fraction))
    if policy_available == 0:
        logged = batch_groups
    if logged_available == 0:
        logged = 0
    return logged, batch_groups - logged


def average_weights(average: dict | None, current: dict, decay: float) -> dict:
    """One step of an exponential moving average of state dicts: decay * average + (1 - decay) * current
    (the current weights when there is no average yet or decay is 0), kept in float32 so bf16 weights
    average without rounding away small steps. Non-float entries (step counters) are taken from `current`."""
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1): {decay}")
    current = {name: value.float() if value.is_floating_point() else value for name, value in current.items()}
    if average is None or decay == 0:
        return current
    if average.keys() != current.keys():
        missing, extra = sorted(current.keys() - average.keys()), sorted(average.keys() - current.keys())
        raise ValueError(f"average and current weights differ in names: missing {missing[:3]}, extra {extra[:3]}")
    return {name: decay * average[name] + (1 - decay) * value if value.is_floating_point() else value
            for name, value in current.items()}
