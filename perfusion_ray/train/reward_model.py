"""`perfusion rm train`: PerFusionRM under Ray Train + DeepSpeed, group examples streamed from Ray Data.

The driver reads the committed group files of a split (train; the judge of evaluation/judge.py trains on
holdout), holds out a validation fraction by request id (for early stopping), and starts a TorchTrainer. Each worker builds the model, wraps it in
a DeepSpeed engine (ZeRO stage from config), streams its shard, and after each epoch reports the
validation GAUC (all-reduced over workers) with a checkpoint: the engine state on every rank, plus
the exported model directory whenever the GAUC improved. Rerunning with resume continues from the
latest checkpoint; the best exported model is copied to <out>/model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.data.group_examples import committed_group_files, decode_groups, distinct_merchants
from perfusion_ray.errors import PerfusionError
from perfusion_ray.faults import fault_point
from perfusion_ray.metrics import gauc
from perfusion_ray.models.clip_towers import load_clip
from perfusion_ray.models.merchant_encoder import stable_bucket
from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig, load_reward_model, save_reward_model
from perfusion_ray.objectives import pairwise_logistic_loss, plackett_luce_loss
from perfusion_ray.records import GroupBatch
from perfusion_ray.train.distributed import (all_reduce_sum, materialize_in_order, report_with_checkpoint, restore_latest,
                                             torch_trainer)
from perfusion_ray.train.strategy import DeepSpeedStrategy

RUN_NAME = "rm-train"
VALIDATION_BUCKETS = 1000


def is_validation(request_id: str, fraction: float) -> bool:
    return stable_bucket(request_id, VALIDATION_BUCKETS) < fraction * VALIDATION_BUCKETS


def decode_fold(table, images_root: str, fraction: float, validation: bool):
    """decode_groups on the rows of one fold (train or validation), chosen by request id."""
    keep = [is_validation(r, fraction) == validation for r in table["request_id"].to_pylist()]
    return decode_groups(table.filter(keep), images_root)


def reward_model_config(config: PerfusionConfig, stat_names: list[str], known_ids: list[str]) -> RewardModelConfig:
    rm = config.rm
    return RewardModelConfig(towers=rm.towers, lora_rank=rm.lora_rank, plugin=rm.plugin, cross_layers=rm.cross_layers,
                             plugin_input=rm.plugin_input, merchant_dim=rm.merchant_dim, id_dropout=rm.id_dropout,
                             image_head_channels=rm.image_head_channels, image_head_dim=rm.image_head_dim,
                             stat_names=stat_names, known_ids=known_ids)


def export_untrained(config: PerfusionConfig, folder: str | Path) -> Path | str:
    """An untrained PerFusionRM for the merchants of the committed train groups, exported to `folder` (a
    local path or a URI; a served model for runs that measure the loop rather than the reward: tests,
    benchmarks)."""
    import tempfile

    from perfusion_ray.storage import is_uri, publish_directory

    layout, files = committed_group_files(config.data.root, "train")
    merchants, stat_names, _ = distinct_merchants(layout, files)
    model_config = reward_model_config(config, stat_names, sorted(m.id for m in merchants))
    model = PerFusionRM(load_clip(config.rm.clip), model_config)
    if not is_uri(folder):
        return save_reward_model(model, folder)
    with tempfile.TemporaryDirectory() as staging:
        publish_directory(save_reward_model(model, Path(staging) / "model"), folder)
    return str(folder)


def batch_scores(model: PerFusionRM, engine, batch: GroupBatch) -> torch.Tensor:
    """Scores [B, K] of a batch of groups, through the engine (so ZeRO hooks run)."""
    merchants, prompts, images = batch.candidates()
    return engine(**model.inputs(merchants, prompts, images)).view(tuple(batch.labels.shape))


def ranking_loss(model: PerFusionRM, engine, batch: GroupBatch, kind: str = "pl",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The RM's group ranking loss on a batch of groups: Plackett-Luce over graded labels, or all-pairs
    logistic. The labels move to the scores' device, so the loss lives where the model does."""
    scores = batch_scores(model, engine, batch)
    labels = torch.as_tensor(np.asarray(batch.labels), dtype=torch.float32).to(scores.device)
    if kind == "pl":
        return plackett_luce_loss(scores, labels, generator)[0]
    return pairwise_logistic_loss(scores, labels)[0]


