"""What a generation run writes: the PNGs (on worker threads), the grids, and the manifest.

PNG encoding, the automatic flags' measurements and the grids run on a few threads while the GPU renders
the next batch (zlib and OpenCV release the GIL), so the writing costs almost no wall time.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from dataclasses import fields as fields_of
from pathlib import Path

from PIL import Image

from library.config import config_to_dict
from library.errors import UserError
from library.files import atomic_write
from library.grid import join_grids_side_by_side, make_grid
from library.infotext import save_png
from library.pick import ImageFlags, check_pick_config, flag_image
from library.tables import GenerateConfig, PickConfig

MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
MANIFEST_FORMAT = "ti-toolkit-generation"
GRID_DIR = "grids"
_WORKERS = min(4, os.cpu_count() or 1)
_GRID_CELL = 256  # combination grids show their pictures at most this big (a quick look, small files)


@dataclass(frozen=True)
class PlannedImage:
    """One image of a run: what to render and where it goes."""

    file: str  # A1111's naming: 00000-<seed>.png
    prompt: str  # after Prompt S/R
    negative_prompt: str
    seed: int
    axis_values: tuple[str, ...]  # this image's value on each axis
    combination: int  # index of its axis combination (the first axis varies fastest)
    batch: int  # batch index within the combination
    position: int  # place within the batch


# --------------------------------------------------------------------------------------------------
# Manifest


def write_manifest(
    folder: Path, config: GenerateConfig, axes: list[list[str]], model_info: dict, plan: list[PlannedImage]
) -> None:
    """manifest.json (resolved config, model, axes, one entry per image in rendering order) and manifest.csv."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "config": config_to_dict(config),
        "model": model_info,
        "axes": axes,
        "images": [asdict(image) for image in plan],
    }
    atomic_write(folder / MANIFEST_JSON, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["file", "seed", "prompt", "negative_prompt", *[f"axis_{n + 1}" for n in range(len(axes))]]
    )
    writer.writerows([i.file, i.seed, i.prompt, i.negative_prompt, *i.axis_values] for i in plan)
    atomic_write(folder / MANIFEST_CSV, buffer.getvalue())


