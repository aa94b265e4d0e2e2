"""Stage 4: the EMA model as a folder of fp16 parts (what a device call brings back), and `assemble`: the parts
as the committed single-file checkpoint (library.convert.save_single_file), optionally a diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from library import toy
from library.convert import save_diffusers, save_single_file
from library.files import atomic_folder, atomic_write, copy_file

from .models import PART_NAMES, fp16_state, make_parts, part_configs, read_parts


def export_parts(unet, text_encoder, vae, folder: Path) -> None:
    """`folder`: unet / text_encoder / vae .safetensors (fp16; diffusers / transformers keys) and
    configs.json; replaced whole."""

    def write(temp: Path) -> None:
        for name, model in zip(PART_NAMES, (unet, text_encoder, vae), strict=True):
            save_file(fp16_state(model), temp / f"{name}.safetensors")
        (temp / "configs.json").write_text(
            json.dumps(part_configs(unet, text_encoder, vae), indent=1, default=list)
        )

    atomic_folder(folder, write, overwrite=True)


def cmd_assemble(args) -> None:
    """fp16 parts -> the committed single-file checkpoint (and optionally a diffusers folder)."""
    folder = Path(args.parts)
    unet, text, vae = read_parts(folder, files={"vae": Path(args.vae)} if args.vae else None)
    parts = make_parts(unet, text, vae)
    out = Path(args.output)
    save_single_file(parts, out, overwrite=True)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if args.scorer:
        copy_file(args.scorer, toy.SCORER_FILE, overwrite=True)
        print(f"wrote {toy.SCORER_FILE}")
    if args.diffusers:
        for model in (unet, text, vae):
            model.to(torch.float16)
        written = save_diffusers(parts, args.diffusers, overwrite=True)
        # fp16 weights, but a float32 config: a plain from_pretrained on the CPU must not mix dtypes.
        config_file = written / "text_encoder" / "config.json"
        config = json.loads(config_file.read_text())
        config.update({k: "float32" for k in ("dtype", "torch_dtype") if k in config} or {"dtype": "float32"})
        atomic_write(config_file, json.dumps(config, indent=2))
        print(f"wrote {written}")
