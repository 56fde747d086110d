"""The base diffusion model: the shipped embedded weights, the Stable Diffusion layout, fidelity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from perfusion_ray.errors import PerfusionError
from perfusion_ray.models.base import EMBEDDED_DIR, BaseDiffusion, load_base
from perfusion_ray.models.pipeline import PerFusionPipeline
from perfusion_ray.world.attributes import COLOURS
from perfusion_ray.world.catalogue import prompt_text
from perfusion_ray.world.oracle import colour_probabilities
from tests.tiny_models import tiny_stable_diffusion

pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / "unet").is_dir(),
                                reason="assets/embedded_base is missing: run `perfusion pretrain base`")


@pytest.fixture(scope="module")
def base() -> BaseDiffusion:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_base("embedded")


@pytest.fixture(scope="module")
def judge():
    from perfusion_ray.models.classifier import load_classifier

    return load_classifier()


def test_shipped_weights_load(base):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from perfusion_ray.models.autoencoder import TinyAutoencoder

    assert isinstance(base.unet, UNet2DConditionModel) and isinstance(base.text_encoder, CLIPTextModel)
    assert isinstance(base.vae, TinyAutoencoder) and isinstance(base.scheduler, DDIMScheduler)
    assert base.scheduler.config.clip_sample is False and base.scheduler.config.steps_offset == 1
    assert base.scheduler.config.prediction_type == "v_prediction"
    assert base.text_encoder.config.vocab_size == len(base.tokenizer) == 49408  # the real CLIP BPE vocabulary
    assert base.tokenizer.model_max_length == base.text_encoder.config.max_position_embeddings == 16
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size
    assert all(p.dtype == torch.float32 and not p.requires_grad for m in base.modules().values() for p in m.parameters())
    assert base.image_size == 32 and base.latent_shape == (4, 8, 8)
    assert base.source == "embedded"


def test_shipped_files_are_small_safetensors():
    files = [f for f in EMBEDDED_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 30 * 2**20
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    for name in ("unet", "text_encoder", "vae", "scheduler", "classifier"):
        assert (EMBEDDED_DIR / name).is_dir(), name
    assert (EMBEDDED_DIR / "curve.json").is_file() and (EMBEDDED_DIR / "metrics.json").is_file()


def test_recorded_fidelity_meets_the_targets():
    """The numbers measured when the weights were made (200 samples, guidance 4, 20 DDIM steps)."""
    metrics = json.loads((EMBEDDED_DIR / "metrics.json").read_text())
    final = metrics["evaluation"]
    assert final["samples"] >= 100 and not metrics["quick"]
    assert final["class_accuracy"] >= 0.6
    assert final["colour_accuracy"] >= 0.8
    assert final["spread"]["colours_seen"] >= 6  # prompts without a colour do not collapse onto one


def test_sampling_shape_and_determinism(base):
    prompts = ["a red dress", "a bag", ""]
    first = base.sample(prompts, num_inference_steps=4, seed=3)
    again = base.sample(prompts, num_inference_steps=4, seed=3)
    other = base.sample(prompts, num_inference_steps=4, seed=4)
    assert first.shape == (3, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert base.sample([], num_inference_steps=2).shape == (0, 32, 32, 3)


def test_stable_diffusion_pipeline_over_the_components(base):
    pipe = base.pipeline()
    out = pipe(["a blue coat"], num_inference_steps=3, height=32, width=32, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)


def test_fidelity_small_sample(base, judge):
    """The shipped model draws the requested colour (chance 1/8) and class (chance 1/10) well above chance."""
    classes = np.arange(32) % 10
    colours = np.arange(32) % 8
    prompts = [prompt_text(int(c), int(k)) for c, k in zip(classes, colours)]
    images = base.sample(prompts, guidance_scale=4.0, num_inference_steps=20, seed=7)
    colour_accuracy = (colour_probabilities(images).argmax(1) == colours).mean()
    class_accuracy = (judge.predict(images) == classes).mean()
    assert colour_accuracy >= 0.6, colour_accuracy
    assert class_accuracy >= 0.35, class_accuracy


def test_prompts_without_colour_spread_over_colours(base):
    images = base.sample([prompt_text(c % 10) for c in range(40)], num_inference_steps=20, seed=11)
    seen = np.bincount(colour_probabilities(images).argmax(1), minlength=len(COLOURS))
    assert (seen > 0).sum() >= 4 and seen.max() <= 0.6 * len(images), seen


def test_classifier_reads_catalogue_renders(judge):
    from perfusion_ray.world import fashion_mnist
    from perfusion_ray.world.attributes import PATTERNS, SHADES, Attributes, render

    data = fashion_mnist.load("test")
    rng = np.random.default_rng(0)
    idx = rng.choice(len(data.labels), 300, replace=False)
    images = np.stack([render(data.images[i], Attributes(COLOURS[rng.integers(8)], SHADES[rng.integers(2)],
                                                         PATTERNS[rng.integers(2)]), 32) for i in idx])
    assert (judge.predict(images) == data.labels[idx]).mean() >= 0.85


# ---------------------------------------------------------------- the Stable Diffusion layout
def test_embedded_round_trip_through_the_sd_layout(base, tmp_path):
    """save_pretrained writes unet/ vae/ text_encoder/ tokenizer/ scheduler/; load_base reads them back exactly."""
    expected = base.sample(["a striped light green sneaker", "trousers"], num_inference_steps=5, seed=1)
    for fp16 in (False, True):
        folder = base.save_pretrained(tmp_path / f"fp16-{fp16}", fp16=fp16, with_tokenizer=True)
        assert {p.name for p in folder.iterdir()} >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                                      "model_index.json"}
        again = load_base(folder)
        assert again.source == str(folder) and again.tokenizer.model_max_length == 16
        # The shipped weights are fp16 values already, so an fp16 save loses nothing.
        assert np.array_equal(again.sample(["a striped light green sneaker", "trousers"], num_inference_steps=5,
                                           seed=1), expected)


def test_stable_diffusion_directory_loads_through_the_same_path(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler

    sd = load_base(tiny_stable_diffusion(tmp_path))
    assert isinstance(sd.vae, AutoencoderKL) and isinstance(sd.scheduler, DDIMScheduler)
    assert sd.scheduler.config.clip_sample is False
    assert sd.tokenizer.model_max_length == 77 and sd.image_size == 32
    images = sd.sample(["a red dress", "a bag"], num_inference_steps=3, seed=0)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    latents = sd.encode_images(torch.zeros(1, 3, 32, 32))
    assert latents.shape == (1, 4, 16, 16)


def test_sdxl_directory_samples_what_diffusers_sdxl_pipeline_samples(tmp_path):
    """An SDXL layout loads through the same path; its prompt states carry the pooled embedding and size
    ids, and our sampler draws what diffusers' StableDiffusionXLPipeline draws from the same noise, with
    guidance's unconditional half zeroed (SDXL's default) or the encoded empty prompt."""
    from transformers import CLIPTextModelWithProjection

    sdxl = load_base(tiny_stable_diffusion(tmp_path, xl=True))
    assert sdxl.is_sdxl and isinstance(sdxl.text_encoder_2, CLIPTextModelWithProjection)
    assert sdxl.force_zeros_for_empty_prompt  # the directory does not say: StableDiffusionXLPipeline's default
    states = sdxl.encode_prompts(["a red dress"])
    assert states.shape == (1, 77 + 1, 64)  # both encoders' states side by side, plus the packed row
    assert states[0, -1, 32:38].tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    prompts = ["a red dress", "a bag"]
    noise = torch.randn((2, *sdxl.latent_shape), generator=torch.Generator().manual_seed(0))
    drawn = {}
    for force_zeros in (True, False):
        sdxl.force_zeros_for_empty_prompt = force_zeros
        ours = PerFusionPipeline.from_base(sdxl)(prompts, latents=noise.clone(), num_inference_steps=3,
                                                 output_type="np").images
        reference = sdxl.pipeline()
        reference.scheduler = sdxl.sampling_scheduler(3)
        theirs = reference(prompts, latents=noise.clone(), num_inference_steps=3, guidance_scale=4.0,
                           height=32, width=32, output_type="np").images
        assert np.abs(ours.astype(np.float64) - theirs * 255.0).max() <= 0.5 + 1e-3  # equal up to uint8 rounding
        drawn[force_zeros] = ours
    assert not np.array_equal(drawn[True], drawn[False])
    saved = load_base(sdxl.save_pretrained(tmp_path / "again"))
    assert saved.is_sdxl and torch.equal(saved.encode_prompts(["a bag"]), sdxl.encode_prompts(["a bag"]))
    assert saved.force_zeros_for_empty_prompt is False  # model_index.json carries the flag


def test_sdxl_tokenizers_of_different_lengths_are_refused_by_name(tmp_path):
    import copy

    from perfusion_ray.models.tokenizer import clip_tokenizer

    folder = tiny_stable_diffusion(tmp_path, xl=True)
    short = copy.deepcopy(clip_tokenizer())  # the cached instance is shared: never edit it
    short.model_max_length = 32
    short.save_pretrained(str(folder / "tokenizer_2"))
    with pytest.raises(PerfusionError, match="tokenizer/ pads to 77 tokens but tokenizer_2/ to 32"):
        load_base(folder)


def test_an_sdxl_directory_with_a_broken_model_index_is_refused_by_name(tmp_path):
    folder = tiny_stable_diffusion(tmp_path, xl=True)
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(PerfusionError, match="model_index.json is not valid JSON"):
        load_base(folder)


def test_missing_components_name_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(PerfusionError, match="vae/, text_encoder/, scheduler/"):
        load_base(tmp_path)


def test_autoencoder_save_load_round_trip(base, tmp_path):
    from perfusion_ray.models.autoencoder import TinyAutoencoder

    base.vae.save_pretrained(str(tmp_path / "vae"))
    again = TinyAutoencoder.from_pretrained(str(tmp_path / "vae"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(base.vae(x), again(x))
        assert base.vae.encode(x).latent_dist.sample().shape == (2, 4, 8, 8)
    assert again.config.scaling_factor == base.vae.config.scaling_factor != 1.0


# ---------------------------------------------------------------- the command
def test_pretrain_command_smoke(tmp_path):
    """`perfusion pretrain base --quick` runs every stage and writes a directory load_base reads."""
    from perfusion_ray.world.pretrain_base import main_pretrain_base

    out, work = tmp_path / "out", tmp_path / "work"
    code = main_pretrain_base(["--quick", "--out", str(out), "--work", str(work), "--classifier-items", "256",
                               "--autoencoder-steps", "3", "--unet-steps", "3", "--eval-samples", "2",
                               "--curve-samples", "2", "--inference-steps", "2"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quick"] and metrics["stages"]["unet"]["steps"] == 3
    assert [p["stage"] for p in json.loads((out / "curve.json").read_text())][:1] == ["classifier"]
    assert load_base(out).sample(["a dress"], num_inference_steps=2).shape == (1, 32, 32, 3)
    # Rerunning continues from the work folder instead of starting over.
    code = main_pretrain_base(["--quick", "--out", str(out), "--work", str(work), "--unet-steps", "4",
                               "--eval-samples", "2", "--curve-samples", "2", "--inference-steps", "2"])
    assert code == 0 and json.loads((out / "metrics.json").read_text())["stages"]["unet"]["steps"] == 4
