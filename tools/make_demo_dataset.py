"""Render the demo dataset in dataset_layouts/demo: 8 small pictures of one made-up "character".

The character is an orange star on a neutral gray background; the demo preset teaches it to a new
word, `d3mo`. Run once; the images are committed: `python tools/make_demo_dataset.py`.
"""

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "dataset_layouts" / "demo" / "10_d3mo star"
SIZE = 64


def star(cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        a = angle + i * math.pi / 5
        points.append((cx + r * math.sin(a), cy - r * math.cos(a)))
    return points


def main() -> None:
    rng = random.Random(7)
    OUT.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        gray = 128 + rng.randint(-6, 6)
        image = Image.new("RGB", (SIZE, SIZE), (gray, gray, gray))
        radius = rng.uniform(16, 24)
        cx = rng.uniform(radius, SIZE - radius)
        cy = rng.uniform(radius, SIZE - radius)
        ImageDraw.Draw(image).polygon(star(cx, cy, radius, rng.uniform(0, 1.2)), fill=(240, 140, 20))
        image.save(OUT / f"{i:02d}.png")
        (OUT / f"{i:02d}.txt").write_text("neutral gray background\n")


if __name__ == "__main__":
    main()
