"""Ranking losses over groups of K candidates with graded labels, on any per-candidate reward.

Shapes: rewards and labels are [B, K]. A group whose labels are all equal carries no preference:
it contributes nothing (no gradient) and is counted in the returned `groups_used`.

Every tensor built here lives on the inputs' device. The public functions check values first (which reads
them); the _-prefixed ones are the math alone, so tests can run them on tensors without values ("meta", or
fake CUDA tensors) and catch a tensor made on the wrong device.
"""

from __future__ import annotations

import torch


def _check(rewards: torch.Tensor, labels: torch.Tensor) -> None:
    if rewards.ndim != 2 or rewards.shape != labels.shape:
        raise ValueError(f"rewards and labels must both be [B, K], got {tuple(rewards.shape)} and {tuple(labels.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"a group needs at least 2 candidates, got K={rewards.shape[1]}")
    if not torch.isfinite(labels).all():
        raise ValueError("labels contain NaN or infinite values")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or infinite values (check the inputs of this batch)")


def plackett_luce_loss(rewards: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                       reduce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Plackett-Luce negative log-likelihood of the ranking the labels induce.

    Candidates are ordered by label (highest first), ties broken by a random permutation (`generator`).
    Every position above the bottom label tier contributes -log(exp(r_i) / sum_{j ranked at or after i}
    exp(r_j)); the group's loss is the mean of its terms. For binary labels this is the top-|P| partial
    ranking: positives drawn first, in random order, each against the remaining positives and all
    negatives. Returns (loss, groups_used): the mean over groups with a preference (a zero that keeps
    the graph when there is none), or per-group losses [B] (0 where unused) with reduce=False.
    """
    _check(rewards, labels)
    return _plackett_luce(rewards, labels, generator, reduce)


def _tie_break(labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A random permutation of each row, on the labels' device. Drawn on the generator's device (a CPU generator
    cannot draw CUDA numbers), so one seed gives the same order on every device."""
    device = generator.device if generator is not None else labels.device
    return torch.argsort(torch.rand(labels.shape, generator=generator, device=device).to(labels.device), dim=1)


def _plackett_luce(rewards: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None,
                   reduce: bool) -> tuple[torch.Tensor, torch.Tensor]:
    k = labels.shape[1]
    # Sort by label, highest first, in a random order within a tier: shuffle, then a stable sort.
    shuffle = _tie_break(labels, generator)
    by_label = torch.sort(torch.gather(labels, 1, shuffle), dim=1, descending=True, stable=True).indices
    order = torch.gather(shuffle, 1, by_label)
    ranked_rewards = torch.gather(rewards, 1, order)
    ranked_labels = torch.gather(labels, 1, order)
    # log sum_{j >= i} exp(r_j): a reversed cumulative logsumexp.
    tail = torch.flip(torch.logcumsumexp(torch.flip(ranked_rewards, [1]), dim=1), [1])
    terms = tail - ranked_rewards  # -log softmax of position i among the rest
    active = ranked_labels > ranked_labels[:, -1:].expand(-1, k)  # above the bottom tier
    per_group = (terms * active).sum(1) / active.sum(1).clamp(min=1)
    used = active.any(1)
    if not reduce:
        return per_group * used, used.sum()
    return (per_group * used).sum() / used.sum().clamp(min=1), used.sum()


def pairwise_logistic_loss(rewards: torch.Tensor, labels: torch.Tensor,
                           reduce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over every pair (i, j) with label_i > label_j of -log sigmoid(r_i - r_j) (Bradley-Terry on
    all K(K-1)/2 comparisons). Returns (loss, groups_used) like plackett_luce_loss."""
    _check(rewards, labels)
    return _pairwise_logistic(rewards, labels, reduce)


def _pairwise_logistic(rewards: torch.Tensor, labels: torch.Tensor, reduce: bool) -> tuple[torch.Tensor, torch.Tensor]:
    better = labels[:, :, None] > labels[:, None, :]  # [B, K, K]
    margins = rewards[:, :, None] - rewards[:, None, :]
    pair_loss = torch.nn.functional.softplus(-margins) * better
    per_group = pair_loss.sum((1, 2)) / better.sum((1, 2)).clamp(min=1)
    used = better.any(2).any(1)
    if not reduce:
        return per_group * used, used.sum()
    return (per_group * used).sum() / used.sum().clamp(min=1), used.sum()
