"""An RM directory loaded for serving, with the version string every score carries.

A directory is named by a local path or a URI (s3://...); a URI is copied to a local cache first
(storage.local_directory: a verified copy per published version), because the loaders need local files.

The version is `<config version>@<first 12 hex of the weights' sha256>`: the exported config's version
("trained", "refreshed-round0003", ...) alone is not enough, because two exports may carry the same name
(two `rm train` runs both say "trained"), and a rollout must be visible in the responses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from perfusion_ray.config import REPO_ROOT
from perfusion_ray.storage import MANIFEST, is_uri, local_directory

logger = logging.getLogger("ray.serve")

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def resolve_path(path: str | Path) -> Path:
    """A relative path against the working directory, else against the repo root (Ray workers and the
    Serve build task may run elsewhere than the shell that named the path)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (REPO_ROOT / path).resolve() if (REPO_ROOT / path).exists() else path.resolve()


def model_location(path: str | Path) -> str:
    """How a model directory is named to replicas on any node: a URI as it is, a local path resolved."""
    return str(path) if is_uri(path) else str(resolve_path(path))


def local_model_dir(path: str | Path) -> Path:
    """A local folder holding the model directory at `path` (a URI: its cached copy)."""
    return local_directory(path) if is_uri(path) else resolve_path(path)


def files_digest(files: list[Path]) -> str:
    """First 12 hex of the sha256 over the files' bytes, in the order given."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def model_version(folder: str | Path) -> str:
    folder = local_model_dir(folder)
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


def load_served_model(folder: str | Path, placement=None) -> ServedModel:
    """Load with one torch thread (replicas share small machines), on placement's device and dtype (a
    serve.placement.ReplicaPlacement; None: CPU, float32), and warm it up once."""
    import numpy as np
    import torch

    from perfusion_ray.models.reward_model import load_reward_model
    from perfusion_ray.records import Merchant

    torch.set_num_threads(1)
    location, folder = model_location(folder), local_model_dir(folder)
    model = load_reward_model(folder)
    if placement is not None:
        model = model.to(device=placement.device, dtype=placement.torch_dtype)
    version = model_version(folder)
    size = model.image_size
    # The first CPU forward pays a one-off warm-up of a few seconds: pay it before traffic arrives.
    model.score([Merchant()], [""], np.zeros((1, size, size, 3), np.uint8))
    return ServedModel(model, version, location, size)


def pipeline_version(folder: str | Path) -> str:
    """`<folder name>@<digest of every file below it>`: a PerFusionPipeline directory's version (any change to a
    weight, config or tokenizer file is a new version)."""
    name = Path(model_location(folder).partition("?")[0]).name  # a URI's cached copy has another name
    folder = local_model_dir(folder)
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST)
    if not files:
        raise FileNotFoundError(f"{folder} holds no files: not a pipeline directory")
    return f"{name}@{files_digest(files)}"


BATCH_KEYS = ("max_batch_size", "batch_wait_timeout_s")


class VersionedReplica:
    """reconfigure() and check_health() of a Serve replica that serves one versioned directory.

    A subclass sets FOLDER_KEY (the user_config key naming the directory), WHAT (for logs), LOADER (folder ->
    Served), BATCH_METHOD (the name of its @serve.batch method) and, in __init__, self._batching =
    (max_batch_size, batch_wait_timeout_s) defaults. user_config: {FOLDER_KEY, revision?, max_batch_size?,
    batch_wait_timeout_s?}; `revision` is free-form: change it to reload a directory whose content was replaced
    in place. The new directory loads beside the old one and is swapped in with one assignment, so a batch
    runs on, and reports, the version it started with."""

    FOLDER_KEY = "model_dir"
    WHAT = "model"
    LOADER = staticmethod(load_served_model)
    BATCH_METHOD = ""
    _served: Served | None = None
    _batching: tuple[int, float] = (64, 0.005)

    async def reconfigure(self, user_config: dict) -> None:
        key = self.FOLDER_KEY
        allowed = {key, "revision", *BATCH_KEYS}
        if set(user_config) - allowed or key not in user_config:
            raise ValueError(f"user_config needs {key} and takes {sorted(allowed - {key})}; got {sorted(user_config)}")
        served = await asyncio.to_thread(self.LOADER, user_config[key])
        batch_method = getattr(self, self.BATCH_METHOD)
        batch_method.set_max_batch_size(int(user_config.get("max_batch_size", self._batching[0])))
        batch_method.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", self._batching[1])))
        previous, self._served = self._served, served
        logger.info("%s %s -> %s (%s)", self.WHAT, previous.version if previous else None, served.version,
                    served.model_dir)

    def check_health(self) -> None:
        if self._served is None:
            raise RuntimeError(f"no {self.WHAT} loaded")
