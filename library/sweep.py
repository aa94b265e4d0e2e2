"""The plan of a validation sweep (A1111's X/Y/Z plot): its axes and cells, and coarse-to-fine re-planning.

- `parse_axis` reads one `[x]`/`[y]`/`[z]` table; `plan` lays out the cells (X columns, Y rows, Z grids);
  `fine_plan` re-plans the step axis every few steps over one interval (coarse-to-fine).
library/validation.py renders the plans (each checkpoint loaded once, all its cells in full batches) and puts
them together with library/run_folder.py (which file `NAME-20` in a prompt stands for, export),
library/scoring.py (scores), library/recommendation.py (the recommended step) and library/report.py (cell
images, grids, scores.csv, report.html).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.embeddings import load_embedding
from library.errors import UserError
from library.grid import apply_prompt_sr, prompt_sr_values
from library.prompts import check_attention
from library.run_folder import NEGATIVE_SUFFIX, Run, describe_steps
from library.sampling import check_sampler, resolve_seed
from library.tables import SamplerSettings, SweepAxis, SweepConfig

# The render progress bar (stderr): images done of the checkpoint's total, and images per second (tqdm's
# default would switch to seconds per image below 1 image/s, as on a CPU).
_PROGRESS = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} images [{elapsed}<{remaining}, {rate_noinv_fmt}]"
)
RUN_CHECKPOINT = "run:checkpoint"  # [model] checkpoints entry meaning "the checkpoint the run was trained on"


# --------------------------------------------------------------------------------------------------
# Axes


@dataclass(frozen=True)
class Axis:
    """One resolved axis: its type, the cell values, and their labels as the grid shows them."""

    type: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]
    search: str = ""  # Prompt S/R: the text every cell replaces


_NUMBER = r"[+-]?\d+(?:\.\d*)?"
_RANGE = re.compile(rf"^({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*({_NUMBER})\s*\)|\[\s*(\d+)\s*\])?$")
_EVERY = re.compile(r"^every\s+(\d+)(?:\s+steps?)?$", re.IGNORECASE)


def expand_numbers(items: str | list[str], kind: type, what: str) -> list:
    """A1111's number lists: `1, 2, 5`, ranges `1-5`, `1-9 (+2)` (step) and `1-10 [4]` (count)."""
    values: list = []
    for item in prompt_sr_values(items) if isinstance(items, str) else items:
        match = _RANGE.match(item)
        try:
            if not match:
                values.append(kind(item))
                continue
            start, end, step, count = match.groups()
            start, end = kind(start), kind(end)
            if count:
                n = int(count)
                values += [kind(start + (end - start) * i / max(1, n - 1)) for i in range(n)]
            else:
                step = kind(step) if step else kind(1)
                if step == 0 or (end - start) * step < 0:
                    raise ValueError
                values += [
                    kind(start + i * step) for i in range(int(math.floor((end - start) / step + 1e-9)) + 1)
                ]
        except ValueError:
            raise UserError(
                f"{what}: {item!r} is not a {kind.__name__} or a range like 20-140 (+20)"
            ) from None
    return values


def expand_steps(text: str, run: Run, what: str) -> list[int]:
    """Saved steps from `every 20` (each saved step divisible by 20), `all`, `20-140` or a list."""
    text = text.strip()
    if not text or text.lower() == "all":
        steps = run.steps
    elif match := _EVERY.match(text):
        every = int(match.group(1))
        steps = [s for s in run.steps if every and s % every == 0]
    elif (match := _RANGE.match(text)) and not match.group(3) and not match.group(4):
        steps = [s for s in run.steps if int(match.group(1)) <= s <= int(match.group(2))]
    else:
        steps = expand_numbers(text, int, what)
        for step in steps:
            run.resolve(f"{run.name}-{step}")
    if not steps:
        raise UserError(f"{what} = {text!r} matches no saved step; saved steps: {describe_steps(run.steps)}")
    return steps


def checkpoint_label(checkpoint: str) -> str:
    return (
        checkpoint
        if ":" in checkpoint and not Path(checkpoint).exists()
        else Path(checkpoint).stem or checkpoint
    )


def axis_items(values: str | int | float | tuple, name: str) -> list[str]:
    """An axis's values as text: a TOML list item by item, anything else as A1111's CSV list."""
    if isinstance(values, tuple):
        return [str(v).replace("[name]", name).strip() for v in values]
    return prompt_sr_values(str(values).replace("[name]", name))


