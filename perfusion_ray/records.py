"""The typed records that travel end to end: a `Merchant`, a `Request` (merchant + prompt), and a
`GroupBatch` (requests with their K candidate images and labels).

A feedback event names its merchant by three columns (merchant_id, merchant_features, merchant_stats);
from ingest to a gradient that merchant is one `Merchant` object, never a JSON string or a dict that is
decoded again at every step. A `GroupBatch` is what the Ray Data shards, the round controller, the
worker group and the objectives exchange: take / concat / chunk for dispatch, `to(device)` for the
models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np


def _pairs(value) -> dict:
    """A map column's value as a dict: Arrow maps arrive as lists of (key, value) pairs, or None."""
    if value is None:
        return {}
    return dict(value.items() if isinstance(value, Mapping) else value)


@dataclass(frozen=True)
class Merchant:
    """Who asks. Every field may be empty: an id the models were not trained on is a cold-start merchant
    (side features only); no id at all scores and generates like the non-personalized path."""

    id: str = ""
    features: Mapping[str, str] = field(default_factory=dict)  # observable categorical side features
    stats: Mapping[str, float] = field(default_factory=dict)  # observable numeric side features

    def __hash__(self) -> int:  # hashable, so models can cache what they derive from a merchant
        return hash((self.id, tuple(sorted(self.features.items())), tuple(sorted(self.stats.items()))))

    @classmethod
    def from_record(cls, record: Mapping) -> "Merchant":
        """From the event schema's columns: merchant_id, merchant_features, merchant_stats (dicts or pairs)."""
        return cls(str(record.get("merchant_id") or ""), {str(k): str(v) for k, v in _pairs(record.get("merchant_features")).items()},
                   {str(k): float(v) for k, v in _pairs(record.get("merchant_stats")).items()})

    @classmethod
    def coerce(cls, value: "Merchant | Mapping") -> "Merchant":
        return value if isinstance(value, Merchant) else cls.from_record(value)

    def record(self) -> dict:
        """The event schema's merchant columns."""
        return {"merchant_id": self.id, "merchant_features": dict(self.features), "merchant_stats": dict(self.stats)}

    def as_fields(self) -> dict:
        """The merchant fields of an endpoint request: merchant_id only when there is one."""
        fields: dict = {"merchant_features": dict(self.features), "merchant_stats": dict(self.stats)}
        if self.id:
            fields["merchant_id"] = self.id
        return fields


@dataclass(frozen=True)
class Request:
    """One request: a merchant asks for K candidates of a prompt."""

    request_id: str
    merchant: Merchant
    prompt: str


@dataclass
class GroupBatch:
    """B groups of K candidates: who asked what, the images (uint8 [B, K, H, W, 3]) and their graded labels
    ([B, K]). Images and labels are numpy arrays for transport and torch tensors after `to(device)`."""

    request_ids: list[str]
    merchants: list[Merchant]
    prompts: list[str]
    images: "np.ndarray"
    labels: "np.ndarray"

    def __post_init__(self):
        if not (len(self.request_ids) == len(self.merchants) == len(self.prompts) == len(self.images)
                == len(self.labels)):
            raise ValueError(f"a group batch needs one request id, merchant, prompt, image group and label row per "
                             f"group: got {len(self.request_ids)}, {len(self.merchants)}, {len(self.prompts)}, "
                             f"{len(self.images)}, {len(self.labels)}")

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def group_size(self) -> int:
        return int(self.labels.shape[1])

    @property
    def requests(self) -> list[Request]:
        return [Request(r, m, p) for r, m, p in zip(self.request_ids, self.merchants, self.prompts)]

    @classmethod
    def from_requests(cls, requests: Sequence[Request], images, labels) -> "GroupBatch":
        return cls([r.request_id for r in requests], [r.merchant for r in requests], [r.prompt for r in requests],
                   images, labels)

    @classmethod
    def from_columns(cls, columns: Mapping) -> "GroupBatch":
        """From the columns of a decoded group table (data.group_examples.decode_groups): a Ray Data numpy
        batch, or a dict of lists."""
        merchants = [Merchant.from_record({"merchant_id": m, "merchant_features": f, "merchant_stats": s})
                     for m, f, s in zip(columns["merchant_id"], columns["merchant_features"], columns["merchant_stats"])]
        labels = np.asarray(np.stack([np.asarray(row, np.float32) for row in columns["labels"]]) if len(merchants)
                            else np.zeros((0, 0), np.float32), np.float32)
        return cls([str(r) for r in columns["request_id"]], merchants, [str(p or "") for p in columns["prompt"]],
                   np.asarray(columns["images"], np.uint8), labels)

    def take(self, rows) -> "GroupBatch":
        """The groups at these positions (repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        return GroupBatch([self.request_ids[i] for i in rows], [self.merchants[i] for i in rows],
                          [self.prompts[i] for i in rows], self.images[rows], self.labels[rows])

    @staticmethod
    def concat(batches: Sequence["GroupBatch"]) -> "GroupBatch":
        """Batches stacked in order (empty ones skipped; at least one must hold groups)."""
        batches = [b for b in batches if len(b)]
        if not batches:
            raise ValueError("nothing to concatenate: every batch is empty")
        stack = np.concatenate if isinstance(batches[0].images, np.ndarray) else _torch_cat
        return GroupBatch([r for b in batches for r in b.request_ids], [m for b in batches for m in b.merchants],
                          [p for b in batches for p in b.prompts], stack([b.images for b in batches]),
                          stack([b.labels for b in batches]))

    def chunk(self, parts: int) -> list["GroupBatch"]:
        """`parts` consecutive pieces whose sizes differ by at most one (a worker group's shares)."""
        bounds = np.linspace(0, len(self), parts + 1).round().astype(int)
        return [self.take(range(bounds[i], bounds[i + 1])) for i in range(parts)]

    def candidates(self) -> tuple[list[Merchant], list[str], "np.ndarray"]:
        """One row per candidate (B*K, group-major): merchants, prompts, images [B*K, H, W, 3]."""
        k = self.group_size
        images = self.images.reshape(len(self) * k, *self.images.shape[2:])
        return [m for m in self.merchants for _ in range(k)], [p for p in self.prompts for _ in range(k)], images

    def to(self, device) -> "GroupBatch":
        """Images (uint8) and labels (float32) as torch tensors on `device`."""
        import torch

        return replace(self, images=torch.as_tensor(np.asarray(self.images)).to(device),
                       labels=torch.as_tensor(np.asarray(self.labels), dtype=torch.float32).to(device))


def _torch_cat(tensors):
    import torch

    return torch.cat(list(tensors))
