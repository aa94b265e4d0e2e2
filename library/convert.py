"""Convert SD 1.x / 2.x / XL weights between the original single-file layout and diffusers.

Original -> diffusers uses diffusers' own key converters; the sizes that vary between models (channels,
levels, layers, widths) are read from the weights' shapes over a base config of the family.
Diffusers -> original, which diffusers ships only as a script, is written here, so that a model can go
back to A1111, ComfyUI or Kohya as one file (`save_single_file`) or out as a diffusers folder
(`save_diffusers`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file

from library.errors import UserError
from library.files import atomic_folder, atomic_write

if TYPE_CHECKING:
    from library.parts import SDParts

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
# SDXL's conditioner: CLIP ViT-L in the transformers layout, then OpenCLIP ViT-bigG in its own (FACTS §9).
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
# Metadata key holding the few sizes the weights cannot tell (attention head counts, sample sizes).
ARCH_KEY = "sd_ti.architecture"
ARCH_FIELDS = {
    "unet": ("attention_head_dim", "sample_size"),
    "text_encoder": ("num_attention_heads",),
    "text_encoder_2": ("num_attention_heads",),
    "vae": ("sample_size",),
}
CLIP_HEAD_WIDTH = 64  # CLIP ViT-L and OpenCLIP ViT-H and bigG all use 64-wide attention heads
SIZE_IDS = 6  # SDXL's size conditioning: original h, w, crop top, left, target h, w
OPENCLIP_H_BLOCKS = 24  # blocks of SD2's OpenCLIP ViT-H text tower, of which SD2 runs 23

# --------------------------------------------------------------------------------------------------
# Original -> diffusers


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _indices(keys, prefix: str) -> set[int]:
    """The numbers n of keys that start with `prefix` + "n."."""
    return {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}


def fix_legacy_clip_keys(sd: dict) -> dict:
    """Early SD1 files (older transformers) lack the `text_model.` level in the CLIP keys."""
    old = "cond_stage_model.transformer."
    fixed = {}
    for key, value in sd.items():
        rest = key[len(old) :]
        if key.startswith(old) and rest.split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm"):
            key = CLIP_PREFIX + rest
        fixed[key] = value
    return fixed


def _scaled_heads(base: dict, channels: list[int]):
    """Head counts for non-standard widths: SD1 keeps its head count, SD2 keeps its head width."""
    heads = base["attention_head_dim"]
    if isinstance(heads, int):
        return heads
    width = base["block_out_channels"][0] // heads[0]
    return [max(1, c // width) for c in channels]


def unet_config_from_ldm(sd: dict, base: dict) -> dict:
    """The diffusers UNet config of an original-layout state dict, derived from its shapes."""
    u = _strip(sd, UNET_PREFIX)
    num_inputs = 1 + max(_indices(u, "input_blocks."))
    levels = 1 + sum(f"input_blocks.{i}.0.op.weight" in u for i in range(num_inputs))
    per_level = num_inputs // levels  # resnets of a level + its downsampler (conv_in for level 0)
    firsts = [1 + level * per_level for level in range(levels)]
    channels = [u[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0] for i in firsts]
    attn = [k for k in u if ".transformer_blocks." in k]
    config = dict(
        base,
        in_channels=u["input_blocks.0.0.weight"].shape[1],
        out_channels=u["out.2.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=per_level - 1,
        down_block_types=[
            "CrossAttnDownBlock2D" if f"input_blocks.{i}.1.proj_in.weight" in u else "DownBlock2D"
            for i in firsts
        ],
        up_block_types=[
            "CrossAttnUpBlock2D"
            if f"output_blocks.{level * per_level}.1.proj_in.weight" in u
            else "UpBlock2D"
            for level in range(levels)
        ],
        cross_attention_dim=next(u[k].shape[1] for k in attn if k.endswith("attn2.to_k.weight")),
        use_linear_projection=next(u[k].ndim for k in u if k.endswith(".proj_in.weight")) == 2,
        transformer_layers_per_block=_transformer_depths(u, firsts),
    )
    if channels != list(base["block_out_channels"]):
        config["attention_head_dim"] = _scaled_heads(base, channels)
    if base.get("addition_embed_type") == "text_time":
        # SDXL's `y`: bigG's pooled vector, then one sinusoidal embedding (no weights) per size id.
        width = u["label_emb.0.0.weight"].shape[1]
        time_width, rest = divmod(width - sd[SDXL_OPENCLIP_PREFIX + "text_projection"].shape[1], SIZE_IDS)
        if rest or time_width <= 0:
            raise ValueError(
                f"label_emb.0.0.weight takes {width} inputs, not the pooled vector + {SIZE_IDS} ids"
            )
        config.update(projection_class_embeddings_input_dim=width, addition_time_embed_dim=time_width)
    return config


def _transformer_depths(u: dict, firsts: list[int]) -> int | list[int]:
    """Transformer layers of each level's attention blocks (SDXL: 1, 2, 10), one number when all levels and
    the middle block have the same. A level without attention counts 1, as diffusers' configs write it,
    unless it is the last: diffusers gives the middle block the last level's depth."""
    middle = 1 + max(_indices(u, "middle_block.1.transformer_blocks."))
    depths = [1 + max(_indices(u, f"input_blocks.{i}.1.transformer_blocks."), default=-1) for i in firsts]
    depths = [d or 1 for d in depths[:-1]] + [depths[-1] or middle]
    return middle if all(d == middle for d in depths) else depths


