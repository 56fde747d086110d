"""The coordinator of the online alignment rounds (`perfusion align`): a single controller, veRL-style.

Who does what (DESIGN.md, "Data flow"):
- the driver (`run_online`) deploys the reward endpoint, starts the RoundCoordinator actor, and runs one
  TorchTrainer whose workers stay alive for every round (train/align_online.py);
- the RoundCoordinator actor (no CPU of its own) owns everything that is not a tensor: it plans each
  round (fresh feedback partitions past the watermark -> Ray Data ingest -> their group files; the
  round's sampled requests), rolls the Serve deployment to a refreshed RM, answers oracle utilities for
  monitoring, and records per-round metrics (TensorBoard, rounds.jsonl, the live progress bar);
- the workers generate, score through the Serve handle, optimize and checkpoint the round state.

Exactly once: ingest commits each partition file into exactly one ingest run (data/ingest.py). The round
state in the Ray Train checkpoint lists the runs the rounds have consumed; a committed run missing from it
(a crash after ingest, before the round's checkpoint) is consumed by the next round before anything new
is ingested, so after a crash at any point no partition is lost or consumed twice.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.errors import PerfusionError
from perfusion_ray.faults import fault_point

COORDINATOR_NAME = "perfusion-round-coordinator"
RUN_NAME = "align-online"


@dataclass
class RoundPlan:
    """What one round works on; the same on every worker."""

    round: int
    fresh_runs: list[str]  # ingest runs consumed by this round
    fresh_partitions: list[str]  # their feedback partition files (relative to the feedback root)
    fresh_group_files: list[str]
    requests: list[dict]  # {request_id, merchant (record), prompt}, split over the workers by position


def _quiet_ray_data() -> None:
    """No Ray Data progress bars from the rounds' small ingests (they would drown the round view)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


