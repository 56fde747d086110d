"""Small collectives shared by the training loops (no-ops in a single process)."""

from __future__ import annotations

import torch


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over every rank (the values themselves outside a process group)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()
