"""`perfusion rm eval`: GAUC, MAP, AUC and logloss on held-out groups, for seen and cold-start merchants.

Seen and cold start come from the data: a merchant is cold start when no group of the train split names
it. Scorers: PerFusionRM, the plug-in-off baseline (when given), zero-shot CLIP and a random floor; and,
only where the environment has an oracle, its reference scorers (FashionWorld: the oracle ceiling, each
merchant's own hidden taste on true attributes, and the side-feature oracle, the taste expected from
observable features: what a perfect reader of pixels reaches knowing only what a cold-start merchant
shows).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.data.group_examples import load_groups
from perfusion_ray.data.store import StoreLayout
from perfusion_ray.environment import Oracle
from perfusion_ray.errors import PerfusionError
from perfusion_ray.metrics import auc, gauc, logloss, mean_average_precision
from perfusion_ray.models.clip_towers import load_clip
from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig, load_reward_model
from perfusion_ray.records import GroupBatch

SUBSETS = ("seen", "cold")


def score_groups(model: PerFusionRM, batch: GroupBatch) -> np.ndarray:
    """[G, K] scores of every candidate of every group."""
    merchants, prompts, images = batch.candidates()
    return model.score(merchants, prompts, images).reshape(batch.labels.shape)


def ranking_metrics(scores: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """GAUC, MAP, AUC, logloss of [G, K] scores against [G, K] binary labels.

    logloss uses p = sigmoid(score - group mean): scores are only comparable within a group.
    """
    groups = np.repeat(np.arange(len(scores)), scores.shape[1])
    flat, labels = scores.reshape(-1), positive.reshape(-1)
    centred = (scores - scores.mean(1, keepdims=True)).reshape(-1)
    return {"gauc": gauc(flat, labels, groups), "map": mean_average_precision(flat, labels, groups),
            "auc": auc(flat, labels), "logloss": logloss(1 / (1 + np.exp(-centred)), labels)}


def train_merchant_ids(root: str) -> set[str]:
    """The merchants that appear in the train split's committed groups: every other one is cold start."""
    import pyarrow.parquet as pq

    layout = StoreLayout(root, "train")
    return {m for path in layout.output_files("groups")
            for m in pq.read_table(path, columns=["merchant_id"], filesystem=layout.filesystem)["merchant_id"].to_pylist()}


def held_out_groups(config: PerfusionConfig) -> GroupBatch:
    batch = load_groups(StoreLayout(config.data.root, "holdout"))
    if batch is None:
        raise PerfusionError(f"no held-out group examples under {config.data.root}",
                             hint="ingest the store's holdout split (`perfusion data ingest --split holdout`)")
    return batch


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


def evaluate_reward_models(config: PerfusionConfig, model_dir: Path, baseline_dir: Path | None,
                           oracle: Oracle | None = None) -> RMEvaluation:
    batch = held_out_groups(config)
    positive = batch.labels > config.data.label_policy.positive_threshold
    seen_ids = train_merchant_ids(config.data.root)
    is_cold = np.array([m.id not in seen_ids for m in batch.merchants])
    zero_shot = PerFusionRM(load_clip(config.rm.clip), RewardModelConfig(towers="frozen", plugin=False))
    scorers = {
        "perfusion_rm": lambda: score_groups(load_reward_model(model_dir), batch),
        "no_plugin": (lambda: score_groups(load_reward_model(baseline_dir), batch)) if baseline_dir else None,
        "clip_zero_shot": lambda: score_groups(zero_shot, batch),
        "random": lambda: np.random.default_rng(0).random(positive.shape),
    }
    if oracle is not None:
        references = oracle.reference_scores(batch)
        scorers.update({name: (lambda scores=scores: scores) for name, scores in references.items()})
    results = {}
    for name, scorer in scorers.items():
        if scorer is None:
            continue
        scores = scorer()
        results[name] = {subset: ranking_metrics(scores[mask], positive[mask])
                         for subset, mask in (("seen", ~is_cold), ("cold", is_cold))}
    both = positive.any(1) & ~positive.all(1)
    return RMEvaluation(results, {"seen": int((both & ~is_cold).sum()), "cold": int((both & is_cold).sum())})
