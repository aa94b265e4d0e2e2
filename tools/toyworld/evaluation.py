"""How good the toy model is: samples of all 36 combinations judged by the scorer (`evaluate`, and the
trainer's own evaluations), the labelled figure of those samples (`samples-grid`), and the likeness of each
saved step of a textual-inversion run (`ti-eval`). Pictures come from library.sampling.generate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image

from library import sampling, toy
from library.conditioning import Conditioner
from library.embedding_set import blocks_from_file, starting_blocks
from library.embeddings import load_embedding
from library.errors import UserError
from library.files import atomic_write, copy_file, ensure_folder
from library.grid import make_grid
from library.models import load_sd
from library.parts import SDParts
from library.run_folder import open_run
from library.tables import SamplerSettings

from .models import log
from .scorer_stage import scorer_accuracy

EVAL_SEED = 1000  # the evaluation's first seed; docs/toy_samples.png shows its samples
GRID_MARGIN = 4  # pixels between the shape columns of the samples grid
# How the evaluation samples are rendered: DPM++ 2M Karras, 20 steps, CFG 4, 64x64.
SAMPLES = SamplerSettings(steps=20, cfg_scale=4.0, sampler="DPM++ 2M Karras", width=64, height=64)
COMBOS = [(c, s) for c in toy.COLOURS for s in toy.SHAPES]  # colour-major, as the grid's rows


def sample_prompts(per_combo: int, count: int, seed: int) -> tuple[list[str], list[int]]:
    """The first `count` of the `per_combo` samples of each combination (colour-major, as the grid rows),
    with the seeds the evaluation gives them: sample j of combination k has seed `seed + k*per_combo + j`."""
    prompts = [toy.caption(c, s, background=False) for c, s in COMBOS for _ in range(count)]
    seeds = [seed + k * per_combo + j for k in range(len(COMBOS)) for j in range(count)]
    return prompts, seeds


def render_samples(parts: SDParts, per_combo: int, count: int, seed: int, batch: int) -> list[Image.Image]:
    """The first `count` evaluation samples of each combination (see sample_prompts)."""
    prompts, seeds = sample_prompts(per_combo, count, seed)
    conditioner = Conditioner.of(parts)
    return sampling.generate(
        parts, conditioner, prompts, [""] * len(prompts), seeds, SAMPLES, batch_size=batch
    )


@torch.no_grad()
def evaluate_parts(
    parts: SDParts,
    device: str,
    per_combo: int,
    batch: int,
    work: Path | None,
    tag: str,
    seed: int = EVAL_SEED,
) -> dict:
    """Generate `per_combo` images for each of the 36 combinations from its plain prompt (`a photo of a
    red star`; DPM++ 2M Karras, 20 steps, CFG 4) and score them; a grid of the first two of each."""
    scorer = toy.load_classifier(work / "scorer.safetensors" if work else toy.SCORER_FILE).to(device)
    images = render_samples(parts, per_combo, per_combo, seed, batch)
    found = toy.classify(images, scorer)
    per, seen = {}, {"both": 0, "colour": 0, "shape": 0, "n": 0}
    for i, (c, s) in enumerate(COMBOS):
        answers = found[i * per_combo : (i + 1) * per_combo]
        both = sum(a == (c, s) for a in answers) / per_combo
        per[f"{c} {s}"] = round(both, 3)
        if (c, s) != toy.HELD_OUT:
            seen["both"] += both * per_combo
            seen["colour"] += sum(a[0] == c for a in answers)
            seen["shape"] += sum(a[1] == s for a in answers)
            seen["n"] += per_combo
    by_shape = {
        s: round(
            sum(per[f"{c} {s}"] for c in toy.COLOURS if (c, s) != toy.HELD_OUT)
            / (6 - (s == toy.HELD_OUT[1])),
            3,
        )
        for s in toy.SHAPES
    }
    report = {
        "seen_both": round(seen["both"] / seen["n"], 4),
        "seen_colour": round(seen["colour"] / seen["n"], 4),
        "seen_shape": round(seen["shape"] / seen["n"], 4),
        "held_out": per[" ".join(toy.HELD_OUT)],
        "per_shape": by_shape,
        "per_combination": per,
        "no_clear_shape_answers": sum(a[1] == toy.NO_SHAPE for a in found) / len(found),
        "per_combo": per_combo,
    }
    if work is not None:
        grid_image(images, per_combo, work / f"grid-{tag}.png")
    log(
        f"eval ({tag}): seen both {report['seen_both']:.3f} colour {report['seen_colour']:.3f} shape {report['seen_shape']:.3f}, held-out {report['held_out']:.3f}, per shape {by_shape}"
    )
    return report


def grid_image(images, per_combo: int, path: Path, columns_per_combo: int = 2) -> None:
    """Rows: colours; columns: shapes, `columns_per_combo` samples each side by side; labelled by
    library.grid.make_grid (the pictures at their own 64 px)."""
    k = min(columns_per_combo, per_combo)
    rows = []
    for ci in range(len(toy.COLOURS)):
        row = []
        for si in range(len(toy.SHAPES)):
            cell = Image.new("RGB", (64 * k, 64))
            for j in range(k):
                cell.paste(images[(ci * len(toy.SHAPES) + si) * per_combo + j], (j * 64, 0))
            row.append(cell)
        rows.append(row)
    grid = make_grid(rows, list(toy.SHAPES), list(toy.COLOURS), margin=GRID_MARGIN)
    atomic_write(path, lambda temp: grid.save(temp, format="PNG"))


def _load_model(checkpoint: str, device: str = "cpu") -> SDParts:
    parts = load_sd(checkpoint)
    for module in parts.modules:
        module.to(device)
    return parts


def cmd_evaluate(args) -> None:
    """Sample accuracy of the committed (or given) model with the scorer, plus the scorer's own accuracy."""
    parts = _load_model(args.checkpoint, args.device)
    scorer = toy.load_classifier()
    report = {"scorer": scorer_accuracy(scorer, "cpu", args.seed, args.scorer_n)} if args.scorer_n else {}
    log("scorer", report.get("scorer"))
    work = Path(args.out) if args.out else None
    if work:
        ensure_folder(work)
        copy_file(toy.SCORER_FILE, work / "scorer.safetensors", overwrite=True)
    report["samples"] = evaluate_parts(parts, args.device, args.per_combo, args.batch, work, "evaluate")
    print(json.dumps(report, indent=1))


