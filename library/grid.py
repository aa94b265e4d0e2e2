"""A1111-style image grids with labels, and A1111's Prompt S/R value lists (FACTS §4).

`make_grid(images, x_labels, y_labels)` lays out `images[row][col]` with the X labels above the columns
and the Y labels left of the rows, as A1111's X/Y/Z plot does; `join_grids_side_by_side` puts several
grids next to each other under their Z labels. Labels show the raw values.

Prompt S/R: the values are one comma-separated list (CSV quoting allowed, so `"a, b", c` is two values);
the first value must occur in the prompt, and each cell replaces every occurrence of it with its own value.
"""

from __future__ import annotations

import csv
import io
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from library.errors import UserError

BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
# Label font size from the cell size, as A1111 sizes it: (width + height) / 25, i.e. 40 px for 512x512 cells.
_FONT_DIVISOR = 25
_MIN_FONT = 10
_MIN_CELL = 128  # smaller pictures are enlarged (pixel-exact, by a whole factor) so their labels stay legible
_Z_GAP_FRACTION = 1 / 16  # blank space between side-by-side grids, as a fraction of a grid's width


# --------------------------------------------------------------------------------------------------
# Prompt S/R


def prompt_sr_values(text: str) -> list[str]:
    """Split a Prompt S/R value list as A1111 does: CSV (quotes allowed), each value stripped.

    Several lines are read as one list. Empty values are kept (`"red, "` gives `["red", ""]`: the second
    cell removes "red"), as in A1111. A list with no value at all is a UserError.
    """
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    values = [value.strip() for row in rows for value in row]
    if not values or not values[0]:
        raise UserError(
            f"Prompt S/R values {text!r}: write comma-separated values whose first one occurs in the prompt, "
            'e.g. "a closeup, a medium closeup"'
        )
    return values


def apply_prompt_sr(prompt: str, values: Sequence[str], value: str, *, must_occur: bool = True) -> str:
    """`prompt` with every occurrence of `values[0]` replaced by `value`.

    With `must_occur` (the default) the first value has to be in the prompt, else UserError; pass False
    when the check was made elsewhere (A1111 accepts a first value found in the negative prompt instead).
    """
    search = values[0]
    if must_occur and search not in prompt:
        raise UserError(
            f"Prompt S/R: the first value {search!r} does not occur in the prompt {prompt!r}; "
            "the first value must be the text that the other values replace"
        )
    return prompt.replace(search, value)


# --------------------------------------------------------------------------------------------------
# Grids


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (the font A1111 labels its grids with) where the system has it, else Pillow's own."""
    size = max(_MIN_FONT, size)
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> list[str]:
    """Break `text` into lines no wider than `max_width` pixels (a single long word may overflow)."""
    if not text:
        return [""]
    char_width = max(1.0, draw.textlength("n", font=font))
    width_chars = max(1, int(max_width / char_width))
    while True:
        lines = []
        for paragraph in text.split("\n"):
            lines.extend(textwrap.wrap(paragraph, width=width_chars, break_long_words=False) or [""])
        if width_chars == 1 or all(draw.textlength(line, font=font) <= max_width for line in lines):
            return lines
        width_chars -= 1


def _text_block(lines: list[str], font, width: int, height: int, align: str = "center") -> Image.Image:
    """A white block of `width` x `height` with `lines` centred vertically (and horizontally)."""
    block = Image.new("RGB", (max(1, width), max(1, height)), BACKGROUND)
    draw = ImageDraw.Draw(block)
    line_height = _line_height(font)
    top = (height - line_height * len(lines)) // 2
    for i, line in enumerate(lines):
        line_width = draw.textlength(line, font=font)
        left = (width - line_width) / 2 if align == "center" else (width - line_width)
        draw.text((max(0, left), top + i * line_height), line, font=font, fill=TEXT_COLOUR)
    return block


def _line_height(font) -> int:
    ascent, descent = font.getmetrics()
    return int((ascent + descent) * 1.15)


def _measure(lines_per_label: list[list[str]], font) -> int:
    return max((len(lines) for lines in lines_per_label), default=0) * _line_height(font)


