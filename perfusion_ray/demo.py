"""`perfusion demo`: the whole loop on the embedded default, end to end, with nothing but the repo.

simulate FashionWorld feedback (the last online.live_hours hours held back) -> ingest (Ray Data) -> train
and evaluate the RM -> serve it -> online rounds while the held-back hours arrive in the store one by
one -> evaluate base vs aligned on held-out requests -> out/report.md, out/report.html, out/metrics.json
and out/pipeline (the saved PerFusionPipeline).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from perfusion_ray.config import PerfusionConfig

# --quick: the same stages on a world small enough for a smoke run of a few minutes.
QUICK_OVERRIDES = {
    "world": {"hours": 8, "requests_per_hour": 40, "holdout_requests_per_merchant": 4},
    "rm": {"epochs": 2},
    "online": {"rounds": 2, "requests_per_round": 8, "steps_per_round": 8, "live_hours": 2, "live_interval_s": 10.0,
               "partitions_per_round": 1, "rm_refresh_every": 2},
    "align": {"eval": {"requests_per_merchant": 1}},
}


def quick_config(config: PerfusionConfig) -> PerfusionConfig:
    raw = config.model_dump(mode="json")
    for section, values in QUICK_OVERRIDES.items():
        for name, value in values.items():
            if isinstance(value, dict):
                raw[section][name].update(value)
            else:
                raw[section][name] = value
    return PerfusionConfig.model_validate(raw)


@dataclass
class Stages:
    """Wall time per stage, printed as the demo goes."""

    seconds: dict[str, float] = field(default_factory=dict)
    total: int = 7

    @contextmanager
    def stage(self, name: str):
        print(f"\n[demo {len(self.seconds) + 1}/{self.total}] {name}", flush=True)
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started
        print(f"[demo] {name}: {self.seconds[name]:.0f}s", flush=True)


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

    def stop(self) -> None:
        self._stop_event.set()
        self.join()



def _showcase_grid(config: PerfusionConfig, pipeline_dir: Path, world) -> tuple[str, object]:
    """Several merchants (seen and cold-start, different segments) on one open prompt and one seed."""
    import numpy as np

    from perfusion_ray.models.base import load_base
    from perfusion_ray.models.pipeline import PerFusionPipeline
    from perfusion_ray.evaluation.alignment import same_prompt_grid
    from perfusion_ray.world.catalogue import prompt_text

    population = world.merchants
    picked, segments = [], set()
    for cold in (False, True):
        for i in np.flatnonzero(population.cold_start == cold):
            if population.segments[i] not in segments or len(picked) < 2 + 3 * cold:
                segments.add(population.segments[i])
                picked.append(int(i))
            if len(picked) >= 3 + 3 * cold:
                break
    records = [{"merchant_id": population.ids[i], "merchant_features": dict(population.features[i]),
                "merchant_stats": dict(population.stats[i])} for i in picked]
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
        print(f"  {split}: {report.counts.groups} groups, {report.counts.rows_quarantined} rows quarantined "
              f"with reasons, {report.counts.files_quarantined} files quarantined")


def live_hours(config: PerfusionConfig) -> list[int]:
    """The hours of the training stream that arrive while the online rounds run."""
    return list(range(config.world.hours - config.online.live_hours, config.world.hours))


def run_demo(config: PerfusionConfig, quick: bool = False, out: Path = Path("out")) -> dict:
    """Every stage of the module docstring; returns the flat metrics written to out/metrics.json."""
    from perfusion_ray.coordinator import run_online
    from perfusion_ray.evaluation.alignment import comparison_grid, evaluate_alignment
    from perfusion_ray.evaluation.reward_model import evaluate_reward_models
    from perfusion_ray.report import ReportInputs, write_report
    from perfusion_ray.runtime import machine
    from perfusion_ray.storage import atomic_write_json, replace_directory
    from perfusion_ray.train.reward_model import train_reward_model
    from perfusion_ray.world.simulator import build_world

    started = time.perf_counter()
    config = quick_config(config) if quick else config
    out = Path(out).absolute()
    stages = Stages()
    metrics: dict[str, float] = {}
    live = config.online.live_hours
    with stages.stage("simulate FashionWorld"):
        fresh_store(config, out)
        world = build_world(config)
        ceilings = simulate_before_the_loop(config, world)
    with stages.stage("ingest (Ray Data)"):
        ingest_both_splits(config)
    with stages.stage("train the reward model (Ray Train + DeepSpeed)"):
        rm_report = train_reward_model(config)
    with stages.stage("evaluate the reward model"):
        evaluation = evaluate_reward_models(config, rm_report.model_dir, None)
        metrics.update(evaluation.flat_metrics())
    with stages.stage(f"serve the RM and run {config.online.rounds} online rounds while feedback arrives"):
        feed = LiveFeed(config, world, live_hours(config), config.online.live_interval_s)
        feed.start()
        try:
            online = run_online(config, rm_dir=rm_report.model_dir)
        finally:
            feed.stop()
        if feed.error:
            raise feed.error
    with stages.stage("evaluate base vs aligned on held-out requests"):
        alignment = evaluate_alignment(config, online.pipeline_dir, out / "eval")
        metrics.update(alignment.metrics)
        grids = dict([_showcase_grid(config, online.pipeline_dir, world)])
        grids["held-out requests: K base images | K aligned images per row (seen merchants, then cold-start)"] = \
            comparison_grid(alignment, config.align.eval.images_per_request)
    with stages.stage("write the report"):
        replace_directory(online.pipeline_dir, out / "pipeline")
        metrics.update({"online.rounds": float(online.rounds), "online.fresh_partitions": float(len(online.consumed_partitions)),
                        "online.live_partitions_written": float(len(feed.written)),
                        "world.oracle_gauc.train": ceilings["train"], "world.oracle_gauc.holdout": ceilings["holdout"]})
        metrics.update({f"online.{key}.last": float(online.history[-1][key]) for key in ("rm_reward", "oracle_utility")})
        metrics.update({f"demo.seconds.{name.split(' ')[0]}": s for name, s in stages.seconds.items()})
        metrics["demo.seconds"] = time.perf_counter() - started
        notes = [f"{config.world.num_merchants} merchants ({int(world.merchants.cold_start.sum())} cold-start), "
                 f"{config.world.hours} hours of feedback of which {live} arrived during the online rounds "
                 f"({len(feed.written)} written, {len(online.consumed_partitions)} fresh partitions consumed by "
                 f"{online.rounds} rounds)",
                 f"reward model {online.rm_version}; pipeline saved to {out / 'pipeline'}",
                 f"total {metrics['demo.seconds'] / 60:.1f} min{' (--quick)' if quick else ''}"]
        write_report(ReportInputs(metrics, evaluation.table, online.history, stages.seconds, grids, notes, machine()),
                     out)
        atomic_write_json(out / "metrics.json", dict(sorted(metrics.items())))
    return metrics
