"""The reward model's trainable image head: its shapes, that it trains while the towers stay frozen, that
the plug-in-off baseline stays blind to the merchant with it, and that an export with it round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from perfusion_ray.models.clip_towers import load_clip, pixel_values
from perfusion_ray.models.image_head import ImageHead
from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig, load_reward_model, save_reward_model
from perfusion_ray.records import Merchant

HEAD = {"image_head_channels": 8, "image_head_dim": 16, "plugin_input": "pooled"}
MERCHANTS = [Merchant("m0", {"channel": "social"}, {"basket_eur": 40.0}),
             Merchant("m1", {"channel": "outlet"}, {"basket_eur": 150.0})]


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _as_trained(model: PerFusionRM) -> PerFusionRM:
    """Non-zero plug-in joins, as after training (fresh joins are zero)."""
    torch.manual_seed(0)
    for plugin in (model.text_plugin, model.image_plugin):
        torch.nn.init.normal_(plugin.projection.weight, std=0.1)
    return model.eval()


def _rm(**config) -> PerFusionRM:
    torch.manual_seed(0)
    return PerFusionRM(load_clip(), RewardModelConfig(stat_names=["basket_eur"], known_ids=["m0", "m1"],
                                                      **{**HEAD, **config}))


def test_head_maps_pixels_to_its_features():
    head = ImageHead(channels=8, dim=16)
    assert head(pixel_values(_images(5), 32)).shape == (5, 16)
    assert head(pixel_values(_images(2).repeat(2, 1).repeat(2, 2), 64)).shape == (2, 16)  # any image size


@pytest.mark.parametrize("towers", ["frozen", "lora"])
def test_head_trains_beside_the_towers(towers):
    model = _rm(towers=towers)
    assert all(p.requires_grad for p in model.image_head.parameters())
    assert not any(p.requires_grad for p in model.clip.vision_model.embeddings.parameters())
    model = _as_trained(model).train()
    scores = model(**model.inputs([MERCHANTS[0]] * 4, ["a dress"] * 4, _images(4)))
    (scores * torch.arange(4.0)).sum().backward()
    assert model.image_head.convolutions[0].weight.grad.abs().sum() > 0


def test_scores_depend_on_the_image_head():
    model = _as_trained(_rm())
    args = ([MERCHANTS[0]] * 3, ["a dress"] * 3, _images(3))
    before = model.score(*args)
    with torch.no_grad():
        model.image_head.projection.weight.mul_(-3)
    assert not np.allclose(before, model.score(*args))


def test_plugin_off_baseline_stays_blind_to_the_merchant():
    images, prompts = _images(4), ["a dress"] * 4
    baseline = _as_trained(_rm(plugin=False))
    assert np.allclose(baseline.score([MERCHANTS[0]] * 4, prompts, images),
                       baseline.score([MERCHANTS[1]] * 4, prompts, images))
    personalized = _as_trained(_rm(plugin=True))
    assert not np.allclose(personalized.score([MERCHANTS[0]] * 4, prompts, images),
                           personalized.score([MERCHANTS[1]] * 4, prompts, images))


def test_fresh_model_with_a_head_scores_as_clip():
    """Zero-initialised joins: the head changes nothing until it is trained."""
    args = (MERCHANTS * 2, ["a coat"] * 4, _images(4))
    assert np.allclose(_rm().eval().score(*args), _rm(image_head_channels=0).eval().score(*args), atol=1e-6)


def test_export_with_a_head_round_trips(tmp_path):
    model = _as_trained(_rm())
    save_reward_model(model, tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["image_head_channels"] == 8
    loaded = load_reward_model(tmp_path / "rm")
    args = ([MERCHANTS[0], MERCHANTS[1], Merchant("new", {"channel": "social"}, {})], ["a dress"] * 3, _images(3))
    assert np.allclose(model.score(*args), loaded.score(*args), atol=1e-6)


def test_export_without_head_fields_loads_headless(tmp_path):
    """Models exported before the head existed load as they were trained."""
    model = _as_trained(_rm(image_head_channels=0))
    save_reward_model(model, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    del config["image_head_channels"], config["image_head_dim"]
    (tmp_path / "rm" / "config.json").write_text(json.dumps(config))
    loaded = load_reward_model(tmp_path / "rm")
    assert loaded.image_head is None
    args = (MERCHANTS, ["a dress"] * 2, _images(2))
    assert np.allclose(model.score(*args), loaded.score(*args), atol=1e-6)
