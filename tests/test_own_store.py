"""A feedback store written by another program, end to end through the command line as a platform team runs
it: a config with no world, other merchant ids and feature names, prompts such as "a dress", tastes over
continuous hue and brightness. Every command runs; the rounds ask the store's own merchants; evaluation
works without an oracle (a judge trained on held-out feedback); the endpoints serve the store's merchants.
Bad stores fail in one line that names the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from perfusion_ray.cli import main
from perfusion_ray.data.store import StoreLayout
from tests.conftest import free_port
from tests.foreign_store import generate

pytestmark = pytest.mark.ray

SMALL = {"data": {"shuffle_blocks": 2},
         "rm": {"epochs": 2, "batch_groups": 4},
         "policy": {"num_inference_steps": 3},
         "align": {"max_steps": 2, "batch_groups": 2, "warmup_steps": 0, "checkpoint_every": 2,
                   "eval": {"requests_per_merchant": 1, "images_per_request": 2}},
         "online": {"rounds": 2, "requests_per_round": 2, "steps_per_round": 1, "partitions_per_round": 1,
                    "rm_refresh_every": 2},
         "cluster": {"num_cpus": 4}}


def _write_config(folder: Path, **sections) -> Path:
    raw = json.loads(json.dumps(SMALL))
    raw["data"].update(root=str(folder / "store"))
    raw["rm"]["out"], raw["align"]["out"], raw["online"]["out"] = (str(folder / name) for name in ("rm", "align", "online"))
    raw["serve"] = {"port": free_port(), "app_name": "own-reward", "route_prefix": "/own-reward"}
    raw["design"] = {"app_name": "own-design", "route_prefix": "/own-design"}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = folder / "store.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_merchants(root: Path) -> set[str]:
    layout = StoreLayout(str(root), "train")
    return {m for f in layout.output_files("groups") for m in pq.read_table(f)["merchant_id"].to_pylist()}


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_cluster):
    folder = tmp_path_factory.mktemp("own")
    report = generate(str(folder / "store"), "tiny", seed=0)
    return folder, report, _write_config(folder)


def test_the_whole_chain_runs_on_a_store_that_is_not_fashionworld(store, capsys, monkeypatch, ray_cluster):
    from ray import serve

    from perfusion_ray.records import Merchant
    from perfusion_ray.serve.client import RewardClient
    from perfusion_ray.serve.design_client import DesignClient

    folder, report, config = store
    args = ["--config", str(config)]
    assert main(["data", "ingest", *args]) == 0
    assert main(["rm", "train", "--judge", *args]) == 0
    assert (folder / "rm" / "model" / "config.json").is_file() and (folder / "rm" / "judge" / "model").is_dir()
    capsys.readouterr()
    assert main(["rm", "eval", *args]) == 0
    table = capsys.readouterr().out
    assert "perfusion_rm (cold)" in table and "clip_zero_shot (seen)" in table and "oracle" not in table
    metrics = json.loads((folder / "rm" / "metrics.json").read_text())
    assert {"rm.gauc.seen", "rm.gauc.cold", "rm.gauc.random.cold"} <= set(metrics)

    assert main(["align", "train", "--offline", *args]) == 0
    try:
        assert main(["align", *args]) == 0
        asked = [json.loads(line) for line in (folder / "online" / "requests.jsonl").read_text().splitlines()]
        assert len(asked) == 2 * 2 and {a["merchant_id"] for a in asked} <= _train_merchants(folder / "store")
        assert all(a["merchant_id"].startswith("shop-") for a in asked)

        assert main(["align", "eval", "--pipeline", str(folder / "online" / "pipeline"), *args]) == 0
        evaluation = json.loads((folder / "align" / "eval" / "metrics.json").read_text())
        assert "align.judge.win_rate.seen" in evaluation and "align.judge.win_rate.cold" in evaluation
        assert not any(key.startswith("align.oracle") for key in evaluation)

        monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
        assert main(["serve", "--app", "design", "--detach", "--model", str(folder / "online" / "pipeline"), *args]) == 0
        settings = yaml.safe_load(config.read_text())
        url = f"http://127.0.0.1:{settings['serve']['port']}"
        merchant_id = sorted(_train_merchants(folder / "store"))[0]
        merchant = Merchant(merchant_id, {"channel": "boutique", "city": "graz"}, {"basket_eur": 60.0})
        design = DesignClient(url + "/own-design").design(merchant, "a dress", seed=3)
        assert len(design.images) == 4
        score = RewardClient(url + "/own-reward").score("a dress", design.images, merchant)
        assert score.merchant_path == "known" and len(score.scores) == 4
    finally:
        serve.shutdown()


def _rewrite(root: Path, transform, report) -> None:
    """Apply `transform(table, report)` to every feedback partition of both splits (a store with that defect)."""
    for path in sorted(root.glob("*/feedback/*/*.parquet")):
        pq.write_table(transform(pq.read_table(path), report), path)


def _without_side_features(table, report):
    import pyarrow as pa

    from perfusion_ray.data.schemas import FEATURES_TYPE, STATS_TYPE

    empty = {"merchant_features": pa.array([[]] * table.num_rows, FEATURES_TYPE),
             "merchant_stats": pa.array([[]] * table.num_rows, STATS_TYPE)}
    return table.set_column(table.schema.get_field_index("merchant_features"), "merchant_features",
                            empty["merchant_features"]).set_column(
        table.schema.get_field_index("merchant_stats"), "merchant_stats", empty["merchant_stats"])


def _one_merchant(table, report):
    import pyarrow.compute as pc

    return table.filter(pc.equal(table["merchant_id"], report.seen_ids[0]))


def _long_prompts(table, report):
    import pyarrow as pa

    prompts = [f"{p} with {'very ' * 120}fine stitching" for p in table["prompt"].to_pylist()]
    return table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts, pa.string()))


@pytest.mark.parametrize("defect, transform", [("no side features", _without_side_features),
                                               ("one merchant", _one_merchant),
                                               ("prompts past the tokenizer's limit", _long_prompts)])
def test_odd_stores_train_and_evaluate(tmp_path, capsys, defect, transform, ray_cluster):
    """Merchants without side features, a single merchant (no cold-start ones), prompts longer than any
    tokenizer takes: ingest, rm train and rm eval run; GAUC is finite where there are groups to rank."""
    report = generate(str(tmp_path / "store"), "tiny", seed=1)
    _rewrite(tmp_path / "store", transform, report)
    config = _write_config(tmp_path, rm={"epochs": 1, "batch_groups": 2})
    args = ["--config", str(config)]
    assert main(["data", "ingest", "--engine", "local", *args]) == 0
    assert main(["rm", "train", *args]) == 0
    assert main(["rm", "eval", *args]) == 0
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["rm.gauc.seen"] == metrics["rm.gauc.seen"]  # not NaN: seen merchants have groups
    if defect == "one merchant":
        assert metrics["rm.gauc.cold"] != metrics["rm.gauc.cold"]  # no cold-start merchant: NaN, not a crash
        assert "cold start 0" in capsys.readouterr().out
    if defect == "prompts past the tokenizer's limit":
        assert main(["align", "train", "--offline", *args]) == 0


def test_each_mistake_is_one_line_that_names_it(store):
    """A user's mistakes on an own store: no reward model yet, no judge and no oracle to evaluate with."""
    import os
    import subprocess
    import sys

    folder, _, config = store
    perfusion = Path(sys.executable).with_name("perfusion")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cases = [(["rm", "eval", "--model", str(folder / "missing")], "is missing config.json"),
             (["align", "eval", "--pipeline", str(folder / "missing")], "is not an exported pipeline"),
             (["world", "simulate"], "needs a world")]
    for command, message in cases:
        run = subprocess.run([str(perfusion), *command, "--config", str(config)], capture_output=True, text=True,
                             env=env, timeout=300)
        assert run.returncode == 2, (command, run.stderr[-2000:])
        lines = run.stderr.strip().splitlines()
        assert message in lines[0] and lines[0].startswith("error: ") and "Traceback" not in run.stderr