def _validation_gauc(model, engine, shard, batch_groups: int, threshold: float) -> float:
    """Size-weighted GAUC over every worker's validation shard (sums all-reduced)."""
    engine.eval()
    weighted = size = 0.0
    with torch.no_grad():
        for columns in shard.iter_batches(batch_size=batch_groups, batch_format="numpy"):
            batch = GroupBatch.from_columns(columns)
            scores = batch_scores(model, engine, batch).float().cpu().numpy()
            labels = batch.labels > threshold
            groups = np.repeat(np.arange(len(labels)), labels.shape[1])
            has_both = labels.any(1) & ~labels.all(1)
            if has_both.any():
                weighted += gauc(scores.reshape(-1), labels.reshape(-1), groups) * has_both.sum() * labels.shape[1]
                size += has_both.sum() * labels.shape[1]
    weighted, size = all_reduce_sum([weighted, size])
    engine.train()
    return weighted / size if size else float("nan")


def train_loop_per_worker(loop: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    config = PerfusionConfig.model_validate(loop["config"])
    rm = config.rm
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(rm.seed + rank)
    model = PerFusionRM(load_clip(rm.clip), RewardModelConfig.model_validate(loop["model_config"]))
    model.merchant_encoder.fit_normalisation(loop["merchants"])
    planned_steps = rm.epochs * loop["steps_per_epoch"]
    strategy = DeepSpeedStrategy(zero_stage=rm.zero_stage, lr=rm.lr, micro_batch=rm.batch_groups, bf16=rm.bf16,
                                 weight_decay=rm.weight_decay, warmup_steps=int(rm.warmup_fraction * planned_steps),
                                 total_steps=planned_steps if rm.lr_schedule == "cosine" else 0)
    engine = strategy.prepare(model)
    state = restore_latest(engine, {"epoch": 0, "best_gauc": -1.0, "stale": 0, "train_seconds": 0.0, "groups_trained": 0})
    resumed_from = state["epoch"]
    threshold = config.data.label_policy.positive_threshold
    generator = torch.Generator().manual_seed(rm.seed * 1000 + rank)
    train_shard, validation_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("validation")
    # The first epoch streams the shard from Ray Data; when it fits rm.cache_shard_mb, later epochs replay it
    # from worker memory in a shuffled batch order (on 2 cores the Ray Data pipeline around each epoch cost
    # more wall time than the training steps themselves).
    cache, cached_bytes, replay = ([] if rm.cache_shard_mb > 0 else None), 0, False
    order_rng = np.random.default_rng([rm.seed, rank])
    while state["epoch"] < rm.epochs and state["stale"] < rm.patience:
        started, cpu_started, losses, groups_trained = time.perf_counter(), time.process_time(), [], 0
        waited, fetch_started = 0.0, time.perf_counter()
        source = [cache[i] for i in order_rng.permutation(len(cache))] if replay else \
            train_shard.iter_batches(batch_size=rm.batch_groups, batch_format="numpy")
        for item in source:
            waited += time.perf_counter() - fetch_started
            batch = item if replay else GroupBatch.from_columns(item)
            if not replay and cache is not None:
                cached_bytes += batch.images.nbytes
                if cached_bytes <= rm.cache_shard_mb * 2**20:
                    cache.append(batch)
                else:
                    cache = None  # too big: stream every epoch
            groups_trained += len(batch)
            loss = ranking_loss(model, engine, batch, rm.loss, generator)
            strategy.step(engine, loss)
            losses.append(loss.item())
            fetch_started = time.perf_counter()
        train_seconds = time.perf_counter() - started
        fault_point(f"rm:epoch{state['epoch'] + 1}:trained")
        replay = cache is not None
        groups_trained = int(all_reduce_sum([float(groups_trained)])[0])
        validation = _validation_gauc(model, engine, validation_shard, rm.batch_groups, threshold)
        improved, best_gauc, stale = early_stopping_update(state["best_gauc"], state["stale"], validation)
        state = {"epoch": state["epoch"] + 1, "best_gauc": best_gauc, "stale": stale,
                 "train_seconds": state["train_seconds"] + train_seconds,
                 "groups_trained": state["groups_trained"] + groups_trained}
        full_state = strategy.full_state_dict(engine) if improved else None  # collective under ZeRO-3
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        report_with_checkpoint(
            engine, state,
            {"epoch": state["epoch"], "loss": mean_loss, "val_gauc": validation, "best_val_gauc": state["best_gauc"],
             "resumed_from_epoch": resumed_from, "train_seconds": state["train_seconds"], "exported": int(improved),
             "export_rank": export_rank(improved, state["epoch"]),
             "groups_trained": state["groups_trained"], "epoch_data_wait_seconds": waited,
             "epoch_train_seconds": train_seconds, "epoch_cpu_seconds": time.process_time() - cpu_started},
            export=(lambda folder: save_reward_model(model, folder / "model", state_dict=full_state)) if improved else None,
            moment=f"rm:epoch{state['epoch']}")


def early_stopping_update(best_gauc: float, stale: int, validation: float) -> tuple[bool, float, int]:
    """(improved, best validation GAUC, epochs without improvement) after an epoch; training stops when the
    last reaches rm.patience. NaN (no validation group with both labels, a tiny store) counts as improved:
    every epoch is kept and exported, the latest wins, and early stopping has nothing to go on."""
    if not math.isfinite(validation):
        return True, best_gauc, 0
    if validation > best_gauc:
        return True, validation, 0
    return False, best_gauc, stale + 1


def export_rank(exported: bool, epoch: int) -> float:
    """The score Ray Train keeps checkpoints by: every exporting epoch above every other, later above earlier.
    An epoch exports only when it beats every earlier one (or has no validation signal), so the latest
    exporting checkpoint holds the best model; ranking by the validation GAUC itself let a later epoch that
    tied the best displace the only checkpoint holding the export."""
    return float(exported) * 1e6 + epoch


def checkpoint_config():
    """Ray Train keeps the two checkpoints of highest export_rank: the latest export is always one of them."""
    from ray.train import CheckpointConfig

    return CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="export_rank", checkpoint_score_order="max")


