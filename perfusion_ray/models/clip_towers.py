"""CLIP towers for the reward model: a local transformers CLIPModel directory (a CLIP-H checkpoint on a
GPU cluster) or the small CLIP the project pretrains on FashionWorld (`perfusion pretrain clip`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel

from perfusion_ray.errors import PerfusionError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMBEDDED_CLIP = Path(__file__).resolve().parents[2] / "assets" / "embedded_clip"
TEXT_LENGTH = 32  # FashionWorld prompts are a few words; a CLIP-H checkpoint allows 77


def small_clip_config(image_size: int = 32) -> CLIPConfig:
    """The embedded CLIP: a 3-layer ViT on 8x8 patches (a patch embedding still sees every stripe) and a 2-layer text tower on the real vocabulary."""
    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=96, intermediate_size=384,
                           num_hidden_layers=3, num_attention_heads=4, num_channels=3),
        projection_dim=64,
    )


def load_clip(path: str | Path | None = None) -> CLIPModel:
    """A CLIPModel from a local directory (default: the shipped embedded CLIP). No hub access."""
    path = Path(path) if path is not None else EMBEDDED_CLIP
    if not (path / "config.json").is_file():
        hint = "run `perfusion pretrain clip` to rebuild the embedded one" if path == EMBEDDED_CLIP else \
            "give a local directory saved with CLIPModel.save_pretrained"
        raise PerfusionError(f"no CLIP checkpoint at {path} (config.json missing)", hint=hint)
    return CLIPModel.from_pretrained(str(path))


def pixel_values(images, size: int) -> torch.Tensor:
    """uint8 RGB [N, H, W, 3] (numpy or tensor) -> CLIP-normalised float [N, 3, size, size]."""
    images = torch.as_tensor(np.asarray(images))
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images [N, H, W, 3], got shape {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def text_inputs(tokenizer, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    encoded = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
