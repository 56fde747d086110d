"""`perfusion demo`: the whole loop on the embedded default, end to end, with nothing but the repo.

simulate FashionWorld feedback (the last online.live_hours hours held back) -> ingest (Ray Data) -> train
and evaluate the RM -> serve it -> online rounds while the held-back hours arrive in the store one by
one -> evaluate base vs aligned on held-out requests -> out/report.md, out/report.html, out/metrics.json
and out/pipeline (the saved PerFusionPipeline).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.console import Stages, say

# --quick: the same stages on a world small enough for a smoke run of a few minutes (a value already
# smaller in the config stays: --quick never makes a run bigger).
QUICK_OVERRIDES = {
    "world": {"hours": 8, "requests_per_hour": 40, "holdout_requests_per_merchant": 4},
    "rm": {"epochs": 2},
    "online": {"rounds": 2, "requests_per_round": 8, "steps_per_round": 8, "live_hours": 2, "live_interval_s": 10.0,
               "partitions_per_round": 1, "rm_refresh_every": 2},
    "align": {"eval": {"requests_per_merchant": 1, "requests_per_split": 12}},
}


def quick_config(config: PerfusionConfig) -> PerfusionConfig:
    raw = config.model_dump(mode="json")

    def shrink(target: dict, values: dict) -> None:
        for name, value in values.items():
            if isinstance(value, dict):
                shrink(target[name], value)
            elif target[name] is not None:  # None: the field is unset and another one rules (it stays so)
                target[name] = min(target[name], value) if target[name] else value

    shrink(raw, QUICK_OVERRIDES)
    return PerfusionConfig.model_validate(raw)


class LiveFeed(threading.Thread):
    """Writes the held-back hours of the training stream into the store, one every `interval_s`, while the
    online rounds run: the fresh feedback partitions the coordinator consumes."""

    def __init__(self, config: PerfusionConfig, world, hours: list[int], interval_s: float):
        super().__init__(daemon=True, name="live-feed")
        self.config, self.world, self.hours, self.interval_s = config, world, hours, interval_s
        self.written: list[int] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        from perfusion_ray.world.simulator import simulate

        try:
            for hour in self.hours:
                if self._stop_event.wait(self.interval_s):
                    return
                simulate(self.config, "train", self.world, progress=False, hours=[hour])
                self.written.append(hour)
        except BaseException as exc:  # noqa: BLE001 - reported by the demo after the rounds
            self.error = exc

    def begin(self, rm_dir: Path) -> None:
        self.start()

    def end(self) -> dict[str, float]:
        self._stop_event.set()
        self.join()
        if self.error:
            raise self.error
        return {"online.live_partitions_written": float(len(self.written))}

    def describe(self, consumed: int) -> str:
        return (f"{len(self.hours)} hours of simulated feedback held back to arrive during the online rounds: "
                f"{len(self.written)} written, {consumed} fresh partitions consumed")


class EndpointFeed:
    """--through-endpoints: the design endpoint serves the policy (rolled to each published version) and the
    world's merchants use it over HTTP; their impressions and feedback are the rounds' fresh partitions."""

    def __init__(self, config: PerfusionConfig, world, out: Path):
        self.config, self.world, self.out = config, world, out
        self.stop_event = threading.Event()
        self.merchants = None
        self.thread: threading.Thread | None = None
        self.baseline_runs: list[str] = []
        self.accounting: dict[str, int] = {}

    def begin(self, rm_dir: Path) -> None:
        from perfusion_ray.config import save_config
        from perfusion_ray.coordinator import export_initial_policy, start_reward_endpoint
        from perfusion_ray.data.store import StoreLayout
        from perfusion_ray.serve import design_app
        from perfusion_ray.serve.apps import deploy
        from perfusion_ray.serve.design_client import DesignClient
        from perfusion_ray.world.endpoint_merchants import EndpointMerchants

        folder = self.out / "design"
        start_reward_endpoint(self.config, rm_dir)
        policy = export_initial_policy(self.config, folder / "initial-policy")
        # The app builder rebuilds its config from a file: this run's whole config, absolute paths included.
        config_path = save_config(self.config, folder / "config.yaml")
        deploy(design_app.application_entry(self.config, config_path, pipeline_dir=policy), timeout_s=300)
        self.baseline_runs = StoreLayout(self.config.data.root, "train").committed_runs()
        url = f"http://127.0.0.1:{self.config.serve.port}{self.config.design.route_prefix}"
        self.merchants = EndpointMerchants(self.world, DesignClient(url), seed=self.config.online.seed)
        self.thread = threading.Thread(target=self.merchants.run, kwargs={"stop": self.stop_event}, daemon=True)
        self.thread.start()

    def end(self) -> dict[str, float]:
        """Stop the merchants, ingest what is left, and account for every event."""
        from perfusion_ray.data.ingest import ingest

        self.stop_event.set()
        self.thread.join()
        ingest(self.config, "train")
        counts = self.merchants.counts
        self.accounting = endpoint_accounting(self.config, self.baseline_runs)
        self.accounting["sent"] = counts.events
        if counts.failed:
            raise RuntimeError(f"{len(counts.failed)} design requests failed: {counts.failed[:3]}")
        return {"endpoints.requests": float(counts.requests), "endpoints.rate_limited": float(counts.rate_limited),
                "endpoints.utility": float(np.mean(counts.utilities)) if counts.utilities else float("nan"),
                **{f"endpoints.events.{name}": float(value) for name, value in self.accounting.items()}}

    def describe(self, consumed: int) -> str:
        a = self.accounting
        return (f"through the endpoints: {self.merchants.counts.requests} design requests by simulated merchants; "
                f"events sent {a['sent']} = stored {a['stored']} = ingested {a['grouped']} + quarantined "
                f"{a['quarantined']}: {'every event accounted for' if a['sent'] == a['stored'] == a['grouped'] + a['quarantined'] else 'MISMATCH'}; "
                f"{consumed} fresh partitions consumed by the rounds")


def endpoint_accounting(config: PerfusionConfig, baseline_runs: list[str]) -> dict[str, int]:
    """Rows the design endpoint stored (its partition files), and what ingest made of the runs after the
    baseline: rows grouped and rows quarantined."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from perfusion_ray.data.ingest import run_manifest
    from perfusion_ray.data.store import StoreLayout

    layout = StoreLayout(config.data.root, "train")
    infos = layout.filesystem.get_file_info(pafs.FileSelector(layout.feedback, recursive=True, allow_not_found=True))
    stored = sum(pq.read_metadata(i.path, filesystem=layout.filesystem).num_rows for i in infos
                 if i.type == pafs.FileType.File and i.base_name.startswith("part-design-"))
    grouped = quarantined = 0
    for run in layout.committed_runs():
        if run not in baseline_runs:
            counts = run_manifest(layout, run)["counts"]
            grouped, quarantined = grouped + counts["rows_grouped"], quarantined + counts["rows_quarantined"]
    return {"stored": stored, "grouped": grouped, "quarantined": quarantined}