def vae_config_from_ldm(vae_sd: dict, base: dict) -> dict:
    """The diffusers VAE config of an original-layout VAE state dict (keys without a prefix)."""
    levels = 1 + max(_indices(vae_sd, "encoder.down."))
    return dict(
        base,
        in_channels=vae_sd["encoder.conv_in.weight"].shape[1],
        out_channels=vae_sd["decoder.conv_out.weight"].shape[0],
        latent_channels=vae_sd["post_quant_conv.weight"].shape[0],
        block_out_channels=[vae_sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
        layers_per_block=1 + max(_indices(vae_sd, "encoder.down.0.block.")),
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )


def text_config_from_ldm(sd: dict, base: dict, openclip: bool) -> dict:
    """The CLIPTextModel config of an original-layout state dict (CLIP for SD1, OpenCLIP for SD2)."""
    if not openclip:
        return _clip_config(_strip(sd, CLIP_PREFIX), base)
    t = _strip(sd, OPENCLIP_PREFIX)
    blocks = 1 + max(_indices(t, "transformer.resblocks."))
    # A full OpenCLIP tower (ViT-H: 24 blocks, with text_projection) has a last block that SD2 never
    # runs: SD2 reads the penultimate layer. Files converted from diffusers hold only the used blocks.
    layers = blocks - 1 if "text_projection" in t or blocks == OPENCLIP_H_BLOCKS else blocks
    return _openclip_config(t, base, layers)


def sdxl_text_configs_from_ldm(sd: dict, base_l: dict, base_g: dict) -> tuple[dict, dict]:
    """The configs of SDXL's CLIPTextModel (CLIP ViT-L) and CLIPTextModelWithProjection (OpenCLIP bigG).

    Unlike SD2's, the bigG keeps all its blocks: SDXL reads the penultimate state itself, and the last block,
    the final norm and the projection make its pooled vector.
    """
    g = _strip(sd, SDXL_OPENCLIP_PREFIX)
    config_g = _openclip_config(g, base_g, 1 + max(_indices(g, "transformer.resblocks.")))
    config_g["projection_dim"] = g["text_projection"].shape[1]
    return _clip_config(_strip(sd, SDXL_CLIP_PREFIX), base_l), config_g


def _clip_config(t: dict, base: dict) -> dict:
    token, position = t["embeddings.token_embedding.weight"], t["embeddings.position_embedding.weight"]
    layers = 1 + max(_indices(t, "encoder.layers."))
    return _text_config(base, token, position, t["encoder.layers.0.mlp.fc1.weight"].shape[0], layers)


def _openclip_config(t: dict, base: dict, layers: int) -> dict:
    intermediate = t["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return _text_config(base, t["token_embedding.weight"], t["positional_embedding"], intermediate, layers)


def _text_config(base: dict, token, position, intermediate: int, layers: int) -> dict:
    config = dict(
        base,
        vocab_size=token.shape[0],
        hidden_size=token.shape[1],
        max_position_embeddings=position.shape[0],
        intermediate_size=intermediate,
        num_hidden_layers=layers,
    )
    if token.shape[1] != base["hidden_size"]:
        config["num_attention_heads"] = max(1, token.shape[1] // CLIP_HEAD_WIDTH)
    return config


def apply_architecture(configs: dict[str, dict], metadata: dict[str, str]) -> None:
    """Put the sizes recorded by `save_single_file` (if any) over the derived configs, in place."""
    recorded = json.loads(metadata.get(ARCH_KEY) or "{}")
    for part, fields in ARCH_FIELDS.items():
        for field in fields:
            if part in configs and field in recorded.get(part, {}):
                configs[part][field] = recorded[part][field]


def unet_from_ldm(sd: dict, config: dict) -> dict:
    """Diffusers UNet state dict from an original-layout state dict (non-EMA weights, as A1111 uses)."""
    return convert_ldm_unet_checkpoint(sd, config)


def vae_from_ldm(vae_sd: dict, config: dict) -> dict:
    """Diffusers VAE state dict from an original-layout VAE state dict (keys without a prefix)."""
    return convert_ldm_vae_checkpoint(vae_sd, config)


def text_from_ldm(sd: dict, config: dict, openclip: bool) -> dict:
    """CLIPTextModel state dict from an original-layout state dict."""
    if openclip:
        state = _open_clip_state(sd, config, OPENCLIP_PREFIX)
    else:
        state = convert_ldm_clip_checkpoint(sd)
    return _clip_model_state(state, config)


def sdxl_text_from_ldm(sd: dict, config_l: dict, config_g: dict) -> tuple[dict, dict]:
    """The state dicts of SDXL's CLIPTextModel and CLIPTextModelWithProjection (which keeps the
    `text_model.` level, and a `text_projection` Linear: the transpose of OpenCLIP's matrix)."""
    clip_l = {k: v for k, v in sd.items() if k.startswith(SDXL_CLIP_PREFIX)}
    state_g = _open_clip_state(sd, config_g, SDXL_OPENCLIP_PREFIX)
    return _clip_model_state(convert_ldm_clip_checkpoint(clip_l), config_l), state_g


def _open_clip_state(sd: dict, config: dict, prefix: str) -> dict:
    # The converter only reads the hidden size from the model, to split the fused q/k/v weights.
    holder = SimpleNamespace(config=SimpleNamespace(hidden_size=config["hidden_size"]))
    return convert_open_clip_checkpoint(holder, sd, prefix=prefix)


def _clip_model_state(state: dict, config: dict) -> dict:
    """A CLIPTextModel's keys (no `text_model.` level) up to the config's layers, without buffers."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    layers = config["num_hidden_layers"]
    return {
        k: v
        for k, v in state.items()
        if k not in ("embeddings.position_ids", "text_projection.weight")
        and not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= layers)
    }


# --------------------------------------------------------------------------------------------------
# Diffusers -> original

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL: the pooled vector and size ids
    "add_embedding.linear_2": "label_emb.0.2",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(key: str, per_level: int, up_attention: list[bool]) -> str:
    p = key.split(".")
    if p[0] == "mid_block":  # resnet, attention, resnet -> middle_block.0 / .1 / .2
        index = 1 if p[1] == "attentions" else 2 * int(p[2])
        return f"middle_block.{index}.{_unet_module(p[1], p[3:])}"
    if p[0] in ("down_blocks", "up_blocks"):
        level, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * per_level}.0.op.{rest[-1]}"
        if kind == "upsamplers":  # after the level's last resnet (and its attention, if any)
            slot = 2 if up_attention[level] else 1
            return f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv.{rest[-1]}"
        index = 1 + level * per_level + j if p[0] == "down_blocks" else level * per_level + j
        block = "input_blocks" if p[0] == "down_blocks" else "output_blocks"
        slot = 0 if kind == "resnets" else 1  # each original block holds [resnet, attention]
        return f"{block}.{index}.{slot}.{_unet_module(kind, rest)}"
    head, leaf = key.rsplit(".", 1)
    return f"{_UNET_TOP[head]}.{leaf}"


def _unet_module(kind: str, rest: list[str]) -> str:
    if kind == "resnets":
        return ".".join([_UNET_RESNET[rest[0]], *rest[1:]])
    return ".".join(rest)  # attention blocks keep their inner names


def unet_to_ldm(state: dict, config) -> dict:
    """Original-layout UNet keys (with the `model.diffusion_model.` prefix) of a diffusers UNet."""
    per_level = config["layers_per_block"] + 1
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    return {UNET_PREFIX + _unet_key(k, per_level, up_attention): v for k, v in state.items()}


def _vae_key(key: str, levels: int) -> str:
    p = key.split(".")
    coder = p[0]
    if coder not in ("encoder", "decoder") or p[1] in ("conv_in", "conv_out"):
        return key
    if p[1] == "conv_norm_out":
        return f"{coder}.norm_out.{p[-1]}"
    if p[1] == "mid_block" and p[2] == "resnets":
        return f"{coder}.mid.block_{int(p[3]) + 1}." + _vae_resnet(p[4:])
    if p[1] == "mid_block":
        return f"{coder}.mid.attn_1.{_VAE_ATTENTION['.'.join(p[4:-1])]}.{p[-1]}"
    # The decoder's up blocks run from the smallest size up; the original numbers them the other way.
    level = int(p[2]) if coder == "encoder" else levels - 1 - int(p[2])
    name = "down" if coder == "encoder" else "up"
    if p[3] == "resnets":
        return f"{coder}.{name}.{level}.block.{p[4]}." + _vae_resnet(p[5:])
    return f"{coder}.{name}.{level}.{name}sample.conv.{p[-1]}"


def _vae_resnet(rest: list[str]) -> str:
    return ".".join(["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]])


def vae_to_ldm(state: dict, levels: int) -> dict:
    """Original-layout VAE keys (no prefix) of a diffusers VAE; attention projections become 1x1 convs."""
    out = {}
    for key, value in state.items():
        new = _vae_key(key, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


# Attention names in diffusers VAE files written before diffusers 0.14.
_OLD_VAE_ATTENTION = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def diffusers_vae_to_ldm(state: dict) -> dict:
    """Original-layout keys of a diffusers VAE file (any diffusers release), its levels read from the keys."""
    for old, new in _OLD_VAE_ATTENTION.items():
        state = {k.replace(old, new): v for k, v in state.items()}
    return vae_to_ldm(state, levels=1 + max(_indices(state, "encoder.down_blocks.")))


def clip_to_ldm(state: dict, prefix: str = CLIP_PREFIX) -> dict:
    """SD1 layout: the transformers CLIP keys under `cond_stage_model.transformer.text_model.` (SDXL's
    CLIP ViT-L: under `prefix` SDXL_CLIP_PREFIX)."""
    return {prefix + k.removeprefix("text_model."): v for k, v in state.items() if "position_ids" not in k}


def openclip_to_ldm(state: dict) -> dict:
    """SD2 layout: OpenCLIP keys with fused q/k/v, plus the last block SD2 skips and `text_projection`.

    Diffusers keeps only the layers SD2 runs. A full OpenCLIP text tower has one block more; it is written
    as all zeros, which makes it an exact identity (zero LayerNorm gains -> zero attention and MLP input,
    zero biases -> zero residual), so tools that run it still get the same output. `text_projection` (unused
    by SD) is an identity matrix.
    """
    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    out, layers = _openclip_keys(s)
    first, extra = "transformer.resblocks.0.", f"transformer.resblocks.{layers}."
    for key in [k for k in out if k.startswith(first)]:
        out[extra + key[len(first) :]] = torch.zeros_like(out[key])
    width = s["embeddings.token_embedding.weight"].shape[1]
    out["text_projection"] = torch.eye(width, dtype=out["ln_final.weight"].dtype)
    return {OPENCLIP_PREFIX + k: v for k, v in out.items()}


def sdxl_openclip_to_ldm(state: dict) -> dict:
    """SDXL's bigG (a CLIPTextModelWithProjection) in OpenCLIP keys: every block, and `text_projection` as
    the matrix OpenCLIP multiplies from the right (`x @ text_projection`), the Linear weight transposed."""
    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    out, _ = _openclip_keys(s)
    out["text_projection"] = s["text_projection.weight"].T
    return {SDXL_OPENCLIP_PREFIX + k: v for k, v in out.items()}


def _openclip_keys(s: dict) -> tuple[dict, int]:
    """OpenCLIP keys (no prefix, fused q/k/v) of a CLIP text model's keys without `text_model.`, and
    its number of blocks."""
    layers = 1 + max(_indices(s, "encoder.layers."))
    out = {
        "token_embedding.weight": s["embeddings.token_embedding.weight"],
        "positional_embedding": s["embeddings.position_embedding.weight"],
        "ln_final.weight": s["final_layer_norm.weight"],
        "ln_final.bias": s["final_layer_norm.bias"],
    }
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [s[f"{src}self_attn.{n}_proj.{leaf}"] for n in "qkv"]
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(qkv)
            out[f"{dst}attn.out_proj.{leaf}"] = s[f"{src}self_attn.out_proj.{leaf}"]
            out[f"{dst}ln_1.{leaf}"] = s[f"{src}layer_norm1.{leaf}"]
            out[f"{dst}ln_2.{leaf}"] = s[f"{src}layer_norm2.{leaf}"]
            out[f"{dst}mlp.c_fc.{leaf}"] = s[f"{src}mlp.fc1.{leaf}"]
            out[f"{dst}mlp.c_proj.{leaf}"] = s[f"{src}mlp.fc2.{leaf}"]
    return out, layers


def to_ldm_state_dict(parts: SDParts) -> dict:
    """The whole model in the original single-file layout (SD1: CLIP keys, SD2: OpenCLIP keys, SDXL: both
    under `conditioner.embedders.`)."""
    unet = unet_to_ldm(parts.unet.state_dict(), parts.unet.config)
    levels = len(parts.vae.config.block_out_channels)
    vae = {VAE_PREFIX + k: v for k, v in vae_to_ldm(parts.vae.state_dict(), levels).items()}
    if parts.family.name == "sdxl":
        clip_l, clip_g = (parts.text_encoders[key].state_dict() for key in parts.family.keys)
        text = {**clip_to_ldm(clip_l, SDXL_CLIP_PREFIX), **sdxl_openclip_to_ldm(clip_g)}
    else:
        te = parts.text_encoder.state_dict()
        text = clip_to_ldm(te) if parts.family.name == "sd1" else openclip_to_ldm(te)
    return {**unet, **vae, **text}


def text_encoder_folders(parts: SDParts) -> dict[str, torch.nn.Module]:
    """The text encoders by their diffusers folder names: text_encoder, then text_encoder_2 (SDXL)."""
    encoders = list(parts.text_encoders.values())
    return {"text_encoder" + (f"_{i + 1}" if i else ""): encoder for i, encoder in enumerate(encoders)}


def architecture_metadata(parts: SDParts, title: str) -> dict[str, str]:
    """SAI ModelSpec keys (as Kohya writes them) plus the sizes the weights cannot tell."""
    resolution = parts.unet.config.sample_size * 2 ** (len(parts.vae.config.block_out_channels) - 1)
    modules = {"unet": parts.unet, **text_encoder_folders(parts), "vae": parts.vae}
    recorded = {
        name: {field: getattr(model.config, field) for field in ARCH_FIELDS[name]}
        for name, model in modules.items()
    }
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": parts.family.architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if parts.prediction_type == "v_prediction" else "epsilon",
        ARCH_KEY: json.dumps(recorded),
    }


# --------------------------------------------------------------------------------------------------
# Writing files


def save_single_file(
    parts: SDParts, path, *, dtype: torch.dtype = torch.float16, overwrite: bool = False
) -> Path:
    """Write the whole model as one original-layout checkpoint that A1111, ComfyUI and Kohya load.

    `.safetensors` carries ModelSpec metadata; `.ckpt` is `torch.save({"state_dict": ..., "metadata": ...})`.
    Weights are cast to `dtype` (fp16 by default, as checkpoints are shared).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".ckpt"):
        raise UserError(
            f"{path}: a single-file checkpoint is written as .safetensors or .ckpt; rename the output"
        )
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in to_ldm_state_dict(parts).items()}
    metadata = architecture_metadata(parts, path.stem)
    if suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata), overwrite=overwrite)
    else:
        atomic_write(
            path,
            lambda tmp: torch.save({"state_dict": state, "metadata": metadata}, tmp),
            overwrite=overwrite,
        )
    return path


