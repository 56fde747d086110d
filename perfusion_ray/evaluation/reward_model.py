"""`perfusion rm eval`: GAUC, MAP, AUC and logloss on held-out groups, for seen and cold-start
merchants, for PerFusionRM, the plug-in-off baseline, zero-shot CLIP, a random floor, and two references
from FashionWorld's pixel oracle: the oracle ceiling (each merchant's own hidden taste, true utilities) and
the side-feature oracle (the taste expected from the merchant's observable features, E[taste | features],
times the true attribute profile): what a scorer that reads pixels perfectly can reach knowing only what a
cold-start merchant shows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.data.group_examples import candidate_rows, read_groups, to_model_batch
from perfusion_ray.data.store import StoreLayout
from perfusion_ray.errors import PerfusionError
from perfusion_ray.metrics import auc, gauc, logloss, mean_average_precision
from perfusion_ray.models.clip_towers import load_clip
from perfusion_ray.models.merchant_encoder import MerchantBatch
from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig, load_reward_model
from perfusion_ray.world.merchants import expected_taste
from perfusion_ray.world.oracle import attribute_profile
from perfusion_ray.world.simulator import build_world

SUBSETS = ("seen", "cold")


def score_groups(model: PerFusionRM, batch: dict[str, np.ndarray]) -> np.ndarray:
    """[G, K] scores of every candidate of every group."""
    merchants, prompts, images = candidate_rows(batch)
    return model.score(MerchantBatch.from_records(merchants), prompts, images).reshape(batch["labels"].shape)


def ranking_metrics(scores: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """GAUC, MAP, AUC, logloss of [G, K] scores against [G, K] binary labels.

    logloss uses p = sigmoid(score - group mean): scores are only comparable within a group.
    """
    groups = np.repeat(np.arange(len(scores)), scores.shape[1])
    flat, labels = scores.reshape(-1), positive.reshape(-1)
    centred = (scores - scores.mean(1, keepdims=True)).reshape(-1)
    return {"gauc": gauc(flat, labels, groups), "map": mean_average_precision(flat, labels, groups),
            "auc": auc(flat, labels), "logloss": logloss(1 / (1 + np.exp(-centred)), labels)}


@dataclass
class RMEvaluation:
    table: dict[str, dict[str, dict[str, float]]]  # scorer -> subset -> metric -> value
    groups: dict[str, int]  # subset -> held-out groups with both labels

    def flat_metrics(self) -> dict[str, float]:
        """metrics.json keys: rm.<metric>.<subset> for PerFusionRM, rm.<metric>.<scorer> (seen merchants)
        and rm.<metric>.<scorer>.cold for the others."""
        flat = {}
        for scorer, subsets in self.table.items():
            for subset, metrics in subsets.items():
                for metric, value in metrics.items():
                    if scorer == "perfusion_rm":
                        flat[f"rm.{metric}.{subset}"] = value
                    else:
                        flat[f"rm.{metric}.{scorer}" + ("" if subset == "seen" else f".{subset}")] = value
        return flat


def evaluate_reward_models(config: PerfusionConfig, model_dir: Path, baseline_dir: Path | None) -> RMEvaluation:
    layout = StoreLayout(config.data.root, "holdout")
    table = read_groups(config.data.root, "holdout")
    if table.num_rows == 0:
        raise PerfusionError("no held-out group examples", hint="run `perfusion world simulate --split holdout` "
                             "and `perfusion data ingest --split holdout`")
    batch = to_model_batch(table, layout.images_uri)
    positive = batch["labels"] > config.data.label_policy.positive_threshold
    world = build_world(config)
    cold_ids = {m for m, cold in zip(world.merchants.ids, world.merchants.cold_start) if cold}
    is_cold = np.array([m in cold_ids for m in batch["merchant_id"]])
    groups, k = positive.shape
    profiles = attribute_profile(batch["images"].reshape(groups * k, *batch["images"].shape[2:])).reshape(groups, k, -1)
    rows = [world.merchants.index(m) for m in batch["merchant_id"]]
    tastes = world.merchants.tastes[rows]
    population = world.merchants
    zero_shot = PerFusionRM(load_clip(config.rm.clip), RewardModelConfig(towers="frozen", plugin=False))
    scorers = {
        "perfusion_rm": lambda: score_groups(load_reward_model(model_dir), batch),
        "no_plugin": (lambda: score_groups(load_reward_model(baseline_dir), batch)) if baseline_dir else None,
        "clip_zero_shot": lambda: score_groups(zero_shot, batch),
        "random": lambda: np.random.default_rng(0).random(positive.shape),
        "oracle": lambda: np.einsum("gkd,gd->gk", profiles, tastes),
        "oracle_side_features": lambda: np.einsum("gkd,gd->gk", profiles, expected_taste(
            world.family, population.features, population.stats, seed=config.world.seed)[rows]),
    }
    results = {}
    for name, scorer in scorers.items():
        if scorer is None:
            continue
        scores = scorer()
        results[name] = {subset: ranking_metrics(scores[mask], positive[mask])
                         for subset, mask in (("seen", ~is_cold), ("cold", is_cold))}
    both = positive.any(1) & ~positive.all(1)
    return RMEvaluation(results, {"seen": int((both & ~is_cold).sum()), "cold": int((both & is_cold).sum())})
