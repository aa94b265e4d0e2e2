#!/usr/bin/env python3
"""Train a textual-inversion embedding of a face or character.

    accelerate launch train_textual_inversion.py --config presets/face.toml
    accelerate launch train_textual_inversion.py --config presets/face.toml train.lr=0.001 save.output_dir=out/me
    accelerate launch train_textual_inversion.py --config presets/face.toml --resume output/face

Settings come from the TOML preset; `table.key=value` arguments override it (see README).
"""

from __future__ import annotations

import argparse
import sys

from library.cli import run_script
from library.config import TrainConfig, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="TOML preset, e.g. presets/face.toml")
    parser.add_argument(
        "--resume", help="a run folder (continues from its latest save) or a NAME-N embedding file"
    )
    parser.add_argument("overrides", nargs="*", metavar="table.key=value", help="override preset values")
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    from library.training import run_training  # after argument parsing: --help stays fast

    config = load_config(TrainConfig, args.config, args.overrides)
    run_training(config, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_script(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
