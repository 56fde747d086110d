"""The online alignment rounds on Ray Train workers that stay alive for every round (`perfusion align`).

Each worker holds the frozen base and the policy in a DeepSpeed engine (ZeRO stage from align), and per round:
  1. gets the round's plan from the coordinator (rank 0 asks, every rank receives the same by broadcast):
     fresh group files past the watermark and the round's requests;
  2. every `online.rm_refresh_every` rounds refreshes the RM on the groups consumed since the last refresh
     (a warm-started DeepSpeed engine on the same workers), rank 0 exports it as a new version and the
     coordinator rolls the Serve deployment to it;
  3. generates K images for its share of the requests with the CURRENT policy;
  4. scores them through the Serve deployment handle (on-policy) and splits P/N from the RM ranking;
  5. takes `online.steps_per_round` group-objective steps on a mix of on-policy and logged groups;
  6. folds the round-end weights into a moving average (online.policy_average_decay), the policy that is
     published and exported: a last iterate swings with the few on-policy groups of its last round;
  7. reports the round's metrics (all-reduced) and checkpoints the whole round state through
     ray.train.report: engine (weights + optimizer + LR schedule) on every rank, the averaged policy, and
     state.json with the round number, the consumed ingest runs and partitions (the watermark), the
     served RM and the history. Random draws are seeded by (seed, rank, round), so the round number
     restores them too.
After the last round the averaged weights are exported as a PerFusionPipeline (as offline alignment does).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.data.group_examples import to_model_batch
from perfusion_ray.data.store import StoreLayout
from perfusion_ray.faults import fault_point
from perfusion_ray.train.align_offline import build_worker_policy, export_pipeline
from perfusion_ray.train.distributed import all_reduce_sum, report_with_checkpoint, restore_latest
from perfusion_ray.train.group_step import group_step, group_tensors
from perfusion_ray.train.on_policy import average_weights, concat, generated_batch, mix_sizes, reward_labels, take
from perfusion_ray.train.strategy import DeepSpeedStrategy


AVERAGE_FILE = "policy_average.safetensors"  # in each round checkpoint: the averaged policy weights


def load_groups(files: list[str], store_root: str) -> dict[str, np.ndarray] | None:
    """Group files -> one model batch (None when there are no groups)."""
    import pyarrow.parquet as pq

    batches = [to_model_batch(table, store_root) for table in (pq.read_table(f) for f in files) if table.num_rows]
    return concat(batches) if batches else None


def _broadcast(value, rank: int):
    """Rank 0's value on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def generate_groups(pipeline, config: PerfusionConfig, requests: list[dict], generator: torch.Generator) -> np.ndarray:
    """K images per request from the current policy: uint8 [R, K, H, W, 3]."""
    k = config.data.group_size
    images = pipeline([r["prompt"] for r in requests], merchant=[r["merchant"] for r in requests],
                      num_images_per_prompt=k, generator=generator, output_type="np",
                      batch_size=config.align.eval.batch_size, num_inference_steps=config.policy.num_inference_steps,
                      guidance_scale=config.policy.guidance_scale,
                      personalize_unconditional=config.policy.personalize_unconditional).images
    return images.reshape(len(requests), k, *images.shape[1:])


def refresh_reward_model(config: PerfusionConfig, rm_dir: str, groups: dict[str, np.ndarray], round_index: int,
                         rank: int, world_size: int) -> str | None:
    """Warm-start the RM from `rm_dir`, train it on `groups` under DeepSpeed, export a new version (rank 0).
    Returns the new directory, or None when there are too few groups for one step on every rank."""
    from perfusion_ray.models.reward_model import load_reward_model, save_reward_model
    from perfusion_ray.storage import replace_directory
    from perfusion_ray.train.reward_model import ranking_loss

    rm, online = config.rm, config.online
    steps = len(groups["labels"]) // (world_size * rm.batch_groups)
    if steps == 0:
        return None
    model = load_reward_model(rm_dir)
    model.train()
    strategy = DeepSpeedStrategy(zero_stage=rm.zero_stage, lr=online.rm_refresh_lr, micro_batch=rm.batch_groups,
                                 bf16=rm.bf16, weight_decay=rm.weight_decay)
    engine = strategy.prepare(model)
    generator = torch.Generator().manual_seed(online.seed * 7919 + round_index * 31 + rank)
    for epoch in range(online.rm_refresh_epochs):
        order = np.random.default_rng([online.seed, 13, round_index, epoch]).permutation(len(groups["labels"]))
        mine = order[: steps * world_size * rm.batch_groups].reshape(steps, world_size, rm.batch_groups)[:, rank]
        for rows in mine:
            strategy.step(engine, ranking_loss(model, engine, take(groups, rows), rm.loss, generator))
    state = strategy.full_state_dict(engine)  # collective under ZeRO-3
    target = Path(online.out).absolute() / "rm" / f"round-{round_index:04d}"
    if rank == 0:
        model.config.version = f"online-round{round_index:04d}"
        with tempfile.TemporaryDirectory() as folder:
            save_reward_model(model, Path(folder) / "model", state_dict=state)
            replace_directory(Path(folder) / "model", target)
    _barrier()
    return str(target)


