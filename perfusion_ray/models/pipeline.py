"""PerFusionPipeline: a diffusers DiffusionPipeline over the frozen base model and the personalized adapter.

    pipe = PerFusionPipeline.from_pretrained("out/align/pipeline")
    images = pipe("a dress", merchant={"merchant_id": "m007", "merchant_features": {...}},
                  num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images

`merchant` is one merchant for every prompt, or one per prompt (merchants share a batch: the merchant is
per-sample conditioning, not a separate model). An id the adapter was not trained on takes the
cold-start path (side features only). No merchant, or no adapter, is the base model exactly.
Sampling is DDIM with classifier-free guidance; by default the branch conditions only the
text-conditioned half, so guidance amplifies the merchant's shift as it does the prompt's
(`personalize_unconditional=True` conditions both halves instead).
save_pretrained / from_pretrained round-trip the whole pipeline (adapter/ holds the branch with its
LoRA matrices; models/adaptive.py). An export also carries the code that loads it with diffusers alone,
perfusion_ray not installed (models/interop.py, docs/interop.md):

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from perfusion_ray.models.adaptive import PersonalizedAdapter, PersonalizedUNet
from perfusion_ray.models.autoencoder import TinyAutoencoder
from perfusion_ray.models.base import BaseDiffusion, conditioned_call, fit_tokenizer
from perfusion_ray.records import Merchant

MerchantInput = Merchant | dict | Sequence[Merchant | dict] | None


@dataclass
class PerFusionPipelineOutput(BaseOutput):
    images: Any  # list of PIL images, uint8 array [N, H, W, 3], or latents, by output_type


class PerFusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->adapter->unet->vae"
    _optional_components = ["adapter", "text_encoder_2", "tokenizer_2"]  # the last two: an SDXL base

    # `adapter` (a PersonalizedAdapter, or None) has no annotation: diffusers checks annotated components'
    # types, and the code an export carries defines the adapter class once per module.
    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, adapter=None, text_encoder_2=None,
                 tokenizer_2=None, force_zeros_for_empty_prompt: bool = False):
        super().__init__()
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)  # saved in model_index.json
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              adapter=adapter, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

    @classmethod
    def from_base(cls, base: BaseDiffusion, adapter: PersonalizedAdapter | None = None) -> "PerFusionPipeline":
        """The pipeline over a base model's components; tokenizers pad to at most their encoder's positions
        (a saved pipeline keeps that length)."""
        tokenizer_2 = fit_tokenizer(base.tokenizer_2, base.text_encoder_2) if base.is_sdxl else None
        return cls(base.vae, base.text_encoder, fit_tokenizer(base.tokenizer, base.text_encoder), base.unet,
                   base.scheduler, adapter, text_encoder_2=base.text_encoder_2, tokenizer_2=tokenizer_2,
                   force_zeros_for_empty_prompt=base.force_zeros_for_empty_prompt)

    # ------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """DiffusionPipeline.save_pretrained, plus the code that loads the export with diffusers alone."""
        from perfusion_ray.models.interop import write_pipeline_code

        super().save_pretrained(str(save_directory), **kwargs)
        write_pipeline_code(Path(save_directory))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> "PerFusionPipeline":
        """DiffusionPipeline.from_pretrained with the export's own components (the adapter, the embedded
        autoencoder) read by this package's classes: the code the export carries is not run here, and
        needs no trust_remote_code."""
        folder = Path(pretrained_model_name_or_path)
        index_file = folder / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
        dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
        own = {name: component.from_pretrained(str(folder / name), torch_dtype=dtype)
               for name, component in (("adapter", PersonalizedAdapter), ("vae", TinyAutoencoder))
               if name not in kwargs and (index.get(name) or [None, None])[1] == component.__name__}
        # diffusers checks a passed component against the module model_index.json names (the carried code,
        # which it would not import): it gets None for ours, and they are registered once it is done.
        pipeline = super().from_pretrained(str(folder), **kwargs, **dict.fromkeys(own))
        pipeline.register_modules(**own)
        return pipeline

    @property
    def base(self) -> BaseDiffusion:
        """The frozen base model's components (prompt and image encoding, the sampling schedule)."""
        return BaseDiffusion(self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler,
                             text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                             force_zeros_for_empty_prompt=self.config.force_zeros_for_empty_prompt)

    # ------------------------------------------------------------ inputs
    @staticmethod
    def _prompts(prompt: str | list[str], allow_empty: bool) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty: give a string or a non-empty list of strings")
        blank = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not (p.strip() or allow_empty)]
        if blank:
            raise ValueError(f"prompt {blank[0]} is empty or not a string: describe the item to generate")
        return prompts

    @staticmethod
    def _merchants(merchant: MerchantInput, count: int) -> list[Merchant] | None:
        if merchant is None:
            return None
        given = [merchant] if isinstance(merchant, (Merchant, dict)) else list(merchant)
        batch = [Merchant.coerce(m) for m in given]
        if len(batch) == 1 and count > 1:
            batch = batch * count
        if len(batch) != count:
            raise ValueError(f"{len(batch)} merchants for {count} prompts: give one merchant, or one per prompt")
        return batch

    # ------------------------------------------------------------ sampling
    def denoiser(self, merchants: list[Merchant] | None, guided: bool, personalize_unconditional: bool = False):
        """(latents, t, context) -> model output, with the branch on for these merchants (if any).

        Under guidance the batch is [unconditional; conditional]. By default only the conditional half
        gets the branch, so guidance scales the merchant's shift with the prompt's (out = u + g (c + d - u));
        personalize_unconditional=True conditions both halves (the shift d enters once, unscaled).
        """
        if merchants is None or self.adapter is None:
            return lambda sample, t, context: conditioned_call(self.unet, sample, t, context).sample
        policy = PersonalizedUNet(self.unet, self.adapter)
        features = self.adapter.featurize(merchants)
        if not guided:
            return lambda sample, t, context: policy(sample, t, context, merchant=features)
        if personalize_unconditional:
            both = {name: torch.cat([value, value]) for name, value in features.items()}
            return lambda sample, t, context: policy(sample, t, context, merchant=both)

        def conditional_only(sample, t, context):
            (uncond_sample, cond_sample), (uncond_context, cond_context) = sample.chunk(2), context.chunk(2)
            return torch.cat([conditioned_call(self.unet, uncond_sample, t, uncond_context).sample,
                              policy(cond_sample, t, cond_context, merchant=features)])

        return conditional_only

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], merchants: list[Merchant] | None, guidance_scale: float,
                       num_inference_steps: int, generator: torch.Generator | None, latents: torch.Tensor | None,
                       personalize_unconditional: bool = False) -> torch.Tensor:
        base = self.base
        n = len(prompts)
        scheduler = base.sampling_scheduler(num_inference_steps)
        if latents is None:
            latents = torch.randn((n, *base.latent_shape), generator=generator, dtype=torch.float32)
        latents = latents.to(base.device, torch.float32) * scheduler.init_noise_sigma
        guided = guidance_scale > 1.0
        cond = base.encode_prompts(prompts)
        context = torch.cat([base.encode_unconditional(n), cond]) if guided else cond
        denoise = self.denoiser(merchants, guided, personalize_unconditional)
        for t in scheduler.timesteps:
            model_in = torch.cat([latents] * 2) if guided else latents
            model_in = scheduler.scale_model_input(model_in, t).to(base.dtype)
            out = denoise(model_in, t, context).float()
            if guided:
                uncond_out, cond_out = out.chunk(2)
                out = uncond_out + guidance_scale * (cond_out - uncond_out)
            latents = scheduler.step(out, t, latents).prev_sample
        return latents

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], merchant: MerchantInput = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, num_inference_steps: int = 20, guidance_scale: float = 4.0,
                 latents: torch.Tensor | None = None, output_type: str = "pil", batch_size: int = 64,
                 return_dict: bool = True, allow_empty_prompt: bool = False, personalize_unconditional: bool = False):
        """Images for each prompt (prompt-major: K images of prompt 0, then prompt 1, ...).

        An empty prompt is an error unless allow_empty_prompt (then it is an unconditional sample).
        `latents` [N*K, C, h, w] fixes the starting noise (same noise, same image: base vs aligned
        comparisons use it); otherwise `generator` draws it batch by batch.
        """
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        prompts = self._prompts(prompt, allow_empty_prompt)
        merchants = self._merchants(merchant, len(prompts))
        k = num_images_per_prompt
        prompts = [p for p in prompts for _ in range(k)]
        if merchants is not None:
            merchants = [m for m in merchants for _ in range(k)]
        if latents is not None and latents.shape[0] != len(prompts):
            raise ValueError(f"latents has {latents.shape[0]} rows for {len(prompts)} images")
        outputs = []
        starts = range(0, len(prompts), batch_size)
        for start in self.progress_bar(starts) if len(starts) > 1 else starts:
            end = start + batch_size
            chunk = merchants[start:end] if merchants is not None else None
            outputs.append(self.sample_latents(prompts[start:end], chunk, guidance_scale, num_inference_steps,
                                               generator, None if latents is None else latents[start:end],
                                               personalize_unconditional))
        result = torch.cat(outputs)
        if output_type != "latent":
            images = self.base.decode_latents(result)
            result = (images.permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
            if output_type == "pil":
                from PIL import Image

                result = [Image.fromarray(image) for image in result]
        return PerFusionPipelineOutput(images=result) if return_dict else (result,)
