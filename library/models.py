"""Load Stable Diffusion checkpoints (SD 1.x, 2.x, XL) offline into one `SDParts` object (library/parts.py).

Single-file checkpoints in the original (CompVis/A1111) layout and diffusers folders are both read
without touching the network: configs and tokenizers ship in `library/assets`. Models are built on the
meta device and take the file's tensors directly, each cast on the device it runs on, so nothing is randomly
initialised first. Which model a file holds (family, text-encoder layout, resolution) is told by
library/model_kind.py.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future
from pathlib import Path

import accelerate
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.initialization import no_init_weights

from library import convert
from library.errors import UserError, first_line
from library.families import FAMILIES
from library.files import read_weights
from library.model_kind import (
    VAE_ROOTS,
    folder_family,
    read_json,
    refuse_foreign,
    single_file_family,
    text_layout,
)
from library.parts import PRECISIONS, SDParts, load_tokenizer, vae_dtype


def tokenizer_from_folder(folder: Path) -> CLIPTokenizer:
    """The CLIP tokenizer of a user's model folder; broken files (vocab.json, merges.txt, ...) are a UserError."""
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        # transformers raises OSError/ValueError/... for missing or broken files, the `tokenizers` library a
        # bare Exception for a vocabulary it cannot read; anything else is a bug and keeps its traceback.
        if not (type(e) is Exception or isinstance(e, OSError | ValueError | KeyError | TypeError)):
            raise
        raise UserError(f"{folder}: cannot load the tokenizer ({first_line(e)}); restore its files") from None


