"""Load training images: any PIL mode to RGB, EXIF orientation, cover-resize and centre crop (or the cut of
an aspect-ratio bucket, library/buckets.py), alpha.

Colour follows A1111 and Kohya, which both train on `Image.convert("RGB")`: the RGB stored under a
transparent pixel is kept as it is (no compositing onto a background). Alpha is returned separately so that
it can serve as a per-pixel loss weight (FACTS §2) when the user asks for it; otherwise it is ignored.
Flatten images yourself beforehand if you want them on a particular background.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from library.buckets import Crop
from library.config import as_size
from library.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ATTENTION_SUFFIX = "_att"  # DreamArtist's per-image attention map: <stem>_att.png beside <stem>.png

# Modes that carry 16-bit grey values; PIL's own convert("RGB") clips them at 255 instead of scaling.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def is_image_file(path: Path) -> bool:
    """True for a visible file with a supported image extension (any case).

    Names starting with "." are skipped: macOS leaves `._name.png` resource forks beside real images.
    """
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """The images directly inside `folder` (not recursive, as Kohya), sorted by name for determinism.

    DreamArtist's attention maps (`<stem>_att.<ext>` beside an image `<stem>.<ext>`) are not training
    images and are left out, as DreamArtist leaves them out.
    """
    images = sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)
    stems = {p.stem for p in images}
    return [
        p
        for p in images
        if not (p.stem.endswith(ATTENTION_SUFFIX) and p.stem.removesuffix(ATTENTION_SUFFIX) in stems)
    ]


def attention_map_for(image: Path) -> Path | None:
    """DreamArtist's attention map of a training image: `<stem>_att` with the image's own extension, else
    with any image extension; None when there is none."""
    suffixes = (image.suffix, *IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS))
    for suffix in suffixes:
        candidate = image.with_name(f"{image.stem}{ATTENTION_SUFFIX}{suffix}")
        if candidate.is_file():
            return candidate
    return None


def attention_weight(grey: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """An attention map's grey values `[H, W]` (0-255, at training size) as a loss weight `[1, h, w]`.

    DreamArtist's table: grey 127 (50 %) weighs 1, white 255 weighs 5, linear between; below 127 the weight
    falls linearly to 0 at black (that part of the picture is not learnt). The map is shrunk to the latent
    first and mapped after, as DreamArtist does. Not normalised to mean 1 (unlike alpha): the grey says
    the weight.
    """
    small = F.interpolate(grey[None, None].float(), size=latent_size, mode="area")[0]
    return torch.where(small <= 127, small / 127, 1 + 4 * (small - 127) / 128)


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image with EXIF orientation applied; UserError if it is unreadable."""
    with _reading(path), Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as training sees it (EXIF orientation applied), from its header; a PNG
    is decoded when its header holds no EXIF, since PNG allows the EXIF after the pixels."""
    with _reading(path), Image.open(path) as image:
        width, height = image.size
        # Orientations 5-8 turn the picture by 90 degrees (as ImageOps.exif_transpose does).
        turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


@contextlib.contextmanager
def _reading(path: Path):
    """Errors of reading an image file become one-line UserErrors naming it."""
    try:
        yield
    except Image.DecompressionBombError as error:  # PIL's guard against files that decode to gigabytes
        raise UserError(
            f"{path}: too large to open safely ({error}); downscale it (training needs far less) or remove it"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(
            f"cannot read image {path}: {error}; re-save it as PNG or JPEG or remove it"
        ) from error


def split_rgb_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Convert any PIL mode to an RGB image plus an 8-bit alpha image (None when there is no alpha)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image), None
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image), None
    if has_alpha:
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    try:
        return image.convert("RGB"), None
    except ValueError as error:
        raise UserError(f"cannot convert image mode {image.mode} to RGB: {error}") from error


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # 65535 / 257 = 255: maps the 16-bit range exactly onto 8 bits.
    grey = np.asarray(image, dtype=np.float64)
    grey8 = np.clip(np.round(grey / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey8] * 3, axis=-1), mode="RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    # Print files often carry an ICC profile; without it, fall back to PIL's plain formula.
    profile = image.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass
    return image.convert("RGB")


def cover_crop_box(width: int, height: int, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred box of the source image that, scaled to `size`, covers it exactly.

    Scale so the image covers the target (for a square target: short side = training size), then take the
    centre. Working in source coordinates lets one Lanczos resize do scaling and cropping together.
    """
    target_w, target_h = size
    scale = max(target_w / width, target_h / height)
    box_w, box_h = target_w / scale, target_h / scale
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return (left, top, left + box_w, top + box_h)


