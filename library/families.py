"""Model families as data: what distinguishes SD 1.x, SD 2.x, SD 2.x-v and SDXL (FACTS §5, §9).

A family lists its text encoders (tokenizer, width, pad id, which hidden state the UNet reads, whether its
pooled output conditions the UNet too), the extra conditioning its UNet takes, its default resolution and
prediction type, and how its embedding files are laid out. The rest of the library reads these facts from
here, so a new family is one description below plus its weight-name conversion (library/convert.py).

An embedding holds one block of vectors per text encoder, keyed by the encoder's `key`. A family with one
encoder stores that block as the bare `[n, width]` matrix of A1111's and Kohya's files; SDXL stores
`{"clip_l": [n, 768], "clip_g": [n, 1280]}`, the pair every SDXL tool exchanges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"

# The noise schedule every SD 1.x / 2.x / XL model was trained with.
_SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
)
CLIP_PAD = 49407  # CLIP's end-of-text token: SD 1.x pads with it
OPENCLIP_PAD = 0  # OpenCLIP pads with id 0 ("!"): SD 2.x and SDXL's bigG


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family."""

    key: (
        str  # its vector block: "clip_l" (CLIP ViT-L/14), "clip_h" (OpenCLIP ViT-H), "clip_g" (OpenCLIP bigG)
    )
    tokenizer: str  # folder of library/assets holding its tokenizer
    width: int  # width of its token embeddings (and of its hidden states)
    pad_id: int
    # The hidden state the UNet reads, counted from the end, and whether the final LayerNorm applies to it:
    # the last after the norm (SD 1.x, and SD 2.x, whose converted encoder stops at the penultimate
    # layer), or the penultimate without it (SDXL).
    layer: int = 1
    final_norm: bool = True
    pooled: bool = False  # its projected output at the end token conditions the UNet too (SDXL's bigG)


@dataclass(frozen=True)
class Family:
    """One model family: its encoders, conditioning, resolution, prediction type and file layout."""

    name: str
    title: str  # as users call it: "SD 1.x"
    text_encoders: tuple[TextEncoderSpec, ...]
    prediction_type: str  # "epsilon" or "v_prediction"
    resolution: int  # the side it was trained at
    architecture: str  # SAI ModelSpec architecture, as Kohya writes it
    size_conditioning: bool = False  # SDXL: original size, crop and target size beside the pooled vector

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(encoder.key for encoder in self.text_encoders)

    @property
    def context_width(self) -> int:
        """Width of the UNet's cross-attention context: the encoders' states side by side."""
        return sum(encoder.width for encoder in self.text_encoders)

    @property
    def scheduler_config(self) -> dict:
        return dict(_SD_SCHEDULE, prediction_type=self.prediction_type)

    @property
    def config_dir(self) -> Path:
        return ASSETS / "configs" / self.name

    def file_vectors(self, blocks: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        """An embedding's blocks as its files hold them: the bare matrix for one encoder, else the dict."""
        if len(self.text_encoders) == 1:
            return blocks[self.keys[0]]
        return {key: blocks[key] for key in self.keys}

    def blocks(
        self, vectors: torch.Tensor | dict[str, torch.Tensor], source: str, widths: dict[str, int]
    ) -> dict[str, torch.Tensor]:
        """An embedding file's vectors as this family's blocks for encoders of `widths` (the loaded model's:
        the built-in test models are narrower than real ones); a file made for another family is a
        UserError naming it (A1111 skips such files; a trainer or a sweep must say why)."""
        if isinstance(vectors, torch.Tensor):
            found = {"vectors": tuple(vectors.shape)}
            if len(self.keys) == 1 and vectors.shape[-1] == widths[self.keys[0]]:
                return {self.keys[0]: vectors}
        else:
            found = {key: tuple(value.shape) for key, value in vectors.items()}
            if set(vectors) == set(self.keys) and all(vectors[k].shape[-1] == widths[k] for k in self.keys):
                return {key: vectors[key] for key in self.keys}
        wanted = ", ".join(f"{key} [n, {widths[key]}]" for key in self.keys)
        raise UserError(
            f"{source}: an embedding of {_describe(found)} does not fit this {self.title} model ({wanted}); "
            "use an embedding made for this model family"
        )


def _describe(found: dict) -> str:
    if list(found) == ["vectors"]:
        width = found["vectors"][-1]
        made = {768: "SD 1.x", 1024: "SD 2.x"}.get(width)
        return f"width {width}" + (f" ({made})" if made else "")
    return ", ".join(f"{key} {list(shape)}" for key, shape in found.items()) + (
        " (SDXL)" if set(found) == {"clip_l", "clip_g"} else ""
    )


CLIP_L = TextEncoderSpec("clip_l", "tokenizer_sd1", 768, CLIP_PAD)
CLIP_H = TextEncoderSpec("clip_h", "tokenizer_sd2", 1024, OPENCLIP_PAD)
# SDXL reads both encoders' penultimate states side by side (2048 wide) and bigG's pooled vector (FACTS §9).
SDXL_CLIP_L = TextEncoderSpec("clip_l", "tokenizer_sd1", 768, CLIP_PAD, layer=2, final_norm=False)
SDXL_CLIP_G = TextEncoderSpec(
    "clip_g", "tokenizer_sd2", 1280, OPENCLIP_PAD, layer=2, final_norm=False, pooled=True
)

FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD 1.x", (CLIP_L,), "epsilon", 512, "stable-diffusion-v1"),
    "sd2": Family("sd2", "SD 2.x", (CLIP_H,), "epsilon", 512, "stable-diffusion-v2-512"),
    "sd2-v": Family("sd2-v", "SD 2.x-v", (CLIP_H,), "v_prediction", 768, "stable-diffusion-v2-768-v"),
    "sdxl": Family(
        "sdxl",
        "SDXL",
        (SDXL_CLIP_L, SDXL_CLIP_G),
        "epsilon",
        1024,
        "stable-diffusion-xl-v1-base",
        size_conditioning=True,
    ),  # fmt: skip
}


def family(name: str) -> Family:
    """The family called `name`; a UserError lists the known ones."""
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_architecture(architecture: str) -> Family | None:
    """The family whose ModelSpec architecture starts `architecture` ("stable-diffusion-v1/textual-inversion")."""
    base = architecture.split("/")[0]
    return next((f for f in FAMILIES.values() if f.architecture == base), None)
