"""The merchant encoder: hashed id embedding + side-feature embeddings (FuxiCTR-style FeatureEmbedding).

A merchant is (id, categorical features, numeric stats). Ids and `name=value` feature tokens are
hashed into fixed tables, so the vocabulary never has to be known in advance. An id the encoder was
not trained on (cold start) gets no id embedding at all: the merchant is represented by its side
features alone. Training drops known ids at random (id_dropout) so that path is learned too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def stable_bucket(text: str, buckets: int) -> int:
    """A hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % buckets


@dataclass
class MerchantBatch:
    """Merchants as given to scoring and training: parallel lists."""

    ids: list[str]
    features: list[dict[str, str]]
    stats: list[dict[str, float]]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows) -> "MerchantBatch":
        """The merchants at these row positions (repeats allowed)."""
        return MerchantBatch([self.ids[i] for i in rows], [self.features[i] for i in rows],
                             [self.stats[i] for i in rows])

    @classmethod
    def from_records(cls, records: list[dict]) -> "MerchantBatch":
        """From dicts with merchant_id and optional merchant_features / merchant_stats (dicts or pairs)."""
        return cls(
            ids=[str(r.get("merchant_id") or "") for r in records],
            features=[dict(r.get("merchant_features") or {}) for r in records],
            stats=[dict(r.get("merchant_stats") or {}) for r in records],
        )


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
        self.known_ids: set[str] = set()

    @property
    def dim(self) -> int:
        return self.id_embedding.embedding_dim

    def fit_normalisation(self, batch: MerchantBatch) -> None:
        """Remember the training merchants (ids and stat scale)."""
        self.known_ids = set(batch.ids)
        if self.stat_names:
            values = np.array([[s.get(name, np.nan) for name in self.stat_names] for s in batch.stats], dtype=np.float64)
            mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
            self.stat_mean.copy_(torch.as_tensor(np.nan_to_num(mean), dtype=torch.float32))
            self.stat_std.copy_(torch.as_tensor(np.where(np.nan_to_num(std) > 1e-6, std, 1.0), dtype=torch.float32))

    def featurize(self, batch: MerchantBatch) -> dict[str, torch.Tensor]:
        """Tensors for forward(); pure bookkeeping, cheap, on the CPU."""
        device = self.id_embedding.weight.device
        ids = torch.tensor([stable_bucket(i, self.id_buckets) for i in batch.ids], dtype=torch.long)
        known = torch.tensor([i in self.known_ids for i in batch.ids], dtype=torch.bool)
        tokens = torch.full((len(batch), self.max_features), self.feature_buckets, dtype=torch.long)
        for row, features in enumerate(batch.features):
            for column, (name, value) in enumerate(sorted(features.items())[: self.max_features]):
                tokens[row, column] = stable_bucket(f"{name}={value}", self.feature_buckets)
        names = self.stat_names or ("",)
        stats = torch.tensor([[float(s.get(name, np.nan)) if s.get(name) is not None else np.nan for name in names]
                              for s in batch.stats], dtype=torch.float32).reshape(len(batch), len(names))
        return {"ids": ids.to(device), "known": known.to(device), "tokens": tokens.to(device), "stats": stats.to(device)}

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
