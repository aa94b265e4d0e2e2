"""The toy world: rendered pictures, their captions, and a classifier that names what a picture shows.

The world is 64x64 pictures of one shape (circle, square, triangle, star, hexagon, cross) in one colour
(red, green, blue, yellow, purple, orange) at a random size, position and rotation on a neutral gray
background with slight noise. The embedded model (`builtin:toy`, trained by tools/toy_world.py) has
learned it from captions such as `a photo of a red star, neutral gray background`; one combination,
`HELD_OUT`, never appears in its training, to test composition.

Rendering is batched tensor code (signed distances with a one-pixel anti-aliased edge), so the same
functions draw on a GPU while training and on a CPU in tests. `ShapeClassifier` is a small CNN that names the
colour and the shape of a picture, or answers `NO_SHAPE` for blobs, smears and empty pictures;
`likeness` turns that into the number sweeps and tests want: how often generated images are a concept.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from library.errors import UserError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 200),
    "orange": (240, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
NO_SHAPE = "no clear shape"
HELD_OUT = ("green", "star")  # never in the model's training captions or pictures
BACKGROUND = "neutral gray background"
SIZE = 64
RADIUS_RANGE = (13.0, 25.0)  # circumradius in pixels; below ~12 px hexagons are hard to draw
ASSETS = Path(__file__).resolve().parent / "assets" / "toy"
TOY_CHECKPOINT = ASSETS / "toy-sd1.safetensors"
SCORER_FILE = ASSETS / "scorer.safetensors"

# --------------------------------------------------------------------------------------------------
# Captions


def caption(colour: str | None, shape: str | None, background: bool = True) -> str:
    """`a photo of a red star, neutral gray background`; a missing colour or shape leaves the word out
    (`a photo of a red shape`, `a photo of a star`, `a photo of a shape`)."""
    if colour and shape:
        text = f"a photo of a {colour} {shape}"
    elif colour:
        text = f"a photo of a {colour} shape"
    else:
        text = f"a photo of a {shape or 'shape'}"
    return f"{text}, {BACKGROUND}" if background else text


def parse_concept(concept: str) -> tuple[str, str]:
    """`"orange star"` -> ("orange", "star"); a UserError names the valid words otherwise."""
    words = concept.lower().split()
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
        raise UserError(
            f"concept {concept!r}: write '<colour> <shape>' with a colour from {', '.join(COLOURS)} "
            f"and a shape from {', '.join(SHAPES)}"
        )
    return words[0], words[1]


def combinations(include_held_out: bool = False) -> list[tuple[int, int]]:
    """(colour index, shape index) pairs of the world, the held-out one only if asked for."""
    held = (list(COLOURS).index(HELD_OUT[0]), SHAPES.index(HELD_OUT[1]))
    pairs = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]
    return [p for p in pairs if include_held_out or p != held]


# --------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Scenes:
    """A batch of scene parameters (all tensors of batch size B, on one device)."""

    colour: torch.Tensor  # [B] long, index into COLOURS
    shape: torch.Tensor  # [B] long, index into SHAPES
    radius: torch.Tensor  # [B] circumradius in pixels
    center: torch.Tensor  # [B, 2] x, y in pixels
    angle: torch.Tensor  # [B] radians
    rgb: torch.Tensor  # [B, 3] 0..255, the colour with a little jitter
    background: torch.Tensor  # [B] gray level 0..255
    noise: torch.Tensor  # [B] noise standard deviation, 0..255 units


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def sample_scenes(
    n: int,
    gen: torch.Generator,
    *,
    pairs: list[tuple[int, int]] | None = None,
    colour_jitter: float = 10.0,
    noise: tuple[float, float] = (1.5, 4.0),
    background_jitter: float = 8.0,
) -> Scenes:
    """`n` random scenes of the world (colour and shape uniform over `pairs`, default all but HELD_OUT)."""
    device = gen.device
    table = torch.tensor(pairs if pairs is not None else combinations(), device=device)
    pick = table[torch.randint(0, len(table), (n,), generator=gen, device=device)]
    radius = _uniform(n, *RADIUS_RANGE, gen, device)
    center = radius[:, None] + (SIZE - 2 * radius[:, None]) * torch.rand(n, 2, generator=gen, device=device)
    base = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device)[pick[:, 0]]
    jitter = (torch.rand(n, 3, generator=gen, device=device) * 2 - 1) * colour_jitter
    return Scenes(
        colour=pick[:, 0],
        shape=pick[:, 1],
        radius=radius,
        center=center,
        angle=_uniform(n, 0.0, 2 * math.pi, gen, device),
        rgb=(base + jitter).clamp(0, 255),
        background=128 + _uniform(n, -background_jitter, background_jitter, gen, device),
        noise=_uniform(n, *noise, gen, device),
    )


def _unit_polygons() -> torch.Tensor:
    """Vertices of each shape at circumradius 1, pointing up, padded to 12 by repeating the last one
    (a zero-length edge changes neither the distance nor the inside test). Row 0 (circle) is unused."""

    def ring(count: int, radii=(1.0,), offset: float = 0.0) -> list[tuple[float, float]]:
        points = []
        for i in range(count):
            r, a = radii[i % len(radii)], offset + 2 * math.pi * i / count
            points.append((r * math.sin(a), -r * math.cos(a)))
        return points

    w = 0.3  # half-width of the cross's arms
    cross = [
        (w, -1),
        (w, -w),
        (1, -w),
        (1, w),
        (w, w),
        (w, 1),
        (-w, 1),
        (-w, w),
        (-1, w),
        (-1, -w),
        (-w, -w),
        (-w, -1),
    ]
    shapes = [
        [(0.0, 0.0)],
        ring(4, offset=math.pi / 4),
        ring(3),
        ring(10, radii=(1.0, 0.45)),
        ring(6),
        cross,
    ]
    return torch.tensor([s + [s[-1]] * (12 - len(s)) for s in shapes], dtype=torch.float32)


_POLYGONS = _unit_polygons()
CIRCLE_SCALE = 0.9  # a circle's radius relative to the circumradius of the other shapes


def _pixel_grid(device) -> torch.Tensor:
    coords = torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)  # [P, 2]


def polygon_sdf(vertices: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) from `points` [P, 2] to closed polygons `vertices` [B, V, 2] -> [B, P]."""
    a = vertices[:, :, None, :]  # [B, V, 1, 2]
    b = torch.roll(vertices, -1, dims=1)[:, :, None, :]
    p = points[None, None]  # [1, 1, P, 2]
    edge, rel = b - a, p - a
    t = ((rel * edge).sum(-1) / ((edge * edge).sum(-1) + 1e-9)).clamp(0, 1)
    dist = (rel - t[..., None] * edge).norm(dim=-1).amin(dim=1)
    # Even-odd rule: count the edges a ray to the right of each point crosses.
    ay, by, py = a[..., 1], b[..., 1], p[..., 1]
    spans = (ay > py) != (by > py)
    dy = torch.where(spans, by - ay, torch.ones_like(by - ay))
    x_cross = a[..., 0] + (py - ay) * (b[..., 0] - a[..., 0]) / dy
    inside = ((spans & (p[..., 0] < x_cross)).sum(dim=1) % 2) == 1
    return torch.where(inside, -dist, dist)


