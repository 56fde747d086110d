"""`perfusion rm train` on Ray Train + DeepSpeed: exports a loadable model, resumes from its latest
checkpoint, and runs under ZeRO-3 on one worker as under ZeRO-2 on two (tiny data, shared cluster)."""

from __future__ import annotations

import pytest

from perfusion_ray.data.ingest import ingest
from perfusion_ray.errors import PerfusionError
from perfusion_ray.models.reward_model import load_reward_model
from perfusion_ray.train.reward_model import early_stopping_update, train_reward_model
from perfusion_ray.world.simulator import simulate

pytestmark = pytest.mark.ray


@pytest.fixture
def ingested(tiny_config, tmp_path):
    simulate(tiny_config, "train", progress=False)
    ingest(tiny_config, "train", engine="local")
    tiny_config.rm.out = str(tmp_path / "rm")
    tiny_config.rm.batch_groups = 8
    return tiny_config


def test_train_exports_a_model_and_resume_continues(ingested, ray_cluster):
    ingested.rm.epochs = 1
    first = train_reward_model(ingested)
    assert first.epochs == 1 and first.resumed_from_epoch == 0
    assert load_reward_model(first.model_dir).config.known_ids  # the seen merchants travel with the model
    ingested.rm.epochs = 2
    second = train_reward_model(ingested, resume=True)
    assert second.epochs == 2 and second.resumed_from_epoch == 1


def test_zero3_on_one_worker_trains_and_exports_gathered_weights(ingested, ray_cluster):
    ingested.rm.epochs = 1
    ingested.rm.zero_stage = 3
    ingested.rm.num_workers = 1
    report = train_reward_model(ingested)
    model = load_reward_model(report.model_dir)  # strict load: every gathered tensor has its full shape
    assert model.logit_scale.shape == (1,)


def test_no_group_examples_is_a_clear_error(tiny_config, tmp_path):
    tiny_config.rm.out = str(tmp_path / "rm")
    with pytest.raises(PerfusionError, match="no group examples"):
        train_reward_model(tiny_config)


def test_eval_writes_every_required_metric(ingested, ray_cluster, tmp_path):
    from perfusion_ray.cli import main

    simulate(ingested, "holdout", progress=False)
    ingest(ingested, "holdout", engine="local")
    ingested.rm.epochs = 1
    model_dir = train_reward_model(ingested).model_dir
    args = ["--set", f"data.root={ingested.data.root}", "--set", "world.num_merchants=12",
            "--set", "world.items_per_combination=4", "--set", f"rm.out={ingested.rm.out}"]
    assert main(["rm", "eval", "--model", str(model_dir), "--metrics", str(tmp_path / "m.json")] + args) == 0
    import json

    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in ("rm.gauc.seen", "rm.gauc.cold", "rm.gauc.clip_zero_shot", "rm.gauc.oracle", "rm.map.seen",
                "rm.gauc.random", "rm.auc.seen", "rm.logloss.seen"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert metrics["rm.gauc.oracle"] > metrics["rm.gauc.random"]


def test_early_stopping_counts_epochs_without_a_better_validation_gauc():
    """A validation curve shaped like the default's: an early bump, then the late best of the cosine
    schedule. Patience 2 stops on the bump; patience 4 (the default) reaches the late best and exports it."""
    curve = [0.749, 0.785, 0.769, 0.781, 0.783, 0.786, 0.788, 0.787]

    def run(patience: int) -> tuple[int, float, int]:
        best, stale, epochs, exported = -1.0, 0, 0, 0
        for validation in curve:
            if stale >= patience:
                break
            improved, best, stale = early_stopping_update(best, stale, validation)
            epochs += 1
            exported = epochs if improved else exported
        return epochs, best, exported

    assert run(2) == (4, 0.785, 2)
    assert run(4) == (8, 0.788, 7)
    # No validation group with both labels: every epoch counts as improved and the best so far is kept.
    assert early_stopping_update(0.7, 3, float("nan")) == (True, 0.7, 0)

