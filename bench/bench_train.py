"""Training speed and memory of our trainer on the GPU: samples/s and peak memory at batch 1, 8 and 32.

Runs in one process on an SD1.5-shaped checkpoint (bench/make_sd15.py) and a folder of at least 32 images:

    python bench/bench_train.py --checkpoint /tmp/sd15-random.safetensors --images /tmp/face --out /tmp/bench

Each case loads the model as a user's run does (presets/face.toml: bf16, AdamW, 2 vectors, cached latents),
warms up, then times pure training steps (no saves, no previews) between CUDA synchronisations.
Also reports the time from process start to the end of the first training step, the low-memory switch, and
torch.compile. Writes bench.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import psutil
import torch
from accelerate.state import AcceleratorState

from library.config import TrainConfig, load_config
from library.training import setup

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def run_case(name: str, overrides: list[str], args, warmup: int = 5, steps: int = 30) -> dict:
    cfg = load_config(
        TrainConfig,
        ROOT / "presets/face.toml",
        [
            f"model.checkpoint={args.checkpoint}",
            f"dataset.image_dir={args.images}",
            f"save.output_dir={args.out}/run-{name}",
            "save.save_every_steps=0",
            "preview.every_steps=0",
            *args.set,
            *overrides,
        ],
    )
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer = setup(cfg, log=lambda *_: None)
    setup_s = time.perf_counter() - started
    lr = 0.002
    trainer.step(0, lr, None)
    sync()
    first_step = time.time() - psutil.Process().create_time()
    first_s = time.perf_counter() - started - setup_s
    for i in range(1, warmup):
        trainer.step(i, lr, None)
    sync()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        trainer.step(i, lr, None)
    sync()
    seconds = time.perf_counter() - t0
    batch = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    result = {
        "case": name,
        "batch": batch,
        "ms_per_step": 1000 * seconds / steps,
        "samples_per_s": steps * batch / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0,
        "setup_s": setup_s,
        "first_step_s": first_s,
        "process_start_to_first_step_s": first_step,
    }
    print(json.dumps(result), flush=True)
    del trainer
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--compile", action="store_true", help="also time train.compile=true (slow to compile)"
    )
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides, e.g. for a CPU smoke test")
    args = parser.parse_args()
    cases = [
        ("bs8", ["train.batch_size=8"]),
        ("bs1", ["train.batch_size=1"]),
        ("bs32", ["train.batch_size=32"]),
        ("bs8-low-memory", ["train.batch_size=8", "train.low_memory=true"]),
    ]
    if args.compile:
        cases.append(("bs8-compile", ["train.batch_size=8", "train.compile=true"]))
    results = [run_case(name, overrides, args) for name, overrides in cases]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps(results, indent=2))
    print(f"{'case':<16}{'batch':>6}{'ms/step':>10}{'samples/s':>11}{'peak GiB':>10}{'first step s':>14}")
    for r in results:
        print(
            f"{r['case']:<16}{r['batch']:>6}{r['ms_per_step']:>10.1f}{r['samples_per_s']:>11.1f}"
            f"{r['peak_gib']:>10.2f}{r['process_start_to_first_step_s']:>14.1f}"
        )


if __name__ == "__main__":
    main()
