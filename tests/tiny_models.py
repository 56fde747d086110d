"""Random Stable-Diffusion-shaped base models at toy size, saved component by component the way a hub
checkout is laid out: the GPU-cluster loading path (SD 1.x and SDXL layouts) exercised on the CPU."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_stable_diffusion(folder: Path, xl: bool = False) -> Path:
    """SD 1.5's layout (AutoencoderKL, PNDM scheduler config as it ships) or, with xl, SDXL's: a second
    text encoder with projection, a UNet with SDXL's "text_time" added conditioning, an Euler scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from perfusion_ray.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2 if xl else 1,
                num_attention_heads=2, max_position_embeddings=77)
    blocks = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + 6 * 8) if xl else dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32)
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(32, 64), attention_head_dim=4, norm_num_groups=8,
                         **blocks).save_pretrained(str(folder / "unet"))
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=32).save_pretrained(str(folder / "vae"))
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(str(folder / "text_encoder"))
    clip_tokenizer().save_pretrained(str(folder / "tokenizer"))
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if xl:
        CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)).save_pretrained(
            str(folder / "text_encoder_2"))
        clip_tokenizer().save_pretrained(str(folder / "tokenizer_2"))
        EulerDiscreteScheduler(**schedule, timestep_spacing="leading").save_pretrained(str(folder / "scheduler"))
    else:
        PNDMScheduler(**schedule, skip_prk_steps=True, set_alpha_to_one=False).save_pretrained(
            str(folder / "scheduler"))
    return folder
