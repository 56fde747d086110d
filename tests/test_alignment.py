"""The generator's training step, its pipeline and `perfusion align train --offline` / `align eval`:
denoiser passes per variant, bad batches refused, the pipeline is the base without a merchant and
round-trips through save_pretrained, and the Ray Train run exports gathered weights under ZeRO-2
and ZeRO-3 and resumes from its checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perfusion_ray.config import PolicyConfig
from perfusion_ray.models.base import load_base
from perfusion_ray.records import Merchant
from perfusion_ray.models.pipeline import PerFusionPipeline
from perfusion_ray.models.policy import build_policy, featurizer, policy_pipeline
from perfusion_ray.train.group_step import GroupTensors, group_step
from tests.tiny_models import tiny_stable_diffusion

MERCHANT = {"merchant_id": "m1", "merchant_features": {"region": "south"}, "merchant_stats": {"price_level": 1.0}}


@pytest.fixture(scope="module")
def base():
    return load_base("embedded")


@pytest.fixture(scope="module")
def policy(base):
    torch.manual_seed(0)
    model = build_policy(base.unet, PolicyConfig(), stat_names=("price_level",),
                         merchants=[Merchant.from_record(MERCHANT)])
    with torch.no_grad():  # stand-ins for trained joins, so the branch moves outputs
        controlnet = model.adapter.controlnet
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(block.weight, std=0.05)
    return model


def _groups(base, policy, labels, groups: int = 2) -> GroupTensors:
    labels = torch.tensor(labels, dtype=torch.float32).expand(groups, -1)
    k = labels.shape[1]
    latents = torch.randn(groups, k, *base.latent_shape, generator=torch.Generator().manual_seed(0))
    context = base.encode_prompts(["a dress"] * groups)
    merchant = featurizer(policy)([Merchant.from_record(MERCHANT)] * groups)
    return GroupTensors(latents, context, merchant, labels)


@pytest.mark.parametrize("variant, passes", [("pl", 2 * 2 * 4), ("multi_neg", 2 * 2 * 4), ("sft", 2 * 4),
                                             ("pairwise", 2 * 4 * 4)])
def test_denoiser_passes_per_variant(base, policy, variant, passes):
    # Labels (3, 1, 0, 0): five ordered pairs differ -> pairwise runs 5 pairs x 4 passes per group.
    result = group_step(policy, base.scheduler, _groups(base, policy, [[3.0, 1.0, 0.0, 0.0]]), 2500.0, variant)
    expected = 2 * 5 * 4 if variant == "pairwise" else passes
    assert result.denoiser_passes == expected and result.groups_used == 2
    result.loss.backward()
    assert all(p.grad is None for p in policy.unet.parameters())  # the base stays frozen


def test_groups_without_preference_are_skipped_and_counted(base, policy):
    result = group_step(policy, base.scheduler, _groups(base, policy, [[1.0, 1.0, 1.0]]), 2500.0, "pl")
    assert result.groups_used == 0 and result.groups_skipped == 2 and float(result.loss) == 0.0


def test_bad_batches_are_refused(base, policy):
    with pytest.raises(ValueError, match="at least 2 candidates"):
        group_step(policy, base.scheduler, _groups(base, policy, [[1.0]]), 2500.0, "pl")
    nan_batch = _groups(base, policy, [[1.0, 0.0]])
    nan_batch.latents[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        group_step(policy, base.scheduler, nan_batch, 2500.0, "pl")
    with pytest.raises(ValueError, match="beta"):
        group_step(policy, base.scheduler, _groups(base, policy, [[1.0, 0.0]]), 0.0, "pl")


def _sample(pipe, merchant=None, prompt="a dress"):
    return pipe(prompt, merchant=merchant, num_images_per_prompt=2, num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(5)).images


def test_pipeline_without_merchant_is_the_base_model(base, policy):
    pipe = policy_pipeline(base, policy)
    expected = base.sample(["a dress", "a dress"], num_inference_steps=3, seed=5)
    assert np.array_equal(_sample(pipe), expected)
    assert not np.array_equal(_sample(pipe, MERCHANT), expected)


def test_pipeline_round_trips_through_save_pretrained(base, policy, tmp_path):
    pipe = policy_pipeline(base, policy)
    pipe.save_pretrained(tmp_path / "pipe")
    again = PerFusionPipeline.from_pretrained(tmp_path / "pipe")
    assert np.array_equal(_sample(again, MERCHANT), _sample(pipe, MERCHANT))
    unknown = {**MERCHANT, "merchant_id": "never-seen"}  # cold start: side features only, still personalized
    assert not np.array_equal(_sample(again, unknown), _sample(again))


def test_pipeline_refuses_bad_requests(base, policy):
    pipe = policy_pipeline(base, policy)
    with pytest.raises(ValueError, match="empty"):
        _sample(pipe, MERCHANT, prompt="  ")
    with pytest.raises(ValueError, match="2 merchants for 1 prompts"):
        _sample(pipe, [MERCHANT, MERCHANT])


def test_an_sdxl_base_takes_the_same_policy_objective_and_pipeline(tmp_path):
    """SDXL's added conditioning reaches the base and the branch: the policy starts as the base, one
    group-objective step trains the joins only, and the pipeline round-trips with both text encoders."""
    sdxl = load_base(tiny_stable_diffusion(tmp_path / "sdxl", xl=True))
    model = build_policy(sdxl.unet, PolicyConfig(), stat_names=("price_level",),
                         merchants=[Merchant.from_record(MERCHANT)])
    groups = _groups(sdxl, model, [[1.0, 0.0, 0.0]])
    sample, t = groups.latents[:, 0], torch.tensor([400, 400])
    with torch.no_grad():
        assert torch.equal(model(sample, t, groups.context, merchant=groups.merchant),
                           model(sample, t, groups.context, branch=False))
    result = group_step(model, sdxl.scheduler, groups, 2500.0, "pl")
    result.loss.backward()
    assert result.denoiser_passes == 2 * 2 * 3 and all(p.grad is None for p in model.unet.parameters())
    joins = model.adapter.controlnet.controlnet_down_blocks.parameters()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in joins)
    pipe = policy_pipeline(sdxl, model)
    pipe.save_pretrained(tmp_path / "pipe")
    again = PerFusionPipeline.from_pretrained(tmp_path / "pipe")
    assert again.text_encoder_2 is not None and again.tokenizer_2 is not None
    assert again.config.force_zeros_for_empty_prompt is True and again.base.force_zeros_for_empty_prompt
    assert np.array_equal(_sample(again, MERCHANT), _sample(pipe, MERCHANT))


# ---------------------------------------------------------------- Ray Train + DeepSpeed
@pytest.fixture
def logged(tiny_config, tmp_path):
    from perfusion_ray.data.ingest import ingest
    from perfusion_ray.world.simulator import simulate

    for split in ("train", "holdout"):
        simulate(tiny_config, split, progress=False)
        ingest(tiny_config, split, engine="local")
    tiny_config.align.out = str(tmp_path / "align")
    tiny_config.align.batch_groups = 2
    tiny_config.align.max_steps = 2
    tiny_config.align.checkpoint_every = 1
    return tiny_config


def _join_weights(pipeline_dir) -> torch.Tensor:
    adapter = PerFusionPipeline.from_pretrained(pipeline_dir).adapter
    return torch.cat([block.weight.flatten() for block in adapter.controlnet.controlnet_down_blocks])


@pytest.mark.ray
def test_offline_alignment_exports_and_resumes(logged, ray_cluster):
    from perfusion_ray.train.align_offline import train_alignment

    first = train_alignment(logged)
    assert first.steps == 2 and first.resumed_from_step == 0 and first.denoiser_passes_per_group == 8
    assert _join_weights(first.pipeline_dir).abs().sum() > 0  # trained: the zero joins moved
    logged.align.max_steps = 3
    second = train_alignment(logged, resume=True)
    assert second.steps == 3 and second.resumed_from_step == 2


@pytest.mark.ray
def test_zero3_in_bf16_gathers_the_exported_weights(logged, ray_cluster, tmp_path):
    from perfusion_ray.cli import main
    from perfusion_ray.train.align_offline import train_alignment

    logged.align.zero_stage = 3  # the GPU cluster settings (configs/sd15.yaml), at small size on the CPU
    logged.align.bf16 = True
    logged.align.num_workers = 1
    report = train_alignment(logged)
    assert _join_weights(report.pipeline_dir).abs().sum() > 0  # full tensors, not empty ZeRO-3 shards
    args = ["align", "eval", "--pipeline", str(report.pipeline_dir), "--out", str(tmp_path / "eval"),
            "--set", f"data.root={logged.data.root}", "--set", "align.eval.requests_per_merchant=1",
            "--set", "align.eval.images_per_request=2", "--set", "policy.num_inference_steps=3"]
    args += [item for override in ("world.num_merchants=12", "world.items_per_combination=4")
             for item in ("--set", override)]
    assert main(args) == 0
    import json

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("align.oracle.utility.base", "align.oracle.utility.aligned", "align.oracle.win_rate",
                "align.oracle.personalization", "align.fidelity.class_acc", "align.fidelity.colour_acc"):
        assert np.isfinite(metrics[key])
    assert metrics["align.oracle.win_rate_low"] <= metrics["align.oracle.win_rate"] <= metrics["align.oracle.win_rate_high"]
    assert metrics["align.requests"] == metrics["align.requests.seen"] + metrics["align.requests.cold"]
    assert (tmp_path / "eval" / "grid.png").is_file()


@pytest.mark.ray
def test_offline_alignment_trains_on_an_sdxl_directory(logged, ray_cluster, tmp_path):
    from perfusion_ray.train.align_offline import train_alignment

    logged.policy.base = str(tiny_stable_diffusion(tmp_path / "sdxl", xl=True))
    logged.align.max_steps = 1
    report = train_alignment(logged)
    assert report.steps == 1 and _join_weights(report.pipeline_dir).abs().sum() > 0
    assert PerFusionPipeline.from_pretrained(report.pipeline_dir).text_encoder_2 is not None


def test_eval_compares_against_the_frozen_base_even_for_a_fine_tuned_unet(logged, base, tmp_path):
    from perfusion_ray.evaluation.alignment import evaluate_alignment

    plain = build_policy(base.unet, PolicyConfig(), adapter="plain_lora")
    with torch.no_grad():  # a stand-in for a trained LoRA
        for name, parameter in plain.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.05)
    policy_pipeline(base, plain).save_pretrained(tmp_path / "plain")
    logged.align.eval.requests_per_merchant, logged.align.eval.images_per_request = 1, 2
    logged.policy.num_inference_steps = 3
    evaluation = evaluate_alignment(logged, tmp_path / "plain")
    assert not np.array_equal(evaluation.base_images, evaluation.aligned_images)
    expected = PerFusionPipeline.from_base(base)(evaluation.requests.prompts, num_images_per_prompt=2,
                                                 num_inference_steps=3, output_type="np",
                                                 latents=torch.randn((len(evaluation.base_images), *base.latent_shape),
                                                                     generator=torch.Generator().manual_seed(1))).images
    assert np.array_equal(evaluation.base_images, expected)
