"""Tiny Stable-Diffusion-architecture models built in code, for tests and the offline demo.

They use the exact diffusers/transformers classes of SD 1.x and 2.x and the real CLIP tokenizer
(all 49,408 tokens), only with few channels, so every code path runs on a CPU in milliseconds.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.families import FAMILIES
from library.parts import SDParts

TEXT_WIDTH = 32


def tiny_unet_config(family: str) -> dict:
    """A two-level UNet in SD's block layout (cross-attention blocks, then a plain block)."""
    sd2 = family != "sd1"
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=[2, 4] if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )


def tiny_vae_config() -> dict:
    """A two-level AutoencoderKL: images are downscaled by 2 into 4 latent channels."""
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
    )


def tiny_text_config(family: str) -> dict:
    """A two-layer CLIP text encoder over the full CLIP vocabulary."""
    return dict(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if family == "sd1" else "gelu",  # CLIP ViT-L; OpenCLIP uses gelu
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=FAMILIES[family].text_encoders[0].pad_id,
        projection_dim=TEXT_WIDTH,
    )


def build_tiny_parts(family: str = "sd1", seed: int = 0) -> SDParts:
    """Build a randomly initialised tiny model of the given family ("sd1", "sd2", "sd2-v")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(family))
    vae = AutoencoderKL(**tiny_vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(family)))
    # A freshly built LayerNorm has zero bias, so every output token would have mean 0 and A1111's
    # emphasis mean-restore would divide by ~0. Real CLIP has a learned bias; give the tiny one one too.
    getattr(text_encoder, "text_model", text_encoder).final_layer_norm.bias.data.normal_(0.0, 0.5)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return SDParts.of(family, [text_encoder], unet, vae, name=f"tiny-{family}")
