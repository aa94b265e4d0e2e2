"""Training previews: which images to render at a preview step, and the sheet that shows them all.

The images come from the [preview] table (one prompt, `batch_size` seeds: seed, seed + 1, ...) or, as in
Kohya's `--sample_prompts`, from a text file with one prompt per line and its own settings:

    a photo of [name] on a beach --n blurry, lowres --w 512 --h 768 --d 42 --s 30 --l 6.5 --ss euler_a

(`--n` negative prompt, `--w`/`--h` size, `--d` seed, `--s` steps, `--l` CFG scale, `--ss` sampler; lines
starting with `#` and empty lines are skipped; options left out come from [preview].) `[name]` becomes
the trigger word; a run of several embeddings previews each of them. The images of step S are
`previews/NAME-S.png`, `NAME-S-1.png`, ... in that order, and `previews/index.html` lays out every preview
of the run, one row per step.
"""

from __future__ import annotations

import html
import re
import typing
from dataclasses import dataclass, replace
from pathlib import Path

from library.captions import read_text_file
from library.errors import UserError
from library.files import atomic_write
from library.prompts import check_attention
from library.tables import PreviewConfig, Sampler, SamplerSettings

SAMPLER_NAMES = typing.get_args(Sampler)

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
    """One picture of a preview step: which embedding it shows, and what to render."""

    name: str  # the embedding whose trigger word filled [name] (a cast previews each of its characters)
    prompt: str  # "" = a line of that embedding's training template, drawn at each preview
    negative: str
    seed: int
    settings: SamplerSettings


def preview_images(
    cfg: PreviewConfig, names: list[str], size: tuple[int, int], seed: int
) -> list[PreviewImage]:
    """The pictures of every preview step, for each embedding of `names` in turn.

    `seed` is the resolved [preview] seed (-1 already drawn); `size` the training resolution.
    """
    settings = _checked_settings(lambda: SamplerSettings.of(cfg, size), "preview")
    images = []
    for name in names:
        base = PreviewImage(
            name,
            cfg.prompt.replace("[name]", name),
            cfg.negative_prompt.replace("[name]", name),
            seed,
            settings,
        )
        check_attention(base.prompt, "preview.prompt")
        check_attention(base.negative, "preview.negative_prompt")
        if cfg.prompts_file:
            images += read_prompts_file(Path(cfg.prompts_file).expanduser(), base)
        else:
            images += [replace(base, seed=seed + i) for i in range(cfg.batch_size)]
    return images


def _checked_settings(make, where: str) -> SamplerSettings:
    try:
        return make()
    except UserError as error:  # the table's own check, e.g. a size that is not a multiple of 8
        raise UserError(f"{where}: {str(error).removeprefix('SamplerSettings: ')}") from None


def read_prompts_file(path: Path, base: PreviewImage) -> list[PreviewImage]:
    """Kohya's sample-prompt lines (see the module docstring) over the settings of `base`."""
    if not path.is_file():
        raise UserError(f"preview.prompts_file {path} not found; give a text file with one prompt per line")
    images = []
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            images.append(_parse_line(line, base, f"{path}:{number}"))
    if not images:
        raise UserError(
            f"{path}: no prompt lines; write one prompt per line (lines starting with # are notes)"
        )
    return images


def _parse_line(line: str, base: PreviewImage, where: str) -> PreviewImage:
    prompt, *options = line.split(" --")
    image, sampler = {"prompt": prompt.strip().replace("[name]", base.name)}, {}
    for option in options:
        match = _OPTION.match(option.strip())
        if not match:
            raise UserError(
                f"{where}: unknown option '--{option.strip()}'; use --n, --w, --h, --d, --s, --l or --ss"
            )
        key, value = match.group(1), match.group(2).strip()
        try:
            if key == "n":
                image["negative"] = value.replace("[name]", base.name)
            elif key == "d":
                image["seed"] = int(value)
            elif key == "ss":
                sampler["sampler"] = KOHYA_SAMPLERS.get(value.lower(), value)
            elif key == "l":
                sampler["cfg_scale"] = float(value)
            else:
                sampler[{"w": "width", "h": "height", "s": "steps"}[key]] = int(value)
        except ValueError:
            raise UserError(f"{where}: --{key} {value!r} is not a number") from None
    if image.get("seed", 0) < 0:
        raise UserError(f"{where}: --d {image['seed']} must be 0 or more")
    if sampler.get("sampler", "DPM++ 2M Karras") not in SAMPLER_NAMES:
        raise UserError(
            f"{where} (--ss): unknown sampler {sampler['sampler']!r}; use one of {', '.join(SAMPLER_NAMES)}"
        )
    settings = _checked_settings(lambda: replace(base.settings, **sampler), where)
    result = replace(base, settings=settings, **image)
    check_attention(result.prompt, where)
    check_attention(result.negative, f"{where} (--n)")
    return result


def image_paths(folder: Path, name: str, step: int, count: int) -> list[Path]:
    """`NAME-S.png`, `NAME-S-1.png`, ...: the files of one embedding's preview step."""
    return [folder / (f"{name}-{step}.png" if i == 0 else f"{name}-{step}-{i}.png") for i in range(count)]


def files_of(folder: Path, step: int, images: list[PreviewImage]) -> list[Path]:
    """The file of each preview picture of `step`, in the order of `images`."""
    paths, seen = [], {}
    for image in images:
        index = seen[image.name] = seen.get(image.name, -1) + 1
        paths.append(image_paths(folder, image.name, step, index + 1)[index])
    return paths


def write_sheet(folder: Path, title: str, steps: list[int], images: list[PreviewImage]) -> Path:
    """`previews/index.html`: every preview of the run on one page, a row per step, a column per picture."""
    esc = html.escape
    head = "".join(
        f"<th>{esc(image.prompt or f'(a template line of {image.name})')}<br><small>seed {image.seed}</small></th>"
        for image in images
    )
    rows = []
    for step in steps:
        cells = "".join(
            f'<td><img src="{esc(path.name)}" alt="step {step}" loading="lazy"></td>'
            for path in files_of(folder, step, images)
        )
        rows.append(f"<tr><th>step {step}</th>{cells}</tr>")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Previews of {esc(title)}</title>'
        "<style>body{font:14px system-ui,sans-serif;margin:16px}table{border-collapse:collapse}"
        "th,td{border:1px solid #ddd;padding:4px;vertical-align:top}th{font-weight:normal;max-width:260px}"
        "img{width:256px}</style></head><body>"
        f"<h1>Previews of {esc(title)}</h1><table><tr><th></th>{head}</tr>{''.join(rows)}</table>"
        "</body></html>\n"
    )
    return atomic_write(folder / SHEET, page)
