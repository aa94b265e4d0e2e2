"""Training speed and memory of our trainer on the GPU: samples/s and peak memory at batch 1, 8 and 32.

Runs in one process on an SD1.5-shaped checkpoint (bench/make_sd15.py) and a folder of at least 32 images:

    python bench/bench_train.py --checkpoint /tmp/sd15-random.safetensors --images /tmp/face --out /tmp/bench

Each case loads the model as a user's run does (presets/face.toml: bf16, AdamW, 2 vectors, cached latents),
warms up, then times pure training steps (no saves, no previews) between CUDA synchronisations.
Also reports the time from process start to the end of the first training step, and the cases of `--cases`:
CUDA graphs on (default) and off, the low-memory switch, torch.compile. `--profile DIR` writes a kernel table
and a Chrome trace of 5 more steps per case. Writes bench.json and prints a table.
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

from library.config import load_config
from library.tables import TrainConfig
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
    if name.endswith("-channels-last"):  # an experiment: NHWC weights spare cuDNN its layout conversions
        trainer.parts.unet.to(memory_format=torch.channels_last)
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
    gpu_busy = profile_steps(trainer, name, warmup + steps, lr, args.profile) if args.profile else None
    result = {
        "case": name,
        "batch": batch,
        "ms_per_step": 1000 * seconds / steps,
        "samples_per_s": steps * batch / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0,
        "setup_s": setup_s,
        "first_step_s": first_s,
        "process_start_to_first_step_s": first_step,
        "gpu_busy_fraction": gpu_busy,
    }
    print(json.dumps(result), flush=True)
    del trainer
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


def profile_steps(trainer, name: str, first: int, lr: float, folder: str, steps: int = 5) -> float:
    """Profile `steps` more steps: write the kernel table to FOLDER/profile-NAME.txt and a Chrome trace, and
    return the share of wall time the GPU spent in kernels (near 1 = bound by arithmetic, low = by launches)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(first, first + steps):
            trainer.step(i, lr, None)
        sync()
        wall = time.perf_counter() - t0
    Path(folder).mkdir(parents=True, exist_ok=True)
    events = prof.key_averages()
    sort = "self_device_time_total" if CUDA else "self_cpu_time_total"
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in kernels) / 1e6 if kernels else 0.0
    summary = (
        f"{name}: {steps} steps in {wall * 1000:.1f} ms wall; {len(kernels)} GPU kernels "
        f"({len(kernels) / steps:.0f} per step) busy {busy * 1000:.1f} ms = {busy / wall:.0%} of the wall time\n"
    )
    table = events.table(sort_by=sort, row_limit=30, max_name_column_width=60)
    Path(folder, f"profile-{name}.txt").write_text(summary + table)
    prof.export_chrome_trace(str(Path(folder, f"trace-{name}.json")))
    print(summary, end="", flush=True)
    return busy / wall


CASES = {
    "bs1": ["train.batch_size=1"],
    "bs8": ["train.batch_size=8"],
    "bs32": ["train.batch_size=32"],
    "bs8-eager": ["train.batch_size=8", "train.cuda_graphs=false"],
    "bs8-channels-last": ["train.batch_size=8"],
    "bs8-low-memory": ["train.batch_size=8", "train.low_memory=true"],
    "bs8-compile": ["train.batch_size=8", "train.compile=true"],
    "bs8-compile-eager": ["train.batch_size=8", "train.compile=true", "train.cuda_graphs=false"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--cases",
        nargs="*",
        default=["bs8", "bs1", "bs32", "bs8-eager", "bs8-low-memory"],
        choices=list(CASES),
        help="bs8-compile* compile the UNet first (minutes)",
    )
    parser.add_argument("--profile", help="also profile 5 steps of each case into this folder")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides, e.g. for a CPU smoke test")
    args = parser.parse_args()
    results = [run_case(name, CASES[name], args) for name in args.cases]
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
