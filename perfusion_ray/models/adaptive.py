"""The personalized adaptive network: a ControlNet-style trainable copy of the base UNet's encoder,
joined to the frozen base through zero-initialised convolutions, conditioned on the merchant.

How the merchant enters the branch: the merchant encoder's vector is projected to a few channels and
tiled to the latent's spatial size as the ControlNet conditioning image. (A probe in STACK.md moved
outputs far more this way than by appending the vector as extra cross-attention tokens; PAPER.md leaves
the choice open.) The copy carries LoRA adapters (peft) on its attention projections; its zero
convolutions, conditioning embedding and the merchant modules train in full; the base UNet is frozen.

The reference model is the same network with the branch switched off (`branch=False`): no second copy
in memory. At initialisation the zero joins make the personalized output equal the base output exactly.
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel
from torch import nn

from perfusion_ray.models.merchant_encoder import MerchantEncoder

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The branch's parts that train in full next to its LoRA matrices (names inside ControlNetModel).
FULLY_TRAINED = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")


class PersonalizedUNet(nn.Module):
    def __init__(self, unet, merchant_dim: int = 64, condition_channels: int = 8, lora_rank: int = 8,
                 stat_names: tuple[str, ...] = ()):
        super().__init__()
        from peft import LoraConfig

        self.unet = unet.requires_grad_(False)
        self.controlnet = ControlNetModel.from_unet(unet, conditioning_channels=condition_channels,
                                                    conditioning_embedding_out_channels=(16,))
        self.controlnet.requires_grad_(False)
        self.controlnet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS))
        for name, parameter in self.controlnet.named_parameters():
            if "lora_" in name or name.startswith(FULLY_TRAINED):
                parameter.requires_grad_(True)
        self.merchant_encoder = MerchantEncoder(merchant_dim, stat_names=stat_names)
        self.condition = nn.Linear(merchant_dim, condition_channels)

    def condition_map(self, merchant: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        """The merchant as a (B, C, H, W) conditioning image at the latent's spatial size."""
        vector = self.condition(self.merchant_encoder(**merchant))
        return vector[:, :, None, None].expand(-1, -1, *sample.shape[-2:]).to(sample.dtype)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                merchant: dict[str, torch.Tensor] | None = None, branch: bool = True) -> torch.Tensor:
        """Noise (or v) prediction. branch=False, or no merchant, is the frozen base: the reference."""
        if not branch or merchant is None:
            return self.unet(sample, timestep, encoder_hidden_states).sample
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states,
                                    controlnet_cond=self.condition_map(merchant, sample),
                                    conditioning_scale=1.0, return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
