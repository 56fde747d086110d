"""The field anchor: DGPO-style direct group preference optimization (Luo et al., 2025, "Reinforcing
Diffusion Models by Direct Group Preference Optimization").

A group's candidates are split by their advantage (label minus the group's mean, over its standard
deviation) into a better half G+ (advantage > 0) and a worse half G- (< 0). Each side's implicit reward is
the advantage-weighted mean of its candidates' implicit rewards r_k = -beta (e_k - f_k) (policy minus
reference denoising error, the Diffusion-DPO surrogate of the likelihood ratio), and the group's loss is
the Bradley-Terry loss of G+ over G-:
    L = -log sigmoid( sum_{G+} w_k r_k - sum_{G-} w_k r_k ),  w_k = |A_k| / sum_{same side} |A_j|.
So the size of the reward gap, not only the order, sets how much a candidate counts; for one winner and
one loser it is Diffusion-DPO. Like the other objectives it trains on the forward process (one shared
timestep and noise per group), so it needs no sampler log-likelihoods and costs the same 2K denoiser
passes per group as pl. Groups whose labels are all equal carry no preference and are skipped.
"""

from __future__ import annotations

import torch


def advantages(labels: torch.Tensor) -> torch.Tensor:
    """Group-normalized advantages [B, K]: (label - group mean) / group std (zero for a flat group)."""
    centred = labels - labels.mean(1, keepdim=True)
    scale = centred.pow(2).mean(1, keepdim=True).sqrt()
    return torch.where(scale > 0, centred / scale.clamp(min=torch.finfo(labels.dtype).tiny), torch.zeros_like(centred))


def _side_weights(advantage: torch.Tensor, sign: int) -> torch.Tensor:
    side = (sign * advantage).clamp(min=0)
    return side / side.sum(1, keepdim=True).clamp(min=torch.finfo(advantage.dtype).tiny)


def _dgpo(rewards: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over groups with a preference, groups used); every tensor on the inputs' device."""
    advantage = advantages(labels)
    used = (advantage > 0).any(1) & (advantage < 0).any(1)
    margin = (_side_weights(advantage, 1) * rewards).sum(1) - (_side_weights(advantage, -1) * rewards).sum(1)
    per_group = torch.where(used, -torch.nn.functional.logsigmoid(margin), torch.zeros_like(margin))
    return per_group.sum() / used.sum().clamp(min=1), used.sum()
