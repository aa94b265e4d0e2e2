"""The `train` command: every stage in order, resuming from the work folder or a snapshot (the scorer in a
subprocess, the VAE, the UNet and text encoder, then export and evaluation); and `collect`, which copies a
running trainer's snapshot or final parts out of a device call."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from library.files import atomic_write, copy_file, ensure_folder
from library.parts import load_tokenizer

from .diffusion_stage import DiffusionTrainer, train_diffusion, write_snapshot
from .evaluation import evaluate_parts
from .export import export_parts
from .models import build_models, log, make_parts
from .storage import load_shards, prefixed, write_json
from .vae_stage import train_vae

SCRIPT = Path(__file__).resolve().parent.parent / "toy_world.py"  # runs the scorer in its own process


def _tiny(args) -> None:
    """CPU smoke runs: tiny sizes, a few steps."""
    vars(args).update(
        batch=4, bank=64, scorer_steps=3, scorer_batch=16, vae_seconds=2, vae_batch=4, eval_n=32, per_combo=1
    )
    vars(args).update(warmup_steps=2, log_every=2)


def _start_scorer(args, work: Path) -> subprocess.Popen:
    options = {
        "--work": work,
        "--device": args.device,
        "--steps": args.scorer_steps,
        "--batch": args.scorer_batch,
        "--seed": args.seed,
        "--eval-n": args.eval_n,
        "--threads": args.threads,
        "--width": args.scorer_width,
    }
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "scorer", *(str(x) for pair in options.items() for x in pair)]
    )


def cmd_train(args) -> None:
    started = time.perf_counter()
    deadline = started + args.budget_s - args.reserve_s
    work = ensure_folder(args.work)
    (work / "trainer.done").unlink(missing_ok=True)
    atomic_write(work / "trainer.pid", str(os.getpid()))
    if args.tiny:
        _tiny(args)
    channels = [int(c) for c in args.unet_channels.split(",")] if args.unet_channels else None
    unet, text_encoder, vae = build_models(args.seed, tiny=args.tiny, unet_channels=channels)
    resume = (
        Path(args.resume_from)
        if args.resume_from
        else (work / "snapshot" if (work / "snapshot" / "state.json").exists() else None)
    )
    state, meta = load_shards(resume) if resume else ({}, {})
    if state:
        log(f"resuming from {resume} at step {meta['step']}")
        vae.load_state_dict(prefixed("vae.", state))
        if resume != work / "snapshot" and (resume / "scorer.safetensors").exists():
            copy_file(resume / "scorer.safetensors", work / "scorer.safetensors", overwrite=True)
        for name in ("scorer", "vae"):
            if name in meta:
                write_json(work / f"{name}.json", meta[name])
    scorer_process = None if (work / "scorer.safetensors").exists() else _start_scorer(args, work)
    if not state:
        report = train_vae(
            vae, args.device, args.vae_seconds, args.vae_batch, args.seed, args.eval_n, args.vae_crop
        )
        write_json(work / "vae.json", report)
        log("vae", report)
    vae.to(args.device).eval().requires_grad_(False)
    trainer = DiffusionTrainer(unet, text_encoder, vae, load_tokenizer("sd1"), args, args.device)
    if state:
        trainer.load_state(state)
        trainer.step, trainer.samples = meta["step"], meta["samples"]
    log(f"bank of {args.bank} pictures ready; training UNet + text encoder, batch {args.batch}")
    train_diffusion(trainer, args, deadline, work, scorer_process)
    if scorer_process is not None:
        scorer_process.wait()
    write_snapshot(trainer, work, quick_eval=not args.final)
    if args.final:
        export_parts(trainer.ema_unet, trainer.ema_text, vae, work / "parts")
        report = evaluate_parts(
            make_parts(trainer.ema_unet, trainer.ema_text, vae),
            args.device,
            args.per_combo,
            576,
            work,
            "final",
        )
        report.update(step=trainer.step, samples=trainer.samples)
        write_json(work / "parts" / "eval.json", report)
    atomic_write(work / "trainer.done", str(trainer.step))
    log(f"done at step {trainer.step} ({trainer.samples} samples) in {time.perf_counter() - started:.0f} s")


def cmd_collect(args) -> None:
    """Copy the trainer's results to `--out`: at `--snapshot-at` seconds ask for a snapshot and copy it;
    otherwise wait for the trainer to finish (or `--max-wait`) and copy its final parts. Stops waiting
    as soon as the trainer process is gone."""
    work, out = Path(args.work), Path(args.out)
    started = time.perf_counter()

    def trainer_alive() -> bool:
        if not (work / "trainer.pid").exists():  # a trainer started just before may not have written it yet
            return time.perf_counter() - started < 120
        try:
            os.kill(int((work / "trainer.pid").read_text()), 0)
        except (OSError, ValueError):
            return False
        return not (work / "trainer.done").exists()

    if args.snapshot_at is not None:
        while time.perf_counter() - started < args.snapshot_at and trainer_alive():
            time.sleep(2)
        state = work / "snapshot" / "state.json"
        stamp = state.stat().st_mtime if state.exists() else 0
        if trainer_alive():
            atomic_write(work / "snapshot.request", "1")
        while time.perf_counter() - started < args.snapshot_at + args.max_wait and trainer_alive():
            if state.exists() and state.stat().st_mtime > stamp and not (work / "snapshot.request").exists():
                break
            time.sleep(1)
        files = [*sorted((work / "snapshot").glob("*")), *sorted(work.glob("grid-*.png"))]
    else:
        while time.perf_counter() - started < args.max_wait and trainer_alive():
            time.sleep(2)
        files = [*sorted((work / "parts").glob("*")), *sorted(work.glob("grid-final.png"))]
    ensure_folder(out)
    for file in [*files, work / "train.log"]:
        if file.is_file():
            copy_file(file, out / file.name, overwrite=True)
            print("collected", file.name, file.stat().st_size)