def _showcase_grid(config: PerfusionConfig, pipeline_dir: Path, world) -> tuple[str, object]:
    """Several merchants (seen and cold-start, different segments) on one open prompt and one seed."""
    from perfusion_ray.models.base import load_base
    from perfusion_ray.models.pipeline import PerFusionPipeline
    from perfusion_ray.evaluation.alignment import same_prompt_grid
    from perfusion_ray.world.catalogue import prompt_text
    from perfusion_ray.world.environment import world_merchant

    population = world.merchants
    picked, segments = [], set()
    for cold in (False, True):
        for i in np.flatnonzero(population.cold_start == cold):
            if population.segments[i] not in segments or len(picked) < 2 + 3 * cold:
                segments.add(population.segments[i])
                picked.append(int(i))
            if len(picked) >= 3 + 3 * cold:
                break
    records = [world_merchant(world, i) for i in picked]
    focus = int(population.category_probs[picked].sum(0).argmax())
    prompt = prompt_text(focus)
    pipeline = PerFusionPipeline.from_pretrained(str(pipeline_dir))
    base = PerFusionPipeline.from_base(load_base(config.policy.base))
    for p in (pipeline, base):
        p.set_progress_bar_config(disable=True)
    grid = same_prompt_grid(config, pipeline, base, prompt, records, seed=config.align.eval.seed)
    rows = ", ".join(f"{population.ids[i]} ({population.segments[i]}{', cold-start' if population.cold_start[i] else ''})"
                     for i in picked)
    return f'"{prompt}", one seed: base (top row), then aligned for {rows}', grid


def fresh_store(config: PerfusionConfig, out: Path) -> None:
    """The demo simulates into an empty store: one it owns (under `out`) is cleared, any other must be empty."""
    import shutil

    from perfusion_ray.errors import PerfusionError

    root = Path(config.data.root).absolute()
    if "://" in config.data.root:
        raise PerfusionError(f"the demo simulates into a local store, not {config.data.root}")
    if root.is_relative_to(out):
        shutil.rmtree(root, ignore_errors=True)
    elif root.exists() and any(root.iterdir()):
        raise PerfusionError(f"data.root {root} is not empty, and the demo simulates a fresh world into it",
                             hint=f"point data.root at an empty folder, or inside {out}")


def simulate_before_the_loop(config: PerfusionConfig, world) -> dict[str, float]:
    """The training stream minus its last online.live_hours hours, and the held-out split; returns the
    oracle GAUC ceiling of each."""
    from perfusion_ray.world.simulator import simulate

    train_hours = range(config.world.hours - config.online.live_hours)
    return {"train": simulate(config, "train", world, hours=train_hours).oracle_gauc,
            "holdout": simulate(config, "holdout", world).oracle_gauc}


def ingest_both_splits(config: PerfusionConfig) -> None:
    from perfusion_ray.data.ingest import ingest

    for split in ("train", "holdout"):
        report = ingest(config, split)
        say(f"      {split}: {report.counts.groups} groups, {report.counts.rows_quarantined} rows quarantined "
              f"with reasons, {report.counts.files_quarantined} files quarantined")


