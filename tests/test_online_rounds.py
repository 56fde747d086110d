"""`perfusion align` (the online rounds) as a user runs it: a real subprocess with its own local Ray cluster,
Serve endpoint and Ray Train workers. A crash of the coordinator after it ingested the next round's
partitions must lose none of them and consume none twice: after `--resume` the consumed partitions are
exactly those of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from perfusion_ray.data.store import StoreLayout
from perfusion_ray.faults import FAULT_ENV
from tests.conftest import TINY_OVERRIDES, free_port
from tests.resume_drills import prepare_rounds_store

pytestmark = pytest.mark.ray

ROUNDS = 2
PERFUSION = Path(sys.executable).with_name("perfusion")


def _overrides(folder: Path, port: int) -> list[str]:
    return TINY_OVERRIDES + [
        "world.hours=6", f"data.root={folder / 'data'}", f"rm.out={folder / 'rm'}", f"online.out={folder / 'online'}",
        f"online.rounds={ROUNDS}", "online.requests_per_round=2", "online.steps_per_round=1",
        "online.partitions_per_round=1", "online.rm_refresh_every=2", "align.batch_groups=2", "align.warmup_steps=0",
        "policy.num_inference_steps=3", f"serve.port={port}", "cluster.num_cpus=4",
    ]


def _align(overrides: list[str], *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", FAULT_ENV)}
    if fault:
        env[FAULT_ENV] = fault
    command = [str(PERFUSION), "align", *extra]
    for item in overrides:
        command += ["--set", item]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _final_state(online_out: Path) -> dict:
    checkpoints = sorted(p for p in (online_out / "ray_results" / "align-online").glob("checkpoint_*") if p.is_dir())
    assert checkpoints, f"no round checkpoint under {online_out}"
    return json.loads((checkpoints[-1] / "state.json").read_text())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("online")
    overrides = _overrides(folder / "uninterrupted", free_port())
    fresh = prepare_rounds_store(folder / "uninterrupted", overrides)
    shutil.copytree(folder / "uninterrupted", folder / "crashed")
    return folder, fresh


@pytest.fixture(scope="module")
def uninterrupted(prepared):
    folder, _ = prepared
    run = _align(_overrides(folder / "uninterrupted", free_port()))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return run, _final_state(folder / "uninterrupted" / "online")


def test_online_rounds_consume_fresh_partitions_in_order_and_export_a_pipeline(prepared, uninterrupted):
    folder, fresh = prepared
    run, state = uninterrupted
    assert state["round"] == ROUNDS
    assert state["consumed_partitions"] == fresh[:ROUNDS]  # one per round, oldest first
    assert [m["round"] for m in state["history"]] == list(range(ROUNDS))
    assert state["rm_version"].startswith("refreshed-round0001@")  # refreshed on the fresh groups and rolled out
    online = folder / "uninterrupted" / "online"
    assert (online / "pipeline" / "model_index.json").is_file()
    assert list((online / "tensorboard").glob("events.out.tfevents.*"))
    assert "rounds in" in run.stdout


def test_resume_after_a_coordinator_crash_consumes_the_same_partitions(prepared, uninterrupted):
    folder, fresh = prepared
    overrides = _overrides(folder / "crashed", free_port())
    # The coordinator dies right after committing round 1's ingest (prefetched while round 0 trains),
    # before any round checkpoint names it: the partition is ingested but not yet consumed.
    crashed = _align(overrides, fault="online:round1:ingested")
    assert crashed.returncode != 0
    layout = StoreLayout(str(folder / "crashed" / "data"), "train")
    assert len(layout.committed_runs()) == 3, "the crash must come after round 1's ingest committed"

    resumed = _align(overrides, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    state = _final_state(folder / "crashed" / "online")
    assert state["consumed_partitions"] == uninterrupted[1]["consumed_partitions"] == fresh[:ROUNDS]
    assert len(set(state["consumed_runs"])) == len(state["consumed_runs"]) == ROUNDS
    assert [m["round"] for m in state["history"]] == list(range(ROUNDS))
