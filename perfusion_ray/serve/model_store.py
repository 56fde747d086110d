"""An RM directory loaded for serving, with the version string every score carries.

The version is `<config version>@<first 12 hex of the weights' sha256>`: the exported config's version
alone is not enough, because two exports may carry the same name (today every trained RM says
"untrained"), and a rollout must be visible in the responses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from perfusion_ray.config import REPO_ROOT

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def resolve_path(path: str | Path) -> Path:
    """A relative path against the working directory, else against the repo root (Ray workers and the
    Serve build task may run elsewhere than the shell that named the path)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (REPO_ROOT / path).resolve() if (REPO_ROOT / path).exists() else path.resolve()


def files_digest(files: list[Path]) -> str:
    """First 12 hex of the sha256 over the files' bytes, in the order given."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def model_version(folder: str | Path) -> str:
    folder = Path(folder)
    name = json.loads((folder / CONFIG_FILE).read_text()).get("version") or "unnamed"
    return f"{name}@{files_digest([folder / WEIGHTS_FILE])}"


@dataclass(frozen=True)
class Served:
    """A model directory loaded in a replica, with the version every answer carries."""

    model: object  # PerFusionRM or PerFusionPipeline (torch imported lazily)
    version: str
    model_dir: str
    image_size: int


@dataclass(frozen=True)
class ServedModel(Served):
    def merchant_path(self, merchant_id: str | None) -> str:
        if not merchant_id:
            return "no_merchant"
        return "known" if merchant_id in self.model.merchant_encoder.known_ids else "cold_start"


def load_served_model(folder: str | Path) -> ServedModel:
    """Load with one torch thread (replicas share small machines) and warm it up once."""
    import numpy as np
    import torch

    from perfusion_ray.models.merchant_encoder import MerchantBatch
    from perfusion_ray.models.reward_model import load_reward_model

    torch.set_num_threads(1)
    folder = resolve_path(folder)
    model = load_reward_model(folder)
    version = model_version(folder)
    size = model.image_size
    # The first CPU forward pays a one-off warm-up (STACK.md): pay it before traffic arrives.
    model.score(MerchantBatch([""], [{}], [{}]), [""], np.zeros((1, size, size, 3), np.uint8))
    return ServedModel(model, version, str(folder), size)


def pipeline_version(folder: str | Path) -> str:
    """`<folder name>@<digest of every file below it>`: a PerFusionPipeline directory's version (any change to a
    weight, config or tokenizer file is a new version)."""
    folder = Path(folder)
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no files: not a pipeline directory")
    return f"{folder.name}@{files_digest(files)}"


BATCH_KEYS = ("max_batch_size", "batch_wait_timeout_s")


async def load_user_config(user_config: dict, key: str, loader, batch_method, max_batch_size: int,
                           batch_wait_timeout_s: float) -> Served:
    """A replica's reconfigure(): check {key, revision?, max_batch_size?, batch_wait_timeout_s?}, load
    user_config[key] in a thread, apply the batch settings to the @serve.batch method; returns what was loaded
    (the caller swaps it in with one assignment). `revision` is free-form: change it to reload a directory
    whose content was replaced in place."""
    allowed = {key, "revision", *BATCH_KEYS}
    if set(user_config) - allowed or key not in user_config:
        raise ValueError(f"user_config needs {key} and takes {sorted(allowed - {key})}; got {sorted(user_config)}")
    served = await asyncio.to_thread(loader, user_config[key])
    batch_method.set_max_batch_size(int(user_config.get("max_batch_size", max_batch_size)))
    batch_method.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", batch_wait_timeout_s)))
    return served
