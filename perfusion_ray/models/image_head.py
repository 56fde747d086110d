"""A small trainable image encoder read beside the CLIP image tower.

A frozen CLIP tower describes an image in the words it was trained on; a store's merchants may care about
what those words do not name (a continuous hue, a brightness, a finish). This head learns its features
from the store's own feedback, directly from pixels, and the image plug-in crosses them with the merchant.
"""

from __future__ import annotations

import torch
from torch import nn


class ImageHead(nn.Module):
    """Three 3x3 convolutions (the last two at stride 2), then mean- and max-pooled channels, projected to
    `dim` features. Input: CLIP-normalised pixels [N, 3, H, W]; output [N, dim]."""

    def __init__(self, channels: int = 32, dim: int = 32):
        super().__init__()
        self.convolutions = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU(),
        )
        self.projection = nn.Linear(2 * channels, dim)

    @property
    def dim(self) -> int:
        return self.projection.out_features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        maps = self.convolutions(pixel_values)
        # mean pooling keeps how much of the image has a property, max pooling that some part has it
        return self.projection(torch.cat([maps.mean((2, 3)), maps.amax((2, 3))], dim=-1))