def live_hours(config: PerfusionConfig) -> list[int]:
    """The hours of the training stream that arrive while the online rounds run."""
    return list(range(config.world.hours - config.online.live_hours, config.world.hours))


def run_demo(config: PerfusionConfig, quick: bool = False, out: Path = Path("out"),
             through_endpoints: bool = False) -> dict:
    """Every stage of the module docstring; returns the flat metrics written to out/metrics.json.

    through_endpoints: the fresh feedback comes from the simulated merchants using the design endpoint
    (EndpointFeed) instead of held-back simulated hours (LiveFeed)."""
    from perfusion_ray.coordinator import run_online
    from perfusion_ray.evaluation.alignment import comparison_grid, evaluate_alignment
    from perfusion_ray.evaluation.reward_model import evaluate_reward_models
    from perfusion_ray.report import ReportInputs, write_report
    from perfusion_ray.runtime import machine
    from perfusion_ray.storage import atomic_write_json, replace_directory
    from perfusion_ray.evaluation.judge import judge_out
    from perfusion_ray.train.reward_model import train_reward_model
    from perfusion_ray.world.environment import fashionworld_environment
    from perfusion_ray.world.simulator import build_world

    started = time.perf_counter()
    config = quick_config(config) if quick else config
    if through_endpoints:
        config = endpoint_config(config)
    config = config.with_absolute_paths()
    out = Path(out).absolute()
    stages = Stages(7)
    metrics: dict[str, float] = {}
    with stages.stage("simulate", "simulate FashionWorld"):
        fresh_store(config, out)
        world = build_world(config)
        environment = fashionworld_environment(config, world)
        ceilings = simulate_before_the_loop(config, world)
    with stages.stage("ingest", "ingest (Ray Data)"):
        ingest_both_splits(config)
    with stages.stage("rm_train", "train the reward model and the judge (Ray Train + DeepSpeed)"):
        rm_report = train_reward_model(config)
        train_reward_model(config, split="holdout", out=judge_out(config))
    with stages.stage("rm_eval", "evaluate the reward model"):
        evaluation = evaluate_reward_models(config, rm_report.model_dir, None, environment.oracle)
        metrics.update(evaluation.flat_metrics())
    feed = EndpointFeed(config, world, out) if through_endpoints else \
        LiveFeed(config, world, live_hours(config), config.online.live_interval_s)
    source = "simulated merchants use the design endpoint" if through_endpoints else "feedback arrives"
    with stages.stage("online", f"serve the RM and run {config.online.rounds} online rounds while {source}"):
        feed.begin(rm_report.model_dir)
        try:
            online = run_online(config, rm_dir=rm_report.model_dir)
        finally:
            metrics.update(feed.end())
    with stages.stage("align_eval", "evaluate base vs aligned on held-out requests"):
        alignment = evaluate_alignment(config, online.pipeline_dir, out / "eval", environment=environment)
        metrics.update(alignment.metrics)
        grids = dict([_showcase_grid(config, online.pipeline_dir, world)])
        grids["held-out requests: K base images | K aligned images per row (seen merchants, then cold-start)"] = \
            comparison_grid(alignment, config.align.eval.images_per_request)
    with stages.stage("report", "write the report"):
        replace_directory(online.pipeline_dir, out / "pipeline")
        metrics.update({"online.rounds": float(online.rounds), "online.fresh_partitions": float(len(online.consumed_partitions)),
                        "world.oracle_gauc.train": ceilings["train"], "world.oracle_gauc.holdout": ceilings["holdout"]})
        metrics.update({f"online.{key}.last": float(online.history[-1][key]) for key in ("rm_reward", "oracle_utility")
                        if key in online.history[-1]})
        metrics.update({f"demo.seconds.{key}": s for key, s in stages.seconds.items()})
        metrics["demo.seconds"] = time.perf_counter() - started
        notes = [f"{config.world.num_merchants} merchants ({int(world.merchants.cold_start.sum())} cold-start), "
                 f"{config.world.hours} hours of feedback",
                 feed.describe(len(online.consumed_partitions)),
                 f"{online.rounds} online rounds; reward model {online.rm_version}; pipeline saved to {out / 'pipeline'}",
                 online.stopped or (f"shipped the averaged policy of round {online.best_probe_round}, the best on the "
                                    f"probe set" if online.best_probe_round >= 0 else "shipped the last average"),
                 f"total {metrics['demo.seconds'] / 60:.1f} min{' (--quick)' if quick else ''}"]
        write_report(ReportInputs(metrics, evaluation.table, online.history, stages.titled(), grids, notes, machine()),
                     out)
        atomic_write_json(out / "metrics.json", dict(sorted(metrics.items())))
    return metrics


def endpoint_config(config: PerfusionConfig) -> PerfusionConfig:
    """--through-endpoints: no held-back hours (the endpoint makes the fresh feedback), every fresh file
    each round (a request's impressions and its feedback are separate files that must meet in one
    ingest run), and the design endpoint rolled to the policy after every round."""
    raw = config.model_dump(mode="json")
    raw["online"].update(live_hours=0, partitions_per_round=0, publish_every=1)
    return PerfusionConfig.model_validate(raw)
