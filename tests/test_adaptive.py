"""The adaptive network: equal to the base model at initialisation, the reference is the same network
with the branch off, and only the branch (LoRA, zero joins, merchant modules) trains."""

from __future__ import annotations

import pytest
import torch

from perfusion_ray.models.adaptive import PersonalizedUNet
from perfusion_ray.models.base import load_base
from perfusion_ray.records import Merchant


@pytest.fixture(scope="module")
def personalized():
    torch.manual_seed(0)
    return PersonalizedUNet.from_unet(load_base("embedded").unet, stat_names=("price_level",))


def _inputs(model, batch: int = 3):
    generator = torch.Generator().manual_seed(1)
    unet = model.unet
    sample = torch.randn(batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                         generator=generator)
    hidden = torch.randn(batch, 16, unet.config.cross_attention_dim, generator=generator)
    merchants = [Merchant(f"m{i}", {"region": "south"}, {"price_level": 1.0}) for i in range(batch)]
    return sample, torch.tensor([10, 500, 900]), hidden, model.merchant_encoder.featurize(merchants)


def test_output_equals_the_base_model_at_initialisation(personalized):
    sample, timestep, hidden, merchant = _inputs(personalized)
    with torch.no_grad():
        personalized_out = personalized(sample, timestep, hidden, merchant)
        reference = personalized(sample, timestep, hidden, merchant, branch=False)
        base = personalized.unet(sample, timestep, hidden).sample
    assert torch.equal(personalized_out, base) and torch.equal(reference, base)


def test_only_the_branch_trains(personalized):
    trainable = {name for name, p in personalized.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith("unet.") for name in trainable)
    assert any("lora_" in name for name in trainable)
    assert any("controlnet_down_blocks" in name for name in trainable)
    assert any(name.startswith("adapter.merchant_encoder.") for name in trainable)
    frozen_copy = [name for name, p in personalized.adapter.controlnet.named_parameters()
                   if not p.requires_grad and "lora_" not in name and ".base_layer." in name]
    assert frozen_copy  # the copied attention weights themselves stay frozen under LoRA


def test_trained_joins_move_outputs_per_merchant(personalized):
    sample, timestep, hidden, _ = _inputs(personalized)
    trained = PersonalizedUNet.from_unet(personalized.unet, stat_names=("price_level",)).eval()  # no id dropout
    trained.merchant_encoder.known_ids = {"a", "b"}
    with torch.no_grad():
        # Stand-ins for trained zero convolutions: the joins, and the conditioning embedding's output.
        controlnet = trained.adapter.controlnet
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(block.weight, std=0.02)

        def predict(merchant_id: str, region: str) -> torch.Tensor:
            merchants = [Merchant(merchant_id, {"region": region}, {"price_level": 1.0})] * 3
            return trained(sample, timestep, hidden, trained.merchant_encoder.featurize(merchants))

        first, second = predict("a", "south"), predict("b", "north")
        reference = trained(sample, timestep, hidden, None)
    assert not torch.allclose(first, reference) and not torch.allclose(first, second)