def _publish(config: PerfusionConfig, loop: dict, full_state: dict, round_index: int, rank: int, coordinator) -> str | None:
    """Rank 0 exports the current policy to <online.out>/policy/round-NNNN and the coordinator rolls the design
    endpoint to it; every rank waits for that. Returns the version the endpoint now serves (None without one)."""
    import ray

    from perfusion_ray.storage import replace_directory

    version = None
    if rank == 0:
        target = Path(config.online.out) / "policy" / f"round-{round_index:04d}"
        with tempfile.TemporaryDirectory() as folder:
            export_pipeline(config, loop, full_state, Path(folder) / "pipeline")
            replace_directory(Path(folder) / "pipeline", target)
        version = ray.get(coordinator.publish_policy.remote(str(target)))
    _barrier()
    return version


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean over every rank of each value (every rank has the same share of requests and steps)."""
    names = sorted(values)
    sums = all_reduce_sum([values[n] for n in names] + [1.0])
    return {name: sums[i] / max(sums[-1], 1e-12) for i, name in enumerate(names)}


def initial_state(loop: dict) -> dict:
    return {"round": 0, "steps": 0, "consumed_runs": [], "consumed_partitions": [],
            "baseline_runs": list(loop["baseline_runs"]), "pending_refresh_runs": [],
            "rm_dir": loop["rm_dir"], "rm_version": "", "history": []}


def online_loop_per_worker(loop: dict) -> None:
    """Runs on every Ray Train worker: all rounds (see the module docstring)."""
    import ray
    import ray.train

    from perfusion_ray.models.policy import featurizer, policy_pipeline
    from perfusion_ray.serve.client import RewardHandleClient
    from perfusion_ray.serve.schemas import Merchant

    config = PerfusionConfig.model_validate(loop["config"])
    align, online = config.align, config.online
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = torch.device("cuda", context.get_local_rank()) if align.use_gpu else torch.device("cpu")
    base, policy = build_worker_policy(config, loop["merchants"], loop["stat_names"], device)
    strategy = DeepSpeedStrategy(zero_stage=align.zero_stage, lr=align.lr, micro_batch=align.batch_groups,
                                 bf16=align.bf16, weight_decay=align.weight_decay, warmup_steps=align.warmup_steps)
    engine = strategy.prepare(policy)
    restored: dict = {}

    def read_average(folder: Path) -> None:
        from safetensors.torch import load_file

        if rank == 0 and (folder / AVERAGE_FILE).is_file():  # only rank 0 publishes and exports
            restored["average"] = load_file(str(folder / AVERAGE_FILE))

    state = restore_latest(engine, initial_state(loop), read_average)
    average = restored.get("average")
    resumed_from = state["round"]
    coordinator = ray.get_actor(loop["coordinator"])
    if rank == 0:
        state["rm_version"] = ray.get(coordinator.ensure_rm.remote(state["rm_dir"]))
    _barrier()
    layout = StoreLayout(config.data.root, "train")
    logged = load_groups(layout.output_files("groups", state["baseline_runs"] + state["consumed_runs"]),
                         layout.images_uri)
    featurize, pipeline = featurizer(policy), policy_pipeline(base, policy)
    scorer = RewardHandleClient(config.serve.app_name)
    threshold = config.data.label_policy.positive_threshold
    k = config.data.group_size
    while state["round"] < online.rounds:
        r = state["round"]
        times: dict[str, float] = {}
        clock = time.perf_counter()
        plan = _broadcast(ray.get(coordinator.plan_round.remote(r, state["consumed_runs"], state["baseline_runs"]))
                          if rank == 0 else None, rank)
        fresh = load_groups(plan.fresh_group_files, layout.images_uri)
        logged = concat([b for b in (logged, fresh) if b is not None]) if fresh is not None else logged
        pending = state["pending_refresh_runs"] + plan.fresh_runs
        times["plan_seconds"] = time.perf_counter() - clock

        clock = time.perf_counter()
        if online.rm_refresh_every and (r + 1) % online.rm_refresh_every == 0 and pending:
            pending_groups = load_groups(layout.output_files("groups", pending), layout.images_uri)
            new_dir = refresh_reward_model(config, state["rm_dir"], pending_groups, r, rank, world_size) \
                if pending_groups is not None else None
            if new_dir is not None:
                if rank == 0:
                    state["rm_version"] = ray.get(coordinator.ensure_rm.remote(new_dir))
                _barrier()
                state["rm_dir"], pending = new_dir, []
        times["rm_refresh_seconds"] = time.perf_counter() - clock

        clock = time.perf_counter()
        requests = plan.requests[rank::world_size]
        generator = torch.Generator().manual_seed(online.seed * 1_000_003 + r * 7919 + rank)
        with torch.no_grad():
            images = generate_groups(pipeline, config, requests, generator)
        policy.train()
        times["generate_seconds"] = time.perf_counter() - clock

        clock = time.perf_counter()
        results = scorer.score_groups([q["prompt"] for q in requests], list(images),
                                      [Merchant(q["merchant"]["merchant_id"], q["merchant"]["merchant_features"],
                                                q["merchant"]["merchant_stats"]) for q in requests])
        scores = np.stack([result.scores for result in results])
        labels = reward_labels(scores, online.split, online.top_m, online.margin)
        on_policy = generated_batch([q["request_id"] for q in requests], [q["merchant"] for q in requests],
                                    [q["prompt"] for q in requests], images, labels)
        times["score_seconds"] = time.perf_counter() - clock
        utilities = np.asarray(ray.get(coordinator.oracle_utility.remote(
            [q["merchant"]["merchant_id"] for q in requests for _ in range(k)],
            images.reshape(-1, *images.shape[2:]))))
        fault_point(f"online:round{r}:scored")

        clock = time.perf_counter()
        rng = np.random.default_rng([online.seed, 17, rank, r])
        n_logged, n_policy = mix_sizes(align.batch_groups, online.logged_fraction,
                                       0 if logged is None else len(logged["labels"]), len(requests))
        losses, margins, gaps, skipped, used = [], [], [], 0, 0
        for _ in range(online.steps_per_round):
            parts = [take(on_policy, rng.choice(len(requests), n_policy, replace=n_policy > len(requests)))]
            if n_logged:
                parts.append(take(logged, rng.choice(len(logged["labels"]), n_logged, replace=False)))
            tensors = group_tensors(base, featurize, concat(parts))
            result = group_step(engine, base.scheduler, tensors, align.beta, align.variant,
                                torch.Generator().manual_seed(int(rng.integers(2**62))), align.share_noise,
                                threshold, align.min_timestep)
            strategy.step(engine, result.loss)
            losses.append(result.loss.item())
            margins.append(result.reward_margin)
            gaps.append(result.reference_gap)
            skipped += result.groups_skipped
            used += result.groups_used
        times["optimize_seconds"] = time.perf_counter() - clock
        fault_point(f"online:round{r}:optimized")

        metrics = _mean_over_ranks({
            "rm_reward": float(scores.mean()), "oracle_utility": float(utilities.mean()),
            "loss": float(np.mean(losses)), "reward_margin": float(np.mean(margins)),
            "reference_gap": float(np.mean(gaps)), **times})
        counts = all_reduce_sum([float(skipped), float(used)])
        state["round"] = r + 1
        state["steps"] += online.steps_per_round
        state["consumed_runs"] += plan.fresh_runs
        state["consumed_partitions"] += plan.fresh_partitions
        state["pending_refresh_runs"] = pending
        metrics.update({"round": r, "steps": state["steps"], "groups_skipped": int(counts[0]),
                        "groups_used": int(counts[1]), "fresh_partitions": len(plan.fresh_partitions),
                        "fresh_groups": 0 if fresh is None else len(fresh["labels"]),
                        "logged_groups": 0 if logged is None else len(logged["labels"]),
                        "rm_version": state["rm_version"], "resumed_from_round": resumed_from,
                        "round_seconds": sum(times.values())})
        final = state["round"] >= online.rounds
        publish = bool(online.publish_every) and state["round"] % online.publish_every == 0 and not final
        decay = online.policy_average_decay
        if final or publish or decay:
            full_state = strategy.full_state_dict(engine)  # collective under ZeRO-3: every rank gathers
            if rank == 0:  # rank 0 alone publishes and exports, so only it keeps the average (decay 0: the last)
                average = average_weights(average, full_state, decay)
        if publish:
            clock = time.perf_counter()
            metrics["policy_version"] = _publish(config, loop, average, r, rank, coordinator) or ""
            metrics["publish_seconds"] = time.perf_counter() - clock
        state["history"].append(metrics)
        if rank == 0:
            ray.get(coordinator.record_round.remote(metrics))

        def export(folder: Path) -> None:
            from safetensors.torch import save_file

            if decay:
                save_file({n: t.contiguous() for n, t in average.items()}, str(folder / AVERAGE_FILE))
            if final:
                export_pipeline(config, loop, average, folder / "pipeline")

        report_with_checkpoint(engine, state, metrics, export=export)
        fault_point(f"online:round{r}:checkpointed")
