#!/usr/bin/env python3
"""Pick the best step of a textual-inversion run: render its saved steps side by side, score them, export one.

    python sweep_validate.py --config presets/validate.toml run.folder=output/face
    python sweep_validate.py --config presets/validate.toml run.folder=output/face \\
        'model.checkpoints=["run:checkpoint", "/models/deliberate_v2.safetensors"]' \\
        scoring.model=/models/clip-vit-large-patch14 fine.interval=auto
    python sweep_validate.py --config presets/validate.toml run.folder=output/face --export 60 --export-to ~/webui/embeddings

Settings come from the TOML preset; `table.key=value` arguments override it (docs/sweep_validate.md).
The sweep writes grid.png, cells/, scores.csv and report.html into sweep.output_dir (default <run>/validation).

The recipe: check and plan every cell before loading anything; load each checkpoint once and render all its
cells in full batches; save and score every cell as it comes; optionally a fine pass every few steps where
the scores (or you) point; then the grids, the recommendation and the report.
"""

from __future__ import annotations

import argparse
import sys

from library.cli import ArgumentParser, parse_command_line, run_script


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML preset, e.g. presets/validate.toml")
    parser.add_argument(
        "--export",
        metavar="STEP",
        help="write NAME.pt / NAME.safetensors from this step (no sweep), "
        "or 'recommended' to sweep first and export the recommended step",
    )
    parser.add_argument("--export-to", metavar="DIR", help="folder for --export (same as export.folder=DIR)")
    parser.add_argument("--overwrite", action="store_true", help="let --export replace existing NAME.* files")
    parser.add_argument("overrides", nargs="*", metavar="table.key=value", help="override preset values")
    return parse_command_line(parser, argv)


def sweep(argv: list[str] | None) -> None:
    args = parse_args(argv)
    from library.config import load_config  # after parsing: --help stays fast
    from library.tables import SweepConfig
    from library.validation import run_sweep

    overrides = list(args.overrides) + ([f"export.folder={args.export_to}"] if args.export_to else [])
    cfg = load_config(SweepConfig, args.config, overrides)
    run_sweep(cfg, export=args.export or "", overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    return run_script(lambda: sweep(argv))


if __name__ == "__main__":
    sys.exit(main())
