#!/usr/bin/env python3
"""Build the embedded toy model (`builtin:toy`): a tiny SD 1.x model that has learned the toy world.

Stages (one module each in tools/toyworld/; each resumes; library/toy.py renders the world and holds the
scorer):
  1. the scorer CNN (a subprocess, in parallel with 2);
  2. the VAE, then its latents are re-centred and re-scaled inside the weights so that SD1's
     scaling factor 0.18215 is exactly 1/std of its latents (any SD1 tool then decodes it right);
  3. the UNet and the CLIP text encoder together, from scratch, on a bank of encoded pictures;
  4. export (EMA weights, fp16) and an evaluation with the scorer.

On the GPU machine, where one call lasts at most 10 minutes, the trainer runs in its own session so that it
outlives the first call (the committed model: H100, 1,100 s, 9,563 steps of batch 1,024):
    mkdir -p /tmp/toy && setsid nohup python tools/toy_world.py train --work /tmp/toy --budget-s 1100 --final \
        --vae-seconds 120 > /tmp/toy/train.log 2>&1 &
    python tools/toy_world.py collect --work /tmp/toy --out $OUT --snapshot-at 505   # call 1: a snapshot
    python tools/toy_world.py collect --work /tmp/toy --out $OUT --max-wait 585      # call 2: the fp16 parts
A machine lost between calls: `train --work /tmp/toy --resume-from SNAPSHOT --budget-s 560 --final`.
A scorer.safetensors already in --work is kept (the committed one: `scorer --device cpu --steps 1500 --batch 64`).
Then, on any machine, from the fp16 parts:
    python tools/toy_world.py assemble --parts PARTS [--diffusers DIR]  # -> library/assets/toy/toy-sd1.safetensors
    python tools/toy_world.py evaluate --per-combo 32                  # sample accuracy with the scorer
    python tools/toy_world.py samples-grid --output docs/toy_samples.png  # its first 2 samples, labelled
    python tools/toy_world.py ti-eval --run output/demo --concept "orange star"
    python tools/toy_world.py dataset --concept "orange star" --out "dataset_layouts/demo/10_d3mo star"
    python tools/toy_world.py preview-grid --run output/demo --output docs/toy_demo.png
A CPU smoke run of everything: `python tools/toy_world.py train --work /tmp/t --tiny --final`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))  # `library`
sys.path.insert(0, str(TOOLS))  # `toyworld`, the stages (also when this file is loaded by its path)
# isort: off
import library  # noqa: E402, F401  (first: it settles how the dependencies behave)

# isort: on
import torch  # noqa: E402
from toyworld import evaluation, export, pictures, scorer_stage, train, vae_stage  # noqa: E402

from library import toy  # noqa: E402
from library.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    p = sub.add_parser("train", help="all stages, resuming from --work or --resume-from")
    p.add_argument("--work", required=True)
    p.add_argument(
        "--budget-s", type=float, default=540, help="wall seconds this call may use, export included"
    )
    p.add_argument(
        "--reserve-s", type=float, default=45, help="seconds kept for the snapshot, export and evaluation"
    )
    p.add_argument("--resume-from", help="a snapshot folder brought back from an earlier call")
    p.add_argument("--final", action="store_true", help="anneal the lr at the end and export the fp16 parts")
    p.add_argument("--device", default=default_device)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup-steps", type=int, default=400)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--bank", type=int, default=1 << 19, help="encoded pictures kept on the device")
    p.add_argument("--vae-seconds", type=float, default=100)
    p.add_argument("--vae-batch", type=int, default=256)
    p.add_argument("--vae-crop", type=int, default=64, help="train the VAE on random crops of this size")
    p.add_argument("--scorer-steps", type=int, default=3000)
    p.add_argument("--scorer-batch", type=int, default=512)
    p.add_argument("--scorer-width", type=int, default=16)
    p.add_argument("--per-combo", type=int, default=32)
    p.add_argument("--eval-n", type=int, default=4096, help="fresh pictures for the scorer and VAE checks")
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--unet-channels", help="e.g. 32,64,64,64 for a CPU-sized UNet (default 64,96,96,96)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--train-threads", type=int, default=0, help="CPU threads once the scorer has finished")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny sizes, a few steps")
    p.set_defaults(func=train.cmd_train)

    p = sub.add_parser("scorer", help="train the scorer only")
    p.add_argument("--work", required=True)
    p.add_argument("--device", default=default_device)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eval-n", type=int, default=4096)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=scorer_stage.cmd_scorer)

    p = sub.add_parser("collect", help="copy a snapshot or the final parts of a running trainer to --out")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--snapshot-at", type=float)
    p.add_argument("--max-wait", type=float, default=40)
    p.set_defaults(func=train.cmd_collect)

    p = sub.add_parser("assemble", help="fp16 parts -> single-file checkpoint (+ diffusers folder)")
    p.add_argument("--parts", required=True)
    p.add_argument("--output", default=str(toy.TOY_CHECKPOINT))
    p.add_argument("--scorer", help="a scorer.safetensors to install as the committed scorer")
    p.add_argument("--diffusers", help="also write a diffusers folder here")
    p.add_argument(
        "--vae", help="a vae.safetensors to use instead of the parts' (e.g. from finetune-decoder)"
    )
    p.set_defaults(func=export.cmd_assemble)

    p = sub.add_parser("finetune-decoder", help="sharpen the VAE decoder of a parts folder (encoder frozen)")
    p.add_argument("--parts", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--device", default=default_device)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--seed", type=int, default=99)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=vae_stage.cmd_finetune_decoder)

    p = sub.add_parser("evaluate", help="sample accuracy of a checkpoint, judged by the scorer")
    p.add_argument("--checkpoint", default=str(toy.TOY_CHECKPOINT))
    p.add_argument("--device", default="cpu")
    p.add_argument("--per-combo", type=int, default=8)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--scorer-n", type=int, default=1024)
    p.add_argument("--seed", type=int, default=77)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", help="folder for the sample grid")
    p.set_defaults(func=evaluation.cmd_evaluate)

    p = sub.add_parser(
        "samples-grid", help="the labelled figure of evaluation samples (docs/toy_samples.png)"
    )
    p.add_argument("--output", default="docs/toy_samples.png")
    p.add_argument("--checkpoint", default=str(toy.TOY_CHECKPOINT))
    p.add_argument("--per-combo", type=int, default=32, help="the evaluation whose seeds are shown")
    p.add_argument("--columns", type=int, default=2, help="samples shown per prompt")
    p.add_argument("--seed", type=int, default=evaluation.EVAL_SEED)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=evaluation.cmd_samples_grid)

    p = sub.add_parser("ti-eval", help="likeness of each saved embedding of a TI run (and of the init word)")
    p.add_argument("--run", required=True)
    p.add_argument("--concept", required=True)
    p.add_argument("--checkpoint", default=str(toy.TOY_CHECKPOINT))
    p.add_argument("--prompt", default="a photo of a [name]")
    p.add_argument("--init-text", default="shape")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=5000)
    p.add_argument("--steps", type=int, nargs="*", help="only these steps (0 = the init word)")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=evaluation.cmd_ti_eval)

    p = sub.add_parser("dataset", help="render pictures of one concept as a Kohya training folder")
    p.add_argument("--concept", required=True, help='"<colour> <shape>", e.g. "orange star"')
    p.add_argument("--out", required=True, help='e.g. "dataset_layouts/demo/10_d3mo star"')
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--caption", default=toy.BACKGROUND, help="the caption file's text ([filewords])")
    p.set_defaults(func=pictures.cmd_dataset)

    p = sub.add_parser("preview-grid", help="before/after grid of a TI run's preview images")
    p.add_argument("--run", required=True)
    p.add_argument("--output", default="docs/toy_demo.png")
    p.add_argument("--scale", type=int, default=2)
    p.set_defaults(func=pictures.cmd_preview_grid)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except UserError as error:  # bad input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
