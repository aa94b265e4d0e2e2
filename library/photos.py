"""Prepare real photos for training: square head-and-shoulders crops around the face (recipe step 1).

Each readable image is turned upright by its EXIF orientation, converted from any mode to RGB (an alpha
channel is kept), cropped to a square around the largest face that OpenCV's Haar cascades find (frontal,
then profile, both directions), and resized with Lanczos. When no face is found the crop is the centred
square, and the report says so. Unreadable files are reported and skipped; nothing is overwritten.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from library.captions import caption_from_stem, check_caption_extension, read_caption
from library.errors import UserError
from library.files import atomic_write
from library.images import open_image, split_rgb_alpha
from library.tables import PhotosConfig

# Faces are searched on a copy whose long side is at most this: the cascades find faces of 24 px and
# more, and a 6000 px photo would take seconds per cascade for no gain.
_DETECT_SIDE = 1024
# Files that sit beside photos and are never pictures: not reported as unreadable.
_SIDECAR_SUFFIXES = (".txt", ".caption", ".json", ".toml", ".yaml", ".yml", ".md", ".html", ".csv")

Box = tuple[int, int, int, int]  # x, y, width, height in pixels


# --------------------------------------------------------------------------------------------------
# Face detection


_per_thread = threading.local()  # OpenCV's cascade classifiers must not be shared between threads


def _cascade(name: str):
    """A Haar cascade from the XML files inside the opencv-python-headless package (once per thread)."""
    loaded = _per_thread.__dict__.setdefault("cascades", {})
    if name in loaded:
        return loaded[name]
    if not hasattr(cv2, "CascadeClassifier"):
        raise UserError(
            f"OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 dropped them); "
            'install "opencv-python-headless>=4.9,<5"'
        )
    classifier = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, name))
    if classifier.empty():
        raise UserError(f"OpenCV's {name} is missing from the opencv-python-headless package; reinstall it")
    loaded[name] = classifier
    return classifier


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area (1.0 when one box holds the other)."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / max(1, min(a[2] * a[3], b[2] * b[3]))


def detect_faces(image: Image.Image) -> list[Box]:
    """Faces in `image` as (x, y, w, h) boxes in its pixels, largest first (frontal and profile views).

    Overlapping detections of the same face (frontal and profile, or two scales) count once.
    """
    scale = min(1.0, _DETECT_SIDE / max(image.size))
    small = image.convert("L")
    if scale < 1.0:
        small = small.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    gray = cv2.equalizeHist(np.asarray(small, dtype=np.uint8))
    width = gray.shape[1]
    min_side = max(24, min(gray.shape) // 25)  # smaller "faces" are noise, even in a full-body photo
    options = dict(scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    found: list[Box] = [
        tuple(b) for b in _cascade("haarcascade_frontalface_default.xml").detectMultiScale(gray, **options)
    ]
    profile = _cascade("haarcascade_profileface.xml")
    found += [tuple(b) for b in profile.detectMultiScale(gray, **options)]
    # The profile cascade knows faces turned one way; the mirrored picture gives the other way.
    found += [
        (width - x - w, y, w, h) for x, y, w, h in profile.detectMultiScale(gray[:, ::-1].copy(), **options)
    ]
    faces: list[Box] = []
    for box in sorted(found, key=lambda b: b[2] * b[3], reverse=True):
        if all(_overlap(box, kept) < 0.3 for kept in faces):
            faces.append(box)
    return [tuple(int(round(v / scale)) for v in box) for box in faces]


# --------------------------------------------------------------------------------------------------
# Crop boxes


def centre_square(width: int, height: int) -> Box:
    """The largest centred square."""
    side = min(width, height)
    return ((width - side) // 2, (height - side) // 2, side, side)


def face_square(width: int, height: int, face: Box, scale: float, offset: float) -> Box:
    """A square head-and-shoulders box around `face`, moved (and if need be shrunk) to fit the image.

    Its side is `scale` times the face's larger side; its centre is `offset` face heights below the
    face's centre, which brings in the neck and shoulders.
    """
    x, y, w, h = face
    side = min(round(scale * max(w, h)), width, height)
    cx, cy = x + w / 2, y + h / 2 + offset * h
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return (left, top, side, side)


# --------------------------------------------------------------------------------------------------
# Preparing a folder


@dataclass
class PhotosReport:
    """What `prepare_photos` did, for the user's summary."""

    written: list[Path] = field(default_factory=list)
    face_crops: list[str] = field(default_factory=list)  # source names cropped around a face
    centre_crops: list[str] = field(default_factory=list)  # no face found: centred square
    several_faces: list[str] = field(default_factory=list)  # cropped around the largest of several
    upscaled: list[str] = field(default_factory=list)  # smaller than the output size
    unreadable: list[str] = field(default_factory=list)  # "name: reason"


def _sources(folder: Path, caption_extension: str) -> list[Path]:
    skip = {*_SIDECAR_SUFFIXES, caption_extension.lower()}
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted((p for p in files if p.suffix.lower() not in skip), key=lambda p: p.name)