def cmd_samples_grid(args) -> None:
    """The README's figure of the toy model (docs/toy_samples.png): the first `--columns` samples of
    each of the 36 prompts of `evaluate --per-combo N` (the same prompts, seeds, sampler and CFG, so
    the same pictures), rows colours, columns shapes, labelled."""
    if not 1 <= args.columns <= args.per_combo:
        raise UserError(f"--columns {args.columns}: use 1 to --per-combo ({args.per_combo})")
    parts = _load_model(args.checkpoint)
    images = render_samples(parts, args.per_combo, args.columns, args.seed, args.batch)
    grid_image(images, args.columns, Path(args.output), args.columns)
    _, seeds = sample_prompts(args.per_combo, args.columns, args.seed)
    print(f"wrote {args.output}: {len(images)} samples, seeds {seeds[0]}..{seeds[-1]}")


def cmd_ti_eval(args) -> None:
    """Likeness (hit rate) of a textual-inversion run: the init word (step 0), then every saved step."""
    parts = _load_model(args.checkpoint)
    conditioner = Conditioner.of(parts)
    settings = SamplerSettings(steps=20, cfg_scale=args.cfg, width=64, height=64)
    seeds = list(range(args.seed, args.seed + args.n))
    run = open_run(args.run)
    name, files = run.name, run.files[run.name]
    if not files:
        raise UserError(f"{run.folder.embeddings_dir}: no saved {name}-N embeddings")
    count = load_embedding(files[min(files)]).num_vectors
    steps = [(0, lambda: starting_blocks(parts, args.init_text, count, "a1111"))]
    steps += [(step, lambda f=file: blocks_from_file(parts, f)) for step, file in sorted(files.items())]
    prompt = args.prompt.replace("[name]", name)
    for step, blocks in steps:
        if args.steps and step not in args.steps:
            continue
        conditioner.set_embedding(name, blocks())
        started = time.perf_counter()
        rate = toy.concept_hit_rate(
            parts, conditioner, prompt, args.concept, seeds, settings, batch_size=args.n
        )
        print(
            f"step {step}: likeness {rate:.3f} ({args.n} images of '{prompt}', {time.perf_counter() - started:.1f} s)",
            flush=True,
        )