def a1111_short_hash(path) -> str:
    """A1111's short checkpoint hash: the first 10 hex digits of the whole file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def hash_in_background(path) -> Future[str]:
    """`a1111_short_hash(path)` on a thread of its own, beside the loading (SHA-256 of a 2 GB file took 2.1 s
    of the face recipe's start on an H200 machine; an SDXL file is 7 GB)."""
    future: Future[str] = Future()

    def work() -> None:
        try:
            future.set_result(a1111_short_hash(path))
        except BaseException as error:  # re-raised where the hash is read
            future.set_exception(error)

    threading.Thread(target=work, name="checkpoint-hash", daemon=True).start()
    return future


def read_state_dict(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a checkpoint file (.safetensors, or .ckpt/.pt/.bin read weights-only),
    as they lie in the file (`_build` places each where its model runs)."""
    return read_weights(path, "checkpoint", "download it again or use a .safetensors copy", aligned=False)


@torch.no_grad()
def is_v_prediction(unet: UNet2DConditionModel) -> bool:
    """A1111's test for SD2 v-prediction weights (`is_using_v_parameterization_for_sd2`).

    On a constant latent at timestep 999 with a constant context, a v-model's output minus its input
    averages below -1, an epsilon model's does not. Run it in float32 on the CPU, as A1111 does.
    """
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=unet.dtype, device=unet.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=unet.dtype, device=unet.device)
    out = unet(x, torch.tensor([999], device=unet.device), encoder_hidden_states=context).sample
    return (out - x).mean().item() < -1


# --------------------------------------------------------------------------------------------------
# Building models from a single file


def _base_configs(family: str, config_dir) -> dict[str, dict]:
    folder = Path(config_dir) if config_dir else FAMILIES[family].config_dir
    encoders = ("text_encoder", "text_encoder_2")[: len(FAMILIES[family].text_encoders)]
    configs = {}
    for part in ("unet", "vae", *encoders):
        file = folder / part / "config.json"
        if not file.is_file():
            holds = ", ".join(f"{name}/" for name in ("unet", "vae", *encoders))
            raise UserError(f"{file}: missing; a config folder holds {holds} config.json files")
        configs[part] = read_json(file)
    return configs


def _derive(path: Path, derive, *args) -> dict:
    """Run a config derivation or key conversion; a missing or odd tensor means a damaged file."""
    try:
        return derive(*args)
    except (KeyError, ValueError, StopIteration, IndexError, AttributeError) as e:
        raise UserError(
            f"{path}: incomplete or unusual SD weights ({type(e).__name__}: {e}); is the file damaged?"
        ) from None


def _build(make, state: dict, what: str, path: Path, dtype: torch.dtype, device):
    """A model made on the meta device that takes `state`'s tensors, cast to `dtype` on `device`, as its
    weights. Each tensor goes to the device as it is in the file and is cast there: SDXL's 6.5 GB took
    12 s to cast on the CPU before going to the GPU. No initial values are drawn, not even on the meta device
    (transformers' CLIP init took 1.4 s of SDXL's loading there)."""
    with accelerate.init_empty_weights(), no_init_weights():
        model = make()
    state = {k: _placed(v, dtype, device) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:300]
        raise UserError(
            f"{path}: the {what} weights do not fit the {what} they were read as ({detail})"
        ) from None
    return model.eval().requires_grad_(False)


def _placed(tensor: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """`tensor` in `dtype` on `device`, contiguous; on the CPU at an aligned address, as a file's tensors
    often are not (CPU kernels take other code paths on unaligned memory: slower, and not bitwise equal)."""
    placed = tensor.to(device)  # first as it is: PyTorch casts a blocking copy to the GPU on the CPU
    placed = placed.to(dtype).contiguous()
    return placed.clone() if placed.device.type == "cpu" and placed.data_ptr() % 64 else placed


def _vae_part(sd: dict) -> dict:
    """VAE tensors without their prefix: `first_stage_model.` in checkpoints, none or `vae.` in VAE files."""
    for prefix in (convert.VAE_PREFIX, "vae.", ""):
        part = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        part = {k: v for k, v in part.items() if k.split(".")[0] in VAE_ROOTS}
        if part:
            return part
    return {}


def _build_vae(
    path: Path, vae_sd: dict, base: dict, metadata: dict | None, dtype: torch.dtype, device
) -> AutoencoderKL:
    """The VAE of an original- or diffusers-layout state dict; `metadata` None = take `base` as it is."""
    if any(k.startswith("encoder.down_blocks.") for k in vae_sd):  # diffusers layout: to the original first
        vae_sd = _derive(path, convert.diffusers_vae_to_ldm, vae_sd)
    config = base
    if metadata is not None:
        config = _derive(path, convert.vae_config_from_ldm, vae_sd, base)
        convert.apply_architecture({"vae": config}, metadata)
    state = _derive(path, convert.vae_from_ldm, vae_sd, config)
    return _build(lambda: AutoencoderKL.from_config(config), state, "VAE", path, dtype, device)


def _load_vae(vae, base: dict, derive: bool, dtype: torch.dtype, device) -> AutoencoderKL:
    """A separate VAE: an A1111-style file, a diffusers VAE file, or a diffusers (VAE) folder."""
    path = Path(vae)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return _from_pretrained(AutoencoderKL, folder, dtype)
    sd, metadata = read_state_dict(path)
    vae_sd = _vae_part(sd)
    if not vae_sd:
        raise UserError(f"{path}: holds no VAE weights (encoder.*, decoder.*); pass a VAE file or folder")
    return _build_vae(path, vae_sd, base, metadata if derive else None, dtype, device)


def _single_file_configs(path: Path, sd: dict, family: str, layout: str, config_dir, metadata: dict) -> dict:
    """The configs to build with: `config_dir`'s as they are, else the shipped ones with the sizes that
    vary (channels, levels, layers, widths) read from the weights, and those our files record."""
    configs = _base_configs(family, config_dir)
    if not config_dir:
        configs["unet"] = _derive(path, convert.unet_config_from_ldm, sd, configs["unet"])
        if layout == "sdxl":
            configs["text_encoder"], configs["text_encoder_2"] = _derive(
                path,
                convert.sdxl_text_configs_from_ldm,
                sd,
                configs["text_encoder"],
                configs["text_encoder_2"],
            )
        else:
            configs["text_encoder"] = _derive(
                path, convert.text_config_from_ldm, sd, configs["text_encoder"], layout == "sd2"
            )
        convert.apply_architecture(configs, metadata)
    return configs


def _text_encoders(path: Path, sd: dict, layout: str, configs: dict, dtype: torch.dtype, device) -> list:
    """The file's text encoders, in the family's order (SDXL: CLIP ViT-L, then bigG with its projection)."""
    if layout != "sdxl":
        state = _derive(path, convert.text_from_ldm, sd, configs["text_encoder"], layout == "sd2")
        config = CLIPTextConfig.from_dict(configs["text_encoder"])
        return [_build(lambda: CLIPTextModel(config), state, "text encoder", path, dtype, device)]
    state_l, state_g = _derive(
        path, convert.sdxl_text_from_ldm, sd, configs["text_encoder"], configs["text_encoder_2"]
    )
    config_l, config_g = (CLIPTextConfig.from_dict(configs[p]) for p in ("text_encoder", "text_encoder_2"))
    return [
        _build(lambda: CLIPTextModel(config_l), state_l, "CLIP ViT-L text encoder", path, dtype, device),
        _build(
            lambda: CLIPTextModelWithProjection(config_g), state_g, "bigG text encoder", path, dtype, device
        ),
    ]


def _load_single_file(path: Path, family: str, vae, config_dir, dtype: torch.dtype, device) -> SDParts:
    digest = hash_in_background(path)
    sd, metadata = read_state_dict(path)
    sd = convert.fix_legacy_clip_keys(sd)
    refuse_foreign(path, sd)
    layout = text_layout(path, sd)
    chosen = single_file_family(path, family, layout, metadata)
    configs = _single_file_configs(path, sd, chosen or "sd2", layout, config_dir, metadata)

    # Telling SD2 epsilon from v takes one run of the UNet in float32 on the CPU, as A1111 does.
    unet_state = _derive(path, convert.unet_from_ldm, sd, configs["unet"])
    test_first = chosen is None
    unet = _build(
        lambda: UNet2DConditionModel.from_config(configs["unet"]),
        unet_state,
        "UNet",
        path,
        torch.float32 if test_first else dtype,
        "cpu" if test_first else device,
    )
    if test_first:
        chosen = "sd2-v" if is_v_prediction(unet) else "sd2"
        unet.to(device, dtype)
        if not config_dir and convert.ARCH_KEY not in metadata:  # 768-px v-models have 96x96 latents
            unet.register_to_config(sample_size=_base_configs(chosen, None)["unet"]["sample_size"])

    text_encoders = _text_encoders(path, sd, layout, configs, dtype, device)
    vae_base = _base_configs(chosen, config_dir)["vae"]
    if vae is not None:
        vae_model = _load_vae(vae, vae_base, not config_dir, vae_dtype(dtype), device)
    elif vae_sd := _vae_part(sd):
        vae_model = _build_vae(
            path, vae_sd, vae_base, None if config_dir else metadata, vae_dtype(dtype), device
        )
    else:
        raise UserError(f"{path}: holds no VAE (first_stage_model.*); pass a separate VAE file")
    return SDParts.of(chosen, text_encoders, unet, vae_model, name=path.stem, checkpoint_hash=digest)


# --------------------------------------------------------------------------------------------------
# Diffusers folders


def _from_pretrained(cls, folder: Path, dtype: torch.dtype):
    """A diffusers/transformers model from a local folder (never the hub), fp16-variant files included."""
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json; pass a diffusers model folder")
    weights = [f.name for f in folder.iterdir() if f.suffix in (".safetensors", ".bin")]
    plain = [w for w in weights if w.count(".") == 1]  # not "name.fp16.safetensors"
    variant = "fp16" if not plain and any(".fp16." in w for w in weights) else None
    transformers_model = cls in (CLIPTextModel, CLIPTextModelWithProjection)
    dtype_arg = {"dtype": dtype} if transformers_model else {"torch_dtype": dtype}
    try:
        model, info = cls.from_pretrained(
            folder, local_files_only=True, variant=variant, output_loading_info=True, **dtype_arg
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:  # TypeError: a config value of the
        # wrong type (`"layers_per_block": "x"`) fails inside the model's constructor
        raise UserError(f"{folder}: cannot load the {cls.__name__} ({first_line(e)})") from None
    if missing := sorted(info.get("missing_keys") or ()):  # transformers would start them from random values
        raise UserError(
            f"{folder}: cannot load the {cls.__name__} ({len(missing)} of its weights missing, e.g. {missing[0]}); "
            "restore the model's files"
        )
    return model.eval().requires_grad_(False)


def _load_folder(folder: Path, family: str, vae, config_dir, dtype: torch.dtype) -> SDParts:
    if config_dir:
        raise UserError(
            f"{folder}: config_dir is for single-file checkpoints; a diffusers folder has its configs"
        )
    sdxl = (folder / "text_encoder_2").is_dir()
    for part in ("unet", "text_encoder", *(("text_encoder_2",) if sdxl else ())):
        if not (folder / part / "config.json").is_file():
            raise UserError(
                f"{folder}: not a diffusers SD folder (no {part}/config.json); pass the folder with model_index.json"
            )
    chosen = folder_family(folder, family, read_json(folder / "text_encoder" / "config.json"))
    tokenizer_dir = folder / "tokenizer"
    if not sdxl and (tokenizer_dir / "tokenizer_config.json").is_file():
        tokenizer = tokenizer_from_folder(tokenizer_dir)
    else:  # SDXL's two tokenizers are CLIP's, padded two ways: the family's own, as the conditioner pads
        tokenizer = load_tokenizer(chosen)
    if vae is not None:
        vae_model = _load_vae(vae, _base_configs(chosen, None)["vae"], True, vae_dtype(dtype), "cpu")
    else:
        vae_model = _from_pretrained(AutoencoderKL, folder / "vae", vae_dtype(dtype))
    text_encoders = [_from_pretrained(CLIPTextModel, folder / "text_encoder", dtype)]
    if sdxl:
        text_encoders.append(_from_pretrained(CLIPTextModelWithProjection, folder / "text_encoder_2", dtype))
    unet = _from_pretrained(UNet2DConditionModel, folder / "unet", dtype)
    return SDParts.of(chosen, text_encoders, unet, vae_model, name=folder.name, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------------
# Entry points


def load_sd(
    path,
    *,
    family: str = "auto",
    vae=None,
    config_dir=None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> SDParts:
    """Load an SD 1.x / 2.x / XL model offline: a single-file checkpoint or a diffusers folder.

    path: `.safetensors`, or `.ckpt`/`.pt` (read weights-only: a pickle that would run code is refused),
        in the original CompVis/A1111 (SDXL: SGM) layout; or a diffusers folder.
    family: "auto" tells SD1 (CLIP text encoder) from SD2 (OpenCLIP) from SDXL (both, under
        `conditioner.`), and SD2 epsilon from v-prediction by a `<name>.yaml` beside the file (as A1111),
        ModelSpec metadata, or A1111's test run of the UNet; "sd1" / "sd2" / "sd2-v" / "sdxl" name it
        outright (for SD2 files the detection gets wrong); one that does not fit the text encoders is a
        UserError.
    vae: an optional separate VAE (A1111 file such as vae-ft-mse-840000-ema-pruned or sdxl_vae, diffusers
        file or folder).
    config_dir: a diffusers-style folder of unet/vae/text_encoder(_2) config.json used as is, instead of the
        shipped configs with sizes read from the weights (SDXL, Pony, Illustrious, NoobAI share one).
    dtype, device: the dtype of the loaded weights (the VAE's is `vae_dtype(dtype)`: float32 under fp16) and
        where they go (a single file's weights go straight there; a folder's are read on the CPU). Models come
        back in eval mode with gradients off.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, family, vae, config_dir, dtype)
    return _load_single_file(path, family, vae, config_dir, dtype, device)


def load_parts(model, *, precision: str = "no", device: torch.device | str = "cpu") -> SDParts:
    """The model a `[model]` config table names, on `device` in the dtype of `precision` (`SDParts.place`).

    "builtin:toy" is the embedded toy model (library/assets/toy, an SD1 single file that has learned the
    toy world of library/toy.py); "builtin:tiny" is a randomly initialised model built in code, for tests.
    """
    dtype = PRECISIONS[precision]
    if model.checkpoint == "builtin:tiny":
        from library.tiny import build_tiny_parts

        parts = build_tiny_parts("sd1" if model.family == "auto" else model.family, seed=0)
    else:
        checkpoint, config_dir = model.checkpoint, model.config_dir or None
        if checkpoint == "builtin:toy":
            from library.toy import TOY_CHECKPOINT

            checkpoint, config_dir = TOY_CHECKPOINT, None
        parts = load_sd(
            checkpoint,
            family=model.family,
            vae=model.vae or None,
            config_dir=config_dir,
            dtype=dtype,
            device=device,
        )
    parts.place(device, precision)
    return parts
