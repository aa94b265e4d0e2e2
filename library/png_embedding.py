"""A1111's image embeddings: an embedding carried inside a PNG or WEBP picture.

A1111 stores the embedding twice. A PNG `tEXt` chunk named `sd-ti-embedding` holds base64 of the JSON of
the `.pt` dict (each tensor written as `{"TORCHTENSOR": nested lists}`). Because image sites strip
chunks, a second copy hides in the pixels: the zlib-compressed JSON is split into its low and high
nibbles, each laid out as an RGB panel (height = the picture's height), scrambled with a fixed LCG
stream, decorated with a dot pattern in the high nibble, and pasted left and right of the picture with a
one-pixel black separator. The layout here is the one A1111's `insert_image_data_embed` produces, so
A1111's `extract_image_data_embed` reads our pictures and we read theirs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin, UnidentifiedImageError

from library.errors import UserError

TEXT_KEY = "sd-ti-embedding"
IMAGE_FORMATS = {".png": "PNG", ".webp": "WEBP"}
_TENSOR_TAG = "TORCHTENSOR"
_CHANNELS = 3
_STYLE_SOURCE_LENGTH = 1024  # A1111 shades the dots with at most the first 1024 numbers of vector 0


# ---------------------------------------------------------------------------------------------------------
# JSON payload (shared by the text chunk and the panels)


def payload_to_json(payload: dict[str, Any]) -> str:
    """JSON text of an embedding dict, tensors as `{"TORCHTENSOR": lists}`, exactly as A1111 writes it."""

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {_TENSOR_TAG: value.detach().cpu().numpy().tolist()}
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    # Default separators and float repr: the same bytes A1111's json.dumps produces.
    return json.dumps(plain(payload))


def payload_from_json(text: str | bytes) -> dict[str, Any]:
    """Inverse of `payload_to_json`; tensors come back as float64 like A1111 decodes them."""

    def hook(obj: dict[str, Any]) -> Any:
        if _TENSOR_TAG in obj:
            return torch.from_numpy(np.array(obj[_TENSOR_TAG], dtype=np.float64))
        return obj

    data = json.loads(text, object_hook=hook)
    if not isinstance(data, dict):
        raise ValueError("the embedded JSON is not an object")
    return data


# ---------------------------------------------------------------------------------------------------------
# The pixel panels


@functools.lru_cache(maxsize=4)
def lcg_stream(count: int) -> np.ndarray:
    """The first `count` numbers of A1111's scrambling stream (read-only array of uint8).

    A1111 uses the Numerical Recipes LCG (a=1664525, c=1013904223, mod 2**32) seeded with 0 and yields
    each state modulo 255; only the low nibble of each number is used for scrambling.
    """
    out = np.empty(count, dtype=np.uint8)
    state = 0
    for i in range(count):
        state = (1664525 * state + 1013904223) & 0xFFFFFFFF
        out[i] = state % 255
    out.flags.writeable = False
    return out


def _scramble(block: np.ndarray) -> np.ndarray:
    """XOR the low nibbles with the LCG stream (its own inverse); the stream restarts for every panel."""
    stream = lcg_stream(block.size).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), stream & 0x0F)


def _panel_length(num_bytes: int, height: int) -> int:
    """Nibbles per panel: A1111 pads to whole columns of `height` RGB pixels, always adding some padding."""
    size = num_bytes + (height - num_bytes % height)
    return size + (height * _CHANNELS - size % (height * _CHANNELS))


def _dot_shades(first_vector: np.ndarray) -> np.ndarray:
    """Grey levels of the decoration: |v| / max|v| * 255 over the start of the first vector."""
    magnitudes = np.abs(first_vector[:_STYLE_SOURCE_LENGTH].astype(np.float64))
    peak = magnitudes.max() if magnitudes.size else 0.0
    if peak == 0:
        # A1111 divides by zero here (all-zero vectors); plain black dots are what it meant.
        return np.zeros(max(1, magnitudes.size), dtype=np.uint8)
    return (magnitudes / peak * 255).astype(np.uint8)


def _decorate(block: np.ndarray, shades: np.ndarray) -> np.ndarray:
    """Put A1111's staggered dot pattern into the high nibble; readers ignore it (purely cosmetic)."""
    height, width = block.shape[:2]
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    index = 0
    for x in range(-6, width, 8):
        for row, y in enumerate(range(-6, height, 8)):
            shift = 4 if row % 2 == 0 else 0
            shade = int(shades[index % len(shades)])
            index += 1
            draw.ellipse((x + shift, y, x + 6 + shift, y + 6), fill=(shade, shade, shade))
    return block ^ (np.asarray(canvas, dtype=np.uint8) & 0xF0)


