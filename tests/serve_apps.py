"""The shipped Serve application files, deployed on the session's cluster for the fault tests: a tiny reward
model and the shipped base model's pipeline behind their real deployments, on a free port of 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from perfusion_ray.config import REPO_ROOT

REWARD_YAML = REPO_ROOT / "cluster" / "serve_reward.yaml"
DESIGN_YAML = REPO_ROOT / "cluster" / "serve_design.yaml"


def tiny_reward_model(folder: Path, seed: int = 0) -> Path:
    """A PerFusionRM on the embedded CLIP towers whose merchant plug-ins move scores (as if trained)."""
    from perfusion_ray.models.clip_towers import load_clip
    from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig, save_reward_model

    torch.manual_seed(seed)
    rm = PerFusionRM(load_clip(), RewardModelConfig(version="fault", towers="frozen", stat_names=["price_level"],
                                                    known_ids=["m0", "m1"]))
    for plugin in (rm.text_plugin, rm.image_plugin):
        torch.nn.init.normal_(plugin.projection.weight, std=0.1)
    return save_reward_model(rm, folder)


def app_entry(path: Path, name: str, overrides: list[str], user_config: dict) -> dict:
    """The first application of a shipped Serve config file, renamed to `name` at /`name`, with these
    config overrides and this user_config."""
    entry = json.loads(json.dumps(yaml.safe_load(path.read_text())["applications"][0]))
    entry.update(name=name, route_prefix=f"/{name}", args={"config": entry["args"]["config"], "set": overrides})
    entry["deployments"][0]["user_config"] = user_config
    return entry


def deploy_all(entries: list[dict], timeout_s: float = 240.0) -> None:
    """Apply these apps beside the live ones and wait until each runs."""
    from perfusion_ray.serve import apps

    apps._apply({**apps.live_declarative_apps(), **{e["name"]: e for e in entries}})
    for entry in entries:
        apps.wait_running(entry["name"], timeout_s=timeout_s)
