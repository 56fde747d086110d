"""`perfusion align train --offline`: the group objective on logged group examples under Ray Train +
DeepSpeed ZeRO.

The driver reads the committed group files of the train split and starts a TorchTrainer. Each worker
loads the frozen base model, builds the policy (models/policy.py) with the same seed on every rank,
wraps it in a DeepSpeed engine (ZeRO stage from config; frozen base weights are partitioned with the
rest under ZeRO-3), and streams its shard of groups from Ray Data: per step one batch of groups ->
per-candidate denoising errors of policy and reference -> group loss (train/group_step.py). Every
`checkpoint_every` steps all ranks save the engine through ray.train.report (resume continues from the
latest; the interrupted pass over the data starts again from its beginning). At the last step the
weights are gathered (ZeRO-3 too) and rank 0 exports a PerFusionPipeline (adapter/ holds the branch
and its LoRA as safetensors), which the driver copies to <align.out>/pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.data.group_examples import committed_group_files, decode_groups, distinct_merchants
from perfusion_ray.errors import PerfusionError
from perfusion_ray.faults import fault_point
from perfusion_ray.records import GroupBatch, Merchant
from perfusion_ray.train.distributed import (all_reduce_sum, materialize_in_order, report_with_checkpoint, restore_latest,
                                             torch_trainer)
from perfusion_ray.train.group_step import group_step, group_tensors
from perfusion_ray.train.strategy import DeepSpeedStrategy

RUN_NAME = "align-offline"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PolicyMerchants:
    """The merchants a policy's encoder is fitted on (known ids, stat scale): the train split's."""

    merchants: list[Merchant]
    stat_names: list[str]


def policy_merchants(config: PerfusionConfig) -> PolicyMerchants:
    layout, files = committed_group_files(config.data.root, "train")
    merchants, stat_names, _ = distinct_merchants(layout, files)
    return PolicyMerchants(merchants, stat_names)


def build_worker_policy(config: PerfusionConfig, known: PolicyMerchants, device="cpu"):
    """The frozen base and a fresh policy, identical on every rank (same seed)."""
    from perfusion_ray.models.base import load_base
    from perfusion_ray.models.policy import build_policy

    base = load_base(config.policy.base, dtype=TORCH_DTYPES[config.policy.dtype], device=device)
    torch.manual_seed(config.align.seed)
    policy = build_policy(base.unet, config.policy, config.align.adapter, tuple(known.stat_names), known.merchants)
    return base, policy.to(device)


def load_policy_weights(policy: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Gathered weights into a freshly built policy: every trainable parameter must be given (frozen ones and
    buffers may be left out, they are what the fresh policy already holds)."""
    missing, unexpected = policy.load_state_dict({name: tensor.float() for name, tensor in state_dict.items()},
                                                 strict=False)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise PerfusionError(f"policy weights do not fit the policy: unexpected {sorted(unexpected)[:3]}, missing "
                             f"trainable {sorted(trainable & set(missing))[:3]}")


def export_pipeline(config: PerfusionConfig, known: PolicyMerchants, state_dict: dict[str, torch.Tensor] | None,
                    folder: Path) -> None:
    """Rebuild the policy on the CPU from gathered weights (None: the policy at initialisation, which is the
    base model) and save it as a PerFusionPipeline."""
    from perfusion_ray.models.policy import policy_pipeline

    base, policy = build_worker_policy(config, known)
    if state_dict is not None:
        load_policy_weights(policy, state_dict)
    policy_pipeline(base, policy).save_pretrained(str(folder))


