"""Ranking metrics on 1-D arrays (pure numpy).

gauc: AUC per group, weighted by group size, over the groups that have both a positive and a
negative; ties in score count one half, as in the Mann-Whitney statistic.
"""

from __future__ import annotations

import numpy as np


def _tie_averaged_ranks(groups: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank): rows sorted by (group, score), with 1-based ranks within each group, ties averaged."""
    order = np.lexsort((scores, groups))
    g, s = groups[order], scores[order]
    n = len(order)
    if n == 0:  # no groups in a subset (e.g. no cold-start merchant)
        return order, np.zeros(0)
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    position = np.arange(n) - group_start + 1.0
    new_run = new_group | np.r_[True, s[1:] != s[:-1]]
    run = np.cumsum(new_run) - 1
    run_mean = np.bincount(run, weights=position) / np.bincount(run)
    return order, run_mean[run]


def _per_group_auc(scores, labels, group_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(auc, size, valid) per group: valid where the group has both labels."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    _, groups = np.unique(np.asarray(group_ids), return_inverse=True)
    if not (scores.shape == labels.shape == groups.shape) or scores.ndim != 1:
        raise ValueError(f"scores, labels and group_ids must be 1-D of one length, got {scores.shape}, {labels.shape}, {np.shape(group_ids)}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    order, rank = _tie_averaged_ranks(groups, scores)
    g, y = groups[order], labels[order]
    num_groups = groups.max() + 1 if len(groups) else 0
    positives = np.bincount(g, weights=y, minlength=num_groups)
    size = np.bincount(g, minlength=num_groups).astype(np.float64)
    negatives = size - positives
    rank_sum = np.bincount(g, weights=rank * y, minlength=num_groups)
    valid = (positives > 0) & (negatives > 0)
    auc = np.where(valid, (rank_sum - positives * (positives + 1) / 2) / np.maximum(positives * negatives, 1), np.nan)
    return auc, size, valid


def gauc(scores, labels, group_ids) -> float:
    """Group AUC: per-group AUC weighted by group size over groups with both labels (NaN if none)."""
    auc, size, valid = _per_group_auc(scores, labels, group_ids)
    if not valid.any():
        return float("nan")
    return float(np.sum(auc[valid] * size[valid]) / np.sum(size[valid]))


def auc(scores, labels) -> float:
    """Plain AUC over all rows (NaN when one class is missing)."""
    scores = np.asarray(scores)
    return gauc(scores, labels, np.zeros(len(scores), dtype=np.int64))


def mean_average_precision(scores, labels, group_ids) -> float:
    """Mean over groups with both labels of the average precision of the group's ranking by score.

    Ties in score are ranked pessimistically (positives after negatives of the same score), so a
    constant scorer does not look good.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    _, groups = np.unique(np.asarray(group_ids), return_inverse=True)
    if not (scores.shape == labels.shape == groups.shape):
        raise ValueError("scores, labels and group_ids must be 1-D of one length")
    order = np.lexsort((labels, -scores, groups))
    g, y = groups[order], labels[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    start = np.maximum.accumulate(np.where(new_group, np.arange(len(g)), 0))
    rank = np.arange(len(g)) - start + 1
    cumulative_hits = np.cumsum(y) - np.r_[0, np.cumsum(y)][start]
    precision_at_hits = np.where(y, cumulative_hits / rank, 0.0)
    num_groups = g.max() + 1 if len(g) else 0
    positives = np.bincount(g, weights=y, minlength=num_groups)
    sizes = np.bincount(g, minlength=num_groups)
    valid = (positives > 0) & (positives < sizes)
    if not valid.any():
        return float("nan")
    ap = np.bincount(g, weights=precision_at_hits, minlength=num_groups) / np.maximum(positives, 1)
    return float(ap[valid].mean())


def logloss(probabilities, labels, eps: float = 1e-7) -> float:
    """Binary cross-entropy of probabilities against 0/1 labels (probabilities clipped to [eps, 1-eps])."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels).astype(np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def wilson_interval(rate: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion `rate` observed over `count` trials (95% for z = 1.96).

    The win rates of `perfusion align eval` rest on a few dozen requests; this is the range a rate
    quoted against a target should be read with. A fractional rate (ties counted half) is fine.
    """
    if count <= 0 or not np.isfinite(rate):
        return float("nan"), float("nan")
    z2n = z * z / count
    centre = (rate + z2n / 2) / (1 + z2n)
    half = z * np.sqrt(rate * (1 - rate) / count + z2n / (4 * count)) / (1 + z2n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def spearman(a, b) -> float:
    """Spearman rank correlation of two 1-D arrays (ties take their average rank); NaN when either is
    constant or shorter than 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"spearman needs arrays of one length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return float("nan")
    zeros = np.zeros(len(a))
    ranks = []
    for values in (a, b):
        order, rank = _tie_averaged_ranks(zeros, values)
        ranked = np.empty(len(values))
        ranked[order] = rank
        ranks.append(ranked)
    if ranks[0].std() == 0 or ranks[1].std() == 0:
        return float("nan")
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])
