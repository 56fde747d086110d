"""The reward model as a transformers model, for `AutoModel.from_pretrained(folder, trust_remote_code=True)`
where perfusion_ray is not installed.

Every reward model directory carries this module as modeling_perfusion_rm.py (models/interop.py), with
PerFusionRM's own scoring code (forward, inputs, score) over the same modules, built from the same
config.json, reading the same model.safetensors. Loading refuses weights that do not fit the modules
(transformers would otherwise start the missing ones from random values, with only a warning).
"""

from __future__ import annotations

from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, PretrainedConfig, PreTrainedModel

from perfusion_ray.models.crossing import PersonalizedPlugin
from perfusion_ray.models.image_head import ImageHead
from perfusion_ray.models.merchant_encoder import MerchantEncoder
from perfusion_ray.models.reward_model import MODEL_TYPE, PerFusionRM
from perfusion_ray.records import Merchant


class PerFusionRMConfig(PretrainedConfig):
    """A reward model directory's config.json: the fields of perfusion_ray's RewardModelConfig, as attributes."""

    model_type = MODEL_TYPE


class PerFusionRMModel(PerFusionRM, PreTrainedModel):
    """PerFusionRM's modules under the same names, as a transformers PreTrainedModel. `score` also takes
    merchants as dicts of the event schema's columns (merchant_id, merchant_features, merchant_stats)."""

    config_class = PerFusionRMConfig
    base_model_prefix = "perfusion_rm"

    def __init__(self, config: PerFusionRMConfig):
        PreTrainedModel.__init__(self, config)  # not PerFusionRM's: that one reads perfusion_ray's own config type
        self.clip = clip = CLIPModel(CLIPConfig.from_dict(config.clip_config))
        width, pooled = clip.config.projection_dim, config.plugin_input == "pooled"
        self.merchant_encoder = MerchantEncoder(config.merchant_dim, config.id_buckets, config.feature_buckets,
                                                tuple(config.stat_names), id_dropout=config.id_dropout)
        self.merchant_encoder.known_ids = set(config.known_ids)
        self.text_plugin = PersonalizedPlugin(width, config.merchant_dim, config.cross_layers,
                                              clip.config.text_config.hidden_size if pooled else None)
        head_channels = getattr(config, "image_head_channels", 0)
        self.image_head = ImageHead(head_channels, config.image_head_dim) if head_channels else None
        image_source = (clip.config.vision_config.hidden_size if pooled else width) + \
            (config.image_head_dim if self.image_head is not None else 0)
        self.image_plugin = PersonalizedPlugin(width, config.merchant_dim, config.cross_layers, image_source)
        clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1))
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone())
        self._set_tower_mode(config.towers, config.lora_rank)
        self.tokenizer = None  # read from the directory by from_pretrained
        self.post_init()

    def _init_weights(self, module) -> None:
        """Every weight comes from model.safetensors (from_pretrained refuses a directory that lacks one)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "PerFusionRMModel":
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        unfit = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(unfit.values()):
            raise ValueError(f"the weights in {pretrained_model_name_or_path} do not fit its config.json: "
                             + ", ".join(f"{kind} {names[:3]}" for kind, names in unfit.items() if names))
        model.tokenizer = CLIPTokenizer.from_pretrained(pretrained_model_name_or_path)
        model.eval()
        return (model, info) if wants_info else model

    def score(self, merchants, prompts: list[str], images, batch_size: int = 256):
        return super().score([Merchant.coerce(m) for m in merchants], prompts, images, batch_size)
