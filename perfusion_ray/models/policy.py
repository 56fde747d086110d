"""The trainable policy in its two kinds, behind one call signature, and its export as a pipeline.

Both kinds are called as `policy(sample, t, context, merchant=..., branch=...)` and branch=False is the
frozen base (the reference), with no second copy in memory:
- "personalized": PersonalizedUNet, the ControlNet-style merchant branch (models/adaptive.py);
- "plain_lora" (ablation): LoRA on the base UNet's own attention projections, no merchant input;
  branch=False disables the LoRA layers for the call.
`policy_pipeline` turns either into a PerFusionPipeline (plain LoRA is fused into the UNet there).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from perfusion_ray.config import PolicyConfig
from perfusion_ray.models.adaptive import LORA_TARGETS, PersonalizedUNet
from perfusion_ray.models.base import conditioned_call
from perfusion_ray.records import Merchant


class PlainLoRAUNet(nn.Module):
    """Ablation: LoRA on (a copy of) the base UNet; the merchant is ignored."""

    def __init__(self, unet, lora_rank: int = 8):
        super().__init__()
        from peft import LoraConfig

        self.unet = copy.deepcopy(unet).requires_grad_(False)  # the caller's UNet stays the plain base
        self.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS))

    def featurize(self, merchants: Sequence[Merchant]) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                merchant: dict[str, torch.Tensor] | None = None, branch: bool = True) -> torch.Tensor:
        if branch:
            return conditioned_call(self.unet, sample, timestep, encoder_hidden_states).sample
        self.unet.disable_adapters()
        try:
            return conditioned_call(self.unet, sample, timestep, encoder_hidden_states).sample
        finally:
            self.unet.enable_adapters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def fused_unet(self):
        """A plain UNet2DConditionModel with the LoRA merged in (for sampling and export)."""
        unet = copy.deepcopy(self.unet)
        unet.fuse_lora()
        unet.unload_lora()
        return unet


def build_policy(unet, policy: PolicyConfig, adapter: str = "personalized", stat_names: tuple[str, ...] = (),
                 merchants: Sequence[Merchant] | None = None) -> nn.Module:
    """A fresh policy over the frozen base UNet; `merchants` are the training merchants (known ids)."""
    if adapter == "plain_lora":
        return PlainLoRAUNet(unet, policy.lora_rank)
    if adapter != "personalized":
        raise ValueError(f"unknown adapter {adapter!r}: personalized or plain_lora")
    model = PersonalizedUNet.from_unet(unet, merchant_dim=policy.merchant_dim,
                                       condition_channels=policy.condition_channels, lora_rank=policy.lora_rank,
                                       stat_names=tuple(stat_names), id_dropout=policy.id_dropout)
    if merchants is not None:
        model.adapter.fit_merchants(merchants)
    return model


def featurizer(policy: nn.Module):
    """The policy's merchant featurizer (merchants -> tensors its forward takes)."""
    return policy.adapter.featurize if isinstance(policy, PersonalizedUNet) else policy.featurize


def policy_pipeline(base, policy: nn.Module):
    """A PerFusionPipeline that samples from `policy` (eval mode)."""
    from perfusion_ray.models.pipeline import PerFusionPipeline

    policy.eval()
    if isinstance(policy, PersonalizedUNet):
        return PerFusionPipeline.from_base(base, policy.adapter)
    return PerFusionPipeline.from_base(dataclasses.replace(base, unet=policy.fused_unet()))
