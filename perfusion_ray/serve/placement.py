"""Where a Serve replica runs its model: on the device Ray's GPU assignment allows, in the dtype the config asks.

A replica asks Ray for serve.replica_gpus / design.replica_gpus GPUs (a fraction shares one GPU). It runs on CUDA
when Ray assigned it GPU ids and torch sees a CUDA device (Ray narrows CUDA_VISIBLE_DEVICES to the assigned ids,
so the device is plain "cuda"), otherwise on the CPU. The choice and its reason go to the replica's log and to
placement() on the deployment handle. The same config therefore runs unchanged on a GPU cluster and here, where
Ray's GPUs are logical only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import get_args

from perfusion_ray.config import ReplicaDtype

logger = logging.getLogger("ray.serve")

DTYPES: tuple[str, ...] = get_args(ReplicaDtype)


@dataclass(frozen=True)
class ReplicaPlacement:
    device: str  # "cuda" or "cpu"
    dtype: str  # the dtype the model's weights and compute use, one of DTYPES
    gpu_ids: tuple[str, ...]  # what Ray assigned this replica
    node_id: str
    reason: str

    def as_dict(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "gpu_ids": list(self.gpu_ids), "node_id": self.node_id,
                "reason": self.reason}

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def choose_device(gpu_ids: tuple[str, ...], cuda_available: bool) -> tuple[str, str]:
    """(device, why) for a replica Ray assigned `gpu_ids`, in a process where torch does or does not see CUDA."""
    if gpu_ids and cuda_available:
        return "cuda", f"Ray assigned GPU {','.join(gpu_ids)}"
    if gpu_ids:
        return "cpu", (f"Ray assigned GPU {','.join(gpu_ids)} but torch sees no CUDA device (a logical GPU or a "
                       f"CPU build of torch)")
    return "cpu", "no GPU assigned (replica_gpus is 0)"


def choose_dtype(requested: str, device: str, bf16_supported: bool) -> tuple[str, str]:
    """(dtype, note): the requested dtype, except bfloat16 on a GPU without it (float16 there, the same memory)."""
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r}: one of {', '.join(DTYPES)}")
    if requested == "bfloat16" and device == "cuda" and not bf16_supported:
        return "float16", "this GPU has no bfloat16, float16 instead"
    return requested, ""


def replica_placement(requested_dtype: str, what: str) -> ReplicaPlacement:
    """Decide inside the replica's own process (where Ray's assignment is visible) and log the decision."""
    import ray
    import torch

    context = ray.get_runtime_context()
    gpu_ids = tuple(str(i) for i in context.get_accelerator_ids().get("GPU", []))
    cuda = torch.cuda.is_available()
    device, why = choose_device(gpu_ids, cuda)
    dtype, note = choose_dtype(requested_dtype, device, cuda and torch.cuda.is_bf16_supported())
    placement = ReplicaPlacement(device, dtype, gpu_ids, context.get_node_id(), "; ".join(filter(None, (why, note))))
    logger.info("%s replica runs on %s in %s: %s", what, device, dtype, placement.reason)
    return placement


class PlacedReplica:
    """A replica whose model runs where replica_placement decided; placement() tells handle callers."""

    _placement: ReplicaPlacement

    def placement(self) -> dict:
        return self._placement.as_dict()
