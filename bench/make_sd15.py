"""Write an SD1.5-shaped checkpoint with random weights (real shapes, original single-file layout, fp16).

No real weights can be downloaded here; random weights with SD 1.5's exact architecture give the same speed
and memory. Usage: python bench/make_sd15.py /tmp/sd15-random.safetensors [seed]
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.convert import save_single_file
from library.families import FAMILIES
from library.parts import SDParts


def build(device: str, seed: int = 0) -> SDParts:
    configs = FAMILIES["sd1"].config_dir
    load = lambda part: json.loads((configs / part / "config.json").read_text())  # noqa: E731
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(load("unet"))
        vae = AutoencoderKL.from_config(load("vae"))
        text = CLIPTextModel(CLIPTextConfig(**load("text_encoder")))
    return SDParts.of("sd1", [text], unet, vae, name="sd15-random")


if __name__ == "__main__":
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0  # a second seed makes a "second checkpoint"
    parts = build("cuda" if torch.cuda.is_available() else "cpu", seed)
    parts.checkpoint_name = Path(sys.argv[1]).stem
    for m in (parts.unet, parts.vae, parts.text_encoder):
        m.to("cpu")
    save_single_file(parts, Path(sys.argv[1]), overwrite=True)
    print("wrote", sys.argv[1], Path(sys.argv[1]).stat().st_size / 2**30, "GiB")
