"""The field-anchor objective (DGPO-style group preference): the better half against the worse half of a
group, each candidate weighted by its normalized advantage, so reward margins count and not only the order."""

from __future__ import annotations

import math

import pytest
import torch

from perfusion_ray.objectives import group_preference_terms
from perfusion_ray.objectives.dgpo import advantages


def test_the_loss_is_bradley_terry_of_advantage_weighted_halves_written_out():
    pol = torch.tensor([[0.10, 0.30, 0.20, 0.40]])
    ref = torch.tensor([[0.20, 0.20, 0.20, 0.20]])
    labels = torch.tensor([[3.0, 1.0, 0.0, 0.0]])  # mean 1: advantages +2, 0, -1, -1 (over their std)
    beta = 2.0
    rewards = [-beta * (p - r) for p, r in zip(pol[0].tolist(), ref[0].tolist())]
    better = rewards[0]  # the only positive advantage
    worse = 0.5 * rewards[2] + 0.5 * rewards[3]  # equal negative advantages share the weight
    expected = -math.log(1 / (1 + math.exp(-(better - worse))))
    terms = group_preference_terms(pol, ref, labels, beta, "dgpo")
    assert terms.loss.item() == pytest.approx(expected, rel=1e-6) and terms.groups_used == 1


def test_advantages_are_centred_scaled_and_zero_for_a_flat_group():
    a = advantages(torch.tensor([[3.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    assert torch.allclose(a[0].mean(), torch.tensor(0.0), atol=1e-6) and torch.allclose(a[0].pow(2).mean(), torch.tensor(1.0))
    assert torch.equal(a[1], torch.zeros(4))


def test_only_the_spread_of_labels_matters_not_their_scale_or_offset():
    generator = torch.Generator().manual_seed(0)
    pol, ref = torch.rand(5, 4, generator=generator), torch.rand(5, 4, generator=generator)
    labels = torch.rand(5, 4, generator=generator)
    loss = group_preference_terms(pol, ref, labels, 3.0, "dgpo").loss
    moved = group_preference_terms(pol, ref, 10.0 * labels - 4.0, 3.0, "dgpo").loss
    assert moved.item() == pytest.approx(loss.item(), rel=1e-5)


def test_a_wider_margin_weighs_its_candidate_more():
    """Two positives: the one far above the mean pulls the gradient harder than the one just above it."""
    pol = torch.full((1, 4), 0.3, requires_grad=True)
    ref = torch.full((1, 4), 0.3)
    labels = torch.tensor([[3.0, 1.2, 0.0, 0.0]])
    group_preference_terms(pol, ref, labels, 1.0, "dgpo").loss.backward()
    grad = pol.grad[0]
    assert grad[0] > grad[1] > 0 > grad[2]  # lowering e_k raises r_k: the stronger positive gets the larger push


def test_groups_without_a_spread_are_skipped_and_counted():
    pol = torch.rand(2, 4, requires_grad=True)
    terms = group_preference_terms(pol, torch.rand(2, 4), torch.tensor([[1.0] * 4, [1.0, 0, 0, 0]]), 5.0, "dgpo")
    assert terms.groups_used == 1 and terms.groups_skipped == 1
    terms.loss.backward()
    assert torch.equal(pol.grad[0], torch.zeros(4))
