"""Training previews: which images to render at a preview step, and the sheet that shows them all.

The images come from the [preview] table (one prompt, `batch_size` seeds: seed, seed + 1, ...) or, as in
Kohya's `--sample_prompts`, from a text file with one prompt per line and its own settings:

    a photo of [name] on a beach --n blurry, lowres --w 512 --h 768 --d 42 --s 30 --l 6.5 --ss euler_a

(`--n` negative prompt, `--w`/`--h` size, `--d` seed, `--s` steps, `--l` CFG scale, `--ss` sampler; lines
starting with `#` and empty lines are skipped; options left out come from [preview].) `[name]` becomes
the trigger word. The images of step S are `previews/NAME-S.png`, `NAME-S-1.png`, ... in that order, and
`previews/index.html` lays out every preview of the run, one row per step.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

from library.captions import read_text_file
from library.config import PreviewConfig
from library.errors import UserError
from library.files import atomic_write
from library.prompts import check_attention
from library.sampling import check_sampler

# Kohya's sampler names (library/train_util.py) -> ours (library/sampling.SAMPLERS).
KOHYA_SAMPLERS = {
    "ddim": "DDIM",
    "euler": "Euler",
    "k_euler": "Euler",
    "euler_a": "Euler a",
    "k_euler_a": "Euler a",
    "dpmsolver++": "DPM++ 2M",
    "dpmsolver++_karras": "DPM++ 2M Karras",
}
_OPTION = re.compile(r"^(ss|n|w|h|d|s|l)\s+(.*)$", re.DOTALL)
SHEET = "index.html"


@dataclass(frozen=True)
class PreviewImage:
    """One picture of a preview step: what to render."""

    prompt: str
    negative: str
    seed: int
    steps: int
    cfg_scale: float
    width: int
    height: int
    sampler: str


def preview_images(cfg: PreviewConfig, name: str, size: tuple[int, int], seed: int) -> list[PreviewImage]:
    """The pictures of every preview step (their prompts may still hold "" for "a template line").

    `seed` is the resolved [preview] seed (-1 already drawn); `size` the training resolution.
    """
    base = PreviewImage(
        cfg.prompt.replace("[name]", name),
        cfg.negative_prompt.replace("[name]", name),
        seed,
        cfg.steps,
        cfg.cfg_scale,
        cfg.width or size[0],
        cfg.height or size[1],
        cfg.sampler,
    )
    _check(base, "preview.prompt", "preview.negative_prompt", "preview.width/height", "preview.sampler")
    if not cfg.prompts_file:
        return [_replace(base, seed=seed + i) for i in range(cfg.batch_size)]
    return read_prompts_file(Path(cfg.prompts_file).expanduser(), base, name)


def _check(
    image: PreviewImage, prompt_key: str, negative_key: str, size_key: str, sampler_key: str
) -> PreviewImage:
    """What would otherwise fail at the first preview, after the model has loaded (or hours into a
    resumed run): the prompts' attention weights, the size, the sampler."""
    check_attention(image.prompt, prompt_key)
    check_attention(image.negative, negative_key)
    if image.width % 8 or image.height % 8 or image.width < 8 or image.height < 8:
        raise UserError(f"{size_key}: size {image.width}x{image.height} must be multiples of 8")
    try:
        check_sampler(image.sampler)
    except UserError as error:
        raise UserError(f"{sampler_key}: {error}") from None
    return image


def read_prompts_file(path: Path, base: PreviewImage, name: str) -> list[PreviewImage]:
    """Kohya's sample-prompt lines (see the module docstring) over the settings of `base`."""
    if not path.is_file():
        raise UserError(f"preview.prompts_file {path} not found; give a text file with one prompt per line")
    images = []
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            images.append(_parse_line(line, base, name, f"{path}:{number}"))
    if not images:
        raise UserError(
            f"{path}: no prompt lines; write one prompt per line (lines starting with # are notes)"
        )
    return images


def _parse_line(line: str, base: PreviewImage, name: str, where: str) -> PreviewImage:
    prompt, *options = line.split(" --")
    values = {"prompt": prompt.strip().replace("[name]", name)}
    for option in options:
        match = _OPTION.match(option.strip())
        if not match:
            raise UserError(
                f"{where}: unknown option '--{option.strip()}'; use --n, --w, --h, --d, --s, --l or --ss"
            )
        key, value = match.group(1), match.group(2).strip()
        try:
            if key == "n":
                values["negative"] = value.replace("[name]", name)
            elif key == "ss":
                values["sampler"] = KOHYA_SAMPLERS.get(value.lower(), value)
            elif key == "l":
                values["cfg_scale"] = float(value)
            else:
                field = {"w": "width", "h": "height", "d": "seed", "s": "steps"}[key]
                values[field] = int(value)
        except ValueError:
            raise UserError(f"{where}: --{key} {value!r} is not a number") from None
    image = _check(_replace(base, **values), where, f"{where} (--n)", where, f"{where} (--ss)")
    if image.steps < 1 or image.seed < 0 or image.cfg_scale < 0:
        raise UserError(f"{where}: --s must be at least 1, --d and --l at least 0")
    return image


def _replace(image: PreviewImage, **changes) -> PreviewImage:
    return PreviewImage(**{**image.__dict__, **changes})


def image_paths(folder: Path, name: str, step: int, count: int) -> list[Path]:
    """`NAME-S.png`, `NAME-S-1.png`, ...: the files of one preview step."""
    return [folder / (f"{name}-{step}.png" if i == 0 else f"{name}-{step}-{i}.png") for i in range(count)]


def write_sheet(folder: Path, name: str, steps: list[int], images: list[PreviewImage]) -> Path:
    """`previews/index.html`: every preview of the run on one page, a row per step, a column per picture."""
    esc = html.escape
    head = "".join(
        f"<th>{esc(image.prompt or '(a template line)')}<br><small>seed {image.seed}</small></th>"
        for image in images
    )
    rows = []
    for step in steps:
        cells = "".join(
            f'<td><img src="{esc(path.name)}" alt="step {step}" loading="lazy"></td>'
            for path in image_paths(folder, name, step, len(images))
        )
        rows.append(f"<tr><th>step {step}</th>{cells}</tr>")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Previews of {esc(name)}</title>'
        "<style>body{font:14px system-ui,sans-serif;margin:16px}table{border-collapse:collapse}"
        "th,td{border:1px solid #ddd;padding:4px;vertical-align:top}th{font-weight:normal;max-width:260px}"
        "img{width:256px}</style></head><body>"
        f"<h1>Previews of {esc(name)}</h1><table><tr><th></th>{head}</tr>{''.join(rows)}</table>"
        "</body></html>\n"
    )
    return atomic_write(folder / SHEET, page)
