"""The merchant encoder: hashed id embedding + side-feature embeddings (FuxiCTR-style FeatureEmbedding).

A merchant is (id, categorical features, numeric stats). Ids and `name=value` feature tokens are
hashed into fixed tables, so the vocabulary never has to be known in advance. An id the encoder was
not trained on (cold start) gets no id embedding at all: the merchant is represented by its side
features alone. Training drops known ids at random (id_dropout) so that path is learned too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from perfusion_ray.records import Merchant


def stable_bucket(text: str, buckets: int) -> int:
    """A hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % buckets


class MerchantEncoder(nn.Module):
    def __init__(self, dim: int = 64, id_buckets: int = 4096, feature_buckets: int = 1024,
                 stat_names: tuple[str, ...] = (), max_features: int = 8, id_dropout: float = 0.25):
        super().__init__()
        self.id_buckets, self.feature_buckets, self.max_features = id_buckets, feature_buckets, max_features
        self.stat_names = tuple(stat_names)
        self.id_dropout = id_dropout
        self.id_embedding = nn.Embedding(id_buckets, dim)
        self.feature_embedding = nn.Embedding(feature_buckets + 1, dim, padding_idx=feature_buckets)
        self.stats_projection = nn.Linear(max(len(self.stat_names), 1), dim)
        self.mlp = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Linear(dim, dim))
        nn.init.normal_(self.id_embedding.weight, std=0.02)
        nn.init.normal_(self.feature_embedding.weight, std=0.1)
        # Set from training data; saved with the weights.
        self.register_buffer("stat_mean", torch.zeros(max(len(self.stat_names), 1)))
        self.register_buffer("stat_std", torch.ones(max(len(self.stat_names), 1)))
        self._known_ids: set[str] = set()
        self._rows: dict[Merchant, tuple] = {}

    @property
    def known_ids(self) -> set[str]:
        return self._known_ids

    @known_ids.setter
    def known_ids(self, ids) -> None:
        self._known_ids, self._rows = set(ids), {}  # the cached rows carry the known flag

    @property
    def dim(self) -> int:
        return self.id_embedding.embedding_dim

    def fit_normalisation(self, merchants: Sequence[Merchant]) -> None:
        """Remember the training merchants (ids and stat scale)."""
        self.known_ids = {m.id for m in merchants}
        if self.stat_names:
            values = np.array([[m.stats.get(name, np.nan) for name in self.stat_names] for m in merchants],
                              dtype=np.float64)
            mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
            self.stat_mean.copy_(torch.as_tensor(np.nan_to_num(mean), dtype=torch.float32))
            self.stat_std.copy_(torch.as_tensor(np.where(np.nan_to_num(std) > 1e-6, std, 1.0), dtype=torch.float32))

    def _row(self, merchant: Merchant) -> tuple[int, bool, list[int], list[float]]:
        """A merchant's hashed id, known flag, feature tokens and raw stats; cached per merchant, since the
        same few merchants recur in every batch."""
        row = self._rows.get(merchant)
        if row is None:
            tokens = [stable_bucket(f"{name}={value}", self.feature_buckets)
                      for name, value in sorted(merchant.features.items())[: self.max_features]]
            tokens += [self.feature_buckets] * (self.max_features - len(tokens))
            stats = [float(merchant.stats[name]) if merchant.stats.get(name) is not None else np.nan
                     for name in self.stat_names or ("",)]
            row = (stable_bucket(merchant.id, self.id_buckets), merchant.id in self.known_ids, tokens, stats)
            if len(self._rows) < 65536:
                self._rows[merchant] = row
        return row

    def featurize(self, merchants: Sequence[Merchant]) -> dict[str, torch.Tensor]:
        """Tensors for forward(); pure bookkeeping, cheap, on the CPU."""
        device = self.id_embedding.weight.device
        rows = [self._row(m) for m in merchants]
        width = len(self.stat_names or ("",))
        return {"ids": torch.tensor([r[0] for r in rows], dtype=torch.long, device=device),
                "known": torch.tensor([r[1] for r in rows], dtype=torch.bool, device=device),
                "tokens": torch.tensor([r[2] for r in rows], dtype=torch.long, device=device).reshape(len(rows), self.max_features),
                "stats": torch.tensor([r[3] for r in rows], dtype=torch.float32, device=device).reshape(len(rows), width)}

    def forward(self, ids: torch.Tensor, known: torch.Tensor, tokens: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        if self.training and self.id_dropout > 0:
            known = known & (torch.rand(known.shape, device=known.device) >= self.id_dropout)
        id_vector = self.id_embedding(ids) * known[:, None].to(self.id_embedding.weight.dtype)
        present = (tokens != self.feature_buckets).to(self.feature_embedding.weight.dtype)
        features = self.feature_embedding(tokens).sum(1) / present.sum(1, keepdim=True).clamp(min=1)
        # A missing stat is its mean (0 after normalisation), never NaN into the network.
        normalised = torch.nan_to_num((stats - self.stat_mean) / self.stat_std, nan=0.0)
        if not self.stat_names:
            normalised = torch.zeros_like(normalised)
        normalised = normalised.to(self.stats_projection.weight.dtype)  # stats arrive float32; weights may be bf16
        return self.mlp(torch.cat([id_vector, features, self.stats_projection(normalised)], dim=1))
