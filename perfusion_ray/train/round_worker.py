"""The SPMD side of the online rounds: what every Ray Train worker holds and the methods the controller
calls on it (perfusion_ray/coordinator.py; dispatch declared with @dispatch, see train/worker_group.py).

Each worker holds the frozen base and the policy in a DeepSpeed engine (ZeRO stage from align), the
logged groups it mixes into every step, and a handle on the reward endpoint. Methods:
  generate       K images per request with the CURRENT policy; the noise of a request comes from
                 (noise seed, request id), so a request draws the same noise whichever rank gets it;
  probe          the same with the averaged (published) policy: the probe set's images;
  score          the RM's scores of groups through the Serve deployment handle (on-policy);
  add_logged     fresh group files join the logged groups;
  train_steps    group-objective steps on a mix of this rank's on-policy share and logged groups, then the
                 round-end trainable weights fold into a moving average (online.policy_average_decay) on
                 every rank: the policy that is probed, published and exported (a last iterate swings with
                 its last few groups);
  keep_best      remember the current average as the best probe policy (rank 0: it exports);
  refresh_rm     warm-start the RM on the groups consumed since the last refresh (DeepSpeed on the same
                 workers) and export it as a new version;
  export_policy  the averaged policy as a PerFusionPipeline (rank 0);
  checkpoint     ray.train.report with the engine on every rank, the averaged (and best) policy and the
                 RoundState; the last round's checkpoint also holds the exported pipeline of the policy
                 that ships (online.ship: the best probe policy, or the last average).
Random draws are seeded by (seed, rank, round), so the round number restores them too.
"""

from __future__ import annotations

import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.data.group_examples import load_groups
from perfusion_ray.data.store import StoreLayout
from perfusion_ray.faults import fault_point
from perfusion_ray.records import GroupBatch, Request
from perfusion_ray.rounds.state import RoundState
from perfusion_ray.train.align_offline import PolicyMerchants, build_worker_policy, export_pipeline
from perfusion_ray.train.distributed import all_reduce_sum, load_engine, report_with_checkpoint
from perfusion_ray.train.group_step import group_step, group_tensors
from perfusion_ray.train.on_policy import average_weights, mix_sizes
from perfusion_ray.train.strategy import DeepSpeedStrategy
from perfusion_ray.train.worker_group import Dispatch, dispatch

AVERAGE_FILE = "policy_average.safetensors"  # in each round checkpoint: the averaged policy's trainable weights
BEST_FILE = "policy_best.safetensors"  # the average of the round with the best probe utility
STATE_FILE = "state.json"


@dataclass(frozen=True)
class RoundLoopConfig:
    """What the training function gets: the config, the merchants the policy knows, the channel's name, and
    the state a fresh run starts from."""

    config: dict
    known: PolicyMerchants
    channel: str
    initial: RoundState


def request_noise(requests: list[Request], k: int, latent_shape: tuple, seed: int) -> torch.Tensor:
    """Starting noise [R * K, *latent_shape], request-major, one generator per request seeded by (seed,
    request id): a request draws the same K noises whichever rank generates it and whatever else is asked."""
    if not requests:
        return torch.zeros((0, *latent_shape))
    return torch.cat([torch.randn((k, *latent_shape), generator=torch.Generator().manual_seed(
        seed * 1_000_003 + zlib.crc32(r.request_id.encode()))) for r in requests])


