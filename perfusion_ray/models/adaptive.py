"""The personalized adaptive network: a ControlNet-style trainable copy of the base UNet's encoder,
joined to the frozen base through zero-initialised convolutions, conditioned on the merchant.

How the merchant enters the branch: the merchant encoder's vector is projected to a few channels and
tiled to the latent's spatial size as the ControlNet conditioning image. (In a probe this moved
outputs far more than appending the vector as extra cross-attention tokens; the method leaves the
choice open.) The copy carries LoRA adapters (peft) on its attention projections; its zero
convolutions, conditioning embedding and the merchant modules train in full; the base UNet is frozen.

Two objects: `PersonalizedAdapter` is everything trainable (a diffusers ModelMixin, saved and loaded on
its own); `PersonalizedUNet` joins it to the frozen base UNet. The reference model is the same network
with the branch switched off (`branch=False`): no second copy in memory. At initialisation the zero
joins make the personalized output equal the base output exactly.

A saved adapter is a folder of standard parts, each readable on its own:
    config.json                  the adapter's own settings (merchant encoder, known ids, LoRA rank)
    controlnet/                  the branch's ControlNetModel without its LoRA (ControlNetModel.from_pretrained)
    lora/                        the branch's LoRA as a peft adapter (adapter_config.json, adapter_model.safetensors)
    merchant.safetensors         the merchant encoder and its projection to the conditioning map
The folder itself holds no diffusers weights file, so a diffusers class pointed at it fails instead of
building a default model. These classes travel with every exported pipeline (models/interop.py): what
they use must be carried with them (models/portable_source.py checks it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import ConfigMixin, ControlNetModel, ModelMixin
from torch import nn

from perfusion_ray.errors import PerfusionError
from perfusion_ray.models.base import conditioned_call
from perfusion_ray.models.merchant_encoder import MerchantEncoder
from perfusion_ray.records import Merchant

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The branch's parts that train in full next to its LoRA matrices (names inside ControlNetModel).
FULLY_TRAINED = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
ADAPTER_CONFIG, MODEL_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"  # diffusers' file names
CONTROLNET_FOLDER, LORA_FOLDER, MERCHANT_WEIGHTS = "controlnet", "lora", "merchant.safetensors"
LORA_WEIGHTS = "adapter_model.safetensors"  # peft's file name
PEFT_PREFIX = "base_model.model."  # peft saves names as seen from the PeftModel that wraps the model


def split_adapter_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """An adapter's state dict as its saved parts: (ControlNetModel names, peft LoRA names, merchant names)."""
    controlnet, lora, merchant = {}, {}, {}
    for name, tensor in state.items():
        inner = name.removeprefix("controlnet.")
        if inner == name:
            merchant[name] = tensor
        elif ".lora_" in inner:
            lora[PEFT_PREFIX + re.sub(r"\.(lora_[AB])\.default\.", r".\1.", inner)] = tensor
        else:
            controlnet[inner.replace(".base_layer.", ".")] = tensor
    return controlnet, lora, merchant


def join_adapter_state(controlnet: dict, lora: dict, merchant: dict) -> dict[str, torch.Tensor]:
    """The inverse of split_adapter_state: the state dict of an adapter with its LoRA attached."""
    wrapped = {name.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for name in lora}  # the layers LoRA wraps
    state = dict(merchant)
    for name, tensor in controlnet.items():
        layer, _, leaf = name.rpartition(".")
        state["controlnet." + (f"{layer}.base_layer.{leaf}" if layer in wrapped else name)] = tensor
    for name, tensor in lora.items():
        state["controlnet." + re.sub(r"\.(lora_[AB])\.", r".\1.default.", name.removeprefix(PEFT_PREFIX))] = tensor
    return state


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path.with_name(path.name + ".tmp")), metadata={"format": "pt"})
    path.with_name(path.name + ".tmp").replace(path)