def read_manifest(path: str | Path) -> dict:
    """Read a manifest.json (or the folder holding one); UserError if it is not ours."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_JSON
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such manifest; give a generate_dataset.py output folder") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a valid manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: not a generate_dataset.py manifest (no format {MANIFEST_FORMAT!r})")
    return manifest


def planned_images(manifest: dict, where: str | Path = MANIFEST_JSON) -> list[PlannedImage]:
    """The manifest's images as PlannedImage entries, each checked before anything is loaded or written.

    A manifest may come from someone else, and its file names decide where `reproduce` writes: each
    entry must have exactly the fields the run wrote, of the right types, and image i must be named
    `<i, 5 digits>-<its seed>.png` (A1111's naming), so no name can reach outside the output folder.
    """
    images = manifest.get("images")
    if not isinstance(images, list) or not images:
        raise UserError(
            f"{where}: 'images' must list the run's pictures; use the manifest.json the run wrote"
        )
    return [_planned_image(entry, number, where) for number, entry in enumerate(images)]


_TEXT_FIELDS = ("file", "prompt", "negative_prompt")
_COUNT_FIELDS = ("seed", "combination", "batch", "position")  # whole numbers, 0 or more


def _planned_image(entry, number: int, where: str | Path) -> PlannedImage:
    fields = [f.name for f in fields_of(PlannedImage)]
    if not isinstance(entry, dict) or sorted(entry) != sorted(fields):
        raise UserError(
            f"{where}: image {number} must have exactly the keys {', '.join(fields)}; "
            "use the manifest.json the run wrote"
        )
    wrong = [key for key in _TEXT_FIELDS if not isinstance(entry[key], str)]
    wrong += [key for key in _COUNT_FIELDS if not _is_count(entry[key])]
    values = entry["axis_values"]
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        wrong.append("axis_values")
    if wrong:
        raise UserError(
            f"{where}: image {number} has a wrong {wrong[0]} ({repr(entry[wrong[0]])[:60]}); "
            "use the manifest.json the run wrote"
        )
    if entry["file"] != f"{number:05d}-{entry['seed']}.png":
        raise UserError(
            f"{where}: image {number} is named {entry['file'][:80]!r}, not {number:05d}-{entry['seed']}.png "
            "(A1111's naming; a run writes no other files); use the manifest.json the run wrote"
        )
    return PlannedImage(**{**entry, "axis_values": tuple(values)})


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --------------------------------------------------------------------------------------------------
# Images, flags and grids


class RunWriter:
    """Saves each rendered image with its infotext, measures it for the flags, and builds the grids.

    `add` returns at once; `finish` waits for everything and raises the first error a worker met.
    """

    def __init__(
        self,
        folder: Path,
        config: GenerateConfig,
        axes: list[list[str]],
        *,
        pick: PickConfig | None = None,
        grids: bool = False,
    ):
        self.folder, self.settings, self.axes = folder, config.generate, axes
        self.pick, self.grids = pick, grids
        self.colour = check_pick_config(pick) if pick is not None else None
        self.measured: dict[str, ImageFlags] = {}
        self._pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="writer")
        self._futures: list[Future] = []
        self._cells: dict[int, list[tuple[PlannedImage, Image.Image]]] = {}
        self._firsts: dict[tuple[str, ...], tuple[PlannedImage, Image.Image, str]] = {}
        self._per_combination = self.settings.batch_count * self.settings.batch_size
        if grids:
            (folder / GRID_DIR).mkdir(exist_ok=True)

    def add(self, planned: PlannedImage, image: Image.Image, infotext: str) -> None:
        self._futures.append(self._pool.submit(self._save, planned, image, infotext))
        if not self.grids:
            return
        if planned.batch == 0 and planned.position == 0:
            self._firsts[planned.axis_values] = (planned, image, infotext)
        cells = self._cells.setdefault(planned.combination, [])
        cells.append((planned, _thumbnail(image)))
        if len(cells) == self._per_combination:
            del self._cells[planned.combination]
            self._futures.append(
                self._pool.submit(self._combination_grid, cells, self._firsts[planned.axis_values])
            )

    def _save(self, planned: PlannedImage, image: Image.Image, infotext: str) -> None:
        save_png(image, self.folder / planned.file, infotext)
        if self.pick is not None:
            self.measured[planned.file] = flag_image(image, planned.file, self.pick, self.colour)

    def _combination_grid(self, cells: list, first: tuple) -> None:
        """Rows = batches (labelled by their first seed), columns = places in the batch."""
        size = self.settings.batch_size
        rows = [cells[b * size : (b + 1) * size] for b in range(self.settings.batch_count)]
        pictures = [[picture for _, picture in row] for row in rows]
        y_labels = [f"seed {row[0][0].seed}" for row in rows] if len(rows) > 1 else []
        title = " | ".join(first[0].axis_values) or None
        grid = make_grid(pictures, [], y_labels, margin=self.settings.grid_margin, title=title)
        save_png(grid, self.folder / GRID_DIR / f"{first[0].combination:04d}.png", first[2])

    def finish(self, overviews: bool = True) -> None:
        """Wait for the workers, then write the X/Y/Z overviews of the first seed (unless they wait for
        the first images of other processes: `write_overviews`)."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if overviews and self.grids and self.axes:
            self._overviews()

    def firsts(self) -> list[tuple[PlannedImage, str]]:
        """The first image of each axis combination this writer saved (for the overviews), with its infotext."""
        return [(planned, infotext) for planned, _, infotext in self._firsts.values()]

    def write_overviews(self, firsts: list[tuple[PlannedImage, str]]) -> None:
        """The overviews, with the first images other processes saved (read back from their PNGs)."""
        if not (self.grids and self.axes):
            return
        for planned, infotext in firsts:
            if planned.axis_values not in self._firsts:
                with Image.open(self.folder / planned.file) as saved:
                    self._firsts[planned.axis_values] = (planned, saved.convert("RGB"), infotext)
        self._overviews()

    def _overviews(self) -> None:
        """A1111's X/Y/Z plot of the first seed: X = columns, Y = rows, Z = grids side by side; axes after
        the third give one overview per combination of their values."""
        axes = self.axes
        xs, ys = axes[0], (axes[1] if len(axes) > 1 else [""])
        zs, rest = (axes[2] if len(axes) > 2 else [""]), axes[3:]
        margin = self.settings.grid_margin
        for n, extra in enumerate(itertools.product(*rest)):

            def first(x: str, y: str, z: str, extra=extra) -> tuple:
                return self._firsts[(x, y, z, *extra)[: len(axes)]]

            grids = [
                make_grid(
                    [[first(x, y, z)[1] for x in xs] for y in ys],
                    xs,
                    axes[1] if len(axes) > 1 else [],
                    margin=margin,
                )
                for z in zs
            ]
            overview = join_grids_side_by_side(grids, zs if len(axes) > 2 else [])
            name = "xyz.png" if not rest else f"xyz-{n:03d}.png"
            save_png(overview, self.folder / GRID_DIR / name, first(xs[0], ys[0], zs[0])[2])


def _thumbnail(image: Image.Image) -> Image.Image:
    factor = max(1, -(-max(image.size) // _GRID_CELL))  # ceil: 512 px -> 256 px
    return image.reduce(factor) if factor > 1 else image
