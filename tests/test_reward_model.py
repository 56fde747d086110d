"""PerFusionRM: merchants with or without history, the plug-in as the only difference from the
baseline, a batched score API that survives odd input, and a self-contained export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from perfusion_ray.errors import PerfusionError
from perfusion_ray.metrics import mean_average_precision
from perfusion_ray.models.clip_towers import load_clip
from perfusion_ray.models.merchant_encoder import MerchantEncoder
from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig, load_reward_model, save_reward_model
from perfusion_ray.records import Merchant

FEATURES = {"region": "south", "tier": "small"}


def _merchants(n: int, ids=None, features=FEATURES, stats=None) -> list[Merchant]:
    return [Merchant(i, dict(features), dict(stats or {"price_level": 1.0})) for i in ids or [f"m{i}" for i in range(n)]]


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model() -> PerFusionRM:
    torch.manual_seed(0)
    rm = PerFusionRM(load_clip(), RewardModelConfig(stat_names=["price_level"], known_ids=["m0", "m1"]))
    for plugin in (rm.text_plugin, rm.image_plugin):  # as if trained: non-zero joins
        torch.nn.init.normal_(plugin.projection.weight, std=0.1)
    return rm.eval()


def test_unseen_merchant_is_represented_by_side_features_alone():
    encoder = MerchantEncoder(dim=16, stat_names=("price_level",)).eval()
    encoder.known_ids = {"known"}
    batch = _merchants(3, ids=["known", "new-a", "new-b"])
    out = encoder(**encoder.featurize(batch))
    assert torch.allclose(out[1], out[2])  # two unseen ids with equal features look the same
    assert not torch.allclose(out[0], out[1])  # a known id adds its own embedding


def test_merchant_with_no_features_or_stats_gets_a_finite_vector():
    encoder = MerchantEncoder(dim=8, stat_names=("price_level",)).eval()
    out = encoder(**encoder.featurize([Merchant("x")]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("plugin_input", ["projected", "pooled"])
def test_fresh_plugin_leaves_the_clip_score_unchanged(plugin_input):
    personalized = PerFusionRM(load_clip(), RewardModelConfig(plugin=True, plugin_input=plugin_input)).eval()
    baseline = PerFusionRM(load_clip(), RewardModelConfig(plugin=False, plugin_input=plugin_input)).eval()
    args = (_merchants(4), ["a red dress"] * 4, _images(4))
    assert np.allclose(personalized.score(*args), baseline.score(*args), atol=1e-6)


def test_scores_depend_on_the_merchant(model):
    images = _images(4)
    a = model.score(_merchants(4, ids=["m0"] * 4), ["a dress"] * 4, images)
    b = model.score(_merchants(4, ids=["m1"] * 4, features={"region": "north", "tier": "large"}), ["a dress"] * 4,
                    images)
    assert not np.allclose(a, b)


def test_odd_input_scores_finitely(model):
    blank = np.zeros((2, 32, 32, 3), np.uint8)
    grey = np.full((2, 32, 32, 3), 128, np.uint8)
    big = _images(2)[:, :, :, :].repeat(2, axis=1).repeat(2, axis=2)  # 64x64 is resized
    scores = model.score([Merchant(), Merchant("x")], ["", ""], blank)
    assert np.isfinite(scores).all()
    assert np.isfinite(model.score(_merchants(2), ["a coat", "a bag"], grey)).all()
    assert model.score(_merchants(2), ["a coat", "a bag"], big).shape == (2,)
    assert model.score(_merchants(0), [], np.zeros((0, 32, 32, 3), np.uint8)).shape == (0,)
    with pytest.raises(ValueError, match="one merchant and one prompt per image"):
        model.score(_merchants(2), ["a coat"], grey)


def test_export_round_trips_and_is_self_contained(model, tmp_path):
    save_reward_model(model, tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    args = (_merchants(3, ids=["m0", "m1", "m9"]), ["a dress", "a coat", ""], _images(3))
    assert np.allclose(model.score(*args), loaded.score(*args), atol=1e-6)
    assert loaded.merchant_encoder.known_ids == {"m0", "m1"}
    assert sorted(p.name for p in (tmp_path / "rm").iterdir()) == [
        "config.json", "model.safetensors", "modeling_perfusion_rm.py", "tokenizer.json", "tokenizer_config.json"]


def test_broken_checkpoints_are_named(model, tmp_path):
    save_reward_model(model, tmp_path / "rm")
    (tmp_path / "rm" / "model.safetensors").unlink()
    with pytest.raises(PerfusionError, match="missing model.safetensors"):
        load_reward_model(tmp_path / "rm")
    save_reward_model(model, tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    config["model_type"] = "clip"
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PerfusionError, match="written by another model"):
        load_reward_model(tmp_path / "other")


def _brute_map(scores, labels, groups):
    values = []
    for g in np.unique(groups):
        m = groups == g
        if labels[m].all() or not labels[m].any():
            continue
        order = sorted(range(m.sum()), key=lambda i: (-scores[m][i], labels[m][i]))
        hits, precisions = 0, []
        for rank, i in enumerate(order, 1):
            if labels[m][i]:
                hits += 1
                precisions.append(hits / rank)
        values.append(np.mean(precisions))
    return np.mean(values)


@pytest.mark.parametrize("seed", range(4))
def test_map_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, 120).astype(float)
    labels = rng.random(120) < 0.4
    groups = rng.integers(0, 15, 120)
    assert mean_average_precision(scores, labels, groups) == pytest.approx(_brute_map(scores, labels, groups))


def test_plugin_off_baseline_ignores_the_merchant_but_can_still_learn():
    baseline = PerFusionRM(load_clip(), RewardModelConfig(plugin=False)).eval()
    torch.nn.init.normal_(baseline.image_plugin.projection.weight, std=0.1)
    images = _images(3)
    a = baseline.score(_merchants(3, ids=["m0"] * 3), ["a dress"] * 3, images)
    b = baseline.score(_merchants(3, ids=["zz"] * 3, features={"region": "north"}), ["a dress"] * 3, images)
    assert np.allclose(a, b)
    assert any(p.requires_grad for p in baseline.image_plugin.parameters())


def test_side_feature_oracle_is_the_segment_taste_when_features_reveal_the_segment():
    from perfusion_ray.world.merchants import TasteFamily, build_population, expected_taste

    family = TasteFamily.model_validate({"name": "two", "perturbation": 0.3, "feature_noise": 0.0, "segments": [
        {"name": "a", "share": 1, "taste": {"colour": {"red": 1.0}}, "side_features": {"region": {"north": 1}}},
        {"name": "b", "share": 1, "taste": {"colour": {"blue": 1.0}}, "side_features": {"region": {"south": 1}}}]})
    population = build_population(family, 20, 0.25, seed=0)
    expected = expected_taste(family, population.features, population.stats, samples=500)
    for row, segment in enumerate(population.segments):
        colour = "red" if segment == "a" else "blue"
        assert expected[row].argmax() == ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"].index(colour)
        assert np.isclose(expected[row].max(), 1.0, atol=1e-6)  # the segment taste, not the merchant's own
    assert not np.allclose(expected, population.tastes)
