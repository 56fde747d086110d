"""The base diffusion model: diffusers components from a directory in Stable Diffusion's layout.

One loading path for every base model. `load_base(path)` reads the subfolders unet/, vae/,
text_encoder/, tokenizer/ and scheduler/ with diffusers/transformers `from_pretrained`, whether the
folder is a Stable Diffusion 1.x checkout on a GPU cluster or the embedded FashionWorld model shipped in
assets/embedded_base/ (`load_base("embedded")`). A folder that also has text_encoder_2/ (and
tokenizer_2/) is read in Stable Diffusion XL's layout: see `encode_prompts` and `conditioned_call`.
The embedded model is a small latent diffusion model
pretrained by `perfusion pretrain base` (perfusion_ray/world/pretrain_base.py): a plain conv autoencoder
(32x32x3 <-> 4x8x8, models/autoencoder.py), a UNet2DConditionModel (64, 128) with cross-attention at
both levels and a 2-layer CLIPTextModel on the real CLIP BPE vocabulary, trained with v-prediction on a
cosine schedule. Its tokenizer is not shipped: a missing tokenizer/ folder means the real CLIP BPE
tokenizer from models/tokenizer.py (the same files). Prompts are padded to the text encoder's
max_position_embeddings when that is below the tokenizer's 77: the embedded model uses 16 (FashionWorld
prompts are at most 10 tokens; padding to 77 doubled the cost of a training step).

Sampling is DDIM with classifier-free guidance. The scheduler always gets clip_sample=False: clamping
predicted latents to [-1, 1] ruins latent models (a quarter of latent values lie outside).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perfusion_ray.config import REPO_ROOT
from perfusion_ray.errors import PerfusionError

EMBEDDED_DIR = REPO_ROOT / "assets" / "embedded_base"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SIZE_IDS = 6  # SDXL's micro-conditioning: original size (h, w), crop top-left (y, x), target size (h, w)

# The embedded model's architecture (perfusion pretrain base builds it from these).
EMBEDDED_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
EMBEDDED_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
)
EMBEDDED_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), sample_size=32)
EMBEDDED_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
)


def images_to_model(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float tensor [B, 3, H, W] in [-1, 1] (what encode_images takes)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@dataclass
class BaseDiffusion:
    """The frozen base model's diffusers components and how to sample from them."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # TinyAutoencoder (embedded) or diffusers AutoencoderKL (Stable Diffusion)
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler: Any  # diffusers DDIMScheduler (clip_sample=False)
    source: str = "embedded"
    text_encoder_2: Any = None  # SDXL layout: transformers CLIPTextModelWithProjection
    tokenizer_2: Any = None
    # SDXL: guidance's unconditional half is zeros, not the encoded empty prompt (model_index.json's flag,
    # True unless it says otherwise, as in StableDiffusionXLPipeline). SD 1.x always encodes "".
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    # ------------------------------------------------------------ shapes
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), size, size)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def modules(self) -> dict[str, Any]:
        modules = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        return {**modules, "text_encoder_2": self.text_encoder_2} if self.is_sdxl else modules

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BaseDiffusion":
        # Only what was asked for: diffusers warns on every .to(dtype=...) of a ModelMixin.
        kwargs = {key: value for key, value in (("device", device), ("dtype", dtype)) if value is not None}
        for module in self.modules().values():
            module.to(**kwargs)
        return self

    def eval(self) -> "BaseDiffusion":
        for module in self.modules().values():
            module.eval()
            module.requires_grad_(False)
        return self

    # ------------------------------------------------------------ text and latents
    def tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> the prompt states every denoiser call takes as its context, [B, L, D].

        Stable Diffusion 1.x: the text encoder's last hidden state. SDXL: both encoders' penultimate
        hidden states side by side, plus one more row that carries the pooled embedding of the second
        encoder and the size ids [h, w, 0, 0, h, w] (what StableDiffusionXLPipeline computes). Packing them
        as a row lets every path that repeats, batches or splits prompt states (guidance, groups) carry
        them along unchanged; `conditioned_call` unpacks the row for the UNet.
        """
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        if not self.is_sdxl:
            return self.text_encoder(ids)[0]
        first = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = self.text_encoder_2(self.tokenize(prompts, self.tokenizer_2).to(self.text_encoder_2.device),
                                     output_hidden_states=True)
        states = torch.cat([first, second.hidden_states[-2]], dim=-1)
        return torch.cat([states, self._added_conditioning_row(second.text_embeds.to(states.dtype), states.shape[-1])],
                         dim=1)

    def _added_conditioning_row(self, pooled: torch.Tensor, width: int) -> torch.Tensor:
        """SDXL's packed row [B, 1, width]: the pooled embedding, then the size ids, zero-padded."""
        if pooled.shape[-1] + SDXL_SIZE_IDS > width:
            raise PerfusionError(f"SDXL pooled embedding ({pooled.shape[-1]}) + {SDXL_SIZE_IDS} size ids do not fit "
                                 f"one row of the prompt states (width {width})")
        size = self.image_size
        row = torch.zeros(pooled.shape[0], 1, width, dtype=pooled.dtype, device=pooled.device)
        row[:, 0, :pooled.shape[-1]] = pooled
        row[:, 0, pooled.shape[-1]:pooled.shape[-1] + SDXL_SIZE_IDS] = torch.tensor(
            [size, size, 0, 0, size, size], dtype=pooled.dtype, device=pooled.device)
        return row

    def encode_unconditional(self, count: int) -> torch.Tensor:
        """Prompt states of guidance's unconditional half: the encoded empty prompt, or for an SDXL base with
        force_zeros_for_empty_prompt zeros everywhere but the size ids, built without running the encoders
        (StableDiffusionXLPipeline zeroes the negative prompt and pooled embeddings and keeps the size ids)."""
        if not (self.is_sdxl and self.force_zeros_for_empty_prompt):
            return self.encode_prompts([""] * count)
        width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        like = dict(dtype=self.text_encoder.dtype, device=self.text_encoder.device)
        states = torch.zeros(count, self.tokenizer.model_max_length, width, **like)
        pooled = torch.zeros(count, self.text_encoder_2.config.projection_dim, **like)
        return torch.cat([states, self._added_conditioning_row(pooled, width)], dim=1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] [B, 3, H, W] -> scaled latents (what the UNet sees)."""
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1], [B, 3, H, W]."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def sampling_scheduler(self, num_inference_steps: int):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler.config, clip_sample=False)
        scheduler.set_timesteps(num_inference_steps)
        return scheduler

    # ------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: list[str], guidance_scale: float = 4.0, num_inference_steps: int = 20,
               seed: int | None = 0, generator: torch.Generator | None = None, batch_size: int = 64) -> np.ndarray:
        """Prompts -> uint8 RGB images [N, H, W, 3]. Same seed, same images (PerFusionPipeline, no merchant)."""
        from perfusion_ray.models.pipeline import PerFusionPipeline

        if generator is None:
            generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        if not prompts:
            size = self.image_size
            return np.zeros((0, size, size, 3), np.uint8)
        return PerFusionPipeline.from_base(self)(list(prompts), guidance_scale=guidance_scale,
                                                 num_inference_steps=num_inference_steps, generator=generator,
                                                 output_type="np", batch_size=batch_size,
                                                 allow_empty_prompt=True).images

    def pipeline(self):
        """A diffusers StableDiffusionPipeline (StableDiffusionXLPipeline) over the same components."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.is_sdxl:
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
                scheduler=self.sampling_scheduler(1), force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.sampling_scheduler(1), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    # ------------------------------------------------------------ saving
    def save_pretrained(self, folder: str | Path, fp16: bool = False, with_tokenizer: bool = True) -> Path:
        """Write the Stable Diffusion layout (unet/ vae/ text_encoder/ tokenizer/ scheduler/, model_index.json;
        SDXL adds text_encoder_2/ and tokenizer_2/).

        fp16 stores the UNet and text encoder in half precision (load_base upcasts to float32); the
        autoencoder stays float32 (it is small and decodes every image).
        """
        from diffusers.utils import logging as diffusers_logging

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        half = torch.float16 if fp16 else None
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # .to(fp16) warns about modules it need not keep in fp32
        try:
            for name in ("unet", "text_encoder") + (("text_encoder_2",) if self.is_sdxl else ()):
                module = getattr(self, name)
                original = module.dtype
                if half is not None:
                    module.to(half)
                try:
                    module.save_pretrained(str(folder / name), safe_serialization=True)
                finally:
                    module.to(original)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        self.vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
        if with_tokenizer:
            self.tokenizer.save_pretrained(str(folder / "tokenizer"))
            if self.is_sdxl:
                self.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
        self.scheduler.save_pretrained(str(folder / "scheduler"))
        index = {"_class_name": "StableDiffusionPipeline", "_perfusion_source": self.source,
                 "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": [type(self.vae).__module__.split(".")[0], type(self.vae).__name__],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", type(self.scheduler).__name__],
                 "safety_checker": [None, None], "feature_extractor": [None, None]}
        if self.is_sdxl:  # StableDiffusionXLPipeline has no safety checker
            del index["safety_checker"], index["feature_extractor"]
            index = {**index, "_class_name": "StableDiffusionXLPipeline",
                     "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                     "tokenizer_2": ["transformers", "CLIPTokenizer"],
                     "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return folder


# ---------------------------------------------------------------- building and loading
def build_embedded(seed: int = 0, image_size: int = 32) -> BaseDiffusion:
    """A freshly initialised embedded model (the starting point of `perfusion pretrain base`)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from perfusion_ray.models.autoencoder import TinyAutoencoder

    torch.manual_seed(seed)
    if image_size % 4:
        raise PerfusionError(f"image_size {image_size} is not a multiple of 4 (the autoencoder downsamples 4x)")
    unet = UNet2DConditionModel(**{**EMBEDDED_UNET, "sample_size": image_size // 4})
    text_encoder = CLIPTextModel(CLIPTextConfig(**EMBEDDED_TEXT_ENCODER))
    vae = TinyAutoencoder(**{**EMBEDDED_VAE, "sample_size": image_size})
    return BaseDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=fit_tokenizer(None, text_encoder),
                         scheduler=DDIMScheduler(**EMBEDDED_SCHEDULER), source="embedded")


def fit_tokenizer(tokenizer, text_encoder):
    """The tokenizer (default: the real CLIP BPE one), padding to at most the text encoder's positions."""
    if tokenizer is None:
        from perfusion_ray.models.tokenizer import clip_tokenizer

        tokenizer = copy.deepcopy(clip_tokenizer())  # the cached instance is shared: never edit it
    positions = int(text_encoder.config.max_position_embeddings)
    if tokenizer.model_max_length > positions:
        tokenizer.model_max_length = positions
    return tokenizer


def _vae_class(folder: Path):
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    except (OSError, ValueError) as exc:
        raise PerfusionError(f"{folder}/config.json is missing or unreadable ({exc})") from exc
    if name == "TinyAutoencoder":
        from perfusion_ray.models.autoencoder import TinyAutoencoder

        return TinyAutoencoder
    import diffusers

    if not hasattr(diffusers, name):
        raise PerfusionError(f"{folder}: unknown VAE class {name!r}", hint="expected AutoencoderKL or TinyAutoencoder")
    return getattr(diffusers, name)


def _force_zeros(folder: Path) -> bool:
    """An SDXL directory's force_zeros_for_empty_prompt; absent (or no model_index.json) means True,
    StableDiffusionXLPipeline's default."""
    index = folder / "model_index.json"
    try:
        return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)) if index.is_file() else True
    except ValueError as exc:
        raise PerfusionError(f"{index} is not valid JSON ({exc})") from exc