def shape_sdf(scenes: Scenes, rounding: torch.Tensor | None = None) -> torch.Tensor:
    """Signed distance [B, P] to each scene's shape; `rounding` [B] (pixels) rounds polygon corners."""
    points = _pixel_grid(scenes.radius.device)
    radius = scenes.radius if rounding is None else scenes.radius - rounding
    cos, sin = torch.cos(scenes.angle), torch.sin(scenes.angle)
    unit = _POLYGONS.to(points.device)[scenes.shape]  # [B, 12, 2]
    rotated = torch.stack(
        [
            unit[..., 0] * cos[:, None] - unit[..., 1] * sin[:, None],
            unit[..., 0] * sin[:, None] + unit[..., 1] * cos[:, None],
        ],
        dim=-1,
    )
    vertices = rotated * radius[:, None, None] + scenes.center[:, None, :]
    sdf = polygon_sdf(vertices, points)
    if rounding is not None:
        sdf = sdf - rounding[:, None]
    circle = (points[None] - scenes.center[:, None, :]).norm(dim=-1) - CIRCLE_SCALE * scenes.radius[:, None]
    return torch.where((scenes.shape == 0)[:, None], circle, sdf)


def paint(scenes: Scenes, sdf: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Images [B, 3, 64, 64] in [-1, 1]: the colour where sdf < 0 (one-pixel anti-aliased edge) over
    the gray background, plus Gaussian noise."""
    coverage = (0.5 - sdf).clamp(0, 1).view(-1, 1, SIZE, SIZE)
    background = scenes.background.view(-1, 1, 1, 1)
    image = background + (scenes.rgb.view(-1, 3, 1, 1) - background) * coverage
    noise = torch.randn(image.shape, generator=gen, device=image.device) * scenes.noise.view(-1, 1, 1, 1)
    return ((image + noise).clamp(0, 255) / 127.5 - 1).float()


def draw(scenes: Scenes, gen: torch.Generator) -> torch.Tensor:
    """Ground-truth pictures of `scenes`: [B, 3, 64, 64] in [-1, 1]."""
    return paint(scenes, shape_sdf(scenes), gen)


def blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a per-image `sigma` [B] in pixels (0 = unchanged)."""
    radius = int(math.ceil(3 * float(sigma.max()))) if sigma.numel() else 0
    if radius == 0:
        return images
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(-1, keepdim=True)  # [B, K]
    b, c, h, w = images.shape
    k = kernel.repeat_interleave(c, 0)  # [B*C, K]
    flat = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, k[:, None, :, None], groups=b * c)
    flat = F.conv2d(flat, k[:, None, None, :], groups=b * c)
    return flat.view(b, c, h, w)


