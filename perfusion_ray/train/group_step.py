"""One alignment step's forward work: group examples -> per-candidate denoising errors -> group loss.

Shared by offline alignment (train/align_offline.py), the online rounds and the ablation benchmark, so
that every variant is measured on exactly the same code. The denoiser is any callable with the
PersonalizedUNet signature (a DeepSpeed engine around one works): `denoise(sample, t, context,
merchant=..., branch=...)`; the reference is the same call with branch=False, under no_grad.

Noise: by default one timestep and one noise draw per group, shared by its K candidates (docs/models.md,
the objective), so the candidates of a group differ only in their image. The pairwise baseline is
Diffusion-DPO on every ordered pair of the group (labels differ), each pair its own example with its
own timestep and noise, as the Diffusion-DPO recipe trains: 4 denoiser passes per pair, against 2K per
group for the group objectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence

import numpy as np
import torch

from perfusion_ray.models.base import images_to_model
from perfusion_ray.objectives import GroupLoss, group_preference_terms
from perfusion_ray.records import GroupBatch, Merchant


@dataclass
class GroupTensors:
    """A batch of group examples as the denoiser sees them."""

    latents: torch.Tensor  # [B, K, C, h, w] scaled latents of the candidates
    context: torch.Tensor  # [B, L, D] text encoder states of the prompts
    merchant: dict[str, torch.Tensor]  # featurized merchants, one row per group
    labels: torch.Tensor  # [B, K] graded labels


@dataclass
class StepResult:
    loss: torch.Tensor
    groups_used: int
    groups_skipped: int
    denoiser_passes: int  # policy + reference forward passes over single candidates
    reward_margin: float  # mean implicit reward of positives minus negatives (for monitoring)
    reference_gap: float = 0.0  # mean |policy error - reference error| per candidate: distance from the reference


@torch.no_grad()
def group_tensors(base, featurize: Callable[[Sequence[Merchant]], dict], batch: GroupBatch) -> GroupTensors:
    """A batch of groups -> latents, prompt states, merchant features, on the base model's device."""
    _, _, images = batch.candidates()
    latents = base.encode_images(images_to_model(np.asarray(images)).to(base.device)).float()
    latents = latents.reshape(len(batch), batch.group_size, *latents.shape[1:])
    context = base.encode_prompts(batch.prompts)
    labels = torch.as_tensor(np.asarray(batch.labels), dtype=torch.float32).to(base.device)
    return GroupTensors(latents, context, featurize(batch.merchants), labels)


def _target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def _repeat_rows(merchant: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: value[index] for name, value in merchant.items()}


