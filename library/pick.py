"""Automatic flags for the recipe's filtering step: never a deletion, only reasons shown on the review page.

An image is flagged when OpenCV finds no face or several faces in it, when its perceptual hash (64-bit
dHash) is within a few bits of an earlier image's (a near-duplicate), when it is blurry (low variance of
the Laplacian, measured at 512 px), or when the top and side borders are not mostly the plain background
colour that was asked for. The thresholds live in [pick]; they are heuristics, so the page shows the
measured numbers beside each reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageColor

from library.config import PickConfig
from library.errors import UserError
from library.files import atomic_write
from library.images import list_images, open_image, split_rgb_alpha
from library.photos import detect_faces

FLAGS_FILE = "flags.json"
_SHARPNESS_SIDE = 512  # sharpness depends on scale: measure every image at the same size
_BORDER = 0.08  # the border strips whose colour is checked, as a fraction of the image side


@dataclass
class ImageFlags:
    """The measurements of one image and the reasons it is flagged (empty = nothing found)."""

    file: str
    reasons: list[str] = field(default_factory=list)
    faces: int | None = None
    sharpness: float | None = None
    background_share: float | None = None
    dhash: str = ""


# --------------------------------------------------------------------------------------------------
# Measurements


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: each bit says whether a pixel of the 9x8 greyscale thumbnail is brighter
    than its right neighbour. Resizing, recompression and small edits change few bits."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """Number of differing bits."""
    return (a ^ b).bit_count()


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of the greyscale image scaled to 512 px on its long side."""
    scale = _SHARPNESS_SIDE / max(image.size)
    gray = image.convert("L").resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )
    return float(cv2.Laplacian(np.asarray(gray, dtype=np.float64), cv2.CV_64F).var())


def parse_colour(text: str) -> tuple[int, int, int]:
    """A CSS colour name or #rrggbb as RGB; UserError naming pick.background otherwise."""
    try:
        return ImageColor.getrgb(text.strip())[:3]
    except ValueError:
        raise UserError(
            f"pick.background = {text!r} is not a colour; use a CSS name (gray, white) or #rrggbb (#808080)"
        ) from None


def background_share(image: Image.Image, colour: tuple[int, int, int], tolerance: float) -> float:
    """The share of the top, left and right border pixels within `tolerance` (RGB distance) of `colour`.

    The bottom border is left out: in a head-and-shoulders picture the shoulders reach it.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = pixels.shape[:2]
    bh, bw = max(1, round(h * _BORDER)), max(1, round(w * _BORDER))
    border = np.concatenate(
        [pixels[:bh].reshape(-1, 3), pixels[bh:, :bw].reshape(-1, 3), pixels[bh:, w - bw :].reshape(-1, 3)]
    )
    distance = np.linalg.norm(border - np.asarray(colour, dtype=np.float32), axis=1)
    return float((distance <= tolerance).mean())


# --------------------------------------------------------------------------------------------------
# Flagging


def check_pick_config(cfg: PickConfig) -> tuple[int, int, int] | None:
    """Validate [pick]; returns the background colour (None when that check is off)."""
    if cfg.duplicate_distance < -1 or cfg.duplicate_distance > 64:
        raise UserError(f"pick.duplicate_distance = {cfg.duplicate_distance}: use -1 (off) to 64 bits")
    if cfg.blur_threshold < 0:
        raise UserError(f"pick.blur_threshold = {cfg.blur_threshold}: use 0 (off) or a positive number")
    if not 0 <= cfg.background_fraction <= 1:
        raise UserError(f"pick.background_fraction = {cfg.background_fraction}: use a share between 0 and 1")
    return parse_colour(cfg.background) if cfg.background else None


def flag_image(
    image: Image.Image, name: str, cfg: PickConfig, colour: tuple[int, int, int] | None
) -> ImageFlags:
    """Measure one image and list the reasons to look twice at it (duplicates are found by `flag_images`)."""
    rgb, _ = split_rgb_alpha(image)
    flags = ImageFlags(file=name, dhash=f"{dhash(rgb):016x}")
    if cfg.faces:
        flags.faces = len(detect_faces(rgb))
        if flags.faces == 0:
            flags.reasons.append("no face found")
        elif flags.faces > 1:
            flags.reasons.append(f"{flags.faces} faces")
    if cfg.blur_threshold > 0:
        flags.sharpness = round(sharpness(rgb), 1)
        if flags.sharpness < cfg.blur_threshold:
            flags.reasons.append(f"blurry (sharpness {flags.sharpness:g} < {cfg.blur_threshold:g})")
    if colour is not None:
        flags.background_share = round(background_share(rgb, colour, cfg.background_tolerance), 3)
        if flags.background_share < cfg.background_fraction:
            flags.reasons.append(
                f"background not plain {cfg.background} ({flags.background_share:.0%} of the border is, "
                f"{cfg.background_fraction:.0%} wanted)"
            )
    return flags


def flag_images(
    paths: list[Path],
    cfg: PickConfig,
    log: Callable[[str], None] = print,
    measured: dict[str, ImageFlags] | None = None,
) -> tuple[list[ImageFlags], list[str]]:
    """Flags for every readable image, in order; unreadable files come back as "name: reason" lines.

    `measured` holds `flag_image` results already taken (generation measures while it renders). A
    near-duplicate is flagged against the first earlier image it is close to, so one picture of each
    group stays unflagged.
    """
    colour = check_pick_config(cfg)
    results: list[ImageFlags] = []
    unreadable: list[str] = []
    hashes: list[tuple[str, int]] = []
    for path in paths:
        try:
            flags = (measured or {}).get(path.name) or flag_image(open_image(path), path.name, cfg, colour)
        except UserError as error:
            unreadable.append(f"{path.name}: {error}")
            continue
        if cfg.duplicate_distance >= 0:
            value = int(flags.dhash, 16)
            for other, other_value in hashes:
                if (bits := hamming(value, other_value)) <= cfg.duplicate_distance:
                    flags.reasons.append(f"near-duplicate of {other} ({bits} bits apart)")
                    break
            hashes.append((path.name, value))
        results.append(flags)
    flagged = sum(1 for f in results if f.reasons)
    log(f"checked {len(results)} images: {flagged} flagged, {len(results) - flagged} without flags")
    for line in unreadable:
        log(f"skipped unreadable file {line}")
    return results, unreadable


def run_pick(
    folder: str | Path,
    cfg: PickConfig,
    log: Callable[[str], None] = print,
    measured: dict[str, ImageFlags] | None = None,
) -> Path:
    """Flag the images of `folder` and write flags.json and review.html beside them; returns the page.

    `measured`: per-image measurements already taken (see `flag_images`)."""
    from library.review import review_items, write_review_page  # the page shows what this module finds

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give the folder of images to review")
    paths = list_images(folder)
    if not paths:
        raise UserError(f"{folder} holds no images (.png, .jpg, .jpeg, .webp, .bmp) to review")
    results, unreadable = flag_images(paths, cfg, log, measured)
    record = {"pick": asdict(cfg), "images": [asdict(f) for f in results], "unreadable": unreadable}
    atomic_write(folder / FLAGS_FILE, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    page = write_review_page(folder, review_items(folder, results))
    log(f"review page: {page} (open it in a browser, keep or drop, then export the selection)")
    return page
