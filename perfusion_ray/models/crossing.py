"""DCN-V2 crossing (CrossNetV2) and the personalized plug-in that injects a merchant into a tower."""

from __future__ import annotations

import torch
from torch import nn


class CrossNetV2(nn.Module):
    """x_{l+1} = x_0 * (W_l x_l + b_l) + x_l  (Wang et al., DCN-V2, full-rank cross layers)."""

    def __init__(self, dim: int, num_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=0.5 / dim ** 0.5)
            nn.init.zeros_(layer.bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class PersonalizedPlugin(nn.Module):
    """tower' = tower + P(CrossNetV2([source ; merchant])): the merchant crosses every source dimension.

    `source` is the tower's feature itself (the default), or another view of the same input of
    `source_dim` features, e.g. the tower's pooled output before CLIP's linear projection, which keeps
    detail the projection drops. P is zero-initialised, so a fresh plug-in leaves the tower's feature
    unchanged (the pretrained CLIP score is the starting point) and switching it off is exactly the
    non-personalized model.
    """

    def __init__(self, tower_dim: int, merchant_dim: int, num_layers: int = 2, source_dim: int | None = None):
        super().__init__()
        width = (source_dim or tower_dim) + merchant_dim
        self.cross = CrossNetV2(width, num_layers)
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, tower_dim)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def forward(self, tower: torch.Tensor, merchant: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        z0 = self.norm(torch.cat([tower if source is None else source, merchant], dim=-1))
        return tower + self.projection(self.cross(z0))
