"""Write an SDXL-shaped checkpoint with random weights (real shapes, original single-file layout, fp16).

No real weights can be downloaded here; random weights with SDXL base 1.0's exact architecture give the same
speed and memory. The parts are built from the SDXL configs (UNet 2.57 B parameters, CLIP ViT-L, OpenCLIP
ViT-bigG with its projection, the SDXL VAE), made on the meta device and filled in place with small random
normal values, in fp16, so a 7 GB file takes seconds on a GPU and well under a minute on a CPU.

    python bench/make_sdxl.py OUT_FILE [--seed N] [--device cuda|cpu]

The file has the layout of sd_xl_base_1.0.safetensors, which A1111, ComfyUI, Kohya and our loader read:
`model.diffusion_model.*` (UNet), `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L, transformers
keys), `conditioner.embedders.1.model.*` (OpenCLIP bigG: fused q/k/v, `text_projection`, `logit_scale`) and
`first_stage_model.*` (VAE).

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

from library import convert
from library.families import FAMILIES
from library.parts import SDParts

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Until library/assets/configs/sdxl lands (branch sdxl-load), the same diffusers configs of SDXL base 1.0 live
# here; the library's folder wins as soon as it exists.
FALLBACK_CONFIGS = Path(__file__).resolve().parent / "sdxl_configs"


def config_dir() -> Path:
    library_dir = FAMILIES["sdxl"].config_dir
    if all((library_dir / part / "config.json").is_file() for part in PARTS):
        return library_dir
    return FALLBACK_CONFIGS


def load_configs() -> dict[str, dict]:
    folder = config_dir()
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


# --------------------------------------------------------------------------------------------------
# Writing. library.convert writes SDXL once branch sdxl-load lands; until then the few SDXL-only keys are
# mapped here on top of the library's UNet / VAE / CLIP conversions (and this section goes).

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
LOGIT_SCALE = math.log(1 / 0.07)  # OpenCLIP's initial value; unused by SDXL, present in its files


def library_writes_sdxl() -> bool:
    """Whether library.convert turns SDXL parts into the original layout (tried on the tiny SDXL)."""
    from library.tiny import build_tiny_parts

    try:
        keys = set(convert.to_ldm_state_dict(build_tiny_parts("sdxl")))
    except Exception:  # noqa: BLE001 - any failure means: not yet
        return False
    wanted = (
        "model.diffusion_model.label_emb.0.0.weight",
        CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight",
        CLIP_G_PREFIX + "transformer.resblocks.0.attn.in_proj_weight",
        CLIP_G_PREFIX + "text_projection",
        "first_stage_model.encoder.conv_in.weight",
    )
    return all(key in keys for key in wanted)


def _openclip_g(state: dict) -> dict:
    """bigG as OpenCLIP keys: all its blocks, fused q/k/v, `text_projection` (x @ P, so P = Linear weight.T)."""
    s = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {
        "token_embedding.weight": s["embeddings.token_embedding.weight"],
        "positional_embedding": s["embeddings.position_embedding.weight"],
        "ln_final.weight": s["final_layer_norm.weight"],
        "ln_final.bias": s["final_layer_norm.bias"],
        "text_projection": s["text_projection.weight"].T.contiguous(),
        "logit_scale": torch.tensor(LOGIT_SCALE, dtype=s["final_layer_norm.weight"].dtype),
    }
    layers = 1 + max(convert._indices(s, "encoder.layers."))
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(
                [s[f"{src}self_attn.{n}_proj.{leaf}"] for n in "qkv"]
            )
            out[f"{dst}attn.out_proj.{leaf}"] = s[f"{src}self_attn.out_proj.{leaf}"]
            out[f"{dst}ln_1.{leaf}"] = s[f"{src}layer_norm1.{leaf}"]
            out[f"{dst}ln_2.{leaf}"] = s[f"{src}layer_norm2.{leaf}"]
            out[f"{dst}mlp.c_fc.{leaf}"] = s[f"{src}mlp.fc1.{leaf}"]
            out[f"{dst}mlp.c_proj.{leaf}"] = s[f"{src}mlp.fc2.{leaf}"]
    return {CLIP_G_PREFIX + k: v for k, v in out.items()}


def sdxl_ldm_state_dict(parts: SDParts) -> dict:
    """The original SDXL layout of `parts` (stand-in for library.convert.to_ldm_state_dict)."""
    unet_state = {
        k.replace("add_embedding.linear_1.", "label_emb.0.0.").replace(
            "add_embedding.linear_2.", "label_emb.0.2."
        ): v
        for k, v in parts.unet.state_dict().items()
    }
    label = {convert.UNET_PREFIX + k: v for k, v in unet_state.items() if k.startswith("label_emb.")}
    rest = {k: v for k, v in unet_state.items() if not k.startswith("label_emb.")}
    unet = {**convert.unet_to_ldm(rest, parts.unet.config), **label}
    levels = len(parts.vae.config.block_out_channels)
    vae = {convert.VAE_PREFIX + k: v for k, v in convert.vae_to_ldm(parts.vae.state_dict(), levels).items()}
    clip_l, clip_g = parts.text_encoders.values()
    # transformers 5 dropped the `text_model.` level of CLIPTextModel's keys; the file keeps 4.x's layout.
    text_l = {
        CLIP_L_PREFIX + "text_model." + k.removeprefix("text_model."): v
        for k, v in clip_l.state_dict().items()
        if not k.endswith("position_ids")
    }
    return {**unet, **vae, **text_l, **_openclip_g(clip_g.state_dict())}


def save(parts: SDParts, path: Path) -> str:
    """Write `parts` as one original-layout fp16 .safetensors file; returns which converter wrote it."""
    if library_writes_sdxl():
        convert.save_single_file(parts, path, overwrite=True)
        return "library.convert.save_single_file"
    from safetensors.torch import save_file

    state = {
        k: v.detach().to("cpu", torch.float16).contiguous() for k, v in sdxl_ldm_state_dict(parts).items()
    }
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": parts.family.architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": path.stem,
        "modelspec.resolution": "1024x1024",
        "modelspec.prediction_type": "epsilon",
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, tmp, metadata=metadata)
    tmp.replace(path)
    return "bench/make_sdxl.py (stand-in until library.convert writes SDXL)"


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
    writer = save(parts, args.out_file)
    print(
        f"configs {config_dir()}; parameters "
        + ", ".join(f"{name} {count / 1e9:.3f} B" for name, count in counts.items())
        + f"; built on {args.device} in {built:.1f} s; written by {writer} in {time.perf_counter() - start - built:.1f} s"
    )
    print("wrote", args.out_file, f"{args.out_file.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
