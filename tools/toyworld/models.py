"""The toy model: SD 1.x classes and configs with few channels, the fp16 parts folder that training exports
and `assemble` reads, and the small helpers every stage shares (logging, bf16 autocast)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.families import ASSETS
from library.files import read_safetensors
from library.parts import SDParts

SD1 = ASSETS / "configs" / "sd1"
SCALE = 0.18215  # SD1's VAE scaling factor; the toy VAE is re-scaled to make it exact
PART_NAMES = ("unet", "text_encoder", "vae")  # the weight files of a parts folder, beside configs.json


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def bf16(device: str, **kwargs) -> torch.autocast:
    """bf16 autocast on an accelerator; off on the CPU (where the smoke runs stay float32)."""
    return torch.autocast(
        device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu", **kwargs
    )


# --------------------------------------------------------------------------------------------------
# The model: SD 1.x classes and configs, few channels


def _sd1(part: str) -> dict:
    return {
        k: v for k, v in json.loads((SD1 / part / "config.json").read_text()).items() if not k.startswith("_")
    }


def unet_config() -> dict:
    """SD1's UNet layout (3 cross-attention levels, 1 plain), channels (64, 96, 96, 96), 1 layer each."""
    return dict(
        _sd1("unet"),
        block_out_channels=[64, 96, 96, 96],
        layers_per_block=1,
        cross_attention_dim=64,
        sample_size=16,
    )


def vae_config() -> dict:
    """SD1's AutoencoderKL with 3 levels (32, 64, 64): 64x64 pictures -> 16x16x4 latents."""
    return dict(
        _sd1("vae"),
        block_out_channels=[32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=SCALE,
    )


def text_config() -> dict:
    """A CLIP text encoder 64 wide, 4 layers, over the full 49,408-token vocabulary."""
    return dict(
        _sd1("text_encoder"),
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=1,
        num_hidden_layers=4,
        projection_dim=64,
    )


def build_models(seed: int, tiny: bool = False, unet_channels: list[int] | None = None):
    """Freshly initialised UNet, text encoder and VAE (on the CPU, so a seed gives the same weights anywhere)."""
    torch.manual_seed(seed)
    u, v, t = unet_config(), vae_config(), text_config()
    if unet_channels:
        u.update(block_out_channels=unet_channels)
    if tiny:  # CPU smoke runs: same code paths, a fraction of the work
        u.update(block_out_channels=[32, 32, 32, 32])
        v.update(block_out_channels=[32, 32, 32])
    text = CLIPTextConfig.from_dict(t)
    return UNet2DConditionModel.from_config(u), CLIPTextModel(text), AutoencoderKL.from_config(v)


def make_parts(unet, text_encoder, vae, name: str = "toy-sd1") -> SDParts:
    return SDParts.of("sd1", [text_encoder.eval()], unet.eval(), vae.eval(), name=name)


# --------------------------------------------------------------------------------------------------
# The parts folder: unet / text_encoder / vae .safetensors (fp16, diffusers and transformers keys) and
# configs.json


def fp16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}


def part_configs(unet, text_encoder, vae) -> dict:
    return {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": text_encoder.config.to_dict()}


def build_part(configs: dict, name: str) -> torch.nn.Module:
    """An empty model of one part from the configs.json of a parts folder."""
    if name == "unet":
        return UNet2DConditionModel.from_config(configs["unet"])
    if name == "vae":
        return AutoencoderKL.from_config(configs["vae"])
    config = {k: v for k, v in configs["text_encoder"].items() if k not in ("dtype", "torch_dtype")}
    return CLIPTextModel(CLIPTextConfig.from_dict(config))


def read_parts(folder: Path, names=PART_NAMES, files: dict[str, Path] | None = None) -> list[torch.nn.Module]:
    """The models `names` of a parts folder, in float32; `files` replaces the weight file of a part."""
    configs = json.loads((folder / "configs.json").read_text())
    models = []
    for name in names:
        file = (files or {}).get(name) or folder / f"{name}.safetensors"
        tensors, _ = read_safetensors(
            file, f"{name} weights", "give a parts folder that `train --final` wrote"
        )
        model = build_part(configs, name)
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
        models.append(model)
    return models