class RoundCoordinator:
    """Runs as a Ray actor (see the module docstring); plain methods so that tests can call it directly."""

    def __init__(self, config_json: dict):
        from perfusion_ray.data.store import StoreLayout
        from perfusion_ray.world.simulator import build_world

        self.config = PerfusionConfig.model_validate(config_json)
        self.layout = StoreLayout(self.config.data.root, "train")
        self.world = build_world(self.config)
        self.out = Path(self.config.online.out).absolute()
        self.history: list[dict] = []  # recorded rounds, for the driver's live view
        self._writer = None
        self._prefetch: threading.Thread | None = None
        _quiet_ray_data()

    # ------------------------------------------------------------ planning
    def committed_runs(self) -> list[str]:
        return self.layout.committed_runs()

    def plan_round(self, round_index: int, consumed_runs: list[str], baseline_runs: list[str]) -> RoundPlan:
        """This round's fresh feedback and requests.

        Fresh feedback is the oldest committed ingest run that no round has consumed (a crashed round's, or
        the one prefetched while the previous round trained), else a new ingest of at most
        online.partitions_per_round files. Before returning, the next round's ingest starts in the
        background, so Ray Data works while the workers generate and optimize."""
        self._finish_prefetch()
        fresh = self._unconsumed_runs(set(consumed_runs) | set(baseline_runs))[:1]
        if not fresh:
            fresh = [run for run in [self._ingest(round_index)] if run]
        partitions = sorted(name for run in fresh for name in self._manifest(run)["files"])
        if round_index + 1 < self.config.online.rounds:
            self._prefetch = threading.Thread(target=self._ingest, args=(round_index + 1,), daemon=True)
            self._prefetch.start()
        return RoundPlan(round_index, fresh, partitions, self.layout.output_files("groups", fresh),
                         self.sample_requests(round_index))

    def _manifest(self, run: str) -> dict:
        from perfusion_ray.data.ingest import run_manifest

        return run_manifest(self.layout, run)

    def _unconsumed_runs(self, known: set[str]) -> list[str]:
        """Committed runs no round consumed, oldest feedback first."""
        runs = [run for run in self.layout.committed_runs() if run not in known]
        return sorted(runs, key=lambda run: min(self._manifest(run)["files"], default=""))

    def _ingest(self, round_index: int) -> str | None:
        from perfusion_ray.data.ingest import ingest

        report = ingest(self.config, "train", "ray", max_files=self.config.online.partitions_per_round)
        fault_point(f"online:round{round_index}:ingested")
        return report.run_id

    def _finish_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch = None

    def sample_requests(self, round_index: int) -> list[dict]:
        """The round's on-policy requests: seen merchants, asking as they do in the feedback stream. Seeded
        by (seed, round), so a resumed round asks the same."""
        from perfusion_ray.world.catalogue import prompt_text
        from perfusion_ray.world.simulator import draw_requests

        online, merchants = self.config.online, self.world.merchants
        rng = np.random.default_rng([online.seed, 11, round_index])
        requesters = rng.choice(merchants.seen_indices, size=online.requests_per_round)
        classes, asked = draw_requests(self.world, requesters, rng)
        return [{"request_id": f"online-r{round_index:04d}-{i:04d}",
                 "merchant": {"merchant_id": merchants.ids[m], "merchant_features": dict(merchants.features[m]),
                              "merchant_stats": dict(merchants.stats[m])},
                 "prompt": prompt_text(int(classes[i]), *[None if a < 0 else int(a) for a in asked[i]])}
                for i, m in enumerate(requesters)]

    # ------------------------------------------------------------ reward endpoint
    def serving_version(self) -> str:
        from perfusion_ray.serve.client import RewardHandleClient

        return RewardHandleClient(self.config.serve.app_name).version()

    def ensure_rm(self, model_dir: str) -> str:
        """Serve `model_dir` (roll the deployment if it serves another version); returns the version."""
        from perfusion_ray.serve.model_store import model_version
        from perfusion_ray.serve.reward_app import rollout

        wanted = model_version(model_dir)
        if self.serving_version() != wanted:
            rollout(model_dir, self.config.serve.app_name)
        return wanted

    def publish_policy(self, pipeline_dir: str) -> str | None:
        """Roll the design endpoint to a newly exported policy, when one is deployed; its version, else None."""
        from perfusion_ray.serve import design_app
        from perfusion_ray.serve.apps import live_declarative_apps

        if self.config.design.app_name not in live_declarative_apps():
            return None
        return design_app.rollout(pipeline_dir, self.config.design.app_name)

    # ------------------------------------------------------------ monitoring
    def oracle_utility(self, merchant_ids: list[str], images: np.ndarray) -> np.ndarray:
        """True utility of each image for its merchant (never shown to the models)."""
        from perfusion_ray.world.oracle import attribute_profile

        rows = [self.world.merchants.index(m) for m in merchant_ids]
        return (attribute_profile(np.asarray(images)) * self.world.merchants.tastes[rows]).sum(1)

    def record_round(self, metrics: dict) -> None:
        """Per-round metrics -> rounds.jsonl, TensorBoard, and the driver's progress view."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "rounds.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.config.online.tensorboard:
            if self._writer is None:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tensorboard"))
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and name != "round":
                    self._writer.add_scalar(f"online/{name}", value, metrics["round"])
            self._writer.flush()
        self.history.append(metrics)

    def get_history(self) -> list[dict]:
        return self.history


# ---------------------------------------------------------------- driver
@dataclass
class OnlineReport:
    pipeline_dir: Path
    rounds: int
    resumed_from_round: int
    consumed_partitions: list[str]
    history: list[dict]
    rm_version: str
    seconds: float


def _show_progress(coordinator, total: int, first: int, stop: threading.Event) -> None:
    """The live view: a progress bar over rounds with the last round's numbers."""
    import ray
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=first, desc="online rounds", unit="round") as bar:
        seen = first
        while not stop.wait(2.0):
            try:
                history = ray.get(coordinator.get_history.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the view must never kill the run
                continue
            for metrics in history:
                if metrics["round"] >= seen:
                    bar.update(metrics["round"] + 1 - seen)
                    seen = metrics["round"] + 1
                    bar.set_postfix(reward=f"{metrics['rm_reward']:.3f}", utility=f"{metrics['oracle_utility']:.3f}",
                                    loss=f"{metrics['loss']:.3f}", fresh=metrics["fresh_partitions"])


def _initial_rm(config: PerfusionConfig, rm_dir: str | Path | None) -> Path:
    from perfusion_ray.serve.reward_app import default_model_dir

    path = Path(rm_dir or default_model_dir(config)).absolute()
    if not (path / "config.json").is_file():
        raise PerfusionError(f"no reward model at {path}", hint="train one with `perfusion rm train` first")
    return path


def policy_merchants(config: PerfusionConfig) -> dict:
    """The merchants (and stat names) the policy's merchant encoder is fitted on: those of the committed
    train groups."""
    from perfusion_ray.data.group_examples import committed_group_files, distinct_merchants

    _, files = committed_group_files(config.data.root, "train")
    merchants, stat_names, _ = distinct_merchants(files)
    return {"merchants": merchants, "stat_names": stat_names}


def export_initial_policy(config: PerfusionConfig, folder: str | Path) -> Path:
    """The policy the rounds start from (the base model: the branch's joins are zero) as a PerFusionPipeline,
    e.g. for the design endpoint to serve before the first round publishes."""
    import tempfile

    from perfusion_ray.storage import replace_directory
    from perfusion_ray.train.align_offline import export_pipeline

    folder = Path(folder).absolute()
    with tempfile.TemporaryDirectory() as staging:
        export_pipeline(config, policy_merchants(config), None, Path(staging) / "pipeline")
        replace_directory(Path(staging) / "pipeline", folder)
    return folder


def start_reward_endpoint(config: PerfusionConfig, rm_dir: str | Path) -> None:
    """Ray, Serve's proxy, and the reward app serving `rm_dir` unless one is deployed already."""
    from perfusion_ray.runtime import init_ray
    from perfusion_ray.serve.apps import deploy, live_declarative_apps, start_serve
    from perfusion_ray.serve.reward_app import application_entry

    init_ray(config.cluster)
    start_serve(config)
    if config.serve.app_name not in live_declarative_apps():
        deploy(application_entry(config, config.source, model_dir=rm_dir))


def run_online(config: PerfusionConfig, resume: bool = False, rm_dir: str | Path | None = None,
               progress: bool = True) -> OnlineReport:
    """The alignment rounds: serve the RM, start the coordinator, run every round on long-lived workers,
    and export the final policy to <online.out>/pipeline."""
    import shutil

    import ray

    from perfusion_ray.data.store import StoreLayout
    from perfusion_ray.storage import replace_directory
    from perfusion_ray.train.align_online import online_loop_per_worker
    from perfusion_ray.train.distributed import torch_trainer

    started = time.perf_counter()
    config = config.with_absolute_paths()
    online = config.online
    out = Path(online.out).absolute()
    storage = out / "ray_results"
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    rm_path = _initial_rm(config, rm_dir)
    start_reward_endpoint(config, rm_path)
    coordinator = ray.remote(num_cpus=0)(RoundCoordinator).options(name=COORDINATOR_NAME, lifetime=None).remote(
        config.model_dump(mode="json"))
    ray.get(coordinator.get_history.remote())  # fail here, not in the workers, when it cannot start
    loop_config = {"config": config.model_dump(mode="json"), **policy_merchants(config),
                   "coordinator": COORDINATOR_NAME, "rm_dir": str(rm_path),
                   # Runs ingested before the loop are logged feedback, not fresh: the RM already saw them.
                   "baseline_runs": StoreLayout(config.data.root, "train").committed_runs()}
    trainer = torch_trainer(online_loop_per_worker, loop_config, config.align, config.cluster, RUN_NAME, storage, {})
    stop = threading.Event()
    first = _rounds_done(out) if resume else 0
    view = threading.Thread(target=_show_progress, args=(coordinator, online.rounds, first, stop), daemon=True)
    if progress:
        view.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if progress:
            view.join(timeout=5)
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / "state.json").read_text())
        exported = Path(folder) / "pipeline"
        if not exported.is_dir():
            raise PerfusionError(f"the last checkpoint {result.checkpoint.path} has no exported pipeline")
        replace_directory(exported, out / "pipeline")
    ray.kill(coordinator)
    return OnlineReport(out / "pipeline", state["round"], int(result.metrics.get("resumed_from_round", 0)),
                        state["consumed_partitions"], state["history"], state.get("rm_version", ""),
                        time.perf_counter() - started)


def _rounds_done(out: Path) -> int:
    """Rounds in rounds.jsonl (the view's starting point on resume; the checkpoint is the truth)."""
    path = out / "rounds.jsonl"
    if not path.is_file():
        return 0
    return len([line for line in path.read_text().splitlines() if line.strip()])
