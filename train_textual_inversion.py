#!/usr/bin/env python3
"""Train a textual-inversion embedding of a face or character.

    python train_textual_inversion.py --config presets/face.toml
    python train_textual_inversion.py --config presets/face.toml train.lr=0.001 save.output_dir=out/me
    python train_textual_inversion.py --resume output/face            # the run's own config.toml
    accelerate launch -q --multi_gpu --num_processes 2 train_textual_inversion.py --config presets/face.toml

Settings come from the TOML preset; `table.key=value` arguments override it (see README).
"""

from __future__ import annotations

import argparse
import sys

from library.cli import ArgumentParser, parse_command_line, run_script


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML preset, e.g. presets/face.toml (with --resume: the run's own)")
    parser.add_argument(
        "--resume", help="a run folder (continues from its latest save) or a NAME-N embedding file"
    )
    parser.add_argument("overrides", nargs="*", metavar="table.key=value", help="override preset values")
    return parse_command_line(parser, argv)


def train(argv: list[str] | None) -> None:
    args = parse_args(argv)
    from library.training import load_training_config, run_training  # after parsing: --help stays fast

    config = load_training_config(args.config, args.resume, args.overrides)
    run_training(config, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    return run_script(lambda: train(argv))


if __name__ == "__main__":
    sys.exit(main())
