#!/usr/bin/env python3
"""Make a training set: generate candidate images (or prepare real photos), flag them, review, select.

    # 1a. candidates of a made-up character (A1111 txt2img, Prompt S/R axes, infotext in every PNG)
    python generate_dataset.py generate --config presets/generate_character.toml \\
        model.checkpoint=/models/v1-5-pruned-emaonly.safetensors generate.output_dir=output/character
    # 1b. or real photos: square head-and-shoulders crops around the face, resized to 512
    python generate_dataset.py photos photos.input_dir=raw_photos photos.output_dir=output/photos photos.flip=true
    # 2. open output/character/review.html, keep or drop, "Export selection", then:
    python generate_dataset.py select ~/Downloads/selection.json \\
        select.output_dir=dataset select.name=fr3nchl4dy select.class_tokens=woman

    python generate_dataset.py pick output/character pick.background=gray     # flag again, rewrite review.html
    python generate_dataset.py generate --reproduce output/character --output output/again [--only 00012-3.png]

Settings come from a TOML preset (--config, optional); `table.key=value` arguments override it. Every
subcommand reads its own table: [model] and [generate], [photos], [pick], [select] (docs/generate_dataset.md).
"""

from __future__ import annotations

import argparse
import sys

from library.cli import ArgumentParser, parse_command_line, run_script
from library.config import load_config
from library.tables import GenerateConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", help="TOML preset, e.g. presets/generate_character.toml")
        return sub

    generate = command("generate", "txt2img candidates with Prompt S/R axes, grids, manifest, review page")
    generate.add_argument(
        "--reproduce", metavar="MANIFEST", help="render a run's images again from its manifest"
    )
    generate.add_argument("--output", metavar="DIR", help="new folder for --reproduce")
    generate.add_argument(
        "--only", nargs="+", default=[], metavar="FILE", help="with --reproduce: just these"
    )
    command("photos", "prepare real photos: face-centred square crops, resized, optional flips and captions")
    pick = command("pick", "flag the images of a folder and write its review.html")
    pick.add_argument("folder", help="a folder of images (generate or photos output)")
    select = command("select", "write the kept images of an exported selection into a Kohya folder")
    select.add_argument("selection", help="selection.json exported from review.html")
    select.add_argument("--images", metavar="DIR", help="the images' folder, if it moved since the review")
    for sub in commands.choices.values():
        sub.add_argument("overrides", nargs="*", metavar="table.key=value", help="override preset values")
    return parse_command_line(parser, argv)


def run(argv: list[str] | None) -> None:
    args = parse_args(argv)
    from library import pick, review  # torch and diffusers load only for `generate`

    if args.command == "generate":
        from library import generation

        if args.reproduce:
            generation.reproduce(args.reproduce, args.output, files=args.only, overrides=args.overrides)
            return
    config = load_config(GenerateConfig, args.config, args.overrides)
    if args.command == "generate":
        generation.run_generate(config)  # flags the images and writes review.html too
    elif args.command == "photos":
        pick.run_photos(config)
    elif args.command == "pick":
        pick.run_pick(args.folder, config.pick)
    elif args.command == "select":
        review.run_select(args.selection, args.images, config.select)


def main(argv: list[str] | None = None) -> int:
    return run_script(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
