"""Small builders shared by the end-to-end tests: datasets on disk and tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from library.conditioning import Conditioner
from library.families import FAMILIES

COLOURS = [(230, 40, 40), (40, 200, 60), (40, 80, 230), (230, 210, 40), (150, 50, 200), (240, 140, 20)]


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line a script prints for bad input (other lines, e.g. progress bars or a
    dependency's notices, are not counted); fails on a traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def make_images(folder: Path, count: int = 8, size: int = 32, caption: str | None = "a shape") -> Path:
    """`count` small pictures of coloured squares on gray, with optional caption files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        lo, hi = 4 + i % 5, size - 4 - i % 3
        ImageDraw.Draw(image).rectangle((lo, lo, hi, hi), fill=COLOURS[i % len(COLOURS)])
        image.save(folder / f"{i:02d}.png")
        if caption is not None:
            (folder / f"{i:02d}.txt").write_text(f"{caption}, picture {i}\n")
    return folder


def tiny_checkpoint(tmp_path: Path, family: str = "sd1") -> Path:
    """A tiny model saved as an original-layout single-file checkpoint, as users have them."""
    from library.convert import save_single_file
    from library.tiny import build_tiny_parts

    path = tmp_path / f"tiny-{family}.safetensors"
    if not path.exists():
        save_single_file(build_tiny_parts(family, seed=0), path)
    return path


class OneEncoder(Conditioner):
    """A one-encoder (SD 1.x) conditioner over a text encoder, whose embeddings are bare [n, width] tensors
    and whose encodings are the context alone, as these tests want them."""

    def __init__(self, tokenizer, text_encoder, family="sd1", **options):
        super().__init__(FAMILIES[family], tokenizer, {FAMILIES[family].keys[0]: text_encoder}, **options)

    @classmethod
    def of(cls, parts, **options):
        return cls(parts.tokenizer, parts.text_encoder, parts.family.name, **options)

    def set_embedding(self, name, vectors):
        super().set_embedding(name, {self.family.keys[0]: vectors})

    def encode(self, prompts):
        return super().encode(prompts).context

    def encode_pair(self, prompts, negatives):
        cond, uncond = super().encode_pair(prompts, negatives)
        return cond.context, uncond.context


def interrupt_after(monkeypatch, stop_at: int) -> None:
    """Make training raise SIGINT (what Ctrl-C does) once update `stop_at` is done."""
    import signal

    from library.trainer import Trainer

    real_step = Trainer.step

    def step(self, index, lr, clip):
        loss = real_step(self, index, lr, clip)
        if index + 1 == stop_at:
            signal.raise_signal(signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "step", step)


def poison_unet_after(monkeypatch, trainer, calls: int) -> None:
    """Make the trainer's UNet answer NaN from its call `calls + 1` on."""
    real = trainer.parts.unet.forward
    made = {"n": 0}

    def poisoned(*args, **kwargs):
        made["n"] += 1
        out = real(*args, **kwargs)
        if made["n"] > calls:
            out.sample.fill_(float("nan"))
        return out

    monkeypatch.setattr(trainer.parts.unet, "forward", poisoned)
