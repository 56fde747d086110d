"""An RM directory loaded for serving, with the version string every score carries.

The version is `<config version>@<first 12 hex of the weights' sha256>`: the exported config's version
alone is not enough, because two exports may carry the same name (today every trained RM says
"untrained"), and a rollout must be visible in the responses.
"""

from __future__ import annotations

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


def model_version(folder: str | Path) -> str:
    folder = Path(folder)
    digest = hashlib.sha256()
    with open(folder / WEIGHTS_FILE, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    name = json.loads((folder / CONFIG_FILE).read_text()).get("version") or "unnamed"
    return f"{name}@{digest.hexdigest()[:12]}"


@dataclass(frozen=True)
class ServedModel:
    model: object  # PerFusionRM (torch imported lazily)
    version: str
    model_dir: str
    image_size: int

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
