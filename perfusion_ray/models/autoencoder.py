"""A small plain convolutional autoencoder: the embedded base model's VAE (32x32x3 <-> 4x8x8).

Stable Diffusion's recipe (a pixel autoencoder trained first, diffusion in its latent space) at the
size of FashionWorld. It is a diffusers ModelMixin + ConfigMixin, so save_pretrained/from_pretrained
work like any diffusers component, and it answers the calls StableDiffusionPipeline makes of an
AutoencoderKL: `encode(x).latent_dist.sample()/.mode()`, `decode(z, return_dict=False)[0]`,
`config.scaling_factor` and `config.block_out_channels` (whose length gives the pipeline's
vae_scale_factor). It is deterministic (no KL term): diffusers' AutoencoderKL was 4-5x slower per
step on 2 CPU cores for no gain at this size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from torch.nn import functional as F


class PointLatent:
    """The latent 'distribution' of a deterministic encoder: sample() and mode() are the code itself."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents

    def mode(self) -> torch.Tensor:
        return self.latents

    @property
    def mean(self) -> torch.Tensor:
        return self.latents


@dataclass
class EncoderOutput(BaseOutput):
    latent_dist: PointLatent


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor


class _ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv2(F.silu(self.conv1(F.silu(x))))


class TinyAutoencoder(ModelMixin, ConfigMixin):
    """Encoder: conv, then per level a residual block and (but the last) a stride-2 conv; decoder mirrors."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        scaling_factor: float = 1.0,
        sample_size: int = 32,
    ):
        super().__init__()
        chs = list(block_out_channels)
        enc: list[nn.Module] = [nn.Conv2d(in_channels, chs[0], 3, padding=1)]
        prev = chs[0]
        for level, ch in enumerate(chs):
            enc.append(_ResBlock(prev, ch))
            prev = ch
            if level < len(chs) - 1:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.encoder = nn.Sequential(*enc)
        self.quant = nn.Conv2d(prev, latent_channels, 3, padding=1)

        dec: list[nn.Module] = [nn.Conv2d(latent_channels, chs[-1], 3, padding=1)]
        prev = chs[-1]
        for level, ch in enumerate(reversed(chs)):
            dec.append(_ResBlock(prev, ch))
            prev = ch
            if level < len(chs) - 1:
                dec.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
                dec.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.decoder = nn.Sequential(*dec)
        self.post = nn.Conv2d(prev, out_channels, 3, padding=1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1], [B, 3, H, W] -> unscaled latents [B, 4, H/4, W/4] (multiply by scaling_factor)."""
        latents = self.quant(F.silu(self.encoder(x)))
        return EncoderOutput(latent_dist=PointLatent(latents)) if return_dict else (PointLatent(latents),)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        """Unscaled latents -> images in about [-1, 1] (callers clamp)."""
        sample = self.post(F.silu(self.decoder(z)))
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latent_dist.mode()).sample
