"""Aspect-ratio buckets as Kohya's `enable_bucket` makes them, and where each training picture is cut from
its image (the size information SDXL's UNet is conditioned on).

Kohya's rules (sd-scripts: `model_util.make_bucket_resolutions`, `train_util.BucketManager`), written anew:
- The bucket sizes (w, h) are multiples of `bucket_reso_steps` with w * h at most the resolution's area: for
  each width from `min_bucket_reso` to `max_bucket_reso`, the tallest height that keeps the area, capped at
  `max_bucket_reso` and kept only if at least `min_bucket_reso`; each also turned on its side; plus the
  largest square. For 512: 256x1024, 320x768, 384x640, 448x576, 512x512 and their transposes.
- An image goes to the bucket whose aspect ratio is closest to its own (its own size when that is a bucket;
  a tie goes to the first in sorted order, as Kohya's argmin). It is scaled so that it covers the bucket
  (sides rounded to whole pixels) and the overhang of one side is cut, half before and half after.
- With `bucket_no_upscale` an image is only ever scaled down: to the resolution's area when it is larger
  (the rounding of the side that keeps the aspect ratio best), else not at all; its bucket is that size
  rounded down to the steps, so a small image keeps its pixels. min/max are not used then (as Kohya).
- Kohya moves min/max that are not multiples of the steps outward to them (min down, max up) and wants
  min <= the resolution's shorter side, max >= its longer side.
Without buckets an image takes the one size `resolution`: the same rule with a single bucket.

Where we differ, on purpose: Kohya ignores EXIF orientation (a phone photo trains on its side); we turn
the image upright first (library/images.py), and its size is the upright one.
SDXL's crop conditioning is the SDXL paper's: the pixels cut from the top and left of the scaled image,
mirrored for a flipped picture as Kohya mirrors it; Kohya's `get_crop_ltrb` gives, for the same cut, the
margin the image would leave if it were fitted inside the bucket instead.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from library.errors import UserError


@dataclass(frozen=True)
class BucketSettings:
    """Kohya's bucket keys, checked (`check_buckets`): min and max are multiples of the steps."""

    min_reso: int = 256
    max_reso: int = 1024
    steps: int = 64
    no_upscale: bool = False


@dataclass(frozen=True)
class Crop:
    """Where a training picture comes from: scale the image to `resized`, cut `target` at (left, top).

    Sizes are (width, height) in pixels; `original` is the image file's size with its EXIF orientation
    applied; `target` is the picture trained on (the bucket, or the resolution without buckets).
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    left: int
    top: int
    target: tuple[int, int]

    def box(self) -> tuple[float, float, float, float]:
        """The cut in the original image's pixels, so that one resize scales and cuts together."""
        scale_x, scale_y = self.original[0] / self.resized[0], self.original[1] / self.resized[1]
        right, bottom = self.left + self.target[0], self.top + self.target[1]
        return (self.left * scale_x, self.top * scale_y, right * scale_x, bottom * scale_y)

    def size_ids(self, flipped: bool) -> tuple[int, int, int, int, int, int]:
        """SDXL's six size numbers: (original h, w, crop top, crop left, target h, w). A mirrored picture
        was cut as far from the right edge as the left crop says, so its left crop is the right margin."""
        left = self.resized[0] - self.left - self.target[0] if flipped else self.left
        return (self.original[1], self.original[0], self.top, left, self.target[1], self.target[0])