def parse_axis(axis: SweepAxis, what: str, cfg: SweepConfig, run: Run, prompt: str) -> Axis | None:
    """Resolve one axis table; None for type "none"."""
    kind = axis.type
    text = ", ".join(map(str, axis.values)) if isinstance(axis.values, tuple) else str(axis.values)
    if kind == "none":
        return None
    if kind == "checkpoint":
        values = axis_items(axis.values, run.name) if text.strip() else list(cfg.model.checkpoints)
        values = [_checkpoint_path(v, run) for v in values]
        return Axis(kind, tuple(values), tuple(unique_labels([checkpoint_label(v) for v in values])))
    if kind == "step":
        steps = expand_steps(text, run, f"{what}.values")
        return Axis(kind, tuple(steps), tuple(f"{run.name}-{s}" for s in steps))
    if kind == "prompt_sr" and _EVERY.match(text.strip()):
        # The shorthand replaces the trigger word the prompt holds, whichever step it names.
        found = run.tokens_in(prompt) or run.tokens_in(cfg.render.negative_prompt)
        if not found:
            raise UserError(
                f"{what}.values = {text!r}: render.prompt has no '{run.name}' or {run.name}-N to replace"
            )
        values = [f"{run.name}-{s}" for s in expand_steps(text, run, f"{what}.values")]
        return Axis(kind, tuple(values), tuple(values), search=found[0])
    values = axis_items(axis.values, run.name)
    if kind == "prompt_sr":
        if values[0] not in prompt and values[0] not in cfg.render.negative_prompt:
            raise UserError(
                f"{what}.values: the first Prompt S/R value {values[0]!r} does not occur in render.prompt "
                f"{prompt!r}; the first value is the text the others replace"
            )
        return Axis(kind, tuple(values), tuple(values), search=values[0])
    if kind == "sampler":
        values = [check_sampler(v) for v in values]
        return Axis(kind, tuple(values), tuple(values))
    if kind == "size":
        values = [_size(v, f"{what}.values") for v in values]
        return Axis(kind, tuple(values), tuple(f"Size: {w}x{h}" for w, h in values))
    number = float if kind == "cfg_scale" else int
    values = expand_numbers(values, number, f"{what}.values")
    if kind == "seed":
        values = [resolve_seed(v) for v in values]
    title = {"cfg_scale": "CFG scale", "seed": "Seed", "steps": "Steps"}[kind]
    return Axis(
        kind, tuple(values), tuple(f"{title}: {v:g}" if number is float else f"{title}: {v}" for v in values)
    )


def unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _checkpoint_path(value: str, run: Run) -> str:
    if value != RUN_CHECKPOINT:
        return value
    if run.config is None:
        raise UserError(
            f"{run.folder.root}: no config.toml, so '{RUN_CHECKPOINT}' is unknown; list the checkpoint file in model.checkpoints"
        )
    if not run.config.model.checkpoint:
        raise UserError(
            f"{run.folder.config_file}: names no model.checkpoint, so '{RUN_CHECKPOINT}' is unknown; "
            "list the checkpoint file in model.checkpoints"
        )
    return run.config.model.checkpoint