def train_loop_per_worker(loop: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    from perfusion_ray.models.policy import featurizer

    config = PerfusionConfig.model_validate(loop["config"])
    align = config.align
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = torch.device("cuda", context.get_local_rank()) if align.use_gpu else torch.device("cpu")
    base, policy = build_worker_policy(config, loop["known"], device)
    strategy = DeepSpeedStrategy(zero_stage=align.zero_stage, lr=align.lr, micro_batch=align.batch_groups,
                                 bf16=align.bf16, weight_decay=align.weight_decay, warmup_steps=align.warmup_steps)
    engine = strategy.prepare(policy)
    state = restore_latest(engine, {"step": 0, "epoch": 0, "batches_into_epoch": 0, "train_seconds": 0.0, "groups": 0,
                                    "groups_used": 0, "passes": 0})
    resumed_from = state["step"]
    featurize = featurizer(policy)
    threshold = config.data.label_policy.positive_threshold
    window: dict[str, list[float]] = {"loss": [], "margin": []}
    for batch in _epochs(ray.train.get_dataset_shard("train"), align.batch_groups, state):
        if state["step"] >= align.max_steps:
            break
        started = time.perf_counter()
        tensors = group_tensors(base, featurize, batch)
        # Seeded by the step, so a resumed run draws the noise and timesteps the uninterrupted run drew.
        generator = torch.Generator().manual_seed(align.seed * 1_000_003 + rank * 7919 + state["step"])
        try:
            result = group_step(engine, base.scheduler, tensors, align.beta, align.variant, generator,
                                align.share_noise, threshold, align.min_timestep)
        except ValueError as exc:
            raise PerfusionError(f"step {state['step']}: {exc} (requests {batch.request_ids[:4]}...)") from exc
        strategy.step(engine, result.loss)
        window["loss"].append(result.loss.item())
        window["margin"].append(result.reward_margin)
        state["step"] += 1
        state["groups"] += len(batch)
        state["groups_used"] += result.groups_used
        state["passes"] += result.denoiser_passes
        state["train_seconds"] += time.perf_counter() - started
        fault_point(f"align:step{state['step']}:trained")
        final = state["step"] >= align.max_steps
        if state["step"] % align.checkpoint_every == 0 or final:
            _report(strategy, engine, config, loop, state, window, resumed_from, final)
            window = {"loss": [], "margin": []}


def _epochs(shard, batch_groups: int, state: dict):
    """The shard's batches, pass after pass (equal shards and drop_last keep ranks in step). A resumed run
    skips the batches of the current pass its checkpoint already trained on (the shard's order is kept,
    train/distributed.py), so it goes on where the uninterrupted run would."""
    skip = state["batches_into_epoch"]
    while True:
        for columns in shard.iter_batches(batch_size=batch_groups, batch_format="numpy", drop_last=True):
            if skip:
                skip -= 1
                continue
            state["batches_into_epoch"] += 1
            yield GroupBatch.from_columns(columns)
        state["epoch"] += 1
        state["batches_into_epoch"] = 0


def _report(strategy, engine, config, loop, state: dict, window: dict, resumed_from: int, final: bool) -> None:
    totals = dict(zip(("groups", "groups_used", "passes"),
                      all_reduce_sum([state["groups"], state["groups_used"], state["passes"]])))
    full_state = strategy.full_state_dict(engine) if final else None  # collective under ZeRO-3
    metrics = {"step": state["step"], "epoch": state["epoch"], "resumed_from_step": resumed_from,
               "loss": float(np.mean(window["loss"])) if window["loss"] else float("nan"),
               "reward_margin": float(np.mean(window["margin"])) if window["margin"] else float("nan"),
               "train_seconds": state["train_seconds"], "groups_trained": totals["groups"],
               "groups_used": totals["groups_used"],
               "denoiser_passes_per_group": totals["passes"] / max(totals["groups"], 1), "final": final}
    report_with_checkpoint(engine, state, metrics, export=(
        lambda folder: export_pipeline(config, loop["known"], full_state, folder / "pipeline")) if final else None,
        moment=f"align:step{state['step']}")


@dataclass
class AlignTrainReport:
    pipeline_dir: Path | str  # a local folder, or the URI it was published to
    steps: int
    resumed_from_step: int
    seconds: float
    train_seconds: float
    groups_trained: int
    denoiser_passes_per_group: float
    final_loss: float


def train_alignment(config: PerfusionConfig, resume: bool = False) -> AlignTrainReport:
    """Train the policy offline on the logged groups and export <align.out>/pipeline."""
    import ray

    from perfusion_ray.runtime import init_ray
    from perfusion_ray.storage import absolute, delete_tree, join, path_or_uri, publish_directory

    started = time.perf_counter()
    layout, files = committed_group_files(config.data.root, "train")
    align = config.align
    known = policy_merchants(config)
    out = absolute(align.out)
    storage = join(out, "ray_results")
    if not resume:
        delete_tree(join(storage, RUN_NAME))
    init_ray(config.cluster)
    # Decoded once before the workers start, not again in every pass over the data.
    dataset = materialize_in_order(ray.data.read_parquet(files, filesystem=layout.filesystem).map_batches(
        decode_groups, batch_format="pyarrow", fn_kwargs={"images_root": layout.images_uri}))
    trainer = torch_trainer(train_loop_per_worker, {"config": config.model_dump(mode="json"), "known": known},
                            align, config.cluster, RUN_NAME, storage, {"train": dataset})
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as folder:
        exported = Path(folder) / "pipeline"
        if not exported.is_dir():
            raise PerfusionError(f"the last checkpoint {result.checkpoint.path} has no exported pipeline")
        publish_directory(exported, join(out, "pipeline"))
    metrics = result.metrics
    return AlignTrainReport(path_or_uri(join(out, "pipeline")), int(metrics["step"]), int(metrics["resumed_from_step"]),
                            time.perf_counter() - started, float(metrics["train_seconds"]),
                            int(metrics["groups_trained"]), float(metrics["denoiser_passes_per_group"]),
                            float(metrics["loss"]))