def make_grid(
    images: list[list[Image.Image]],
    x_labels: list[str],
    y_labels: list[str],
    *,
    margin: int = 0,
    title: str | None = None,
) -> Image.Image:
    """Lay out `images[row][col]` in a labelled grid: X = columns (labels on top), Y = rows (labels left).

    Pass an empty label list for an axis without labels. Cells take the size of the largest image
    (smaller ones are centred; pictures under 128 px are enlarged by a whole factor); `margin` is the blank space in pixels between cells; `title`, if given,
    is written above everything. Returns an RGB image.
    """
    if not images or not images[0]:
        raise ValueError("make_grid needs at least one row with one image")
    rows, cols = len(images), len(images[0])
    if any(len(row) != cols for row in images):
        raise ValueError("make_grid needs every row to hold the same number of images")
    if x_labels and len(x_labels) != cols:
        raise ValueError(f"make_grid got {len(x_labels)} X labels for {cols} columns")
    if y_labels and len(y_labels) != rows:
        raise ValueError(f"make_grid got {len(y_labels)} Y labels for {rows} rows")
    if margin < 0:
        raise ValueError(f"make_grid margin must be >= 0, got {margin}")

    cell_w = max(image.width for row in images for image in row)
    cell_h = max(image.height for row in images for image in row)
    factor = -(-_MIN_CELL // max(cell_w, cell_h))  # ceil; 1 for pictures of 128 px and more
    if factor > 1:
        images = [
            [
                image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
                for image in row
            ]
            for row in images
        ]
        cell_w, cell_h = cell_w * factor, cell_h * factor
    font = _font((cell_w + cell_h) // _FONT_DIVISOR)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(4, _line_height(font) // 3)

    x_lines = [_wrap(scratch, label, font, cell_w - pad) for label in x_labels]
    top = _measure(x_lines, font) + 2 * pad if x_labels else 0
    y_width = cell_w * 3 // 4 if y_labels else 0
    y_lines = [_wrap(scratch, label, font, y_width - 2 * pad) for label in y_labels]
    title_lines = _wrap(scratch, title, font, cols * cell_w) if title else []
    title_h = _measure([title_lines], font) + 2 * pad if title else 0

    grid_w = cols * cell_w + (cols - 1) * margin
    grid_h = rows * cell_h + (rows - 1) * margin
    canvas = Image.new("RGB", (y_width + grid_w, title_h + top + grid_h), BACKGROUND)
    if title:
        canvas.paste(_text_block(title_lines, font, canvas.width, title_h), (0, 0))
    for c, lines in enumerate(x_lines):
        canvas.paste(_text_block(lines, font, cell_w, top), (y_width + c * (cell_w + margin), title_h))
    for r, lines in enumerate(y_lines):
        canvas.paste(
            _text_block(lines, font, y_width - pad, cell_h), (0, title_h + top + r * (cell_h + margin))
        )
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            x = y_width + c * (cell_w + margin) + (cell_w - image.width) // 2
            y = title_h + top + r * (cell_h + margin) + (cell_h - image.height) // 2
            canvas.paste(image.convert("RGB"), (x, y))
    return canvas


def join_grids_side_by_side(grids: list[Image.Image], z_labels: list[str]) -> Image.Image:
    """Put grids next to each other, each under its Z label (A1111's Z axis); heights are top-aligned."""
    if not grids:
        raise ValueError("join_grids_side_by_side needs at least one grid")
    if z_labels and len(z_labels) != len(grids):
        raise ValueError(f"join_grids_side_by_side got {len(z_labels)} labels for {len(grids)} grids")
    labels = list(z_labels) or [""] * len(grids)
    gap = max(8, round(max(g.width for g in grids) * _Z_GAP_FRACTION))
    font = _font(max(g.width + g.height for g in grids) // (2 * _FONT_DIVISOR))
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(4, _line_height(font) // 3)
    lines = [_wrap(scratch, label, font, grid.width) for label, grid in zip(labels, grids, strict=True)]
    label_h = _measure(lines, font) + 2 * pad if any(labels) else 0

    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    height = label_h + max(g.height for g in grids)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    x = 0
    for grid, label_lines in zip(grids, lines, strict=True):
        if label_h:
            canvas.paste(_text_block(label_lines, font, grid.width, label_h), (x, 0))
        canvas.paste(grid.convert("RGB"), (x, label_h))
        x += grid.width + gap
    return canvas
