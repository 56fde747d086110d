"""Exports load with diffusers, peft and transformers alone, and compute what the project computes."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from perfusion_ray.config import PolicyConfig
from perfusion_ray.errors import PerfusionError
from perfusion_ray.models import adaptive, base, pipeline
from perfusion_ray.models.adaptive import PersonalizedAdapter, join_adapter_state, split_adapter_state
from perfusion_ray.models.clip_towers import load_clip
from perfusion_ray.models.base import load_base
from perfusion_ray.models.pipeline import PerFusionPipeline
from perfusion_ray.models.policy import build_policy, policy_pipeline
from perfusion_ray.models.portable_source import Definition, carried_module
from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig, save_reward_model
from perfusion_ray.records import Merchant
from tests.tiny_models import tiny_stable_diffusion

PROMPTS = ["a red dress", "a blue shirt"]
STEPS, SEED = 4, 3
MERCHANTS = {"known": {"merchant_id": "m1", "merchant_features": {"region": "east"}, "merchant_stats": {"price_level": 1.0}},
             "cold": {"merchant_id": "zz", "merchant_features": {"region": "west"}, "merchant_stats": {"price_level": 3.0}},
             "none": None}
REWARD_ROWS = {"merchants": [MERCHANTS["known"], MERCHANTS["cold"], {"merchant_id": "m0"}, {}],
               "prompts": ["a red dress", "a blue shirt", "a bag", ""]}


def _reward_model(folder: Path) -> PerFusionRM:
    torch.manual_seed(0)
    model = PerFusionRM(load_clip(), RewardModelConfig(stat_names=["price_level"], known_ids=["m0", "m1"],
                                                       image_head_channels=8, image_head_dim=16))
    with torch.no_grad():  # stand-ins for trained plug-ins, so the merchant moves the scores
        for parameter in [*model.text_plugin.parameters(), *model.image_plugin.parameters()]:
            parameter.normal_(0, 0.05)
    save_reward_model(model, folder)
    return model.eval()


def _sdxl_pipeline(folder: Path) -> Path:
    """A random SDXL-layout base (AutoencoderKL, two text encoders) with a branch whose joins move its images."""
    sdxl = load_base(tiny_stable_diffusion(folder / "base", xl=True))
    torch.manual_seed(0)
    policy = build_policy(sdxl.unet, PolicyConfig(), stat_names=("price_level",),
                          merchants=[Merchant.coerce(MERCHANTS["known"])])
    with torch.no_grad():
        controlnet = policy.adapter.controlnet
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(block.weight, std=0.5)
    policy_pipeline(sdxl, policy).save_pretrained(folder / "pipeline")
    return folder / "pipeline"


@pytest.fixture(scope="module")
def plain_run(tiny_pipelines, tmp_path_factory):
    """The project's images and scores, and what a process without perfusion_ray made of the same exports."""
    root = tmp_path_factory.mktemp("interop")
    pipelines = {"embedded": tiny_pipelines["v2"], "sdxl": _sdxl_pipeline(root / "sdxl")}
    ours = {}
    for kind, folder in pipelines.items():
        pipe = PerFusionPipeline.from_pretrained(folder)
        ours.update({f"{kind}_{name}": pipe(PROMPTS, merchant=merchant, num_images_per_prompt=2,
                                            num_inference_steps=STEPS, output_type="np",
                                            generator=torch.Generator().manual_seed(SEED)).images
                     for name, merchant in MERCHANTS.items()})
    model = _reward_model(root / "rm")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.save(root / "images.npy", images)
    ours["scores"] = model.score([Merchant.coerce(m) for m in REWARD_ROWS["merchants"]], REWARD_ROWS["prompts"], images)
    save_reward_model(model, root / "broken")
    weights = load_file(str(root / "broken" / "model.safetensors"))
    save_file({name: tensor for name, tensor in weights.items() if not name.startswith("image_head.")},
              str(root / "broken" / "model.safetensors"))
    case = {"pipelines": {kind: str(folder) for kind, folder in pipelines.items()}, "merchants": MERCHANTS, "prompts": PROMPTS, "steps": STEPS,
            "seed": SEED, "reward_model": str(root / "rm"), "broken_reward_model": str(root / "broken"),
            "reward_rows": REWARD_ROWS, "reward_images": str(root / "images.npy"), "out": str(root)}
    (root / "case.json").write_text(json.dumps(case))
    site = sysconfig.get_paths()["purelib"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules")}
    script = Path(__file__).with_name("plain_interop.py")
    done = subprocess.run([sys.executable, "-I", "-S", str(script), site, str(root / "case.json")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = dict(np.load(root / "plain.npz"))
    return ours, plain, json.loads((root / "plain.json").read_text())


def test_the_loading_process_cannot_import_perfusion_ray(plain_run):
    _, _, report = plain_run
    assert report["perfusion_ray_importable"] is False
    assert report["embedded_component_modules"] == {"adapter": "diffusers_modules.local.perfusion_adapter",
                                                    "vae": "diffusers_modules.local.autoencoder",
                                                    "unet": "diffusers.models.unets.unet_2d_condition"}


@pytest.mark.parametrize("kind", ["embedded", "sdxl"])
def test_diffusers_alone_loads_the_pipeline_and_generates_the_same_images(plain_run, kind):
    ours, plain, report = plain_run
    assert report[f"{kind}_pipeline_class"] == "diffusers_modules.local.pipeline.PerFusionPipeline"
    # the branch moves the images, and merchants apart: the comparison has teeth
    assert not np.array_equal(ours[f"{kind}_known"], ours[f"{kind}_none"])
    assert not np.array_equal(ours[f"{kind}_known"], ours[f"{kind}_cold"])
    for name in MERCHANTS:
        np.testing.assert_array_equal(plain[f"{kind}_{name}"], ours[f"{kind}_{name}"], err_msg=f"merchant {name}")


def test_the_branch_loads_through_controlnet_and_peft_and_nothing_misreads_the_adapter_folder(plain_run):
    _, _, report = plain_run
    assert report["controlnet_loading"] == {"missing_keys": 0, "unexpected_keys": 0, "mismatched_keys": 0,
                                            "error_msgs": 0}
    assert report["lora"] == {"peft_type": "LORA", "r": 8, "targets": sorted(adaptive.LORA_TARGETS)}
    assert report["peft_branch_max_difference"] == 0.0
    assert report["adapter_folder_as_controlnet"].startswith("OSError")


def test_transformers_alone_loads_the_reward_model_and_scores_the_same(plain_run):
    ours, plain, report = plain_run
    assert report["reward_model_class"].endswith("modeling_perfusion_rm.PerFusionRMModel")
    assert len(set(np.round(ours["scores"], 4))) == len(ours["scores"])
    np.testing.assert_array_equal(plain["scores"], ours["scores"])
    assert "do not fit its config.json" in report["broken_reward_model"]
    assert "image_head." in report["broken_reward_model"]


# ---------------------------------------------------------------- the adapter's saved parts
@pytest.fixture(scope="module")
def adapter(tiny_pipelines) -> PersonalizedAdapter:
    return PersonalizedAdapter.from_pretrained(tiny_pipelines["v2"] / "adapter")


def test_the_saved_parts_join_back_into_the_adapter_state(adapter):
    state = adapter.state_dict()
    controlnet, lora, merchant = split_adapter_state(state)
    assert lora and all(name.startswith(adaptive.PEFT_PREFIX) and ".default." not in name for name in lora)
    assert not any("base_layer" in name or "lora_" in name for name in controlnet)
    assert sorted(merchant) == sorted(name for name in state if not name.startswith("controlnet."))
    joined = join_adapter_state(controlnet, lora, merchant)
    assert joined.keys() == state.keys() and all(joined[name] is state[name] for name in state)


def test_an_adapter_saved_as_one_file_still_loads(adapter, tmp_path):
    config = {key: value for key, value in adapter.config.items() if not key.startswith("_")}
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "PersonalizedAdapter", **config}))
    save_file({name: tensor.contiguous() for name, tensor in adapter.state_dict().items()},
              str(tmp_path / "diffusion_pytorch_model.safetensors"))
    again = PersonalizedAdapter.from_pretrained(tmp_path)
    assert all(torch.equal(again.state_dict()[name], tensor) for name, tensor in adapter.state_dict().items())


