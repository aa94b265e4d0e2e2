"""Which model a checkpoint file or a diffusers folder holds, told from its keys, metadata and configs before
anything is built: other kinds of files refused by name, the text-encoder layout, the family (SD 2.x epsilon or
v from a `<name>.yaml` beside the file or ModelSpec metadata), and the side the model was trained at."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import safetensors
import torch
import yaml

from library import convert
from library.errors import UserError, first_line
from library.families import FAMILIES

VAE_ROOTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")  # the first names of a VAE's weights


def read_json(file: Path) -> dict:
    """A JSON config of a model folder; broken JSON (a hand edit, a cut download) is a UserError."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e}); restore the file from the model's download") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: not a JSON object of settings; restore the file from the model's download")
    return config


def refuse_foreign(path: Path, sd: dict) -> None:
    """Name what the file is when it is not an SD 1.x / 2.x / XL text-to-image checkpoint."""
    keys = list(sd)

    def has(part: str) -> bool:
        return any(part in k for k in keys)

    sdxl = has("conditioner.embedders.")
    what = None
    if not keys:
        what = "holds no tensors (an embedding or an optimizer state?); pass a model checkpoint"
    elif has("conditioner.embedders.0.model."):
        what = "is an SDXL refiner (bigG text encoder only); pass an SDXL base-architecture checkpoint"
    elif "v_pred" in sd:  # the marker NoobAI-XL's v-prediction files carry (ComfyUI and Forge read it)
        what = "is an SDXL v-prediction model; only epsilon-prediction SDXL models are supported"
    elif has("joint_blocks."):
        what = "is an SD3 checkpoint; only SD 1.x, 2.x and XL models are supported"
    elif has("double_blocks."):
        what = "is a Flux checkpoint; only SD 1.x, 2.x and XL models are supported"
    elif has("lora_") or has(".lora_down.") or has(".lora_A."):
        what = "is a LoRA, not a model; pass the base checkpoint it was trained on"
    elif "emb_params" in sd or "string_to_param" in sd:
        what = "is a textual-inversion embedding, not a model checkpoint"
    elif all(k.split(".")[0] in VAE_ROOTS for k in keys):
        what = "is a VAE file; pass it as the VAE beside a full SD checkpoint"
    elif f"{convert.UNET_PREFIX}input_blocks.0.0.weight" not in sd:
        what = "is not a Stable Diffusion 1.x/2.x/XL checkpoint (no model.diffusion_model.* UNet weights)"
    elif has(f"{convert.UNET_PREFIX}label_emb.") and not sdxl:
        what = "is an SD2 unCLIP or upscaler model; use a text-to-image SD 1.x/2.x checkpoint"
    else:
        channels = sd[f"{convert.UNET_PREFIX}input_blocks.0.0.weight"].shape[1]
        if channels != 4:
            kind = {9: "an inpainting", 8: "an InstructPix2Pix"}.get(channels, f"a {channels}-channel")
            what = f"is {kind} model; train embeddings on the matching base (text-to-image) model"
    if what:
        raise UserError(f"{path}: {what}")


# What each text-encoder layout of a single file is, and the families that fit it.
_LAYOUTS = {
    "sd1": ("an SD 1.x checkpoint (CLIP ViT-L text encoder)", ("sd1",)),
    "sd2": ("an SD 2.x checkpoint (OpenCLIP ViT-H text encoder)", ("sd2", "sd2-v")),
    "sdxl": ("an SDXL checkpoint (CLIP ViT-L and OpenCLIP bigG text encoders)", ("sdxl",)),
}


