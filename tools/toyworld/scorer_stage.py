"""Stage 1: the scorer, library.toy.ShapeClassifier, trained on freshly rendered pictures every step (the
world with more jitter, noise and blur than it has, and pictures with no clear shape); its accuracy."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from library import toy

from .models import bf16, log
from .storage import save_weights, write_json


def train_scorer(
    work: Path, device: str, steps: int, batch: int, seed: int, eval_n: int = 4096, width: int = 16
) -> dict:
    """Train the scorer on fresh pictures every step: the world (all 36 combinations, with more jitter,
    noise and slight blur than the world has) and pictures with no clear shape. Writes
    `work`/scorer.safetensors and scorer.json (its accuracy)."""
    gen = torch.Generator(device).manual_seed(seed)
    torch.manual_seed(seed)
    scorer = toy.ShapeClassifier(width).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    n_none = batch // 5
    started = time.perf_counter()
    for step in range(steps):
        images, colours, shapes = _scorer_batch(batch - n_none, n_none, gen)
        with bf16(device):
            colour_logits, shape_logits = scorer(images.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(colour_logits.float(), colours, ignore_index=-1) + F.cross_entropy(
            shape_logits.float(), shapes
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"scorer step {step}: loss {loss.item():.4f}")
    scorer.eval()
    save_weights(
        work / "scorer.safetensors", {k: v.float().cpu().contiguous() for k, v in scorer.state_dict().items()}
    )
    report = scorer_accuracy(scorer, device, seed + 1, eval_n)
    report.update(
        steps=steps,
        batch=batch,
        seconds=round(time.perf_counter() - started, 1),
        shape_classes=len(toy.SHAPES) + 1,
    )
    write_json(work / "scorer.json", report)
    log("scorer", report)
    return report


def _scorer_batch(n_world: int, n_none: int, gen: torch.Generator):
    device = gen.device
    scenes = toy.sample_scenes(
        n_world,
        gen,
        pairs=toy.combinations(include_held_out=True),
        colour_jitter=25,
        noise=(0.5, 8.0),
        background_jitter=15,
    )
    world = toy.draw(scenes, gen)
    soft = torch.rand(n_world, generator=gen, device=device) < 0.4
    sigma = torch.where(
        soft, 1.2 * torch.rand(n_world, generator=gen, device=device), torch.zeros(n_world, device=device)
    )
    world = toy.blur(world, sigma)
    none, none_colour = toy.draw_without_shape(n_none, gen)
    images = torch.cat([world, none])
    colours = torch.cat([scenes.colour, none_colour])
    shapes = torch.cat([scenes.shape, torch.full((n_none,), len(toy.SHAPES), device=device)])
    return images, colours, shapes


@torch.no_grad()
def scorer_accuracy(scorer, device: str, seed: int, n: int) -> dict:
    """Accuracy on fresh ground truth (all combinations, the world's own jitter) and on no-shape pictures."""
    gen = torch.Generator(device).manual_seed(seed)
    scorer.eval()
    scenes = toy.sample_scenes(n, gen, pairs=toy.combinations(include_held_out=True))
    found = toy.classify(toy.draw(scenes, gen), scorer)
    truth = [
        (list(toy.COLOURS)[c], toy.SHAPES[s])
        for c, s in zip(scenes.colour.tolist(), scenes.shape.tolist(), strict=True)
    ]
    none, _ = toy.draw_without_shape(n // 2, gen)
    said = toy.classify(none, scorer)
    return {
        "ground_truth_both": sum(a == b for a, b in zip(found, truth, strict=True)) / n,
        "ground_truth_colour": sum(a[0] == b[0] for a, b in zip(found, truth, strict=True)) / n,
        "ground_truth_shape": sum(a[1] == b[1] for a, b in zip(found, truth, strict=True)) / n,
        "no_shape_said": sum(s == toy.NO_SHAPE for _, s in said) / len(said),
    }


def cmd_scorer(args) -> None:
    train_scorer(Path(args.work), args.device, args.steps, args.batch, args.seed, args.eval_n, args.width)