def _write_text_encoder_weights(text_encoder, folder: Path) -> None:
    """Text-encoder weights under `text_model.` (and `text_projection.`), the key layout every transformers
    release reads."""
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    nested = hasattr(text_encoder, "text_model")  # CLIPTextModelWithProjection keeps the level itself
    state = {
        ("" if nested else "text_model.") + k: v.detach().cpu().contiguous()
        for k, v in text_encoder.state_dict().items()
    }
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def save_diffusers(parts: SDParts, folder, *, overwrite: bool = False) -> Path:
    """Write the model as a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/; SDXL: also text_encoder_2/, tokenizer_2/) that `StableDiffusionPipeline` (or
    `StableDiffusionXLPipeline`) `.from_pretrained` and `load_sd` read offline.

    The tokenizer folders also get `vocab.json` and `merges.txt`, which older transformers releases need.
    """

    def write(tmp: Path) -> None:
        parts.pipeline().save_pretrained(tmp, safe_serialization=True)
        for name, encoder in text_encoder_folders(parts).items():
            _write_text_encoder_weights(encoder, tmp / name)
            tokenizer = tmp / name.replace("text_encoder", "tokenizer")
            parts.tokenizer.backend_tokenizer.model.save(str(tokenizer))

    return atomic_folder(folder, write, overwrite=overwrite)
