"""Group-level preference objectives for diffusion (PerFusion's generalization of Diffusion-DPO).

Per candidate k of a group: e_k = policy denoising error, f_k = reference (branch off) error, both
mean squared errors at one shared timestep and noise. Implicit reward r_k = -beta * (e_k - f_k)
(diffusers' Diffusion-DPO convention: no 1/2 factor, default beta 2500). Variants:
  pl         Plackett-Luce over graded labels (ties in random order); binary labels: top-|P| ranking
  multi_neg  each positive against all negatives: -log(e^{r_p} / (e^{r_p} + sum_n e^{r_n}))
  pairwise   mean over all (P, N) pairs of -log sigmoid(r_p - r_n)  (Diffusion-DPO on every pair)
  sft        mean denoising error of the positives (no reference, no negatives)
  dgpo       the field anchor: advantage-weighted better half against worse half (objectives/dgpo.py)
pl, multi_neg, pairwise and dgpo equal Diffusion-DPO for one winner and one loser. The binary split is
P = label > positive_threshold. Groups without a preference (no P or no N; for sft no P) are skipped
and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perfusion_ray.objectives.dgpo import _dgpo
from perfusion_ray.objectives.ranking import _check, _pairwise_logistic, _plackett_luce

VARIANTS = ("pl", "multi_neg", "pairwise", "sft", "dgpo")


@dataclass
class GroupLoss:
    loss: torch.Tensor  # scalar; zero (with graph) when no group was used
    groups_used: int
    groups_skipped: int


def _multi_negative(rewards: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    negative = ~positive
    negatives_lse = torch.logsumexp(rewards.masked_fill(positive, float("-inf")), dim=1, keepdim=True)
    # -log(e^{r_p} / (e^{r_p} + sum_n e^{r_n})) = logaddexp(r_p, lse_n) - r_p
    terms = torch.logaddexp(rewards, negatives_lse.expand_as(rewards)) - rewards
    used = positive.any(1) & negative.any(1)
    per_group = (terms * positive).sum(1) / positive.sum(1).clamp(min=1)
    per_group = torch.where(used, per_group, torch.zeros_like(per_group))
    return per_group.sum() / used.sum().clamp(min=1), used.sum()


def group_preference_terms(policy_err: torch.Tensor, ref_err: torch.Tensor, labels: torch.Tensor, beta: float,
                           variant: str = "pl", generator: torch.Generator | None = None,
                           positive_threshold: float = 0.5) -> GroupLoss:
    """The loss with its bookkeeping (how many groups carried a preference)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if policy_err.shape != ref_err.shape:
        raise ValueError(f"policy_err {tuple(policy_err.shape)} and ref_err {tuple(ref_err.shape)} differ in shape")
    labels = labels.to(policy_err.dtype)
    _check(policy_err, labels)
    if not torch.isfinite(ref_err).all():
        raise ValueError("ref_err contains NaN or infinite values")
    loss, used = _group_loss(policy_err, ref_err, labels, beta, variant, generator, positive_threshold)
    used = int(used)
    return GroupLoss(loss, used, labels.shape[0] - used)


def _group_loss(policy_err: torch.Tensor, ref_err: torch.Tensor, labels: torch.Tensor, beta: float, variant: str,
                generator: torch.Generator | None, positive_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, groups used) on checked inputs: the math alone, every tensor on the inputs' device."""
    rewards = -beta * (policy_err - ref_err)
    positive = labels > positive_threshold
    if variant == "pl":
        return _plackett_luce(rewards, labels, generator, True)
    if variant == "multi_neg":
        return _multi_negative(rewards, positive)
    if variant == "pairwise":
        return _pairwise_logistic(rewards, positive.to(rewards.dtype), True)
    if variant == "dgpo":
        return _dgpo(rewards, labels)
    used_mask = positive.any(1)
    per_group = (policy_err * positive).sum(1) / positive.sum(1).clamp(min=1)
    return (per_group * used_mask).sum() / used_mask.sum().clamp(min=1), used_mask.sum()


def group_preference_loss(policy_err: torch.Tensor, ref_err: torch.Tensor, labels: torch.Tensor, beta: float,
                          variant: str = "pl", generator: torch.Generator | None = None,
                          positive_threshold: float = 0.5) -> torch.Tensor:
    """Scalar group preference loss over [B, K] per-candidate errors and labels (see the module docstring)."""
    return group_preference_terms(policy_err, ref_err, labels, beta, variant, generator, positive_threshold).loss