def draw_without_shape(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pictures with no clear shape, and their colour (-1 where there is no object): smooth random
    blobs, polygons with strongly rounded corners, heavily blurred shapes, and empty or noisy frames."""
    device = gen.device
    scenes = sample_scenes(n, gen, pairs=combinations(include_held_out=True), colour_jitter=25)
    kind = torch.randint(0, 4, (n,), generator=gen, device=device)
    # 0: a blob whose radius wobbles with 2-5 lobes (neither round nor a polygon)
    points = _pixel_grid(device)
    rel = points[None] - scenes.center[:, None, :]
    phi = torch.atan2(rel[..., 1], rel[..., 0])
    wobble = torch.zeros_like(phi)
    for lobes in (2, 3, 4, 5):
        amplitude = _uniform(n, 0.0, 0.22, gen, device)
        if lobes == 3:
            amplitude = amplitude.clamp(min=0.12)  # at least one clear lobe
        phase = _uniform(n, 0.0, 2 * math.pi, gen, device)
        wobble = wobble + amplitude[:, None] * torch.cos(lobes * phi + phase[:, None])
    blob = rel.norm(dim=-1) - 0.8 * scenes.radius[:, None] * (1 + wobble)
    # 1: a square or triangle with corners rounded by 30-50 % of its radius (more would be a circle)
    rounded = Scenes(**{**scenes.__dict__, "shape": 1 + scenes.shape % 2})
    rounding = scenes.radius * _uniform(n, 0.3, 0.5, gen, device)
    sdf = torch.where((kind == 0)[:, None], blob, shape_sdf(rounded, rounding))
    images = paint(scenes, torch.where((kind == 2)[:, None], shape_sdf(scenes), sdf), gen)
    # 2: any shape blurred until it has no edge
    sigma = torch.where(kind == 2, _uniform(n, 3.0, 6.0, gen, device), torch.zeros(n, device=device))
    images = blur(images, sigma)
    # 3: no object: the background with weak or strong noise
    strong = torch.rand(n, generator=gen, device=device) < 0.5
    level = torch.where(strong, _uniform(n, 10.0, 60.0, gen, device), scenes.noise)
    empty = scenes.background.view(-1, 1, 1, 1) + torch.randn(
        images.shape, generator=gen, device=device
    ) * level.view(-1, 1, 1, 1)
    empty = (empty.clamp(0, 255) / 127.5 - 1).float()
    images = torch.where((kind == 3).view(-1, 1, 1, 1), empty, images)
    return images, torch.where(kind == 3, -1, scenes.colour)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB pictures."""
    array = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).numpy()), "RGB") for a in array]


