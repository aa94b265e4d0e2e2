"""DreamArtist APT against plain Textual Inversion, measured on the toy world.

    OMP_NUM_THREADS=1 python tools/apt_eval.py --out output/apt_eval [--seeds 32] [--lr 0.001]

Trains `presets/dreamartist_demo.toml` (the pair h3x / h3x-neg on the demo's blue hexagon) for 150 steps,
and the same data, steps, lr and seed as plain TI (`dreamartist.enabled=false`), saving every 25 steps. Then
renders "a photo of a h3x" with the vectors of steps 0, 25, 50, 100 and 150 for `--seeds` seeds (20 steps,
64 px, DPM++ 2M Karras) at CFG 3 and 7: APT with the negative prompt its training and previews use ("a photo
of a h3x-neg": the prompt with h3x-neg for h3x), with "h3x-neg" alone (as the A1111 wiki tells users to
write it), and with an empty one; TI with an empty one. Step 0 is the starting vectors (the init words, the negative's with DreamArtist's small
offset), which training saves. The toy world's shape classifier says what each picture shows;
hit rate = pictures that show a blue hexagon. Prints a Markdown table (README, "DreamArtist APT").
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAME = "h3x"
CONCEPT = "blue hexagon"
STEPS = (0, 25, 50, 100, 150)
CFGS = (3.0, 7.0)


def train(out: Path, apt: bool, lr: float | None = None) -> Path:
    """Train the demo preset (APT, or plain TI with the same data and steps) into `out`; a finished run
    already there is used as it is."""
    if (out / f"{NAME}.pt").is_file():
        return out
    from library.config import load_config
    from library.tables import TrainConfig
    from library.training import run_training

    overrides = [
        f"save.output_dir={out.as_posix()}",
        "preview.every_steps=0",
        f"train.max_steps={max(STEPS)}",
        "save.save_every_steps=25",
        f"dreamartist.enabled={'true' if apt else 'false'}",
    ] + ([f"train.lr={lr}"] if lr else [])
    config = load_config(TrainConfig, ROOT / "presets/dreamartist_demo.toml", overrides)
    dataset = dataclasses.replace(config.dataset, image_dir=str(ROOT / config.dataset.image_dir))
    config = dataclasses.replace(config, dataset=dataset)
    run_training(config, log=lambda *_: None)
    return out


def vectors_at(parts, run: Path, name: str, step: int):
    """The blocks of `name` saved at `step` (step 0 is saved too: the starting vectors)."""
    from library.embedding_set import blocks_from_file

    base = name.removesuffix("-neg")  # DreamArtist's step names: NAME-N.pt and NAME-N-neg.pt
    return blocks_from_file(parts, run / "embeddings" / f"{base}-{step}{name[len(base) :]}.pt")


def hit_rates(run: Path, negative: str, cfg: float, seeds: list[int]) -> dict[int, float]:
    """Per step: the share of "a photo of a h3x" pictures (negative prompt `negative`) showing the concept."""
    from library import toy
    from library.conditioning import Conditioner
    from library.models import load_parts
    from library.sampling import generate
    from library.tables import ModelConfig, SamplerSettings

    parts = load_parts(ModelConfig(checkpoint="builtin:toy"))
    conditioner = Conditioner.of(parts)
    settings = SamplerSettings(steps=20, cfg_scale=cfg, width=64, height=64, sampler="DPM++ 2M Karras")
    found = {}
    for step in STEPS:
        conditioner.set_embedding(NAME, vectors_at(parts, run, NAME, step))
        if negative:
            conditioner.set_embedding(f"{NAME}-neg", vectors_at(parts, run, f"{NAME}-neg", step))
        prompts, negatives = [f"a photo of a {NAME}"] * len(seeds), [negative] * len(seeds)
        images = generate(parts, conditioner, prompts, negatives, seeds, settings, batch_size=16)
        found[step] = toy.likeness(images, CONCEPT)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the two runs")
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--lr", type=float, help="train.lr of both runs (default: the demo preset's, 0.005)")
    args = parser.parse_args(argv)
    seeds = list(range(1000, 1000 + args.seeds))
    apt, ti = train(args.out / "apt", apt=True, lr=args.lr), train(args.out / "ti", apt=False, lr=args.lr)
    rows = [
        ("APT", f'"a photo of a {NAME}-neg"', apt, f"a photo of a {NAME}-neg"),
        ("APT", f'"{NAME}-neg"', apt, f"{NAME}-neg"),
        ("APT", "empty", apt, ""),
        ("plain TI", "empty", ti, ""),
    ]
    print(f"hit rate ({CONCEPT}) of 'a photo of a {NAME}', {len(seeds)} seeds, 20 steps, 64 px", flush=True)
    print("| training | negative prompt | CFG | " + " | ".join(f"step {s}" for s in STEPS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in STEPS) + " |", flush=True)
    for cfg in CFGS:
        for label, negative_label, run, negative in rows:
            found = hit_rates(run, negative, cfg, seeds)
            hits = " | ".join(f"{found[s]:.0%}" for s in STEPS)
            print(f"| {label} | {negative_label} | {cfg:g} | {hits} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
