"""Automatic flags for the recipe's filtering step: never a deletion, only reasons shown on the review page.

An image is flagged when OpenCV finds no face or several faces in it, when its perceptual hash (64-bit
dHash) is within a few bits of an earlier image's (a near-duplicate), when it is blurry (a 1-pixel blur
takes little of its edge steepness away, see `sharpness`), or when the top and side borders are not
mostly the plain background colour that was asked for. The thresholds live in [pick]; they are heuristics,
so the page shows the measured numbers beside each reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageColor

from library.errors import UserError
from library.files import atomic_write
from library.images import list_images, open_image, split_rgb_alpha
from library.photos import detect_faces, prepare_photos
from library.review import FLAGS_FILE, review_items, write_review_page
from library.tables import GenerateConfig, PickConfig

# Sharpness is judged at the picture's own size, at most this many pixels on its long side: training
# sizes reach 1024 (SDXL), and finer detail of larger photos is lost when they are resized for training.
_SHARPNESS_MAX_SIDE = 1024
_REBLUR_SIGMA = 1.0  # pixels: the test blur; steepness that it takes away is detail finer than it
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
    """How much of the picture's edge steepness a 1-pixel blur takes away, in percent (0-100).

    Per pixel and colour channel, the squared gradient of the picture is compared with that of a copy
    blurred by a 1-pixel Gaussian; sharpness is the share of the picture's total that the blur removes.
    A crisp edge loses most of its steepness to that blur, an already blurred edge little (judging blur
    by blurring again is the idea of Crete et al., "The blur effect", 2007). As a share it depends
    neither on contrast nor on how much of the picture is edges, and edges between colours of equal
    brightness count. The picture is measured as it is, never enlarged: enlarging adds no detail, it
    only spreads every edge over more pixels (which made every 64 px picture "blurry"); pictures over
    1024 px are scaled down first. Crisp pictures score about 50-90 from 64 to 2048 px, clearly blurred
    ones under 30. Noise and film grain count as fine detail.
    """
    pixels = _sharpness_pixels(image)
    steepness = _squared_gradient(pixels)
    total = float(steepness.sum())
    if total <= 0:
        return 0.0  # a flat picture has no edge to be sharp
    blurred = cv2.GaussianBlur(pixels, (0, 0), _REBLUR_SIGMA, borderType=cv2.BORDER_REPLICATE)
    lost = np.maximum(steepness - _squared_gradient(blurred), 0).sum()
    return 100.0 * float(lost) / total


def _sharpness_pixels(image: Image.Image) -> np.ndarray:
    """RGB as float32, scaled down by area averaging when over the measuring size."""
    rgb = image.convert("RGB")
    factor = max(rgb.size) // _SHARPNESS_MAX_SIDE
    if factor >= 2:  # a cheap first step in 8 bits: a 12-megapixel photo is 144 MB as float32 RGB
        rgb = rgb.reduce(factor)
    pixels = np.asarray(rgb, dtype=np.float32)
    scale = _SHARPNESS_MAX_SIDE / max(rgb.size)
    if scale < 1:  # the rest in float: rounding to 8 bits would add steps that read as detail
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    return pixels


def _squared_gradient(pixels: np.ndarray) -> np.ndarray:
    """Per pixel and channel, the squared length of the central-difference gradient.

    Squared, so that edges outweigh the one-level steps of 8-bit rounding in smooth areas (those steps
    would otherwise read as fine detail in a heavily blurred picture)."""
    gx = cv2.Sobel(pixels, cv2.CV_32F, 1, 0, ksize=1, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(pixels, cv2.CV_32F, 0, 1, ksize=1, borderType=cv2.BORDER_REPLICATE)
    return gx * gx + gy * gy


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
    """The background colour [pick] asks for (None when that check is off); its ranges are the table's own."""
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


def run_photos(config: GenerateConfig) -> Path:
    """`generate_dataset.py photos`: face-centred crops of real photos, flagged, with their review page."""
    check_pick_config(config.pick)
    prepare_photos(config.photos)
    return run_pick(config.photos.output_dir, config.pick)