def _output_names(sources: list[Path]) -> dict[Path, str]:
    """Output stems: the source stem, with the source suffix added where two sources share a stem."""
    stems: dict[str, int] = {}
    for path in sources:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    return {p: p.stem if stems[p.stem] == 1 else f"{p.stem}-{p.suffix.lstrip('.').lower()}" for p in sources}


def _caption(source: Path, cfg: PhotosConfig) -> str | None:
    existing = read_caption(source, cfg.caption_extension)
    if not cfg.caption:
        return existing
    filewords = existing if existing is not None else caption_from_stem(source.stem)
    return cfg.caption.replace("[filewords]", filewords)


def prepare_photo(image: Image.Image, cfg: PhotosConfig) -> tuple[Image.Image, int]:
    """Crop one upright image around its largest face and resize it; returns (picture, faces found)."""
    rgb, alpha = split_rgb_alpha(image)
    faces = detect_faces(rgb)
    if faces:
        box = face_square(rgb.width, rgb.height, faces[0], cfg.face_scale, cfg.face_offset)
    else:
        box = centre_square(rgb.width, rgb.height)
    x, y, side, _ = box
    crop = (x, y, x + side, y + side)
    size = (cfg.size, cfg.size)
    picture = rgb.resize(size, Image.Resampling.LANCZOS, box=crop)
    if alpha is not None:
        picture.putalpha(alpha.resize(size, Image.Resampling.LANCZOS, box=crop))
    return picture, len(faces)


def check_photos_config(cfg: PhotosConfig) -> None:
    if not cfg.input_dir or not Path(cfg.input_dir).is_dir():
        raise UserError(
            f"photos.input_dir = {cfg.input_dir!r} is not a folder; give the folder of your photos"
        )
    if not cfg.output_dir:
        raise UserError("photos.output_dir is empty; name a new folder for the prepared pictures")
    if Path(cfg.output_dir).resolve() == Path(cfg.input_dir).resolve():
        raise UserError(
            "photos.output_dir must differ from photos.input_dir (the originals are never replaced)"
        )
    check_caption_extension(cfg.caption_extension, "photos.caption_extension")


def prepare_photos(cfg: PhotosConfig, log: Callable[[str], None] = print) -> PhotosReport:
    """Prepare every picture of photos.input_dir into photos.output_dir (PNG, captions beside them)."""
    check_photos_config(cfg)
    source_dir, out = Path(cfg.input_dir), Path(cfg.output_dir)
    sources = _sources(source_dir, cfg.caption_extension)
    names = _output_names(sources)
    targets = [
        out / f"{stem}{suffix}" for stem in names.values() for suffix in (".png", cfg.caption_extension)
    ]
    if cfg.flip:
        targets += [
            out / f"{stem}-flipped{s}" for stem in names.values() for s in (".png", cfg.caption_extension)
        ]
    if not sources:
        raise UserError(f"photos.input_dir {source_dir}: holds no pictures; give the folder of your photos")
    clash = next((t for t in targets if t.exists()), None)
    if clash is not None:
        raise UserError(f"{clash} already exists; choose a new photos.output_dir (nothing is overwritten)")

    report = PhotosReport()
    for source in sources:
        try:
            image = open_image(source)
            picture, faces = prepare_photo(image, cfg)
            caption = _caption(source, cfg)
        except UserError as error:
            report.unreadable.append(f"{source.name}: {error}")
            continue
        if min(image.size) < cfg.size:
            report.upscaled.append(f"{source.name} ({image.width}x{image.height})")
        (report.face_crops if faces else report.centre_crops).append(source.name)
        if faces > 1:
            report.several_faces.append(source.name)
        variants = [(names[source], picture)]
        if cfg.flip:
            variants.append((f"{names[source]}-flipped", ImageOps.mirror(picture)))
        for stem, variant in variants:
            atomic_write(out / f"{stem}.png", lambda temp, picture=variant: picture.save(temp, format="PNG"))
            report.written.append(out / f"{stem}.png")
            if caption is not None:
                atomic_write(out / f"{stem}{cfg.caption_extension}", caption + "\n")
    if not report.written:  # (atomic_write makes the output folder: it exists only once a picture is in it)
        raise UserError(
            f"photos.input_dir {source_dir}: none of its {len(sources)} files could be prepared; the first: "
            f"{report.unreadable[0]}"
        )
    _log_report(report, out, log)
    return report


def _log_report(report: PhotosReport, out: Path, log: Callable[[str], None]) -> None:
    log(f"wrote {len(report.written)} pictures to {out}: {len(report.face_crops)} cropped around a face")
    if report.centre_crops:
        log(f"no face found, centre crop: {', '.join(report.centre_crops)}")
    if report.several_faces:
        log(f"several faces, cropped around the largest: {', '.join(report.several_faces)}")
    if report.upscaled:
        log(f"smaller than the output size, enlarged (check their sharpness): {', '.join(report.upscaled)}")
    for line in report.unreadable:
        log(f"skipped unreadable file {line}")
