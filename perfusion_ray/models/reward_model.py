"""PerFusionRM: CLIP text and image towers, each with a feature-crossing plug-in that injects the
merchant; score s(u, c, x) = logit_scale * cos(text'(c, u), image'(x, u)).

Towers are frozen, LoRA-tuned or fully tuned by config. With plugin=False the same code path is the
non-personalized baseline: the plug-ins keep their capacity but see a zero merchant vector, so the
baseline can learn what every merchant likes, and nothing about who asks. A trained model is a self-contained directory (config.json +
model.safetensors, no pickle) that `load_reward_model` rebuilds with one call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel

from perfusion_ray.errors import PerfusionError
from perfusion_ray.models.clip_towers import pixel_values, text_inputs
from perfusion_ray.models.crossing import PersonalizedPlugin
from perfusion_ray.models.image_head import ImageHead
from perfusion_ray.models.merchant_encoder import MerchantEncoder
from perfusion_ray.models.tokenizer import clip_tokenizer
from perfusion_ray.records import Merchant

MODEL_TYPE = "perfusion_rm"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class RewardModelConfig(BaseModel):
    """Architecture of a PerFusionRM; stored as config.json beside the weights."""

    model_config = ConfigDict(extra="forbid")

    model_type: Literal["perfusion_rm"] = MODEL_TYPE
    version: str = Field("untrained", description="carried with every score the model produces")
    towers: Literal["frozen", "lora", "full"] = "lora"
    lora_rank: int = Field(8, ge=1)
    plugin: bool = True
    cross_layers: int = Field(2, ge=1)
    plugin_input: Literal["projected", "pooled"] = "projected"  # what the plug-ins cross with the merchant
    image_head_channels: int = Field(0, ge=0)  # a trainable pixel encoder beside the image tower; 0: none
    image_head_dim: int = Field(32, ge=1)
    merchant_dim: int = Field(64, ge=4)
    id_buckets: int = Field(4096, ge=1)
    feature_buckets: int = Field(1024, ge=1)
    stat_names: list[str] = []
    id_dropout: float = Field(0.25, ge=0, lt=1)
    text_length: int = Field(32, ge=4)
    known_ids: list[str] = []  # merchants seen in training; any other id is cold start
    clip_config: dict = {}  # the towers' CLIPConfig, so the directory is self-contained


class PerFusionRM(nn.Module):
    def __init__(self, clip: CLIPModel, config: RewardModelConfig):
        super().__init__()
        self.config = config.model_copy(update={"clip_config": clip.config.to_dict()})
        self.clip = clip
        width = clip.config.projection_dim
        self.merchant_encoder = MerchantEncoder(config.merchant_dim, config.id_buckets, config.feature_buckets,
                                                tuple(config.stat_names), id_dropout=config.id_dropout)
        self.merchant_encoder.known_ids = set(config.known_ids)
        pooled = config.plugin_input == "pooled"
        self.text_plugin = PersonalizedPlugin(width, config.merchant_dim, config.cross_layers,
                                              clip.config.text_config.hidden_size if pooled else None)
        self.image_head = ImageHead(config.image_head_channels, config.image_head_dim) \
            if config.image_head_channels else None
        image_source = (clip.config.vision_config.hidden_size if pooled else width) + \
            (config.image_head_dim if self.image_head is not None else 0)
        self.image_plugin = PersonalizedPlugin(width, config.merchant_dim, config.cross_layers, image_source)
        # 1-element, not 0-dim: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes.
        clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1))
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone())
        self._set_tower_mode(config.towers, config.lora_rank)
        self.tokenizer = clip_tokenizer()

    def _set_tower_mode(self, towers: str, rank: int) -> None:
        self.clip.requires_grad_(towers == "full")
        if towers == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
            inject_adapter_in_model(lora, self.clip)  # leaves only the LoRA matrices trainable in the towers

    @property
    def image_size(self) -> int:
        return self.clip.config.vision_config.image_size

    def encode_merchants(self, merchants: Sequence[Merchant]) -> dict[str, torch.Tensor]:
        return self.merchant_encoder.featurize(merchants)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                merchant: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores [N] for N (merchant, prompt, image) rows."""
        # CLIPModel.get_*_features, in two steps: the pooled tower output, then CLIP's linear projection.
        text_pooled = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        image_pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
        text, image = self.clip.text_projection(text_pooled), self.clip.visual_projection(image_pooled)
        vector = self.merchant_encoder(**merchant)
        if not self.config.plugin:
            # The non-personalized baseline: the same plug-ins and capacity, blind to the merchant.
            vector = torch.zeros_like(vector)
        pooled = self.config.plugin_input == "pooled"
        text = self.text_plugin(text, vector, text_pooled if pooled else None)
        image_source = image_pooled if pooled else image
        if self.image_head is not None:
            image_source = torch.cat([image_source, self.image_head(pixel_values)], dim=-1)
        image = self.image_plugin(image, vector, image_source)
        cosine = nn.functional.cosine_similarity(text, image, dim=-1)
        return self.logit_scale.exp() * cosine

    def inputs(self, merchants: Sequence[Merchant], prompts: list[str], images) -> dict:
        """Model inputs for N rows: merchants (N), prompts (N), uint8 RGB images [N, H, W, 3]."""
        if not (len(merchants) == len(prompts) == len(images)):
            raise ValueError(f"need one merchant and one prompt per image, got {len(merchants)}, {len(prompts)}, "
                             f"{len(images)}")
        device = self.logit_scale.device
        text = {k: v.to(device) for k, v in text_inputs(self.tokenizer, prompts, self.config.text_length).items()}
        return {**text, "pixel_values": pixel_values(images, self.image_size).to(device),
                "merchant": self.encode_merchants(merchants)}

    @torch.no_grad()
    def score(self, merchants: Sequence[Merchant], prompts: list[str], images, batch_size: int = 256) -> np.ndarray:
        """Batched scoring: one float per (merchant, prompt, image) row. The Serve deployment wraps this."""
        was_training = self.training
        self.eval()
        scores = []
        for start in range(0, len(prompts), batch_size):
            part = slice(start, start + batch_size)
            scores.append(self(**self.inputs(merchants[part], prompts[part], images[part])).float().cpu().numpy())
        self.train(was_training)
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)


