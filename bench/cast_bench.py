"""Three characters in one run against three separate runs of the same steps (issue 14), on the GPU machine.

    python3 bench/cast_bench.py CHECKPOINT OUT_DIR [table.key=value ...]   (e.g. a CPU check: builtin:tiny
        /tmp/cb train.max_steps=2 dataset.resolution=64 train.mixed_precision=no preview.steps=2)

`presets/cast.toml` as shipped (150 steps, batch 8 per character, saves every 10, previews every 25), its three
characters pointed at three folders of 8 random 560×640 pictures under OUT_DIR/images; then each character
alone: the same preset with that character as its [embedding] (its own init text, template and lr × its
lr_factor), the same steps, after an uncounted 2-step run that warms the machine. Every run is `accelerate launch` timed from launch to exit. Prints a Markdown
table and writes OUT_DIR/cast_bench.json.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import tomli_w
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
          "--dynamo_backend", "no"]  # fmt: skip


def images(folder: Path, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (640, 560, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def launch(config: Path, log: Path, precision: str) -> dict:
    started = time.perf_counter()
    command = [*LAUNCH, "--mixed_precision", precision, "train_textual_inversion.py", "--config", str(config)]
    with log.open("w") as out:
        rc = subprocess.call(command, cwd=ROOT,
                             stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    # the trainer's closing line: "N steps in X s (Y samples/s)"
    found = re.findall(r"(\d+) steps in ([\d.]+) s", text)
    loop = float(found[-1][1]) if found else None
    return {"rc": rc, "wall_s": round(wall, 1), "loop_s": loop}


def main() -> int:
    checkpoint, out = sys.argv[1], Path(sys.argv[2])
    preset = tomllib.loads((ROOT / "presets/cast.toml").read_text())
    preset["model"]["checkpoint"] = checkpoint
    for override in sys.argv[3:]:
        key, _, value = override.partition("=")
        table, _, name = key.partition(".")
        preset[table][name] = tomllib.loads(f"v = {value}")["v"] if not value.isidentifier() else value
    precision = preset["train"]["mixed_precision"]
    for seed, entry in enumerate(preset["embeddings"]):
        entry["image_dir"] = str(out / "images" / entry["name"])
        images(Path(entry["image_dir"]), seed)
    steps, batch = preset["train"]["max_steps"], preset["train"]["batch_size"]
    runs = {}
    together = dict(preset, save=dict(preset["save"], output_dir=str(out / "cast")))
    (out / "cast.toml").write_text(tomli_w.dumps(together))
    # A first process on a fresh machine pays for cold disk and kernel caches (~10 s): warm them, uncounted.
    warm = dict(
        together,
        train=dict(preset["train"], max_steps=2),
        save=dict(preset["save"], output_dir=str(out / "warm")),
    )
    (out / "warm.toml").write_text(tomli_w.dumps(warm))
    launch(out / "warm.toml", out / "warm.log", precision)
    runs["cast"] = launch(out / "cast.toml", out / "cast.log", precision)
    for entry in preset["embeddings"]:
        alone = {k: v for k, v in preset.items() if k != "embeddings"}
        alone["embedding"] = dict(
            preset["embedding"], name=entry["name"], init_text=entry.get("init_text", "")
        )
        alone["dataset"] = dict(preset["dataset"], image_dir=entry["image_dir"])
        if "template" in entry:
            alone["dataset"]["template"] = entry["template"]
        alone["train"] = dict(preset["train"], lr=preset["train"]["lr"] * entry.get("lr_factor", 1.0))
        alone["save"] = dict(preset["save"], output_dir=str(out / entry["name"]))
        (out / f"{entry['name']}.toml").write_text(tomli_w.dumps(alone))
        runs[entry["name"]] = launch(out / f"{entry['name']}.toml", out / f"{entry['name']}.log", precision)
    names = [e["name"] for e in preset["embeddings"]]
    separate = sum(runs[n]["wall_s"] for n in names)
    cast = runs["cast"]
    print("| run | wall, launch to exit | training loop | samples/s in the loop |")
    print("| --- | --- | --- | --- |")
    for name, run in runs.items():
        samples = steps * batch * (len(names) if name == "cast" else 1)
        rate = f"{samples / run['loop_s']:.1f}" if run["loop_s"] else "?"
        print(f"| {name} (rc {run['rc']}) | {run['wall_s']} s | {run['loop_s']} s | {rate} |")
    print(
        f"three separate runs: {separate:.1f} s; one cast run: {cast['wall_s']} s = {cast['wall_s'] / separate:.2f}×"
    )
    saved = {n: len(list((out / "cast" / "embeddings").glob(f"{n}-*.pt"))) for n in names}
    print(f"cast saves per character: {saved}")
    (out / "cast_bench.json").write_text(
        json.dumps({"runs": runs, "separate_s": separate, "saves": saved}, indent=1)
    )
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
