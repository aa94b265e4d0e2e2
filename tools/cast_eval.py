"""The cast demo measured on the toy world: each character trained in one run with the others against
trained alone, and how often one character's prompt brings up another (leakage).

    python tools/cast_eval.py --out output/cast_eval [--seeds 32]

Trains `presets/cast_demo.toml` once (three characters together) and once per character alone (the same
preset with that character's table only), then renders "a photo of a NAME" with each saved step (0, 25, 50,
75, 100) for `--seeds` seeds (20 steps, CFG 4, 64 px) and asks the toy world's shape classifier what each
picture shows. Hit rate = pictures showing the character's own concept; leakage = pictures showing another
character's concept (reported over the trained steps: at step 0 the word is still "shape", any shape in any
colour). Prints a Markdown table (README, "Several characters in one run").
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CAST = {"h3xa": "yellow hexagon", "tr1a": "green triangle", "p0rp": "purple circle"}
STEPS = (0, 25, 50, 75, 100)


def train(out: Path, names: list[str]) -> Path:
    """Train the cast demo's characters `names` into `out`; returns the run folder."""
    from library.config import load_config
    from library.tables import TrainConfig
    from library.training import run_training

    preset = ROOT / "presets/cast_demo.toml"
    config = load_config(TrainConfig, preset, [f"save.output_dir={out}", "preview.every_steps=0"])
    entries = tuple(
        dataclasses.replace(entry, image_dir=str(ROOT / entry.image_dir))
        for entry in config.embeddings
        if entry.name in names
    )
    run_training(dataclasses.replace(config, embeddings=entries), log=lambda *_: None)
    return out


def rates(run: Path, name: str, seeds: list[int]) -> dict[int, dict[str, float]]:
    """Per saved step: the share of pictures of "a photo of a NAME" showing each character's concept."""
    from library import toy
    from library.conditioning import Conditioner
    from library.embedding_set import blocks_from_file
    from library.models import load_parts
    from library.sampling import generate
    from library.tables import ModelConfig, SamplerSettings

    parts = load_parts(ModelConfig(checkpoint="builtin:toy"))
    conditioner = Conditioner.of(parts)
    settings = SamplerSettings(steps=20, cfg_scale=4.0, width=64, height=64)
    found = {}
    for step in STEPS:
        file = run / "embeddings" / f"{name}-{step}.pt"
        conditioner.set_embedding(
            name, blocks_from_file(parts, file if file.exists() else run / f"{name}.pt")
        )
        prompt = f"a photo of a {name}"
        images = generate(parts, conditioner, [prompt] * len(seeds), [""] * len(seeds), seeds, settings)
        found[step] = {other: toy.likeness(images, concept) for other, concept in CAST.items()}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the runs")
    parser.add_argument("--seeds", type=int, default=32)
    args = parser.parse_args(argv)
    seeds = list(range(1000, 1000 + args.seeds))
    together = train(args.out / "together", list(CAST))
    print(
        "| character | trained | "
        + " | ".join(f"step {s}" for s in STEPS)
        + " | leakage at steps 25 / 50 / 75 / 100 |"
    )
    print("| --- | --- | " + " | ".join("---" for _ in STEPS) + " | --- |")
    for name, concept in CAST.items():
        alone = train(args.out / f"alone-{name}", [name])
        for label, run in (("with the others", together), ("alone", alone)):
            found = rates(run, name, seeds)
            hits = " | ".join(f"{found[s][name]:.0%}" for s in STEPS)
            # Step 0 is the untrained word "shape", any shape in any colour: its other-character pictures are chance.
            leaks = [sum(v for other, v in found[s].items() if other != name) for s in STEPS[1:]]
            print(
                f"| {name} ({concept}) | {label} | {hits} | {' / '.join(f'{v:.0%}' for v in leaks)} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