def conditioned_call(model, sample: torch.Tensor, timestep, context: torch.Tensor, **kwargs):
    """Call a UNet2DConditionModel or ControlNetModel on prompt states from `encode_prompts`.

    For an SDXL-shaped model (addition_embed_type "text_time") the last row of `context` is unpacked
    into added_cond_kwargs (pooled text embedding, size ids); any other model gets `context` as is.
    """
    if getattr(model.config, "addition_embed_type", None) != "text_time":
        return model(sample, timestep, context, **kwargs)
    pooled = model.config.projection_class_embeddings_input_dim - SDXL_SIZE_IDS * model.config.addition_time_embed_dim
    row = context[:, -1]
    added = {"text_embeds": row[:, :pooled], "time_ids": row[:, pooled:pooled + SDXL_SIZE_IDS]}
    return model(sample, timestep, context[:, :-1], added_cond_kwargs=added, **kwargs)


def resolve_base_path(path: str | Path) -> Path:
    return EMBEDDED_DIR if str(path) == "embedded" else Path(path).expanduser()


def load_base(path: str | Path = "embedded", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
              ) -> BaseDiffusion:
    """Load a base model from a directory in Stable Diffusion's layout ('embedded' = the shipped model).

    Components are read with from_pretrained from the subfolders unet/, vae/, text_encoder/, tokenizer/
    (optional: the CLIP BPE tokenizer otherwise) and scheduler/ (any diffusers scheduler config; sampling
    converts it to DDIM); text_encoder_2/ and tokenizer_2/ make it an SDXL base. Weights stored in fp16
    are cast to `dtype`. Returned in eval mode, frozen.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = resolve_base_path(path)
    missing = [name for name in ("unet", "vae", "text_encoder", "scheduler") if not (folder / name).is_dir()]
    if missing:
        what = "the embedded base model" if str(path) == "embedded" else "a Stable Diffusion directory"
        raise PerfusionError(
            f"{folder} is not {what}: missing {', '.join(name + '/' for name in missing)}",
            hint="policy.base is 'embedded' or a local folder with unet/ vae/ text_encoder/ tokenizer/ scheduler/ "
                 "(e.g. a Stable Diffusion 1.5 checkout); `perfusion pretrain base` rebuilds the embedded one")
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype)
    vae = _vae_class(folder / "vae").from_pretrained(str(folder / "vae"), torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype)

    def tokenizer_in(name: str, encoder):
        found = CLIPTokenizer.from_pretrained(str(folder / name)) if (folder / name).is_dir() else None
        return fit_tokenizer(found, encoder)

    tokenizer = tokenizer_in("tokenizer", text_encoder)
    text_encoder_2 = tokenizer_2 = None
    if (folder / "text_encoder_2").is_dir():
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"), dtype=dtype)
        tokenizer_2 = tokenizer_in("tokenizer_2", text_encoder_2)
        if tokenizer_2.model_max_length != tokenizer.model_max_length:
            raise PerfusionError(f"{folder}: tokenizer/ pads to {tokenizer.model_max_length} tokens but tokenizer_2/ "
                                 f"to {tokenizer_2.model_max_length}; SDXL's two prompt states must have one length")
    scheduler = DDIMScheduler.from_pretrained(str(folder / "scheduler"), clip_sample=False)
    base = BaseDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                         source="embedded" if folder.resolve() == EMBEDDED_DIR.resolve() else str(folder),
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                         force_zeros_for_empty_prompt=text_encoder_2 is not None and _force_zeros(folder))
    return base.to(device=device).eval()  # from_pretrained already cast every weight to dtype