def hide_in_image(picture: Image.Image, payload: dict[str, Any], first_vector: np.ndarray) -> Image.Image:
    """Return a new RGB image: the data panels of `payload` left and right of `picture`.

    `first_vector` (the embedding's first row) only shades the decoration, as in A1111.
    """
    picture = picture.convert("RGB")
    height = picture.height
    packed = np.frombuffer(zlib.compress(payload_to_json(payload).encode(), level=9), np.uint8)
    length = _panel_length(packed.size, height)
    # np.resize repeats the data to fill the padding; zlib ignores what follows the stream.
    low = np.resize(packed & 0x0F, length).reshape(height, -1, _CHANNELS)
    high = np.resize(packed >> 4, length).reshape(height, -1, _CHANNELS)
    shades = _dot_shades(first_vector)
    low_panel = Image.fromarray(_scramble(_decorate(low, shades)), mode="RGB")
    high_panel = Image.fromarray(_scramble(_decorate(high, shades[::-1])), mode="RGB")

    panel_width = low_panel.width
    canvas = Image.new("RGB", (picture.width + 2 * panel_width + 2, height), (0, 0, 0))
    canvas.paste(low_panel, (0, 0))
    canvas.paste(picture, (panel_width + 1, 0))
    canvas.paste(high_panel, (panel_width + 1 + picture.width + 1, 0))
    return canvas


def _crop_black(pixels: np.ndarray) -> np.ndarray:
    """Cut off outer rows and columns that have no pixel with all three channels non-zero."""
    lit = (pixels > 0).all(axis=2)
    cols, rows = np.flatnonzero(lit.any(axis=0)), np.flatnonzero(lit.any(axis=1))
    if cols.size == 0:
        return pixels
    return pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def find_in_image(picture: Image.Image) -> dict[str, Any] | None:
    """Read the panel copy of an embedding, as A1111's extractor does; None when there is none."""
    pixels = _crop_black(np.asarray(picture.convert("RGB"), dtype=np.uint8)) & 0x0F
    separators = np.flatnonzero(pixels.sum(axis=(0, 2)) == 0)
    if separators.size < 2:
        return None
    low = _scramble(pixels[:, : separators.min()])
    high = _scramble(pixels[:, separators.max() + 1 :])
    if low.shape != high.shape or low.size == 0:
        return None
    try:
        return payload_from_json(zlib.decompress(((high << 4) | low).tobytes()))
    except (zlib.error, ValueError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------------------------------------
# Files


def plain_card(title: str, lines: list[str], size: int = 512) -> Image.Image:
    """A simple square picture naming the embedding, used when the caller gives no image."""
    card = Image.new("RGB", (size, size), (46, 52, 64))
    draw = ImageDraw.Draw(card)
    draw.rectangle((8, 8, size - 9, size - 9), outline=(136, 192, 208), width=3)
    draw.text((size // 2, size // 3), title, fill=(236, 239, 244), font=_font(size // 10), anchor="mm")
    small = _font(size // 20)
    for i, line in enumerate(lines):
        y = size // 2 + i * (size // 14)
        draw.text((size // 2, y), line, fill=(216, 222, 233), font=small, anchor="mm")
    return card


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def write_image(
    path: Path, image_format: str, picture: Image.Image, payload: dict[str, Any], first_vector: np.ndarray
) -> None:
    """Write an image embedding ("PNG" or "WEBP") to `path`; PNG also gets the text chunk.

    WEBP is written lossless so that the panels survive; it has no text chunk, so A1111 reads the panels.
    """
    if image_format not in IMAGE_FORMATS.values():
        raise ValueError(f"unknown image format {image_format!r}")
    hidden = hide_in_image(picture, payload, first_vector)
    if find_in_image(hidden) is None:
        raise UserError(
            f"{path.name}: the picture is too small or too dark at its edges to carry the embedding; "
            "give a larger, brighter image"
        )
    if image_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(TEXT_KEY, base64.b64encode(payload_to_json(payload).encode()))
        hidden.save(path, format="PNG", pnginfo=info)
    else:
        hidden.save(path, format="WEBP", lossless=True, quality=100, exact=True)


def read_image(path: Path) -> dict[str, Any]:
    """The embedding dict inside an A1111 image embedding: the text chunk first, else the panels."""
    try:
        with Image.open(path) as picture:
            picture.load()
            text = getattr(picture, "text", {}).get(TEXT_KEY)
            if text is not None:
                return payload_from_json(base64.b64decode(text, validate=True))
            found = find_in_image(picture)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise UserError(f"{path}: not a readable image ({error}); re-download or re-export it") from error
    except (binascii.Error, ValueError) as error:
        raise UserError(f"{path}: the '{TEXT_KEY}' text chunk is corrupt ({error})") from error
    if found is None:
        raise UserError(f"{path}: this image holds no embedding (no '{TEXT_KEY}' chunk, no data panels)")
    return found
