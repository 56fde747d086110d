"""The seam between the framework and any world: only the place that picks the environment knows
FashionWorld; a store on its own supplies the rounds' requests from its logged traffic; a config without a
world runs everything but `world simulate`, which says so in one line."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from perfusion_ray.cli import main
from perfusion_ray.config import REPO_ROOT, load_config
from perfusion_ray.data.ingest import ingest
from perfusion_ray.data.logged_requests import LoggedRequests
from perfusion_ray.environment import build_environment
from perfusion_ray.errors import PerfusionError
from perfusion_ray.world.simulator import simulate
from tests.conftest import TINY_OVERRIDES

ALLOWED = {"environment.py", "demo.py"}  # the place that picks the environment, and the demo


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_nothing_outside_world_imports_world_but_the_environment_picker_and_the_demo():
    package = REPO_ROOT / "perfusion_ray"
    offenders = [str(path.relative_to(package)) for path in package.rglob("*.py")
                 if "world" not in path.relative_to(package).parts[:1] and path.name not in ALLOWED
                 and any(name == "perfusion_ray.world" or name.startswith("perfusion_ray.world.")
                         for name in _imported_modules(path))]
    assert offenders == []


def test_a_config_without_a_world_refuses_world_simulate_in_one_line(tmp_path, capsys):
    config = tmp_path / "store.yaml"
    config.write_text(f"data:\n  root: {tmp_path / 'store'}\n")
    assert load_config(config).world is None
    assert main(["world", "simulate", "--config", str(config)]) == 2
    error = capsys.readouterr().err.splitlines()
    assert error[0] == "error: `perfusion world simulate` needs a world: this config has no `world:` section"
    assert error[1].startswith("hint:") and len(error) == 2
    assert build_environment(load_config(config)).oracle is None


@pytest.fixture
def logged_store(tmp_path):
    config = load_config(None, TINY_OVERRIDES + [f"data.root={tmp_path / 'data'}", "world.hours=4"])
    simulate(config, "train", progress=False)
    ingest(config, "train", engine="local")
    return config


def test_logged_requests_come_from_the_store_in_proportion_to_traffic_within_the_window(logged_store):
    import pyarrow.parquet as pq

    from perfusion_ray.data.store import StoreLayout

    layout = StoreLayout(logged_store.data.root, "train")
    logged = [row for path in layout.output_files("groups")
              for row in pq.read_table(path, columns=["merchant_id", "prompt", "event_time"]).to_pylist()]
    newest = max(row["event_time"] for row in logged)
    source = LoggedRequests(logged_store.data.root, window_hours=2, seed=0)
    pool = source.pool()
    assert pool and all((newest - row["event_time"]).total_seconds() <= 2 * 3600 for row in pool)
    assert len(pool) < len(logged)  # the oldest hours fall out of the window
    requests = source.requests(3, 2000)
    assert requests == source.requests(3, 2000)  # the same round asks the same
    assert requests != source.requests(4, 2000)
    asked = Counter(r.merchant.id for r in requests)
    traffic = Counter(row["merchant_id"] for row in pool)
    assert set(asked) <= set(traffic)
    expected = np.array([traffic[m] / len(pool) for m in sorted(traffic)])
    observed = np.array([asked[m] / len(requests) for m in sorted(traffic)])
    assert np.abs(expected - observed).max() < 0.05
    prompts = {(row["merchant_id"], row["prompt"]) for row in pool}
    assert all((r.merchant.id, r.prompt) in prompts for r in requests)


def test_the_store_environment_draws_logged_requests_even_when_asked_on_a_world(logged_store):
    logged_store.online.request_source = "logged"
    environment = build_environment(logged_store)
    assert environment.oracle is not None  # the world's oracle still monitors
    assert isinstance(environment.request_source, LoggedRequests)


def test_logged_requests_on_an_empty_store_are_a_clear_error(tmp_path):
    with pytest.raises(PerfusionError, match="no logged requests"):
        LoggedRequests(str(tmp_path / "empty"), 24).requests(0, 4)


def test_the_fashionworld_oracle_refuses_merchants_of_another_world(logged_store):
    from perfusion_ray.records import Merchant

    oracle = build_environment(logged_store).oracle
    images = np.zeros((1, 32, 32, 3), np.uint8)
    assert oracle.utility([Merchant("m0000")], images).shape == (1,)
    with pytest.raises(PerfusionError, match="shop-b3"):
        oracle.utility([Merchant("shop-b3")], images)


def test_evaluation_takes_requests_per_split_round_robin_over_merchants(tmp_path):
    from perfusion_ray.evaluation.alignment import evaluation_requests

    config = load_config(None, TINY_OVERRIDES + [f"data.root={tmp_path / 'data'}", "world.hours=4",
                                                 "world.holdout_requests_per_merchant=6"])
    for split in ("train", "holdout"):
        simulate(config, split, progress=False)
        ingest(config, split, engine="local")
    environment = build_environment(config)
    config.align.eval.requests_per_split = 10
    picked = evaluation_requests(config, environment)
    assert int((~picked.cold).sum()) == 10 and int(picked.cold.sum()) == 10
    per_merchant = Counter(r.merchant.id for r in picked.requests)
    cold_counts = [n for r, n in per_merchant.items() if r in {q.merchant.id for q, c in zip(picked.requests, picked.cold) if c}]
    assert max(cold_counts) - min(cold_counts) <= 1  # spread evenly over the cold-start merchants
    assert all(environment.prompt_is_open(r.prompt) for r in picked.requests)
    assert [r.request_id for r in picked.requests] == sorted(r.request_id for r in picked.requests)
