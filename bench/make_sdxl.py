"""Write an SDXL-shaped checkpoint with random weights (real shapes, original single-file layout, fp16).

No real weights can be downloaded here; random weights with SDXL base 1.0's exact architecture give the same
speed and memory. The parts are built from the SDXL configs (UNet 2.57 B parameters, CLIP ViT-L, OpenCLIP
ViT-bigG with its projection, the SDXL VAE), made on the meta device and filled in place with small random
normal values, in fp16, so a 7 GB file takes seconds on a GPU and well under a minute on a CPU.

    python bench/make_sdxl.py OUT_FILE [--seed N] [--device cuda|cpu]

The configs are the library's (library/assets/configs/sdxl) and the file is written by
`library.convert.save_single_file`, in the layout of sd_xl_base_1.0.safetensors that A1111, ComfyUI, Kohya and
our loader read: `model.diffusion_model.*` (UNet), `conditioner.embedders.0.transformer.text_model.*` (CLIP
ViT-L, transformers keys), `conditioner.embedders.1.model.*` (OpenCLIP bigG: fused q/k/v, `text_projection`)
and `first_stage_model.*` (VAE).

Random values: every Linear / Conv weight ~ N(0, 1 / (3 fan_in)) (the variance of PyTorch's default init, which
the random SD1.5 file of bench/make_sd15.py has), token and position embeddings ~ N(0, 0.02), norms weight 1 /
bias 0, other biases 0. The CPU proof (bench/compare/sdxl_cpu_check.sh) runs the UNet and both encoders on
them in bf16: finite.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.convert import save_single_file
from library.families import FAMILIES
from library.parts import SDParts

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def load_configs() -> dict[str, dict]:
    """SDXL base 1.0's diffusers configs, as the library ships them (library/assets/configs/sdxl)."""
    folder = FAMILIES["sdxl"].config_dir
    return {part: json.loads((folder / part / "config.json").read_text()) for part in PARTS}


def _fill(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random values in place (see the module docstring); position ids as the models make them."""
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            with torch.no_grad():
                if isinstance(sub, torch.nn.GroupNorm | torch.nn.LayerNorm):
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif isinstance(sub, torch.nn.Embedding):
                    param.normal_(0.0, 0.02, generator=generator)
                elif name == "bias" or param.ndim < 2:
                    param.zero_()
                else:
                    fan_in = param[0].numel()
                    param.normal_(0.0, 1.0 / math.sqrt(3 * fan_in), generator=generator)
        for name, buffer in sub.named_buffers(recurse=False):
            if name == "position_ids":
                buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))
            else:
                raise RuntimeError(
                    f"{type(sub).__name__}.{name}: a buffer make_sdxl.py does not know how to fill"
                )


def build(device: str, seed: int = 0, dtype: torch.dtype = torch.float16) -> SDParts:
    """SDXL base 1.0's parts with random weights, in `dtype` on `device`."""
    configs = load_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        clip_l = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    generator = torch.Generator(device).manual_seed(seed)
    for module in (unet, vae, clip_l, clip_g):
        module.to(dtype).to_empty(device=device)  # dtype first: meta tensors cost nothing to cast
        _fill(module, generator)
        module.eval().requires_grad_(False)
    return SDParts.of("sdxl", [clip_l, clip_g], unet, vae, name="sdxl-random")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_file", type=Path, help="the .safetensors file to write")
    parser.add_argument("--seed", type=int, default=0, help="a second seed makes a 'second checkpoint'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.out_file.suffix.lower() != ".safetensors":
        parser.error("OUT_FILE must end in .safetensors")
    start = time.perf_counter()
    parts = build(args.device, args.seed)
    parts.checkpoint_name = args.out_file.stem
    counts = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (("unet", parts.unet), ("vae", parts.vae), *parts.text_encoders.items())
    }
    built = time.perf_counter() - start
    args.out_file.parent.mkdir(parents=True, exist_ok=True)
    save_single_file(parts, args.out_file, overwrite=True)
    print(
        "parameters "
        + ", ".join(f"{name} {count / 1e9:.3f} B" for name, count in counts.items())
        + f"; built on {args.device} in {built:.1f} s; written in {time.perf_counter() - start - built:.1f} s"
    )
    print("wrote", args.out_file, f"{args.out_file.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
