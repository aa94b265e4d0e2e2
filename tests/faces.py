"""A drawn face that OpenCV's frontal Haar cascade really finds, for the photo and flag tests."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def drawn_face(
    size: tuple[int, int] = (400, 400),
    at: tuple[int, int] = (0, 0),
    background=(128, 128, 128),
    blur: float = 0.0,
    grain: float = 6.0,
) -> Image.Image:
    """A 400x400-px face (hair, skin, brows, eyes, nose, mouth) drawn with its box's corner at `at` on a
    plain background of `size`, softened a little and given a photo's grain; `blur` then softens it all."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    x, y = at

    def box(*coords):
        return [c + (x if i % 2 == 0 else y) for i, c in enumerate(coords)]

    draw.ellipse(box(110, 60, 290, 300), fill=(40, 30, 20))
    draw.ellipse(box(120, 90, 280, 310), fill=(225, 190, 160))
    draw.ellipse(box(150, 158, 192, 172), fill=(30, 20, 20))
    draw.ellipse(box(208, 158, 250, 172), fill=(30, 20, 20))
    draw.rectangle(box(145, 140, 197, 150), fill=(50, 35, 25))
    draw.rectangle(box(203, 140, 255, 150), fill=(50, 35, 25))
    draw.polygon([tuple(box(200, 180)), tuple(box(185, 235)), tuple(box(215, 235))], fill=(190, 160, 135))
    draw.ellipse(box(165, 255, 235, 272), fill=(150, 60, 60))
    soft = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
    noise = np.random.default_rng(0).normal(0, grain, soft.shape[:2])[..., None]
    photo = Image.fromarray(np.clip(soft + noise, 0, 255).astype(np.uint8))
    return photo.filter(ImageFilter.GaussianBlur(blur)) if blur else photo


# Where the drawn face's skin ellipse sits inside its 400x400 box: (centre x, centre y).
FACE_CENTRE = (200, 200)