def text_layout(path: Path, sd: dict) -> str:
    """ "sd1" for a CLIP ViT-L text encoder, "sd2" for OpenCLIP ViT-H, "sdxl" for both of SDXL's."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        for prefix, name in (
            (convert.SDXL_CLIP_PREFIX, "CLIP ViT-L"),
            (convert.SDXL_OPENCLIP_PREFIX, "OpenCLIP bigG"),
        ):
            if not any(k.startswith(prefix) for k in sd):
                raise UserError(
                    f"{path}: is an SDXL checkpoint without its {name} text encoder ({prefix}*); "
                    "pass a complete SDXL checkpoint"
                )
        return "sdxl"
    if f"{convert.CLIP_PREFIX}embeddings.token_embedding.weight" in sd:
        return "sd1"
    if f"{convert.OPENCLIP_PREFIX}token_embedding.weight" in sd:
        return "sd2"
    raise UserError(
        f"{path}: has no text encoder weights (cond_stage_model.*); pass a complete SD checkpoint"
    )


def prediction_hint(path: Path, metadata: dict) -> str | None:
    """SD2 family from a config A1111 reads beside the file (`<name>.yaml`) or from ModelSpec metadata."""
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        try:
            config = yaml.safe_load(beside.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{beside}: not valid YAML ({first_line(e)}); fix or remove it") from None
        params = (config.get("model") or {}).get("params") or {}
        return "sd2-v" if params.get("parameterization") == "v" else "sd2"
    spec = metadata.get("modelspec.prediction_type")
    return {"v": "sd2-v", "epsilon": "sd2"}.get(spec)


def single_file_family(path: Path, family: str, layout: str, metadata: dict) -> str | None:
    """The family the caller asked for or a config/metadata names; None when only the UNet can tell."""
    if family != "auto":
        if family not in FAMILIES:
            raise UserError(f"{path}: unknown family {family!r}; use auto, {', '.join(FAMILIES)}")
        what, fits = _LAYOUTS[layout]
        if family not in fits:
            raise UserError(f"{path}: family={family} does not fit {what}; use auto or {' or '.join(fits)}")
        return family
    if layout == "sd2":
        return prediction_hint(path, metadata)
    return layout


def folder_family(folder: Path, family: str, text_config: dict) -> str:
    """SDXL from its second text encoder; else SD1 or SD2 from the text encoder (768 or 1024 wide; else
    CLIP's quick_gelu marks SD1), and epsilon or v from the scheduler's prediction_type."""
    width = text_config.get("hidden_size")
    sd1 = width == 768 or (width != 1024 and text_config.get("hidden_act") == "quick_gelu")
    sdxl = (folder / "text_encoder_2").is_dir()
    if family != "auto":
        if family not in FAMILIES:
            raise UserError(f"{folder}: unknown family {family!r}; use auto, {', '.join(FAMILIES)}")
        if sdxl != (family == "sdxl"):
            what = (
                "this SDXL model (text_encoder_2/)" if sdxl else "this SD 1.x/2.x model (no text_encoder_2/)"
            )
            raise UserError(f"{folder}: family={family} does not fit {what}; use auto")
        if not sdxl and (family == "sd1") != sd1:
            raise UserError(f"{folder}: family={family} does not fit its {width}-wide text encoder")
        return family
    if sdxl:
        return "sdxl"
    if sd1:
        return "sd1"
    scheduler = folder / "scheduler" / "scheduler_config.json"
    prediction = read_json(scheduler).get("prediction_type") if scheduler.is_file() else None
    return "sd2-v" if prediction == "v_prediction" else "sd2"


def native_resolution(model) -> int:
    """The side the model of a `[model]` table was trained at (SD 1.x/2.x 512, SD 2.x-v 768, SDXL 1024, the
    toy model 64), found without loading it: the family if named, else the keys of the file (a safetensors
    header, a memory-mapped .ckpt) or a diffusers folder's configs. Anything it cannot tell gives 512 (SD 1.x),
    and a broken file is left to the loader to name."""
    if model.checkpoint == "builtin:toy":
        from library.toy import SIZE

        return SIZE  # the toy world's pictures
    if model.family != "auto":
        return FAMILIES[model.family].resolution
    path = Path(model.checkpoint).expanduser()
    if model.checkpoint.startswith("builtin:") or not path.exists():
        return FAMILIES["sd1"].resolution
    try:
        if path.is_dir():
            text_config = read_json(path / "text_encoder" / "config.json")
            return FAMILIES[folder_family(path, "auto", text_config)].resolution
        if path.suffix.lower() == ".safetensors":
            with safetensors.safe_open(str(path), "pt") as file:
                keys, metadata = list(file.keys()), file.metadata() or {}
        else:
            data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            data = data.get("state_dict", data) if isinstance(data, dict) else {}
            keys, metadata = [key for key in data if isinstance(key, str)], {}
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, safetensors.SafetensorError):
        return FAMILIES["sd1"].resolution  # the loader names what is wrong with the file
    if any(key.startswith("conditioner.embedders.") for key in keys):
        return FAMILIES["sdxl"].resolution
    if any(key.startswith(convert.OPENCLIP_PREFIX) for key in keys):
        return FAMILIES[prediction_hint(path, metadata) or "sd2"].resolution
    return FAMILIES["sd1"].resolution
