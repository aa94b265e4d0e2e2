"""Leakage between the characters of a cast: how often one character's prompts give another character.

An image rendered for character A shows character B when its likeness to B's training images reaches B's
likeness bar (the bar B's own renders are judged by) and is above its likeness to A's. On real checkpoints
that is the CLIP scorer's image similarity; on the toy world the toy scorer's (1 for an image of B's
concept, else 0). The sweep of a cast (library/validation.py) counts it per step and checkpoint, writes
leakage.csv and cast.html beside the characters' own sweeps.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from library.files import atomic_write
from library.recommendation import Recommendation

LEAKAGE_COLUMNS = ["character", "checkpoint", "step", "shows", "images", "leaked", "rate"]


@dataclass(frozen=True)
class Rival:
    """Another character of the cast, as a character's images are checked against it."""

    name: str
    references: Sequence
    bar: float

    def shown_in(self, scorer, images, own_likeness: Sequence[float]) -> list[bool]:
        """Which of `images` show this character rather than their own (see the module docstring)."""
        likeness = scorer.likeness(images, self.references)
        return [value >= self.bar and value > own for value, own in zip(likeness, own_likeness, strict=True)]


@dataclass(frozen=True)
class Leak:
    """Of `images` rendered for `character` at `step` on `checkpoint`, `leaked` show `shows`."""

    character: str
    checkpoint: str
    step: int
    shows: str
    images: int
    leaked: int


def rates(leaks: Sequence[Leak], character: str, step: int) -> dict[str, tuple[int, int]]:
    """(leaked, images) into each other character at `step`, over every checkpoint."""
    found: dict[str, tuple[int, int]] = {}
    for leak in leaks:
        if leak.character == character and leak.step == step:
            leaked, images = found.get(leak.shows, (0, 0))
            found[leak.shows] = (leaked + leak.leaked, images + leak.images)
    return found


def worst(leaks: Sequence[Leak], character: str) -> tuple[float, int | None, str]:
    """The highest leakage rate of `character` over its steps: (rate, step, the character shown)."""
    found = (0.0, None, "")
    for step in sorted({leak.step for leak in leaks if leak.character == character}):
        for shows, (leaked, images) in rates(leaks, character, step).items():
            if images and leaked / images > found[0]:
                found = (leaked / images, step, shows)
    return found


def describe(leaks: Sequence[Leak], character: str, step: int) -> str:
    """'0/16 show tr1a, 1/16 show p0rp' at `step`."""
    return ", ".join(
        f"{leaked}/{images} show {shows}" for shows, (leaked, images) in rates(leaks, character, step).items()
    )


def write_leakage_csv(path: Path, leaks: Sequence[Leak]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(LEAKAGE_COLUMNS)
    for leak in leaks:
        rate = f"{leak.leaked / leak.images:.4f}" if leak.images else ""
        writer.writerow(
            [leak.character, leak.checkpoint, leak.step, leak.shows, leak.images, leak.leaked, rate]
        )
    return atomic_write(path, buffer.getvalue())


def write_cast_page(
    path: Path, run_root: Path, results: dict[str, tuple[Path, Recommendation | None]], leaks: Sequence[Leak]
) -> Path:
    """cast.html: per character its recommended step, the leakage there and at its worst step, and a link
    to its own report."""
    esc = html.escape
    names = list(results)
    head = "".join(f"<th>shows {esc(n)}</th>" for n in names)
    rows = []
    for name, (report, rec) in results.items():
        step = rec.step if rec is not None else None
        cells = []
        for other in names:
            leaked, images = rates(leaks, name, step).get(other, (0, 0)) if step is not None else (0, 0)
            text = "" if other == name else (f"{leaked}/{images}" if images else "–")
            cells.append(f"<td>{esc(text)}</td>")
        rate, at, shows = worst(leaks, name)
        worst_text = f"{rate:.0%} at step {at} ({shows})" if at is not None else "–"
        link = esc(report.relative_to(path.parent).as_posix())
        rows.append(
            f"<tr><th><a href='{link}'>{esc(name)}</a></th><td>{esc('–' if step is None else str(step))}</td>"
            f"{''.join(cells)}<td>{esc(worst_text)}</td></tr>"
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Validation sweep of the cast of {esc(run_root.name)}</title>"
        "<style>body{font:15px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}"
        ".note{color:#666}</style></head><body>\n"
        f"<h1>Validation sweep of the cast of {esc(str(run_root))}</h1>\n"
        "<p class='note'>Leakage: of the images rendered for a character at its recommended step (every "
        "checkpoint of the sweep), how many show another character of the cast (likeness to the other's "
        "training images at its likeness bar, and above the likeness to the character's own). leakage.csv "
        "has every step.</p>\n"
        f"<table><tr><th>character</th><th>recommended step</th>{head}<th>worst leakage</th></tr>"
        f"{''.join(rows)}</table>\n</body></html>\n"
    )
    return atomic_write(path, page)
