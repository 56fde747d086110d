"""The label policy grades candidates as documented; GAUC and the Wilson interval agree with their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from perfusion_ray.config import LabelPolicy
from perfusion_ray.data.labels import graded_labels, is_positive
from perfusion_ray.metrics import auc, gauc


def test_highest_event_grade_wins_and_returns_count_against():
    policy = LabelPolicy()
    counts = {
        "impression": np.ones(5),
        "select": np.array([0, 1, 1, 1, 1]),
        "click": np.array([0, 0, 2, 1, 1]),
        "order": np.array([0, 0, 0, 1, 1]),
        "return": np.array([0, 0, 0, 0, 1]),
    }
    assert graded_labels(counts, policy).tolist() == [0.0, 1.0, 2.0, 3.0, 1.0]
    assert is_positive(graded_labels(counts, policy), policy).tolist() == [False, True, True, True, True]


def test_a_custom_policy_changes_grades_and_split():
    policy = LabelPolicy(grades={"impression": 0.0, "order": 1.0}, return_penalty=-1.0, positive_threshold=0.9)
    counts = {"impression": np.ones(3), "select": np.array([1, 1, 1]), "order": np.array([0, 1, 1]),
              "return": np.array([0, 0, 1])}
    labels = graded_labels(counts, policy)
    assert labels.tolist() == [0.0, 1.0, 0.0]  # a select alone is worth nothing under this policy
    assert is_positive(labels, policy).tolist() == [False, True, False]


def _brute_gauc(scores, labels, groups):
    total = weight = 0.0
    for g in np.unique(groups):
        m = groups == g
        pos, neg = scores[m][labels[m]], scores[m][~labels[m]]
        if len(pos) and len(neg):
            pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
            total += np.mean(pairs) * m.sum()
            weight += m.sum()
    return total / weight


@pytest.mark.parametrize("seed", range(5))
def test_gauc_matches_brute_force_with_ties_and_degenerate_groups(seed):
    rng = np.random.default_rng(seed)
    n = 300
    scores = rng.integers(0, 4, n).astype(float)  # many ties
    labels = rng.random(n) < 0.3
    groups = rng.integers(0, 40, n)
    labels[groups == 0] = True  # a group with no negatives
    labels[groups == 1] = False  # a group with no positives
    assert gauc(scores, labels, groups) == pytest.approx(_brute_gauc(scores, labels, groups))


def test_gauc_edge_cases():
    assert np.isnan(gauc([0.1, 0.2], [1, 1], [0, 0]))  # no group has both labels
    assert np.isnan(gauc([], [], []))  # no groups at all (a store with no cold-start merchant)
    assert gauc([0.1, 0.9, 0.5, 0.5], [0, 1, 1, 0], ["a", "a", "b", "b"]) == pytest.approx(0.75)
    assert auc([1.0, 2.0, 3.0], [0, 1, 1]) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        gauc([np.nan, 1.0], [0, 1], [0, 0])
    with pytest.raises(ValueError, match="one length"):
        gauc([0.1, 0.2], [0, 1, 1], [0, 0])


@pytest.mark.parametrize("rate, count", [(0.5, 24), (0.583, 24), (0.646, 96), (0.0, 10), (1.0, 10), (0.25, 3)])
def test_wilson_interval_solves_its_defining_equation(rate, count):
    """The ends are the proportions pi with (rate - pi)^2 = z^2 pi (1 - pi) / count, found here by bisection."""
    from perfusion_ray.metrics import wilson_interval

    z = 1.96

    def gap(pi):
        return (rate - pi) ** 2 - z * z * pi * (1 - pi) / count

    def root(lo, hi):  # gap changes sign once on [lo, hi]
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (gap(lo) > 0) == (gap(mid) > 0) else (lo, mid)
        return (lo + hi) / 2

    low, high = wilson_interval(rate, count, z)
    expected_low = 0.0 if rate == 0 else root(0.0, rate)
    expected_high = 1.0 if rate == 1 else root(rate, 1.0)
    assert low == pytest.approx(expected_low, abs=1e-9) and high == pytest.approx(expected_high, abs=1e-9)
    assert low <= rate <= high


def test_wilson_interval_known_value_and_no_requests():
    from perfusion_ray.metrics import wilson_interval

    assert wilson_interval(0.5, 24) == pytest.approx((0.3143, 0.6857), abs=1e-4)  # 12 of 24
    assert all(np.isnan(wilson_interval(0.5, 0)))