def _save_json(value: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(path.name + ".tmp").write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    path.with_name(path.name + ".tmp").replace(path)


class PersonalizedAdapter(ModelMixin, ConfigMixin):
    """The trainable branch: merchant encoder -> conditioning map -> ControlNet copy with LoRA.

    Built from a base UNet with `from_unet` (the copy starts as the base encoder), or from its own
    config (then the weights come from a saved adapter). Config keys must not shadow submodule names:
    diffusers resolves attributes from the config first.
    """

    config_name = "config.json"

    def __init__(self, controlnet_config: dict, merchant_dim: int = 64, condition_channels: int = 8, lora_rank: int = 8,
                 stat_names: tuple[str, ...] | list[str] = (), known_ids: list[str] | tuple[str, ...] = (),
                 id_dropout: float = 0.25, lora: bool = True):
        super().__init__()
        self.register_to_config(controlnet_config=dict(controlnet_config), merchant_dim=merchant_dim,
                                condition_channels=condition_channels, lora_rank=lora_rank,
                                stat_names=list(stat_names), known_ids=sorted(known_ids), id_dropout=id_dropout,
                                lora=lora)
        self.controlnet = ControlNetModel.from_config(dict(controlnet_config))
        self.merchant_encoder = MerchantEncoder(merchant_dim, stat_names=tuple(stat_names), id_dropout=id_dropout)
        self.merchant_encoder.known_ids = set(known_ids)
        self.condition = nn.Linear(merchant_dim, condition_channels)
        if lora:
            self._attach_lora()

    def _attach_lora(self) -> None:
        from peft import LoraConfig

        self.controlnet.requires_grad_(False)
        self.controlnet.add_adapter(LoraConfig(r=self.config.lora_rank, lora_alpha=self.config.lora_rank,
                                               target_modules=LORA_TARGETS))
        for name, parameter in self.controlnet.named_parameters():
            if "lora_" in name or name.startswith(FULLY_TRAINED):
                parameter.requires_grad_(True)

    @classmethod
    def from_unet(cls, unet, merchant_dim: int = 64, condition_channels: int = 8, lora_rank: int = 8,
                  stat_names: tuple[str, ...] = (), known_ids: tuple[str, ...] = (), id_dropout: float = 0.25
                  ) -> "PersonalizedAdapter":
        """A fresh adapter whose ControlNet copy starts as the base UNet's encoder (joins at zero)."""
        copy = ControlNetModel.from_unet(unet, conditioning_channels=condition_channels,
                                         conditioning_embedding_out_channels=(16,))
        adapter = cls(dict(copy.config), merchant_dim, condition_channels, lora_rank, stat_names, known_ids,
                      id_dropout, lora=False)
        adapter.controlnet.load_state_dict(copy.state_dict())
        adapter._attach_lora()
        adapter.register_to_config(lora=True)
        return adapter

    # ------------------------------------------------------------ merchants
    def featurize(self, merchants: Sequence[Merchant]) -> dict[str, torch.Tensor]:
        return self.merchant_encoder.featurize(merchants)

    def fit_merchants(self, merchants: Sequence[Merchant]) -> None:
        """Remember the training merchants (known ids, stat scale): others take the cold-start path."""
        self.merchant_encoder.fit_normalisation(merchants)
        self.register_to_config(known_ids=sorted(self.merchant_encoder.known_ids))

    def condition_map(self, merchant: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        """The merchant as a (B, C, H, W) conditioning image at the latent's spatial size."""
        vector = self.condition(self.merchant_encoder(**merchant))
        return vector[:, :, None, None].expand(-1, -1, *sample.shape[-2:]).to(sample.dtype)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                merchant: dict[str, torch.Tensor], conditioning_scale: float = 1.0):
        """The residuals the branch adds to the base UNet: (down block residuals, mid block residual)."""
        return conditioned_call(self.controlnet, sample, timestep, encoder_hidden_states,
                                controlnet_cond=self.condition_map(merchant, sample),
                                conditioning_scale=conditioning_scale, return_dict=False)

    # ------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | Path, state_dict: dict | None = None, **_) -> None:
        """The folder of standard parts (module docstring). `state_dict` lets ZeRO-3 callers pass gathered
        weights. diffusers' own save would keep the peft layers' names but not their meaning on reload."""
        import diffusers

        folder = Path(save_directory)
        state = state_dict if state_dict is not None else self.state_dict()
        controlnet, lora, merchant = split_adapter_state(
            {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()})
        version = {"_diffusers_version": diffusers.__version__}
        _save_json({"_class_name": "ControlNetModel", **version, **{key: value for key, value in
                    self.config.controlnet_config.items() if not key.startswith("_")}},
                   folder / CONTROLNET_FOLDER / ADAPTER_CONFIG)
        _save_tensors(controlnet, folder / CONTROLNET_FOLDER / MODEL_WEIGHTS)
        if lora:
            self.controlnet.peft_config["default"].save_pretrained(str(folder / LORA_FOLDER))
            _save_tensors(lora, folder / LORA_FOLDER / LORA_WEIGHTS)
        _save_tensors(merchant, folder / MERCHANT_WEIGHTS)
        _save_json({"_class_name": type(self).__name__, **version, **{key: value for key, value in self.config.items()
                    if key != "controlnet_config" and not key.startswith("_")}}, folder / ADAPTER_CONFIG)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, torch_dtype: torch.dtype | None = None,
                        **_) -> "PersonalizedAdapter":
        """Load a saved adapter; one saved as a single diffusers weights file (the layout of earlier
        exports, config.json with its controlnet_config) loads too."""
        from safetensors.torch import load_file

        folder = Path(pretrained_model_name_or_path)
        config = json.loads((folder / ADAPTER_CONFIG).read_text()) if (folder / ADAPTER_CONFIG).is_file() else {}
        single_file = (folder / MODEL_WEIGHTS).is_file() and "controlnet_config" in config
        needed = [ADAPTER_CONFIG] + ([MODEL_WEIGHTS] if single_file else [
            f"{CONTROLNET_FOLDER}/{ADAPTER_CONFIG}", f"{CONTROLNET_FOLDER}/{MODEL_WEIGHTS}", MERCHANT_WEIGHTS]
            + ([f"{LORA_FOLDER}/{LORA_WEIGHTS}"] if config.get("lora", True) else []))
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise PerfusionError(f"adapter directory {folder} is missing {missing[0]}",
                                 hint="export one with `perfusion align train` or PerFusionPipeline.save_pretrained")
        init = {key: value for key, value in config.items() if not key.startswith("_")}
        if single_file:
            state = load_file(str(folder / MODEL_WEIGHTS))
        else:
            controlnet_config = json.loads((folder / CONTROLNET_FOLDER / ADAPTER_CONFIG).read_text())
            init["controlnet_config"] = {key: value for key, value in controlnet_config.items()
                                         if not key.startswith("_")}
            lora = load_file(str(folder / LORA_FOLDER / LORA_WEIGHTS)) if init.get("lora", True) else {}
            state = join_adapter_state(load_file(str(folder / CONTROLNET_FOLDER / MODEL_WEIGHTS)), lora,
                                       load_file(str(folder / MERCHANT_WEIGHTS)))
        adapter = cls(**init)
        missing, unexpected = adapter.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise PerfusionError(f"the weights in {folder} do not match its config: "
                                 f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        if torch_dtype is not None:
            adapter.to(torch_dtype)
        return adapter.eval()


class PersonalizedUNet(nn.Module):
    """The policy: frozen base UNet + the adapter's residuals. branch=False is the reference."""

    def __init__(self, unet, adapter: PersonalizedAdapter):
        super().__init__()
        self.unet = unet.requires_grad_(False)
        self.adapter = adapter

    @classmethod
    def from_unet(cls, unet, **adapter_options) -> "PersonalizedUNet":
        return cls(unet, PersonalizedAdapter.from_unet(unet, **adapter_options))

    @property
    def merchant_encoder(self) -> MerchantEncoder:
        return self.adapter.merchant_encoder

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                merchant: dict[str, torch.Tensor] | None = None, branch: bool = True,
                conditioning_scale: float = 1.0) -> torch.Tensor:
        """Noise (or v) prediction. branch=False, or no merchant, is the frozen base: the reference."""
        if not branch or merchant is None:
            return conditioned_call(self.unet, sample, timestep, encoder_hidden_states).sample
        down, mid = self.adapter(sample, timestep, encoder_hidden_states, merchant, conditioning_scale)
        return conditioned_call(self.unet, sample, timestep, encoder_hidden_states,
                                down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