class RoundWorker:
    def __init__(self, loop: RoundLoopConfig):
        import ray.train

        from perfusion_ray.models.policy import featurizer, policy_pipeline
        from perfusion_ray.serve.client import RewardHandleClient

        self.config = PerfusionConfig.model_validate(loop.config)
        self.known = loop.known
        align = self.config.align
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = torch.device("cuda", context.get_local_rank()) if align.use_gpu else torch.device("cpu")
        self.base, self.policy = build_worker_policy(self.config, self.known, self.device)
        self.strategy = DeepSpeedStrategy(zero_stage=align.zero_stage, lr=align.lr, micro_batch=align.batch_groups,
                                          bf16=align.bf16, weight_decay=align.weight_decay,
                                          warmup_steps=align.warmup_steps)
        self.engine = self.strategy.prepare(self.policy)
        self.average: dict | None = None
        self.best: dict | None = None
        self._sampler = None  # the averaged policy as a pipeline, for the probe (built on first use)
        self.restored = self._restore()
        self.layout = StoreLayout(self.config.data.root, "train")
        state = self.restored or loop.initial
        self.logged = load_groups(self.layout, self.layout.output_files("groups", state.logged_runs()))
        self.featurize, self.pipeline = featurizer(self.policy), policy_pipeline(self.base, self.policy)
        self.scorer = RewardHandleClient(self.config.serve.app_name)

    def _restore(self) -> RoundState | None:
        """The engine, the average (rank 0) and the state of Ray Train's latest checkpoint, if there is one."""
        import ray.train
        from safetensors.torch import load_file

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return None
        with checkpoint.as_directory() as folder:
            load_engine(self.engine, folder, checkpoint.path)
            if (Path(folder) / AVERAGE_FILE).is_file():
                self.average = load_file(str(Path(folder) / AVERAGE_FILE))
            if self.rank == 0 and (Path(folder) / BEST_FILE).is_file():  # only rank 0 exports
                self.best = load_file(str(Path(folder) / BEST_FILE))
            return RoundState.from_json((Path(folder) / STATE_FILE).read_text())

    def restored_state(self) -> RoundState | None:
        return self.restored

    # ------------------------------------------------------------ generation and scoring
    @dispatch(Dispatch.SPLIT)
    def generate(self, requests: list[Request], noise_seed: int) -> GroupBatch:
        """K = data.group_size images per request from the current policy, with the rounds' sampler steps
        (online.num_inference_steps); labels all zero."""
        self.policy.eval()  # sampling sees every known id (the merchant encoder drops ids only in training)
        groups = self._sample(self.pipeline, requests, noise_seed,
                              self.config.online.num_inference_steps or self.config.policy.num_inference_steps)
        self.policy.train()
        return groups

    @dispatch(Dispatch.SPLIT)
    def probe(self, requests: list[Request], noise_seed: int) -> GroupBatch:
        """K images per request from the averaged policy (what is published), with evaluation's sampler steps."""
        return self._sample(self._averaged_pipeline(), requests, noise_seed, self.config.policy.num_inference_steps)

    def _sample(self, pipeline, requests: list[Request], noise_seed: int, steps: int) -> GroupBatch:
        config = self.config
        k = config.data.group_size
        if not requests:  # a rank whose share is empty
            size = self.base.image_size
            return GroupBatch([], [], [], np.zeros((0, k, size, size, 3), np.uint8), np.zeros((0, k), np.float32))
        noise = request_noise(requests, k, self.base.latent_shape, noise_seed)
        with torch.no_grad():
            images = pipeline([r.prompt for r in requests], merchant=[r.merchant for r in requests],
                              num_images_per_prompt=k, latents=noise, output_type="np",
                              batch_size=config.align.eval.batch_size, num_inference_steps=steps,
                              guidance_scale=config.policy.guidance_scale,
                              personalize_unconditional=config.policy.personalize_unconditional).images
        images = images.reshape(len(requests), k, *images.shape[1:])
        return GroupBatch.from_requests(requests, images, np.zeros((len(requests), k), np.float32))

    def _averaged_pipeline(self):
        """A pipeline over a separate copy of the policy holding the averaged weights (the training engine's
        module keeps the current ones)."""
        from perfusion_ray.models.policy import policy_pipeline
        from perfusion_ray.train.align_offline import load_policy_weights

        if self._sampler is None:
            # Under ZeRO-3 the engine's base weights are partitioned: the copy gets a base of its own.
            base, policy = (build_worker_policy(self.config, self.known, self.device)
                            if self.config.align.zero_stage == 3 else (self.base, self._fresh_policy()))
            self._sampler = (base, policy)
        base, policy = self._sampler
        if self.average is not None:
            load_policy_weights(policy, self.average)
        return policy_pipeline(base, policy)

    def _fresh_policy(self):
        from perfusion_ray.models.policy import build_policy

        config = self.config
        return build_policy(self.base.unet, config.policy, config.align.adapter, tuple(self.known.stat_names),
                            self.known.merchants).to(self.device)

    @dispatch(Dispatch.SPLIT)
    def score(self, groups: GroupBatch) -> np.ndarray:
        """[B, K] RM scores through the reward endpoint (every group in flight together)."""
        if not len(groups):
            return np.zeros((0, self.config.data.group_size), np.float32)
        results = self.scorer.score_groups(groups.prompts, list(groups.images), groups.merchants)
        return np.stack([result.scores for result in results])

    # ------------------------------------------------------------ optimization
    @dispatch(Dispatch.BROADCAST)
    def add_logged(self, group_files: list[str]) -> int:
        """Fresh group files join the logged groups; returns how many logged groups there are now."""
        fresh = load_groups(self.layout, group_files) if group_files else None
        if fresh is not None:
            self.logged = fresh if self.logged is None else GroupBatch.concat([self.logged, fresh])
        return 0 if self.logged is None else len(self.logged)

    @dispatch(Dispatch.SPLIT_REDUCED)
    def train_steps(self, on_policy: GroupBatch, round_index: int) -> dict[str, float]:
        """online.steps_per_round group-objective steps on this rank's share of the labelled on-policy groups
        mixed with logged groups; then the round-end weights join the average. Metrics: means over ranks."""
        align, online = self.config.align, self.config.online
        started = time.perf_counter()
        rng = np.random.default_rng([online.seed, 17, self.rank, round_index])
        n_logged, n_policy = mix_sizes(align.batch_groups, online.logged_fraction,
                                       0 if self.logged is None else len(self.logged), len(on_policy))
        threshold = self.config.data.label_policy.positive_threshold
        losses, margins, gaps, skipped, used, passes = [], [], [], 0, 0, 0
        for _ in range(online.steps_per_round):
            parts = [on_policy.take(rng.choice(len(on_policy), n_policy, replace=n_policy > len(on_policy)))]
            if n_logged:
                parts.append(self.logged.take(rng.choice(len(self.logged), n_logged, replace=False)))
            tensors = group_tensors(self.base, self.featurize, GroupBatch.concat(parts))
            result = group_step(self.engine, self.base.scheduler, tensors, align.beta, align.variant,
                                torch.Generator().manual_seed(int(rng.integers(2**62))), align.share_noise,
                                threshold, align.min_timestep)
            self.strategy.step(self.engine, result.loss)
            losses.append(result.loss.item())
            margins.append(result.reward_margin)
            gaps.append(result.reference_gap)
            skipped += result.groups_skipped
            used += result.groups_used
            passes += result.denoiser_passes
        seconds = time.perf_counter() - started
        fault_point(f"online:round{round_index}:optimized")
        trained = self.strategy.trainable_state_dict(self.engine)  # collective under ZeRO-3: every rank gathers
        self.average = average_weights(self.average, trained, online.policy_average_decay)
        means = _mean_over_ranks({"loss": float(np.mean(losses)), "reward_margin": float(np.mean(margins)),
                                  "reference_gap": float(np.mean(gaps)), "optimize_seconds": seconds})
        counts = all_reduce_sum([float(skipped), float(used), float(passes)])
        return {**means, "groups_skipped": int(counts[0]), "groups_used": int(counts[1]),
                "denoiser_passes": int(counts[2]),
                "logged_groups": 0 if self.logged is None else len(self.logged)}

    @dispatch(Dispatch.BROADCAST)
    def refresh_rm(self, group_files: list[str], rm_dir: str, round_index: int) -> str | None:
        """Warm-start the RM from `rm_dir`, train it on these groups under DeepSpeed, export a new version to
        <online.out>/rm/round-NNNN (rank 0). None when there are too few groups for one step on every rank."""
        from perfusion_ray.models.reward_model import load_reward_model, save_reward_model
        from perfusion_ray.serve.model_store import local_model_dir
        from perfusion_ray.storage import join, publish_directory
        from perfusion_ray.train.reward_model import ranking_loss

        rm, online = self.config.rm, self.config.online
        groups = load_groups(self.layout, group_files)
        steps = 0 if groups is None else len(groups) // (self.world_size * rm.batch_groups)
        if steps == 0:
            return None
        model = load_reward_model(local_model_dir(rm_dir))  # a URI: its cached copy on this node
        model.train()
        strategy = DeepSpeedStrategy(zero_stage=rm.zero_stage, lr=online.rm_refresh_lr, micro_batch=rm.batch_groups,
                                     bf16=rm.bf16, weight_decay=rm.weight_decay)
        engine = strategy.prepare(model)
        generator = torch.Generator().manual_seed(online.seed * 7919 + round_index * 31 + self.rank)
        for epoch in range(online.rm_refresh_epochs):
            order = np.random.default_rng([online.seed, 13, round_index, epoch]).permutation(len(groups))
            mine = order[: steps * self.world_size * rm.batch_groups].reshape(steps, self.world_size,
                                                                               rm.batch_groups)[:, self.rank]
            for rows in mine:
                strategy.step(engine, ranking_loss(model, engine, groups.take(rows), rm.loss, generator))
        state = strategy.full_state_dict(engine)  # collective under ZeRO-3
        target = join(online.out, "rm", f"round-{round_index:04d}")  # online.out is absolute or a URI
        if self.rank == 0:
            model.config.version = f"refreshed-round{round_index:04d}"
            with tempfile.TemporaryDirectory() as folder:
                save_reward_model(model, Path(folder) / "model", state_dict=state)
                publish_directory(Path(folder) / "model", target)
        _barrier()
        return target

    # ------------------------------------------------------------ export and checkpoint
    @dispatch(Dispatch.BROADCAST)
    def keep_best(self) -> None:
        """The current average becomes the best probe policy (rank 0 keeps it: only it exports)."""
        if self.rank == 0:
            self.best = {name: tensor.clone() for name, tensor in self.average.items()}

    def _shipped(self) -> dict:
        return self.best if self.config.online.ship == "best_probe" and self.best is not None else self.average

    @dispatch(Dispatch.BROADCAST)
    def export_policy(self, target: str) -> str:
        """Rank 0 writes the averaged policy as a PerFusionPipeline to `target` (a local path or a URI, published
        so that no reader sees half of it)."""
        from perfusion_ray.storage import publish_directory

        if self.rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                export_pipeline(self.config, self.known, self.average, Path(folder) / "pipeline")
                publish_directory(Path(folder) / "pipeline", target)
        _barrier()
        return target

    @dispatch(Dispatch.BROADCAST)
    def checkpoint(self, state: RoundState, metrics: dict, final: bool) -> None:
        """The round's checkpoint: engine (weights + optimizer + LR schedule) on every rank, the averaged
        policy and state.json, and on the last round the exported pipeline."""

        def extras(folder: Path) -> None:
            from safetensors.torch import save_file

            save_file({n: t.contiguous() for n, t in self.average.items()}, str(folder / AVERAGE_FILE))
            if self.best is not None:
                save_file({n: t.contiguous() for n, t in self.best.items()}, str(folder / BEST_FILE))
            if final:
                export_pipeline(self.config, self.known, self._shipped(), folder / "pipeline")

        report_with_checkpoint(self.engine, asdict(state), metrics, export=extras,
                               moment=f"online:round{state.round - 1}")


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean over every rank of each value (every rank has the same share of requests and steps)."""
    names = sorted(values)
    sums = all_reduce_sum([values[n] for n in names] + [1.0])
    return {name: sums[i] / max(sums[-1], 1e-12) for i, name in enumerate(names)}


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def round_loop_per_worker(train_loop_config: dict) -> None:
    """The TorchTrainer's training function: build the worker, then run the controller's calls."""
    import ray

    from perfusion_ray.train.worker_group import serve_commands

    loop: RoundLoopConfig = train_loop_config["loop"]
    worker = RoundWorker(loop)
    serve_commands(worker, ray.get_actor(loop.channel), worker.rank)