def from_pil(images) -> torch.Tensor:
    """RGB pictures (any size; resized to 64x64) -> [B, 3, 64, 64] in [-1, 1]."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (SIZE, SIZE):
            image = image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


# --------------------------------------------------------------------------------------------------
# The shape classifier (and the sweep scorer built on it)


class ShapeClassifier(nn.Module):
    """A small CNN: 64x64 picture -> colour logits [6] and shape logits [7] (the last is NO_SHAPE)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        w = width
        self.features = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.MaxPool2d(2),
            *block(4 * w, 4 * w),
        )  # fmt: skip
        self.head = nn.Linear(8 * w, len(COLOURS) + len(SHAPES) + 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(images)
        x = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        logits = self.head(x)
        return logits[:, : len(COLOURS)], logits[:, len(COLOURS) :]


@functools.lru_cache(maxsize=4)
def load_classifier(path: str | Path = SCORER_FILE) -> ShapeClassifier:
    """The committed classifier (CPU, eval mode, float32); cached."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no scorer file; train one with `python tools/toy_world.py train`")
    state = {k: v.float() for k, v in load_file(path).items()}
    scorer = ShapeClassifier(width=state["features.0.weight"].shape[0])
    scorer.load_state_dict(state)
    return scorer.eval().requires_grad_(False)


def classify(images, scorer: ShapeClassifier | None = None) -> list[tuple[str, str]]:
    """(colour, shape) of each picture; shape is NO_SHAPE for blobs, smears and empty pictures.

    `images`: PIL pictures, or a tensor [B, 3, 64, 64] in [-1, 1].
    """
    scorer = scorer or load_classifier()
    x = images if isinstance(images, torch.Tensor) else from_pil(images)
    device = next(scorer.parameters()).device
    names = [*SHAPES, NO_SHAPE]
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), 256):
            colour_logits, shape_logits = scorer(x[start : start + 256].to(device, torch.float32))
            colours, shapes = colour_logits.argmax(1).tolist(), shape_logits.argmax(1).tolist()
            out += [(list(COLOURS)[c], names[s]) for c, s in zip(colours, shapes, strict=True)]
    return out


def likeness(images, concept: str, scorer: ShapeClassifier | None = None) -> float:
    """The fraction of `images` that the scorer names as `concept` ("orange star"): both attributes right."""
    target = parse_concept(concept)
    if len(images) == 0:
        raise UserError("likeness needs at least one image")
    found = classify(images, scorer)
    return sum(answer == target for answer in found) / len(found)


class ToyScorer:
    """The sweep's scorer protocol (library/scoring.py) on the toy world, judged by the scorer CNN
    (`scoring.model = "builtin:toy"`).

    likeness: 1.0 for an image that shows the target concept, else 0.0 (so a cell's mean likeness is its
    hit rate); the target is `concept`, or else what most reference images show (0.0 for every image when
    the references show no clear shape).
    adherence: the share of the colour and shape words of the prompt that the image shows (1.0 for a
    prompt that names neither, when the image shows a clear shape).
    """

    def __init__(self, concept: str | None = None, scorer: ShapeClassifier | None = None) -> None:
        self.target = parse_concept(concept) if concept else None
        self.scorer = scorer

    def _target(self, references) -> tuple[str, str] | None:
        if self.target is not None:
            return self.target
        found = [a for a in classify(references, self.scorer) if a[1] != NO_SHAPE] if len(references) else []
        return max(sorted(set(found)), key=found.count) if found else None

    def likeness(self, images, references) -> list[float]:
        if len(images) == 0:
            return []
        target = self._target(references)
        return [float(answer == target) for answer in classify(images, self.scorer)]

    def adherence(self, images, prompt: str) -> list[float]:
        if len(images) == 0:
            return []
        words = set(prompt.lower().replace(",", " ").split())
        colour = next((c for c in COLOURS if c in words), None)
        shape = next((s for s in SHAPES if s in words), None)
        scores = []
        for found_colour, found_shape in classify(images, self.scorer):
            checks = [found_colour == colour] if colour else []
            checks += [found_shape == shape] if shape else []
            scores.append(sum(checks) / len(checks) if checks else float(found_shape != NO_SHAPE))
        return scores

    def forget(self) -> None:
        """Nothing is cached per image."""


def concept_hit_rate(
    parts, conditioner, prompt: str, concept: str, seeds: list[int], settings, batch_size: int = 32
) -> float:
    """Generate one image per seed from `prompt` (library.sampling.generate) and return its likeness."""
    from library.sampling import generate

    images = generate(
        parts, conditioner, [prompt] * len(seeds), [""] * len(seeds), seeds, settings, batch_size=batch_size
    )
    return likeness(images, concept)
