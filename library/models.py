"""Load Stable Diffusion 1.x / 2.x checkpoints offline into one `SDParts` object.

Single-file checkpoints in the original (CompVis/A1111) layout and diffusers folders are both read
without touching the network: configs and tokenizers ship in `library/assets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

ASSETS = Path(__file__).resolve().parent / "assets"

# The noise schedule every SD 1.x / 2.x model was trained with.
_SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
)


@dataclass(frozen=True)
class Family:
    """What distinguishes one model family from another."""

    name: str
    prediction_type: str  # "epsilon" or "v_prediction"
    text_width: int  # width of the text encoder's token embeddings
    tokenizer_dir: Path

    @property
    def scheduler_config(self) -> dict:
        return dict(_SD_SCHEDULE, prediction_type=self.prediction_type)


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "epsilon", 768, ASSETS / "tokenizer_sd1"),
    "sd2": Family("sd2", "epsilon", 1024, ASSETS / "tokenizer_sd2"),
    "sd2-v": Family("sd2-v", "v_prediction", 1024, ASSETS / "tokenizer_sd2"),
}


@dataclass
class SDParts:
    """Everything a textual-inversion run needs from a checkpoint."""

    family: str  # key of FAMILIES
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    checkpoint_name: str  # file stem (or folder name), as A1111 shows it
    checkpoint_hash: str  # A1111 short hash: first 10 hex of the file's SHA-256 ("" if unknown)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)


def load_tokenizer(family: str) -> CLIPTokenizer:
    """The real CLIP tokenizer for a family, from the folder shipped with the project."""
    return CLIPTokenizer.from_pretrained(FAMILIES[family].tokenizer_dir, local_files_only=True)