def check_buckets(
    resolution: tuple[int, int], min_reso: int, max_reso: int, steps: int, no_upscale: bool, where: str = ""
) -> tuple[BucketSettings, list[str]]:
    """Kohya's bucket keys, checked against the resolution; returns the settings and notes on any min/max
    moved to a multiple of the steps (as Kohya does). `where` prefixes the key names in messages
    (e.g. "dataset."). Bad values are one-line UserErrors naming the key and the fix."""
    if steps < 8 or steps % 8:
        raise UserError(
            f"{where}bucket_reso_steps = {steps} must be a positive multiple of 8 (the VAE's factor); "
            "Kohya uses 64, or 32 for SDXL"
        )
    if min_reso > max_reso:
        raise UserError(
            f"{where}min_bucket_reso = {min_reso} is above {where}max_bucket_reso = {max_reso}; lower "
            "min_bucket_reso or raise max_bucket_reso"
        )
    notes = []
    low, high = min_reso - min_reso % steps, max_reso + (-max_reso) % steps
    if low != min_reso:
        notes.append(f"{where}min_bucket_reso {min_reso} -> {low}, a multiple of bucket_reso_steps {steps}")
    if high != max_reso:
        notes.append(f"{where}max_bucket_reso {max_reso} -> {high}, a multiple of bucket_reso_steps {steps}")
    if low < steps:
        raise UserError(
            f"{where}min_bucket_reso = {min_reso} is below {where}bucket_reso_steps = {steps}; set "
            f"min_bucket_reso to at least {steps}"
        )
    short, long = min(resolution), max(resolution)
    if low > short:
        raise UserError(
            f"{where}min_bucket_reso = {min_reso} is above the resolution's shorter side {short}; lower "
            f"min_bucket_reso to {short} or less (or raise the resolution)"
        )
    if high < long:
        raise UserError(
            f"{where}max_bucket_reso = {max_reso} is below the resolution's longer side {long}; raise "
            f"max_bucket_reso to {long} or more"
        )
    return BucketSettings(low, high, steps, no_upscale), notes


@functools.cache
def bucket_sizes(resolution: tuple[int, int], settings: BucketSettings) -> tuple[tuple[int, int], ...]:
    """Every bucket (width, height) for this resolution, sorted (Kohya's `make_bucket_resolutions`)."""
    area, step = resolution[0] * resolution[1], settings.steps
    square = math.isqrt(area) // step * step
    sizes = {(square, square)}
    for width in range(settings.min_reso, settings.max_reso + 1, step):
        height = min(settings.max_reso, area // width // step * step)
        if height >= settings.min_reso:
            sizes |= {(width, height), (height, width)}
    return tuple(sorted(sizes))


def crop_for(size: tuple[int, int], resolution: tuple[int, int], settings: BucketSettings | None) -> Crop:
    """Where the picture of an image of `size` (width, height) is cut: in its bucket, or, with `settings`
    None (no buckets), at `resolution`."""
    if settings is None:
        return cover(size, resolution)
    if settings.no_upscale:
        return _no_upscale(size, resolution, settings)
    sizes = bucket_sizes(resolution, settings)
    if size in sizes:
        return cover(size, size)
    ratio = size[0] / size[1]
    return cover(size, min(sizes, key=lambda bucket: abs(bucket[0] / bucket[1] - ratio)))


def cover(size: tuple[int, int], target: tuple[int, int]) -> Crop:
    """Scale `size` to cover `target` (whole pixels, rounded) and cut the overhang evenly."""
    width, height = size
    if width / height > target[0] / target[1]:  # wider than the target: fit the height, cut the sides
        scale = target[1] / height
    else:
        scale = target[0] / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return Crop(size, resized, (resized[0] - target[0]) // 2, (resized[1] - target[1]) // 2, target)


def _no_upscale(size: tuple[int, int], resolution: tuple[int, int], settings: BucketSettings) -> Crop:
    width, height = size
    area, step, ratio = resolution[0] * resolution[1], settings.steps, width / height
    resized = size
    if width * height > area:
        # Scale to the area, then round one side to the steps and derive the other from the aspect ratio:
        # whichever side keeps the aspect ratio closer.
        def to_steps(x: float) -> int:
            return int(x + 0.5) // step * step

        by_width = to_steps(math.sqrt(area * ratio))
        by_height = to_steps(area / math.sqrt(area * ratio))
        error_width = _ratio_error(by_width, to_steps(by_width / ratio), ratio)
        error_height = _ratio_error(to_steps(by_height * ratio), by_height, ratio)
        if error_width < error_height:
            resized = (by_width, int(by_width / ratio + 0.5))
        else:
            resized = (int(by_height * ratio + 0.5), by_height)
    target = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if min(target) == 0:
        raise UserError(
            f"a {width}x{height} image has a side below bucket_reso_steps = {step}, so bucket_no_upscale "
            "leaves no bucket for it; lower bucket_reso_steps, turn bucket_no_upscale off or remove the image"
        )
    return Crop(size, resized, (resized[0] - target[0]) // 2, (resized[1] - target[1]) // 2, target)


def _ratio_error(width: int, height: int, ratio: float) -> float:
    return abs(width / height - ratio) if width and height else math.inf