def test_an_adapter_folder_without_its_lora_is_refused_by_name(adapter, tmp_path):
    adapter.save_pretrained(tmp_path)
    (tmp_path / "lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(PerfusionError, match="missing lora/adapter_model.safetensors"):
        PersonalizedAdapter.from_pretrained(tmp_path)


# ---------------------------------------------------------------- carried code
def test_carried_code_that_needs_an_uncarried_project_name_is_refused():
    with pytest.raises(ValueError, match="conditioned_call uses SDXL_SIZE_IDS, which is not carried"):
        carried_module("x", [Definition(base, "conditioned_call")])
    with pytest.raises(ValueError, match="PerFusionPipeline uses BaseDiffusion, which is not carried"):
        carried_module("x", [Definition(pipeline, "PerFusionPipeline")])  # imported from the project
    with pytest.raises(ValueError, match="BaseDiffusion has no method render"):
        carried_module("x", [Definition(base, "BaseDiffusion", without=("render",))])


def test_carried_code_is_the_project_code_with_only_the_imports_it_uses():
    text = carried_module("doc", [Definition(base, "SDXL_SIZE_IDS"), Definition(base, "conditioned_call")])
    namespace: dict = {}
    exec(compile(text, "carried", "exec"), namespace)
    assert namespace["SDXL_SIZE_IDS"] == base.SDXL_SIZE_IDS
    assert [line for line in text.splitlines() if line.startswith(("import ", "from "))] == [
        "from __future__ import annotations"]  # conditioned_call needs no module at run time