def best_export(result) -> tuple:
    """(checkpoint, metrics) of a finished run's best export: the kept checkpoint of highest export_rank."""
    checkpoint, metrics = max(result.best_checkpoints, key=lambda pair: pair[1]["export_rank"])
    with checkpoint.as_directory() as folder:
        if not (Path(folder) / "model").is_dir():
            raise PerfusionError(f"the best checkpoint {checkpoint.path} has no exported model")
    return checkpoint, metrics


@dataclass
class RMTrainReport:
    model_dir: Path | str  # a local folder, or the URI it was published to
    best_val_gauc: float
    epochs: int  # epochs completed in total
    resumed_from_epoch: int  # epochs that were already done when this run started
    seconds: float
    groups_per_second: float  # optimizer-loop throughput over all workers (no start-up, no validation)


def train_reward_model(config: PerfusionConfig, resume: bool = False, split: str = "train",
                       out: str | Path | None = None) -> RMTrainReport:
    """Train, early-stop and export PerFusionRM on a split's groups to <out>/model (default out: rm.out).
    See the module docstring."""
    import ray

    from perfusion_ray.runtime import init_ray
    from perfusion_ray.storage import absolute, delete_tree, join, path_or_uri, publish_directory

    started = time.perf_counter()
    layout, files = committed_group_files(config.data.root, split)
    rm = config.rm
    merchants, stat_names, train_groups = distinct_merchants(
        layout, files, keep=lambda request_id: not is_validation(request_id, rm.validation_fraction))
    model_config = reward_model_config(config, stat_names, sorted(m.id for m in merchants))
    model_config.version = "trained" if split == "train" else f"judge-{split}"
    out = absolute(out or rm.out)
    storage = join(out, "ray_results")
    if not resume:
        delete_tree(join(storage, RUN_NAME))
    init_ray(config.cluster)
    read = ray.data.read_parquet(files, filesystem=layout.filesystem)
    # Decoded once, before the workers start: streamed lazily, every epoch would re-read the parquet files
    # and re-decode every image (on the same CPUs the workers train on).
    datasets = {
        name: materialize_in_order(read.map_batches(decode_fold, batch_format="pyarrow", fn_kwargs={
            "images_root": layout.images_uri, "fraction": rm.validation_fraction, "validation": name == "validation"}))
        for name in ("train", "validation")
    }
    trainer = torch_trainer(
        train_loop_per_worker,
        {"config": config.model_dump(mode="json"), "model_config": model_config.model_dump(), "merchants": merchants,
         "steps_per_epoch": math.ceil(train_groups / (rm.num_workers * rm.batch_groups))},
        rm, config.cluster, RUN_NAME, storage, datasets, checkpoint_config())
    result = trainer.fit()
    if result.error:
        raise result.error
    best, best_metrics = best_export(result)
    target = join(out, "model")
    with best.as_directory() as folder:
        load_reward_model(Path(folder) / "model")  # the export must load on its own, or the run is not done
        publish_directory(Path(folder) / "model", target)
    return RMTrainReport(path_or_uri(target), float(best_metrics["best_val_gauc"]), int(result.metrics["epoch"]),
                         int(result.metrics["resumed_from_epoch"]), time.perf_counter() - started,
                         result.metrics["groups_trained"] / max(result.metrics["train_seconds"], 1e-9))
