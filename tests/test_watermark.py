"""Exactly once: a crash at any step of ingest, then a rerun (with new partitions arriving meanwhile),
ends with the same consumed files and the same group examples as a run that never crashed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

from perfusion_ray.config import load_config
from perfusion_ray.data.ingest import ingest
from perfusion_ray.data.store import StoreLayout, list_partition_files
from perfusion_ray.data.watermark import Watermark
from perfusion_ray.faults import FAULT_ENV, FAULT_EXIT_CODE
from perfusion_ray.world.simulator import simulate
from tests.conftest import TINY_OVERRIDES


def _config(root, hours: int):
    return load_config(None, TINY_OVERRIDES + [f"data.root={root}", f"world.hours={hours}"])


def _outcome(root) -> tuple[set[str], Counter, int]:
    layout = StoreLayout(str(root), "train")
    requests = Counter(r for f in layout.output_files("groups") for r in pq.read_table(f)["request_id"].to_pylist())
    quarantined = sum(pq.read_metadata(f).num_rows for f in layout.output_files("quarantine"))
    return Watermark.load(layout.watermark).consumed, requests, quarantined


def _ingest_cli(root, engine: str, env: dict, fault: str | None) -> int:
    env = dict(env)
    if fault:
        env[FAULT_ENV] = fault
    command = [sys.executable, "-m", "perfusion_ray.cli", "data", "ingest", "--split", "train", "--engine", engine]
    for item in TINY_OVERRIDES + [f"data.root={root}", "world.hours=3"]:
        command += ["--set", item]
    return subprocess.run(command, env=env, capture_output=True, timeout=300).returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: ingest 3 hours, 1 more hour arrives, ingest again."""
    root = tmp_path_factory.mktemp("reference")
    simulate(_config(root, 3), "train", progress=False)
    ingest(_config(root, 3), "train", engine="local")
    simulate(_config(root, 4), "train", progress=False)
    ingest(_config(root, 4), "train", engine="local")
    return root, _outcome(root)


@pytest.mark.parametrize("engine, step", [
    ("local", "ingest:written"),
    ("local", "ingest:committed"),
    ("local", "ingest:watermarked"),
    pytest.param("ray", "ingest:committed", marks=pytest.mark.ray),
])
def test_crash_then_rerun_consumes_every_partition_exactly_once(reference, subprocess_env, tmp_path, engine, step):
    reference_root, (consumed, requests, quarantined) = reference
    root = tmp_path / "store"
    simulate(_config(root, 3), "train", progress=False)
    assert _ingest_cli(root, engine, subprocess_env, fault=step) == FAULT_EXIT_CODE
    simulate(_config(root, 4), "train", progress=False)  # a new hour lands while the ingest is down
    assert _ingest_cli(root, engine, subprocess_env, fault=None) == 0
    assert _outcome(root) == (consumed, requests, quarantined)
    assert set(consumed) == set(list_partition_files(StoreLayout(str(root), "train")))
    assert max(requests.values()) == 1  # no group counted twice


def test_rerun_with_nothing_new_changes_nothing(reference, tmp_path):
    reference_root, expected = reference
    root = tmp_path / "copy"
    shutil.copytree(reference_root, root)
    report = ingest(_config(root, 4), "train", engine="local")
    assert report.run_id is None and not report.recovered_runs
    assert _outcome(root) == expected
