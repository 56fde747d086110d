"""Ingest under fuzzing: mutated partitions and images (bit flips, truncation, type changes, renamed columns
and the named shapes of damage) through both engines. Nothing escapes, rows read = grouped + quarantined in
every run, both engines write the same groups and quarantine, and a good partition after each round becomes
its groups. A larger run: `.venv/bin/python -m benchmarks.ingest_fuzz`."""

from __future__ import annotations

import pytest

from perfusion_ray.config import load_config
from perfusion_ray.world.simulator import simulate
from tests.conftest import TINY_OVERRIDES
from tests.ingest_fuzzing import fuzz
from tests.partition_mutations import MUTATIONS

ROUNDS, FILES_PER_ROUND = 3, 10


@pytest.mark.ray
def test_mutated_partitions_never_stop_ingest_and_both_engines_agree(ray_cluster, tmp_path):
    base = tmp_path / "base"
    config = load_config(None, TINY_OVERRIDES + [f"data.root={base}"])
    simulate(config, "train", progress=False)

    report = fuzz(str(base), tmp_path / "stores", config, ROUNDS, FILES_PER_ROUND, seed=7)

    assert report.failures == []
    assert report.files_mutated >= ROUNDS * FILES_PER_ROUND
    assert report.ingest_runs == 1 + 2 * ROUNDS and report.rows_read > 0
    assert report.outcomes["files quarantined whole"] > 0 and report.outcomes["rows quarantined"] > 0
    assert set(name for shape in report.shapes for name in shape.split("+")) <= set(MUTATIONS)
