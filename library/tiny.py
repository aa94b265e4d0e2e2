"""Tiny Stable-Diffusion-architecture models built in code, for tests and the offline demo.

They use the exact diffusers/transformers classes of SD 1.x, 2.x and SDXL and the real CLIP tokenizer
(all 49,408 tokens), only with few channels, so every code path runs on a CPU in milliseconds.

The tiny SDXL keeps what makes SDXL different: two encoders of different widths (CLIP-L 32, bigG 48, so a
block given to the wrong encoder fails), bigG with a projection and more layers, a UNet that reads both
penultimate states side by side (80 wide) and the pooled vector with six size ids, and the configs' end
token id 2 of the real SDXL files (FACTS §9: transformers' own pooling then picks the wrong token).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.families import FAMILIES
from library.parts import SDParts

TEXT_WIDTH = 32
SDXL_G_WIDTH = 48  # the tiny bigG: wider than the tiny CLIP-L, as 1280 is wider than 768
SDXL_TIME_WIDTH = 8  # width of each of the six size-id embeddings (256 in SDXL)


def tiny_unet_config(family: str) -> dict:
    """A two-level UNet in SD's block layout (cross-attention blocks, then a plain block; SDXL: the other
    way round, with two transformer layers in its cross-attention level and the pooled/size embedding)."""
    shared = dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=32,
    )  # fmt: skip
    if family == "sdxl":
        return dict(
            shared,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=TEXT_WIDTH + SDXL_G_WIDTH,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_WIDTH,
            projection_class_embeddings_input_dim=SDXL_G_WIDTH + 6 * SDXL_TIME_WIDTH,
        )
    sd2 = family != "sd1"
    return dict(
        shared,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=[2, 4] if sd2 else 8,
        use_linear_projection=sd2,
    )


def tiny_vae_config(family: str = "sd1") -> dict:
    """A two-level AutoencoderKL: images are downscaled by 2 into 4 latent channels."""
    return dict(
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
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


def tiny_sdxl_text_configs() -> tuple[dict, dict]:
    """The tiny SDXL's CLIP-L and bigG configs (bigG: wider, three layers, gelu, projected)."""
    clip_l = dict(tiny_text_config("sd1"), eos_token_id=2)
    clip_g = dict(
        tiny_text_config("sd2"),
        hidden_size=SDXL_G_WIDTH,
        intermediate_size=96,
        num_hidden_layers=3,
        projection_dim=SDXL_G_WIDTH,
        eos_token_id=2,
    )
    return clip_l, clip_g


def build_tiny_parts(family: str = "sd1", seed: int = 0) -> SDParts:
    """Build a randomly initialised tiny model of the given family ("sd1", "sd2", "sd2-v", "sdxl")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(family))
    vae = AutoencoderKL(**tiny_vae_config(family))
    if family == "sdxl":
        clip_l, clip_g = tiny_sdxl_text_configs()
        text_encoders = [
            CLIPTextModel(CLIPTextConfig(**clip_l)),
            CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)),
        ]
    else:
        text_encoders = [CLIPTextModel(CLIPTextConfig(**tiny_text_config(family)))]
    for text_encoder in text_encoders:
        # A freshly built LayerNorm has zero bias, so every output token would have mean 0 and A1111's
        # emphasis mean-restore would divide by ~0. Real CLIP has a learned bias; give the tiny one one too.
        getattr(text_encoder, "text_model", text_encoder).final_layer_norm.bias.data.normal_(0.0, 0.5)
    for module in (unet, vae, *text_encoders):
        module.eval().requires_grad_(False)
    return SDParts.of(family, text_encoders, unet, vae, name=f"tiny-{family}")
