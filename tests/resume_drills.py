"""Resume drills shared by tests/test_resume_kills.py and benchmarks/faults.py: one Ray Train worker of
`rm train`, `align train --offline` or the online rounds dies once at a named moment (faults.py), Ray Train
restarts the workers from the last checkpoint it registered, and the run must still finish with what an
uninterrupted run has: the same exactly-once counters (groups trained, steps, rounds, consumed partitions)
and a quality figure within the run-to-run spread.

Moments, each in the second epoch / step / round (so a checkpoint before it exists):
  ...:trained / optimized   before the checkpoint: the optimizer steps are done, nothing is saved yet;
  ...:saved                 during the checkpoint: every file is written locally, the report not yet made;
  ...:reported              right after it: this rank's report is made, Ray Train may not have registered it
                            (it counts once every rank's report is polled), so the checkpoint may be lost.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from perfusion_ray.config import PerfusionConfig, load_config
from perfusion_ray.faults import FAULT_ENV, FAULT_ONCE_ENV
from tests.conftest import TINY_OVERRIDES

RM_EPOCHS, OFFLINE_STEPS, ONLINE_ROUNDS = 3, 3, 2
RM_MOMENTS = ("rm:epoch2:trained", "rm:epoch2:saved", "rm:epoch2:reported")
OFFLINE_MOMENTS = ("align:step2:trained", "align:step2:saved", "align:step2:reported")
ONLINE_MOMENTS = ("online:round1:optimized", "online:round1:saved", "online:round1:reported")
# How far a resumed run's quality figure may sit from the uninterrupted run's: a few times what resumed runs
# of these tiny configs differed by (validation GAUC 0.0125: one pair of 80 ranked the other way; mean round
# reward 5e-5 of 12.9). The offline run resumes exactly (same batches in the same order, noise seeded by the
# step): its final loss moved by 5e-6, so a resume that retrains or skips a batch shows.
# benchmarks/faults.py --resume-seeds prints the spread over seeds.
RM_GAUC_SPREAD, OFFLINE_LOSS_SPREAD, ONLINE_REWARD_SPREAD = 0.05, 1e-3, 0.05
# In the test suite each run is killed at one moment, the three runs covering the three moments between them;
# benchmarks/faults.py kills each run at every moment.
SUITE_MOMENTS = {"rm": "rm:epoch2:trained", "offline": "align:step2:saved", "online": "online:round1:reported"}
# The index (epoch, step or rounds done) a moment's checkpoint holds, 1-based like the state's counters.
KILLED_AT = 2


def reported_before_kill(moment: str) -> int:
    """The latest checkpoint a worker had reported when it died at `moment` (Ray Train may not have it)."""
    return KILLED_AT if moment.endswith(":reported") else KILLED_AT - 1


@contextmanager
def killed_once(moment: str | None, folder: Path):
    """While inside, the first Ray Train worker to reach `moment` dies (None: nobody does); yields the marker
    file that records the kill. Workers read the variables when their trainer is built (train/distributed.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "worker-killed"
    saved = {key: os.environ.get(key) for key in (FAULT_ENV, FAULT_ONCE_ENV)}
    if moment:
        os.environ[FAULT_ENV], os.environ[FAULT_ONCE_ENV] = moment, str(marker)
    try:
        yield marker
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Drill:
    """What one run did: whether the kill fired, whether the run finished, its exactly-once counters (from the
    final checkpoint's state.json) and quality figure, and, for the rounds, the partitions it consumed."""

    run: str
    moment: str  # "" for the uninterrupted run
    out: Path  # the run's output folder
    killed: bool
    finished: bool
    error: str = ""
    counts: dict = field(default_factory=dict)
    metric: float = float("nan")
    restored_from: int | None = None  # the epoch / step / round the restarted workers resumed from
    consumed: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def consumed_twice(self) -> int:
        return sum(count - 1 for count in Counter(self.consumed).values() if count > 1)

    @property
    def lost(self) -> int:
        return len(set(self.expected) - set(self.consumed))

    @property
    def checkpoint_lost(self) -> bool:
        """The last checkpoint reported before the kill was not registered: the restart resumed from an earlier one."""
        return self.restored_from is not None and self.restored_from < reported_before_kill(self.moment)


def _final_state(run_folder: Path, progress: str) -> dict:
    states = [json.loads(path.read_text()) for path in run_folder.glob("checkpoint_*/state.json")]
    return max(states, key=lambda state: state[progress]) if states else {}


def _uploaded_checkpoints(run_folder: Path, progress: str, index: int) -> int:
    """How many checkpoint folders hold state `index`: 2 when a reported checkpoint was lost and redone."""
    return sum(json.loads(path.read_text())[progress] == index for path in run_folder.glob("checkpoint_*/state.json"))


def _drill(run: str, moment: str | None, out: Path, action) -> tuple[Drill, object]:
    started = time.perf_counter()
    with killed_once(moment, out) as marker:
        try:
            result, error = action(), ""
        except Exception as exc:  # noqa: BLE001 - a run that does not finish is the figure, not a crash
            result, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    drill = Drill(run, moment or "", out, marker.is_file(), result is not None, error,
                  seconds=time.perf_counter() - started)
    return drill, result


# ---------------------------------------------------------------- rm train
def rm_config(folder: Path, seed: int = 0) -> PerfusionConfig:
    # 6 hours and a 30% validation share: a validation GAUC over about 40 groups, not 6 (coarse steps of 1/12).
    return load_config(None, TINY_OVERRIDES + [f"data.root={folder / 'data'}", "world.hours=6",
                                               "rm.validation_fraction=0.3", f"rm.epochs={RM_EPOCHS}",
                                               "rm.batch_groups=8", f"rm.seed={seed}"])


def prepare_rm_store(folder: Path) -> None:
    from perfusion_ray.data.ingest import ingest
    from perfusion_ray.world.simulator import simulate

    config = rm_config(folder)
    simulate(config, "train", progress=False)
    ingest(config, "train", engine="local")


def rm_drill(store: Path, out: Path, moment: str | None = None, seed: int = 0) -> Drill:
    from perfusion_ray.train.reward_model import RUN_NAME, train_reward_model

    config = rm_config(store, seed)
    config.rm.out = str(out)
    drill, report = _drill("rm train", moment, out, lambda: train_reward_model(config))
    if report is not None:
        state = _final_state(out / "ray_results" / RUN_NAME, "epoch")
        drill.counts = {"epochs": state["epoch"], "groups_trained": state["groups_trained"]}
        drill.metric, drill.restored_from = report.best_val_gauc, report.resumed_from_epoch
        drill.finished = report.epochs == RM_EPOCHS
    return drill


# ---------------------------------------------------------------- align train --offline
def offline_config(folder: Path, seed: int = 0) -> PerfusionConfig:
    return load_config(None, TINY_OVERRIDES + [f"data.root={folder / 'data'}", "align.batch_groups=2",
                                               f"align.max_steps={OFFLINE_STEPS}", "align.checkpoint_every=1",
                                               f"align.seed={seed}"])


def prepare_offline_store(folder: Path) -> None:
    prepare_rm_store(folder)  # the same logged train groups


def offline_drill(store: Path, out: Path, moment: str | None = None, seed: int = 0) -> Drill:
    from perfusion_ray.train.align_offline import RUN_NAME, train_alignment

    config = offline_config(store, seed)
    config.align.out = str(out)
    drill, report = _drill("align train --offline", moment, out, lambda: train_alignment(config))
    if report is not None:
        state = _final_state(out / "ray_results" / RUN_NAME, "step")
        drill.counts = {"steps": state["step"], "groups": state["groups"], "groups_used": state["groups_used"],
                        "denoiser_passes": state["passes"]}
        drill.metric, drill.restored_from = report.final_loss, report.resumed_from_step
        drill.finished = report.steps == OFFLINE_STEPS
    return drill


# ---------------------------------------------------------------- the online rounds
def online_overrides(folder: Path, port: int, seed: int = 0) -> list[str]:
    return TINY_OVERRIDES + [
        "world.hours=6", f"data.root={folder / 'data'}", f"online.out={folder / 'online'}",
        f"online.rounds={ONLINE_ROUNDS}", "online.requests_per_round=2", "online.steps_per_round=1",
        "online.partitions_per_round=1", "online.rm_refresh_every=2", "align.batch_groups=2", "align.warmup_steps=0",
        "policy.num_inference_steps=3", f"serve.port={port}", "serve.app_name=resume-reward",
        "serve.route_prefix=/resume-reward", f"online.seed={seed}",
    ]


def prepare_rounds_store(folder: Path, overrides: list[str]) -> list[str]:
    """3 hours ingested before the loop, 3 fresh hours waiting, an untrained RM to serve; returns the fresh
    partition files, oldest first."""
    from perfusion_ray.data.ingest import ingest
    from perfusion_ray.data.store import StoreLayout, list_partition_files
    from perfusion_ray.train.reward_model import export_untrained
    from perfusion_ray.world.simulator import build_world, simulate

    config = load_config(None, overrides)
    world = build_world(config)
    simulate(config, "train", world, progress=False, hours=range(3))
    ingest(config, "train", engine="local")
    simulate(config, "train", world, progress=False, hours=range(3, 6))
    export_untrained(config, folder / "rm" / "model")
    layout = StoreLayout(config.data.root, "train")
    consumed = set(json.loads(Path(layout.watermark).read_text())["consumed"])
    return [name for name in list_partition_files(layout) if name not in consumed]


def prepare_online_store(folder: Path, port: int) -> list[str]:
    """prepare_rounds_store for the drills (an uninterrupted run consumes the first ONLINE_ROUNDS fresh files)."""
    return prepare_rounds_store(folder, online_overrides(folder, port))


def online_drill(template: Path, fresh: list[str], folder: Path, port: int, moment: str | None = None,
                 seed: int = 0) -> Drill:
    """The rounds on a copy of the prepared store (each run consumes the same fresh partitions)."""
    from perfusion_ray.coordinator import RUN_NAME, run_online

    shutil.copytree(template, folder)
    config = load_config(None, online_overrides(folder, port, seed))
    drill, report = _drill("online rounds", moment, folder,
                           lambda: run_online(config, rm_dir=folder / "rm" / "model", progress=False))
    drill.expected = fresh[:ONLINE_ROUNDS]
    if report is not None:
        run_folder = folder / "online" / "ray_results" / RUN_NAME
        state = _final_state(run_folder, "round")
        drill.counts = {"rounds": state["round"], "steps": state["steps"],
                        "history": [m["round"] for m in state["history"]], "consumed_runs": len(state["consumed_runs"]),
                        "distinct_consumed_runs": len(set(state["consumed_runs"]))}
        drill.consumed = list(report.consumed_partitions)
        drill.metric = float(report.history[-1]["rm_reward"])
        redone = _uploaded_checkpoints(run_folder, "round", KILLED_AT) > 1
        drill.restored_from = (KILLED_AT - 1 if redone or not moment.endswith(":reported") else KILLED_AT) \
            if moment and drill.killed else None
        drill.finished = report.rounds == ONLINE_ROUNDS
    return drill
