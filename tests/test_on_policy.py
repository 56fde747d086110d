"""The pure parts of an online round: P/N from the RM ranking, the on-policy/logged mix, the averaged policy."""

from __future__ import annotations

import numpy as np
import pytest

import torch

from perfusion_ray.train.on_policy import average_weights, mix_sizes, reward_labels


def test_top_m_puts_exactly_the_m_best_in_p():
    scores = np.array([[0.1, 0.9, 0.5, 0.2], [3.0, -1.0, 2.0, 2.5]])
    assert reward_labels(scores, "top_m", top_m=1).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert reward_labels(scores, "top_m", top_m=2).tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]


def test_top_m_breaks_ties_by_position_so_p_has_exactly_m():
    labels = reward_labels(np.zeros((1, 4)), "top_m", top_m=1)
    assert labels.tolist() == [[1, 0, 0, 0]]


def test_margin_keeps_everything_near_the_best_and_can_leave_no_negatives():
    scores = np.array([[1.0, 0.8, 0.2, 0.0], [1.0, 0.95, 0.9, 0.99]])
    labels = reward_labels(scores, "margin", margin=0.3)
    assert labels.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]  # the second group carries no gradient


@pytest.mark.parametrize("scores, kwargs, message", [
    (np.zeros((2, 1)), {}, "K >= 2"),
    (np.array([[0.0, np.nan]]), {}, "NaN"),
    (np.zeros((1, 4)), {"top_m": 4}, "top_m"),
    (np.zeros((1, 4)), {"split": "best"}, "unknown split"),
])
def test_bad_scores_or_rules_are_clear_errors(scores, kwargs, message):
    with pytest.raises(ValueError, match=message):
        reward_labels(scores, **kwargs)


def test_mix_follows_the_share_and_falls_back_to_the_other_source():
    assert mix_sizes(8, 0.5, logged_available=100, policy_available=4) == (4, 4)
    assert mix_sizes(8, 0.25, logged_available=100, policy_available=4) == (2, 6)
    assert mix_sizes(8, 0.5, logged_available=0, policy_available=4) == (0, 8)
    assert mix_sizes(8, 0.5, logged_available=100, policy_available=0) == (8, 0)
    with pytest.raises(ValueError, match="no groups"):
        mix_sizes(8, 0.5, 0, 0)


def test_the_averaged_policy_weighs_recent_rounds_most_and_keeps_counters():
    rounds = [{"w": torch.full((2,), float(r), dtype=torch.bfloat16), "step": torch.tensor(r)} for r in (1, 2, 3)]
    average = None
    for weights in rounds:
        average = average_weights(average, weights, decay=0.5)
    # 0.25 * 1 + 0.25 * 2 + 0.5 * 3 (the first round starts the average)
    assert torch.allclose(average["w"], torch.full((2,), 2.25))
    assert average["w"].dtype == torch.float32 and average["step"].item() == 3


def test_decay_zero_ships_the_last_round_and_bad_inputs_are_errors():
    first, last = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    assert torch.equal(average_weights(first, last, 0.0)["w"], last["w"])
    with pytest.raises(ValueError, match="decay"):
        average_weights(first, last, 1.0)
    with pytest.raises(ValueError, match="missing"):
        average_weights(first, {"v": torch.ones(2)}, 0.5)


def test_ranking_grades_every_candidate_by_its_place_and_scores_keep_margins():
    scores = np.array([[0.2, 0.9, -1.0, 0.5]])
    assert reward_labels(scores, "ranking").tolist() == [[1, 3, 0, 2]]
    assert np.allclose(reward_labels(scores, "scores"), scores)


def test_the_guard_fires_after_enough_rounds_of_proxy_above_and_gold_below_the_best_round():
    from perfusion_ray.rounds.guard import rounds_past_best, should_stop

    proxy = [11.78, 11.77, 11.99, 11.93, 12.18]
    gold = [0.458, 0.503, 0.379, 0.432, 0.416]  # best at round 1; the rebound in round 3 stays far below it
    assert [rounds_past_best(proxy[:n], gold[:n], 0.02) for n in range(1, 6)] == [0, 0, 1, 2, 3]
    assert not should_stop(proxy[:3], gold[:3], 2, 0.02) and should_stop(proxy[:4], gold[:4], 2, 0.02)
    assert not should_stop(proxy, gold, 0, 0.02)  # 0: off
    # A plateau within the tolerance of its best is noise, not gaming.
    assert not should_stop([1.0, 1.1, 1.2, 1.3], [0.487, 0.472, 0.474, 0.469], 2, 0.02)
    # The proxy back at or under the best round's value resets the count; a new best gold does too.
    assert not should_stop([1.0, 1.1, 1.0, 1.2], [0.5, 0.4, 0.45, 0.44], 2, 0.02)
    assert not should_stop([1.0, 1.2, 1.4, 1.6], [0.5, 0.4, 0.45, 0.55], 2, 0.02)
    # At the default tolerance a healthy demo's probe (0.03 below its best round twice while the proxy rose)
    # runs on, and the hacked RM's curve above still stops.
    from perfusion_ray.config import OnlineConfig

    tolerance = OnlineConfig().guard_tolerance
    assert not should_stop([0.338, 0.490, 0.520, 0.596], [0.456, 0.486, 0.455, 0.457], 2, tolerance)
    assert should_stop(proxy[:4], gold[:4], 2, tolerance)