def build_reward_model(clip: CLIPModel, config: RewardModelConfig) -> PerFusionRM:
    return PerFusionRM(clip, config)


def save_reward_model(model: PerFusionRM, folder: str | Path, state_dict: dict | None = None) -> Path:
    """Write config.json + model.safetensors. `state_dict` lets ZeRO-3 callers pass gathered weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.model_copy(update={"known_ids": sorted(model.merchant_encoder.known_ids)})
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"model_type": MODEL_TYPE, "version": config.version})
    (folder / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    from perfusion_ray.models.interop import write_reward_model_code

    write_reward_model_code(folder, model.tokenizer)  # loadable by transformers' AutoModel too
    return folder


def load_reward_model(folder: str | Path) -> PerFusionRM:
    """Rebuild a PerFusionRM from its directory, or fail naming what is wrong with it."""
    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise PerfusionError(f"reward model directory {folder} is missing {name}",
                                 hint="export one with `perfusion rm train` (it writes <out>/model)")
    raw = json.loads((folder / CONFIG_FILE).read_text())
    raw.pop("auto_map", None)  # for transformers' AutoModel (models/interop.py)
    if raw.get("model_type") != MODEL_TYPE:
        raise PerfusionError(f"{folder / CONFIG_FILE} was written by another model (model_type="
                             f"{raw.get('model_type')!r}, expected {MODEL_TYPE!r})")
    config = RewardModelConfig.model_validate(raw)
    model = PerFusionRM(CLIPModel(CLIPConfig.from_dict(config.clip_config)), config)
    state = load_file(str(folder / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PerfusionError(f"{folder / WEIGHTS_FILE} does not fit its config: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
    return model.eval()