def denoising_errors(denoise, scheduler, latents: torch.Tensor, context: torch.Tensor,
                     merchant: dict[str, torch.Tensor], timesteps: torch.Tensor, noise: torch.Tensor,
                     with_reference: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-candidate mean squared errors of the policy (with grad) and of the reference (without).

    with_reference=False skips the reference pass (sft needs none) and returns the policy's errors,
    detached, in its place.
    latents [N, K, C, h, w]; context [N, L, D]; merchant rows [N]; timesteps [N]; noise [N, K, C, h, w].
    Returns policy_err, ref_err, each [N, K].
    """
    rows, k = latents.shape[:2]
    flat = latents.reshape(rows * k, *latents.shape[2:])
    flat_noise = noise.reshape(rows * k, *noise.shape[2:])
    index = torch.arange(rows, device=latents.device).repeat_interleave(k)
    t = timesteps[index]
    noisy = scheduler.add_noise(flat, flat_noise, t)
    target = _target(scheduler, flat, flat_noise, t)
    # The denoiser's own precision (bf16 under DeepSpeed's bf16); errors are taken in float32.
    dtype = next(denoise.parameters()).dtype if hasattr(denoise, "parameters") else noisy.dtype
    noisy, states, conditions = noisy.to(dtype), context[index].to(dtype), _repeat_rows(merchant, index)
    prediction = denoise(noisy, t, states, merchant=conditions, branch=True)
    policy_err = ((prediction.float() - target) ** 2).mean(dim=(1, 2, 3)).view(rows, k)
    if not with_reference:
        return policy_err, policy_err.detach()
    with torch.no_grad():
        reference = denoise(noisy, t, states, merchant=conditions, branch=False)
    ref_err = ((reference.float() - target) ** 2).mean(dim=(1, 2, 3)).view(rows, k)
    return policy_err, ref_err


def independent_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (group, better, worse) with label_better > label_worse: Diffusion-DPO's pairs."""
    better = labels[:, :, None] > labels[:, None, :]
    group, winner, loser = better.nonzero(as_tuple=True)
    return group, winner, loser


def _sample_timesteps(scheduler, count: int, generator: torch.Generator, device, low: float = 0.0) -> torch.Tensor:
    """Uniform over the upper (1 - low) share of the training timesteps."""
    steps = int(scheduler.config.num_train_timesteps)
    return torch.randint(int(low * steps), steps, (count,), generator=generator).to(device)


def group_step(denoise, scheduler, batch: GroupTensors, beta: float, variant: str = "pl",
               generator: torch.Generator | None = None, share_noise: bool = True,
               positive_threshold: float = 0.5, min_timestep: float = 0.0) -> StepResult:
    """The loss of one batch of groups for the chosen objective variant (see the module docstring).

    min_timestep: the lowest share of the noise schedule sampled (0 = all timesteps).
    """
    generator = generator or torch.Generator().manual_seed(0)
    latents, labels = batch.latents, batch.labels.to(batch.latents.device)
    groups, k = labels.shape
    device = latents.device
    if variant == "pairwise":
        group, winner, loser = independent_pairs(labels)
        if len(group) == 0:
            zero = latents.new_zeros((), requires_grad=False)
            return StepResult(zero, 0, groups, 0, 0.0)
        pair_latents = torch.stack([latents[group, winner], latents[group, loser]], dim=1)  # [P, 2, ...]
        noise = torch.randn(len(group), 1, *latents.shape[2:], generator=generator).to(device).expand_as(pair_latents)
        timesteps = _sample_timesteps(scheduler, len(group), generator, device, min_timestep)
        policy_err, ref_err = denoising_errors(denoise, scheduler, pair_latents, batch.context[group],
                                               _repeat_rows(batch.merchant, group), timesteps, noise)
        pair_labels = torch.tensor([[1.0, 0.0]], device=device).expand(len(group), 2)
        terms = group_preference_terms(policy_err, ref_err, pair_labels, beta, "pairwise", generator, 0.5)
        used = int(torch.unique(group).numel())
        return StepResult(terms.loss, used, groups - used, 4 * len(group),
                          _reward_margin(policy_err.detach(), ref_err, pair_labels, beta, 0.5),
                          _reference_gap(policy_err, ref_err))
    shape = (groups, 1 if share_noise else k, *latents.shape[2:])
    noise = torch.randn(shape, generator=generator).to(device).expand_as(latents)
    timesteps = _sample_timesteps(scheduler, groups, generator, device, min_timestep)
    with_reference = variant != "sft"
    policy_err, ref_err = denoising_errors(denoise, scheduler, latents, batch.context, batch.merchant, timesteps,
                                           noise.contiguous(), with_reference)
    terms: GroupLoss = group_preference_terms(policy_err, ref_err, labels, beta, variant, generator,
                                              positive_threshold)
    passes = (2 if with_reference else 1) * groups * k
    return StepResult(terms.loss, terms.groups_used, terms.groups_skipped, passes,
                      _reward_margin(policy_err.detach(), ref_err, labels, beta, positive_threshold),
                      _reference_gap(policy_err, ref_err))


def _reference_gap(policy_err: torch.Tensor, ref_err: torch.Tensor) -> float:
    return float((policy_err.detach() - ref_err).abs().mean())


def _reward_margin(policy_err, ref_err, labels, beta: float, threshold: float) -> float:
    rewards = -beta * (policy_err - ref_err)
    positive = labels > threshold
    has_both = positive.any(1) & (~positive).any(1)
    if not has_both.any():
        return 0.0
    mean_p = (rewards * positive).sum(1) / positive.sum(1).clamp(min=1)
    mean_n = (rewards * ~positive).sum(1) / (~positive).sum(1).clamp(min=1)
    return float((mean_p - mean_n)[has_both].mean())
