"""Group objectives: each preference variant is Diffusion-DPO for one winner and one loser, order of
candidates does not matter, groups without a preference are skipped and counted, bad input is refused."""

from __future__ import annotations

import pytest
import torch

from perfusion_ray.objectives import group_preference_loss, group_preference_terms, plackett_luce_loss
from perfusion_ray.objectives.group_preference import VARIANTS

PREFERENCE_VARIANTS = ("pl", "multi_neg", "pairwise", "dgpo")


def diffusion_dpo(pol_w, pol_l, ref_w, ref_l, beta):
    """Written out from diffusers' train_diffusion_dpo.py, independently of the package."""
    inside = beta * ((ref_w - ref_l) - (pol_w - pol_l))
    return -torch.log(torch.sigmoid(inside))


@pytest.mark.parametrize("variant", PREFERENCE_VARIANTS)
def test_one_winner_one_loser_is_diffusion_dpo(variant):
    generator = torch.Generator().manual_seed(0)
    pol, ref = torch.rand(6, 2, generator=generator) * 0.2, torch.rand(6, 2, generator=generator) * 0.2
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 3)
    winner, loser = labels.argmax(1), labels.argmin(1)
    rows = torch.arange(6)
    expected = diffusion_dpo(pol[rows, winner], pol[rows, loser], ref[rows, winner], ref[rows, loser], 50.0).mean()
    assert group_preference_loss(pol, ref, labels, 50.0, variant) == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_candidate_order_does_not_change_the_loss(variant):
    generator = torch.Generator().manual_seed(1)
    pol, ref = torch.rand(4, 5, generator=generator), torch.rand(4, 5, generator=generator)
    labels = torch.tensor([[3.0, 0, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 2, 0, 1], [1, 0, 0, 0, 0]])
    permutation = torch.tensor([4, 2, 0, 3, 1])
    original = group_preference_loss(pol, ref, labels, 5.0, variant)
    permuted = group_preference_loss(pol[:, permutation], ref[:, permutation], labels[:, permutation], 5.0, variant)
    if variant == "pl":
        # Ties are broken at random; averaged over draws the order of candidates does not matter.
        draws = [group_preference_loss(pol[:, permutation], ref[:, permutation], labels[:, permutation], 5.0, variant,
                                       torch.Generator().manual_seed(s)) for s in range(400)]
        draws0 = [group_preference_loss(pol, ref, labels, 5.0, variant, torch.Generator().manual_seed(s))
                  for s in range(400)]
        assert torch.stack(draws).mean() == pytest.approx(torch.stack(draws0).mean().item(), rel=0.02)
    else:
        assert permuted == pytest.approx(original.item(), rel=1e-6)


def test_pl_with_untied_labels_is_exactly_order_invariant():
    pol, ref = torch.rand(2, 4), torch.rand(2, 4)
    labels = torch.tensor([[3.0, 0, 2, 1], [0, 1, 2, 3]])
    flipped = group_preference_loss(pol.flip(1), ref.flip(1), labels.flip(1), 3.0, "pl")
    assert flipped == pytest.approx(group_preference_loss(pol, ref, labels, 3.0, "pl").item(), rel=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_groups_without_preference_carry_no_gradient_and_are_counted(variant):
    pol = torch.rand(3, 4, requires_grad=True)
    ref = torch.rand(3, 4)
    labels = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [2, 2, 2, 2]])
    result = group_preference_terms(pol, ref, labels, 10.0, variant)
    result.loss.backward()
    assert pol.grad[0].abs().sum() > 0 and pol.grad[1].abs().sum() == 0
    if variant == "sft":  # all-positive groups still teach sft
        assert pol.grad[2].abs().sum() > 0 and (result.groups_used, result.groups_skipped) == (2, 1)
    else:
        assert pol.grad[2].abs().sum() == 0 and (result.groups_used, result.groups_skipped) == (1, 2)


def test_a_batch_with_no_preference_gives_zero_with_a_graph():
    pol = torch.rand(2, 3, requires_grad=True)
    loss = group_preference_loss(pol, torch.rand(2, 3), torch.zeros(2, 3), 10.0)
    loss.backward()
    assert loss.item() == 0.0 and pol.grad.abs().sum() == 0


def test_gradients_reach_only_trainable_parameters():
    trainable, frozen = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    frozen.requires_grad_(False)
    x = torch.rand(2, 4, 3)
    policy_err = (trainable(x) + frozen(x)).squeeze(-1) ** 2
    ref_err = frozen(x).squeeze(-1) ** 2
    group_preference_loss(policy_err, ref_err, torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 1]]), 2.0).backward()
    assert trainable.weight.grad is not None and frozen.weight.grad is None


def test_graded_labels_rank_every_tier_above_the_bottom():
    rewards = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    loss, used = plackett_luce_loss(rewards, torch.tensor([[2.0, 1.0, 0.0]]))
    # -log(1/3) for the first pick, -log(1/2) for the second, averaged.
    assert loss.item() == pytest.approx((torch.log(torch.tensor(3.0)) + torch.log(torch.tensor(2.0))).item() / 2)
    assert used.item() == 1


@pytest.mark.parametrize("bad, message", [
    (dict(beta=0.0), "beta must be > 0"),
    (dict(beta=-1.0), "beta must be > 0"),
    (dict(policy_err=torch.rand(2, 3)), "differ in shape"),
    (dict(labels=torch.rand(2, 3)), r"\[B, K\]"),
    (dict(policy_err=torch.tensor([[float("nan"), 0.1, 0.1, 0.1]] * 2)), "NaN"),
    (dict(ref_err=torch.tensor([[float("nan"), 0.1, 0.1, 0.1]] * 2)), "NaN"),
    (dict(policy_err=torch.rand(2, 1), ref_err=torch.rand(2, 1), labels=torch.ones(2, 1)), "at least 2 candidates"),
    (dict(variant="dpo"), "unknown variant"),
])
def test_bad_input_is_a_clear_error(bad, message):
    args = dict(policy_err=torch.rand(2, 4), ref_err=torch.rand(2, 4), labels=torch.tensor([[1.0, 0, 0, 0]] * 2),
                beta=1.0, variant="pl")
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        group_preference_loss(**args)
