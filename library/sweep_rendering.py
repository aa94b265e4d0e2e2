"""Rendering a sweep's cells: each checkpoint loaded once, its cells in UNet batches of whole cells, a
process's share of them under a launch of several (library/shards.py); a cell's images as one picture."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator

import torch
from PIL import Image
from tqdm import tqdm

from library.embedding_set import blocks_from_file
from library.run_folder import Run
from library.sampling import generate
from library.shards import Shards
from library.sweep import Plan, checkpoint_label
from library.tables import ModelConfig, SamplerSettings, SweepConfig

# The render progress bar (stderr): images done of the checkpoint's total, and images per second (tqdm's
# default would switch to seconds per image below 1 image/s, as on a CPU).
_PROGRESS = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} images [{elapsed}<{remaining}, {rate_noinv_fmt}]"
)


def render_by_checkpoint(
    cfg: SweepConfig, run: Run, plans: list[Plan], shards: Shards | None = None, log=print
) -> Iterator[tuple[str, object, dict[tuple[int, int], list[Image.Image]], float]]:
    """Per checkpoint (loaded one at a time): (checkpoint, parts, {(plan position, cell index): images},
    seconds), the plan position being its place in `plans`.

    All cells of all plans that use the checkpoint are rendered together, grouped by sampler settings, in
    UNet batches of whole cells (up to `sweep.images_per_batch` images; a larger cell alone, in several).
    Under a launch of several processes each renders its share of those batches, and every cell is
    rendered in the batch it has in one process.
    """
    from library.conditioning import Conditioner
    from library.models import load_parts

    shards = shards or Shards()
    device = shards.device()
    precision = cfg.sweep.mixed_precision if device.type == "cuda" else "no"
    trained = run.config  # render as the run trained: its CLIP skip, and its family for its own checkpoint
    clip_skip = trained.train.clip_skip if trained else 0
    checkpoints = list(dict.fromkeys(c for p in plans for c in p.checkpoints))
    for checkpoint in checkpoints:
        label = checkpoint_label(checkpoint)
        log(f"{label}: loading {checkpoint}")
        started = time.perf_counter()
        family = cfg.model.family
        if family == "auto" and trained and checkpoint == trained.model.checkpoint:
            family = trained.model.family
        model = ModelConfig(
            checkpoint=checkpoint, vae=cfg.model.vae, family=family, config_dir=cfg.model.config_dir
        )
        parts = load_parts(model, precision=precision, device=device)
        conditioner = Conditioner.of(parts, clip_skip=clip_skip)
        jobs = [
            (k, i, cell)
            for k, p in enumerate(plans)
            for i, cell in enumerate(p.cells)
            if cell.checkpoint == checkpoint
        ]
        for token in {t for _, _, cell in jobs for t in run.tokens_in(cell.prompt + "\n" + cell.negative)}:
            name, file = run.resolve(token)
            if name not in conditioner.embedding_names:
                blocks = blocks_from_file(parts, file)
                conditioner.set_embedding(name, {k: v.to(device) for k, v in blocks.items()})
        loaded = time.perf_counter() - started
        images: dict[tuple[int, int], list[Image.Image]] = {}
        groups: dict[SamplerSettings, list] = {}
        for job in jobs:
            groups.setdefault(job[2].settings, []).append(job)
        size = cfg.sweep.images_per_batch
        units = [unit for group in groups.values() for unit in _whole_cells(group, size)]
        mine = [unit for n, unit in enumerate(units) if shards.mine(n)]
        total = sum(len(job[2].seeds) for job in jobs)
        log(f"{label}: loaded in {loaded:.1f} s; rendering {total} images")
        render_started = time.perf_counter()
        share = sum(len(job[2].seeds) for unit in mine for job in unit)
        with tqdm(
            total=share,
            desc=label,
            unit=" images",
            file=sys.stderr,
            bar_format=_PROGRESS,
            disable=not shards.main,
        ) as progress:
            for unit in mine:
                flat = [(job, seed) for job in unit for seed in job[2].seeds]
                # One UNet batch per call (as generate would batch them anyway), so the bar moves per batch.
                for start in range(0, len(flat), size):
                    batch = flat[start : start + size]
                    out = generate(
                        parts,
                        conditioner,
                        [j[2].prompt for j, _ in batch],
                        [j[2].negative for j, _ in batch],
                        [seed for _, seed in batch],
                        batch[0][0][2].settings,
                        batch_size=size,
                    )
                    for (job, _), image in zip(batch, out, strict=True):
                        images.setdefault((job[0], job[1]), []).append(image)
                    progress.update(len(batch))
        seconds = time.perf_counter() - render_started
        count = sum(len(v) for v in images.values())
        each = f" (this process's share of {shards.count})" if shards.count > 1 else ""
        log(f"{label}: {count} images in {seconds:.1f} s ({count / max(seconds, 1e-9):.2f} images/s){each}")
        yield checkpoint, parts, images, seconds
        del parts, conditioner
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _whole_cells(jobs: list, size: int) -> list[list]:
    """Consecutive cells packed into UNet batches of at most `size` images without splitting a cell (a
    cell of more images than `size` is a batch unit of its own)."""
    units, current, count = [], [], 0
    for job in jobs:
        n = len(job[2].seeds)
        if current and count + n > size:
            units.append(current)
            current, count = [], 0
        current.append(job)
        count += n
    return units + [current] if current else units


def batch_grid(images: list[Image.Image]) -> Image.Image:
    """A cell's images as one picture, A1111's way: rows = sqrt(n), lowered until it divides n."""
    rows = max(1, int(math.sqrt(len(images))))
    while len(images) % rows:
        rows -= 1
    cols = len(images) // rows
    w, h = images[0].size
    canvas = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        canvas.paste(image, ((i % cols) * w, (i // cols) * h))
    return canvas