def _size(text: str, what: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", text)
    if not match:
        raise UserError(f"{what}: size {text!r} must be WIDTHxHEIGHT, e.g. 512x512")
    width, height = int(match.group(1)), int(match.group(2))
    if width % 8 or height % 8 or min(width, height) < 8:  # SD's VAE works on 8x8-pixel cells; say so now,
        # not after a checkpoint has loaded
        raise UserError(f"{what}: size {width}x{height} must be multiples of 8, e.g. 512x512")
    return width, height


# --------------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class Cell:
    """One cell of the plot: one prompt on one checkpoint, rendered for `seeds` (the cell's batch)."""

    x: int
    y: int
    z: int
    checkpoint: str
    checkpoint_label: str
    prompt: str
    negative: str
    seeds: tuple[int, ...]
    settings: SamplerSettings
    step: int | None  # the embedding step in the prompt (for scores); None when it holds several or none


@dataclass(frozen=True)
class Plan:
    name: str  # "coarse" or "fine"
    axes: tuple[Axis | None, Axis | None, Axis | None]
    cells: tuple[Cell, ...]

    @property
    def checkpoints(self) -> list[str]:
        return list(dict.fromkeys(c.checkpoint for c in self.cells))

    def labels(self, index: int) -> list[str]:
        axis = self.axes[index]
        return list(axis.labels) if axis else []


def base_prompt(cfg: SweepConfig, run: Run) -> str:
    if not cfg.render.prompt.strip():
        raise UserError(
            "render.prompt is empty: write the validation prompt, e.g. 'a photo of [name]-20 on a beach'"
        )
    return cfg.render.prompt.replace("[name]", run.name)


def plan(
    cfg: SweepConfig, run: Run, axes: tuple[Axis | None, Axis | None, Axis | None], name: str = "coarse"
) -> Plan:
    """All cells of the plot, checking every embedding they name exists before anything is rendered."""
    types = [a.type for a in axes if a]
    if types.count("checkpoint") > 1:
        raise UserError("only one of [x], [y], [z] can be of type checkpoint")
    if "checkpoint" not in types and len(cfg.model.checkpoints) > 1:
        raise UserError(
            'model.checkpoints lists several checkpoints: make one axis type = "checkpoint" to compare them'
        )
    prompt = base_prompt(cfg, run)
    seed = resolve_seed(cfg.render.seed)
    width, height = _default_size(cfg, run)
    first_checkpoint = _checkpoint_path(cfg.model.checkpoints[0], run)
    cells = []
    for z, y, x in itertools.product(*(range(len(a.values)) if a else [0] for a in reversed(axes))):
        state = dict(
            prompt=prompt,
            negative=cfg.render.negative_prompt,
            seed=seed,
            steps=cfg.render.steps,
            cfg_scale=cfg.render.cfg_scale,
            sampler=cfg.render.sampler,
            size=(width, height),
            checkpoint=first_checkpoint,
            checkpoint_label=checkpoint_label(first_checkpoint),
        )
        for axis, i in zip(axes, (x, y, z), strict=True):
            if axis:
                _apply(state, axis, i, run)
        check_attention(state["prompt"], "render.prompt")  # now, not after a checkpoint has loaded
        check_attention(state["negative"], "render.negative_prompt")
        settings = SamplerSettings(
            steps=state["steps"],
            cfg_scale=state["cfg_scale"],
            sampler=state["sampler"],
            width=state["size"][0],
            height=state["size"][1],
        )
        names = {run.resolve(t)[0] for t in run.tokens_in(state["prompt"] + "\n" + state["negative"])}
        step = _step_of(names, run)
        seeds = tuple(state["seed"] + i for i in range(cfg.render.batch_size))
        cells.append(
            Cell(
                x,
                y,
                z,
                state["checkpoint"],
                state["checkpoint_label"],
                state["prompt"],
                state["negative"],
                seeds,
                settings,
                step,
            )
        )
    return Plan(name, axes, tuple(cells))


def _apply(state: dict, axis: Axis, i: int, run: Run) -> None:
    value = axis.values[i]
    if axis.type == "prompt_sr":
        for key in ("prompt", "negative"):
            state[key] = apply_prompt_sr(state[key], [axis.search], value, must_occur=False)
    elif axis.type == "step":
        if not run.tokens_in(state["prompt"] + state["negative"]):
            raise UserError(f"a step axis needs '{run.name}' (or {run.name}-N) in render.prompt to replace")
        for key in ("prompt", "negative"):
            state[key] = run.at_step(state[key], value)
    elif axis.type == "checkpoint":
        state["checkpoint"], state["checkpoint_label"] = value, axis.labels[i]
    elif axis.type == "size":
        state["size"] = value
    else:
        state[axis.type] = value


def _step_of(names: set[str], run: Run) -> int | None:
    """The step a cell shows: that of its one embedding, or of its one DreamArtist pair (`NAME-20` in the
    prompt, `NAME-20-neg` in the negative prompt)."""
    steps = set()
    for name in names:
        if name in run.names:  # the final embedding
            steps.add(load_embedding(run.final_file(name)).step)
        else:
            steps.add(int(name.removesuffix(NEGATIVE_SUFFIX).rsplit("-", 1)[1]))
    positives = {name for name in names if not (name.endswith(NEGATIVE_SUFFIX) and len(names) > 1)}
    if len(positives) != 1 or len(steps) != 1:
        return None
    return steps.pop()


def _default_size(cfg: SweepConfig, run: Run) -> tuple[int, int]:
    trained = run.config.dataset.size if run.config else (512, 512)
    return cfg.render.width or trained[0], cfg.render.height or trained[1]


def step_axis_index(axes) -> int | None:
    """Which of X/Y/Z carries the embedding steps: a step axis, or Prompt S/R over NAME-N values."""
    for i, axis in enumerate(axes):
        if axis and (
            axis.type == "step"
            or (axis.type == "prompt_sr" and all(re.search(r"-\d+$", v) for v in axis.values))
        ):
            return i
    return None


def fine_plan(cfg: SweepConfig, run: Run, coarse_axes, interval: tuple[int, int]) -> Plan:
    """The coarse plot again with its step axis replaced by every `fine.every` saved step in `interval`."""
    index = step_axis_index(coarse_axes)
    if index is None:
        raise UserError(
            "fine.interval needs a step axis: an axis of type step, or Prompt S/R over NAME-N values"
        )
    lo, hi = interval
    steps = [s for s in run.steps if lo <= s <= hi and s % cfg.fine.every == 0]
    if not steps:
        raise UserError(
            f"fine pass: no saved step in {lo}-{hi} divisible by fine.every = {cfg.fine.every}; "
            f"saved steps: {describe_steps(run.steps)}"
        )
    axes = list(coarse_axes)
    axes[index] = Axis("step", tuple(steps), tuple(f"{run.name}-{s}" for s in steps))
    return plan(cfg, run, tuple(axes), name="fine")


def parse_interval(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match or int(match.group(1)) > int(match.group(2)):
        raise UserError(
            f'fine.interval = {text!r}: write FIRST-LAST (e.g. 40-80), "auto" or "" for no fine pass'
        )
    return int(match.group(1)), int(match.group(2))


def auto_interval(steps: list[int], recommended: int) -> tuple[int, int]:
    """The coarse gap the first passing step closes: (previous coarse step, recommended step]."""
    earlier = [s for s in steps if s < recommended]
    return (earlier[-1] + 1 if earlier else 0), recommended


# --------------------------------------------------------------------------------------------------
# Rendering
