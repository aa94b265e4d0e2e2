"""Pictures for people: a Kohya training folder of one concept of the world (`dataset`), and the grid of a
textual-inversion run's previews, one row per step (`preview-grid`)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from library import toy
from library.files import atomic_folder, atomic_write
from library.grid import BACKGROUND, make_grid
from library.images import open_image


def cmd_dataset(args) -> None:
    """Render `--n` pictures of one concept as a Kohya folder: NN.png plus a NN.txt caption each."""
    colour, shape = toy.parse_concept(args.concept)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; give a new folder (nothing was written)")
    gen = torch.Generator().manual_seed(args.seed)
    pair = (list(toy.COLOURS).index(colour), toy.SHAPES.index(shape))
    images = toy.to_pil(toy.draw(toy.sample_scenes(args.n, gen, pairs=[pair]), gen))

    def write(folder: Path) -> None:
        for i, image in enumerate(images):
            image.save(folder / f"{i:02d}.png")
            (folder / f"{i:02d}.txt").write_text(args.caption + "\n")

    atomic_folder(out, write, overwrite=out.is_dir())  # an empty folder is replaced, a file never
    print(f"wrote {args.n} pictures ({colour} {shape}) to {out}")


def preview_files(folder: Path) -> dict[int, list[Path]]:
    """The preview pictures of each step, in order: `NAME-S.png`, `NAME-S-1.png`, ... (library/previews.py
    names them so); a step's pictures of several embeddings follow each other."""
    rows: dict[int, list[tuple[int, Path]]] = {}
    for file in folder.glob("*.png"):
        parts = file.stem.split("-")
        if parts[-1] == "embedding" or not parts[-1].isdigit():
            continue
        step, index = (
            (int(parts[-2]), int(parts[-1]))
            if len(parts) > 2 and parts[-2].isdigit()
            else (int(parts[-1]), 0)
        )
        rows.setdefault(step, []).append((index, file))
    return {step: [file for _, file in sorted(rows[step])] for step in sorted(rows)}


def cmd_preview_grid(args) -> None:
    """One row per preview step of a training run (step 0 = the init word), its preview images side by side,
    each enlarged `--scale` times; laid out and labelled by library.grid.make_grid."""
    folder = Path(args.run) / "previews"
    rows = preview_files(folder)
    if not rows:
        raise SystemExit(f"{folder}: no preview images")
    cells = [
        [
            image.convert("RGB").resize(
                (image.width * args.scale, image.height * args.scale), Image.Resampling.NEAREST
            )
            for image in map(open_image, files)
        ]
        for files in rows.values()
    ]
    columns = max(len(row) for row in cells)
    size = cells[0][0].size
    cells = [row + [Image.new("RGB", size, BACKGROUND)] * (columns - len(row)) for row in cells]
    grid = make_grid(cells, [], [f"step {step}" for step in rows])
    atomic_write(args.output, lambda temp: grid.save(temp, format="PNG"))
    print(f"wrote {args.output}: steps {sorted(rows)}")