def load_training_image(
    path: str | Path, size: int | tuple[int, int] | Crop
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load an image as a training tensor.

    Returns `(pixels, alpha)`: pixels `[3, H, W]` float32 in [-1, 1]; alpha `[H, W]` float32 in [0, 1],
    or None when the image has no alpha channel. `size` is an int (square) or (width, height), cut from the
    centre of the image scaled to cover it; or a `Crop` (an aspect-ratio bucket's cut) of this image.
    """
    pixels, alpha, _ = _load(Path(path), size)
    return pixels, alpha


def _load(path: Path, size: int | tuple[int, int] | Crop) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    """(pixels, alpha, the upright image's (width, height))."""
    rgb, alpha = split_rgb_alpha(open_image(path))
    original = (rgb.width, rgb.height)
    (width, height), box = _cut(path, original, size)
    rgb = rgb.resize((width, height), Image.Resampling.LANCZOS, box=box)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    if alpha is None:
        return pixels, None, original
    alpha = alpha.resize((width, height), Image.Resampling.LANCZOS, box=box)
    return pixels, torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0), original


def _cut(path: Path, original: tuple[int, int], size: int | tuple[int, int] | Crop):
    """((width, height), box in source pixels) of the training picture cut from an image of size `original`."""
    if isinstance(size, Crop):
        if size.original != original:
            raise UserError(
                f"{path}: the image is {original[0]}x{original[1]} now but was {size.original[0]}x"
                f"{size.original[1]} when the dataset was read; leave the images alone while training starts"
            )
        return size.target, size.box()
    width, height = as_size(size)
    return (width, height), cover_crop_box(original[0], original[1], (width, height))


def _load_attention(path: Path, image: Path, original: tuple[int, int], size) -> torch.Tensor:
    """An attention map's grey values [H, W] (0-255), cut exactly as its image is cut; a map of another size
    than its image is first stretched onto the image."""
    grey = open_image(path).convert("L")
    if grey.size != original:
        grey = grey.resize(original, Image.Resampling.LANCZOS)
    (width, height), box = _cut(image, original, size)
    grey = grey.resize((width, height), Image.Resampling.LANCZOS, box=box)
    return torch.from_numpy(np.asarray(grey, dtype=np.float32).copy())


def alpha_loss_weight(alpha: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor | None:
    """Turn an alpha map `[H, W]` into a loss weight `[1, h, w]` at latent size, min 0 and mean 1.

    Like A1111: shift to min 0, divide by the mean, so the loss stays comparable with unweighted images.
    A uniform alpha (e.g. a fully opaque RGBA file) carries no information; A1111 would divide by zero
    there, we return None (weight 1 everywhere) instead.
    """
    small = F.interpolate(alpha[None, None].float(), size=latent_size, mode="area")[0]
    small = small - small.min()
    mean = small.mean()
    if mean <= 1e-6:
        return None
    return small / mean


@dataclass
class LatentCache:
    """Scaled VAE latents of the training images, one slot per (record index, flipped)."""

    slots: dict[tuple[int, bool], int]
    mean: torch.Tensor  # [slots, C, h, w] float32: the cached sample ("once") or the mean
    std: torch.Tensor | None  # [slots, C, h, w] float32, kept only for "random" sampling
    alphas: list[torch.Tensor | None]  # per record: alpha [H, W] at training size, or None
    latent_size: tuple[int, int]  # (h, w)
    original_sizes: list[tuple[int, int]]  # per record: the upright image's (width, height)
    attention: list[torch.Tensor | None]  # per record: its attention map's grey [H, W] (0-255), or None


@torch.no_grad()
def encode_images(
    items: list[tuple[Path, tuple[int, int] | Crop, bool]],
    vae: torch.nn.Module,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    batch_size: int,
    method: str,
    seed: int,
    want_alpha: bool,
    attention_maps: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> LatentCache:
    """Encode images `(path, (width, height) or Crop, also_flipped)` with the VAE, in batches of `batch_size`;
    every item must give pictures of one size.

    `method` is A1111's latent sampling: "once" caches one sample (its noise comes from a generator
    seeded with `seed`, so it is reproducible), "deterministic" the mean, "random" the mean and std.
    With `attention_maps`, each image's `<stem>_att` map is read too, cut as its image.
    """
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    # One job per cached latent: (index, False) and, for flip_aug images, (index, True) right after it.
    jobs = [
        (index, flipped) for index, (_, _, flip) in enumerate(items) for flipped in (False, True)[: 1 + flip]
    ]
    alphas: list[torch.Tensor | None] = [None] * len(items)
    originals: list[tuple[int, int]] = [(0, 0)] * len(items)
    greys: list[torch.Tensor | None] = [None] * len(items)
    means, stds = [], []
    loaded: tuple[int, torch.Tensor] = (-1, torch.empty(0))  # the mirror job reuses the decoded image
    for first in range(0, len(jobs), batch_size):
        chunk = jobs[first : first + batch_size]
        pixels = []
        for index, flipped in chunk:
            if loaded[0] != index:
                path, size, _ = items[index]
                image, alpha, originals[index] = _load(Path(path), size)
                loaded = (index, image)
                alphas[index] = alpha if want_alpha else None
                found = attention_maps and attention_map_for(Path(path))
                if found:
                    greys[index] = _load_attention(found, Path(path), originals[index], size)
            pixels.append(loaded[1].flip(-1) if flipped else loaded[1])
        dist = vae.encode(torch.stack(pixels).to(device=device, dtype=dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            names = ", ".join(str(items[index][0]) for index, _ in chunk)
            raise UserError(
                f"the VAE gave NaN/inf latents in {dtype} for {names}; encode with float32 or bfloat16"
            )
        means.append((mean - shift) * scale)
        stds.append(std * scale)
        if progress is not None:
            progress(min(first + batch_size, len(jobs)), len(jobs))
    mean, std = torch.cat(means), torch.cat(stds)
    if method == "once":
        generator = torch.Generator().manual_seed(seed)
        mean = mean + std * torch.randn(mean.shape, generator=generator).to(std.device)
    return LatentCache(
        slots={job: slot for slot, job in enumerate(jobs)},
        mean=mean,
        std=std if method == "random" else None,
        alphas=alphas,
        latent_size=(mean.shape[-2], mean.shape[-1]),
        original_sizes=originals,
        attention=greys,
    )
