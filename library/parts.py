"""The parts of a loaded model (`SDParts`): its family, tokenizer, text encoders, UNet, VAE and noise schedule,
and where they run in which precision.

Models come from library/models.py (checkpoint files and diffusers folders), library/tiny.py and
library/toy.py (the built-in ones); everything else takes an `SDParts`.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTokenizer

from library.families import ASSETS, Family, family

# Mixed-precision setting -> the dtype of the frozen weights (the trained vectors stay float32).
PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype beside frozen weights of `dtype`: SD's VAE overflows in fp16 (black pictures), so under
    fp16 it stays float32, as A1111's --no-half-vae."""
    return torch.float32 if dtype == torch.float16 else dtype


def load_tokenizer(name: str) -> CLIPTokenizer:
    """The real CLIP tokenizer of a family's first text encoder, from the folder shipped with the project.
    The family's encoders share CLIP's vocabulary; each pads its own way (`TextEncoderSpec.pad_id`)."""
    return CLIPTokenizer.from_pretrained(
        ASSETS / family(name).text_encoders[0].tokenizer, local_files_only=True
    )


@dataclass
class SDParts:
    """Everything a run needs from a checkpoint."""

    family: Family
    tokenizer: CLIPTokenizer
    text_encoders: dict[str, torch.nn.Module]  # by the family's encoder keys, in its order
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    checkpoint_name: str  # file stem (or folder name), as A1111 shows it
    hashing: str | Future[str]  # the checkpoint hash, or its computation under way (`checkpoint_hash`)

    @classmethod
    def of(
        cls,
        family_name: str,
        text_encoders,
        unet,
        vae,
        *,
        name: str,
        checkpoint_hash: str | Future[str] = "",
        tokenizer=None,
    ) -> SDParts:
        """Parts from built modules (text encoders in the family's order), with the family's tokenizer and
        noise schedule."""
        described = family(family_name)
        return cls(
            family=described,
            tokenizer=tokenizer or load_tokenizer(family_name),
            text_encoders=dict(zip(described.keys, text_encoders, strict=True)),
            unet=unet,
            vae=vae,
            noise_scheduler=DDPMScheduler(**described.scheduler_config),
            checkpoint_name=name,
            hashing=checkpoint_hash,
        )

    @property
    def checkpoint_hash(self) -> str:
        """A1111's short hash: the first 10 hex digits of the file's SHA-256 ("" if unknown)."""
        if isinstance(self.hashing, Future):
            self.hashing = self.hashing.result()
        return self.hashing

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The first text encoder (the only one of SD 1.x and 2.x)."""
        return next(iter(self.text_encoders.values()))

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [*self.text_encoders.values(), self.unet, self.vae]

    @property
    def widths(self) -> dict[str, int]:
        """The width of each text encoder's token embeddings, as loaded (the built-in test models are narrow)."""
        return {key: enc.get_input_embeddings().embedding_dim for key, enc in self.text_encoders.items()}

    @property
    def unet_dtype(self) -> torch.dtype:
        """The UNet's dtype, read off its first weight. diffusers' `unet.dtype` walks every module: called once
        a training step and once a sampling step, it took 3.9 s of the profiled face recipe (H200, 802 calls)."""
        return next(self.unet.parameters()).dtype

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def place(self, device, precision: str, *, vae: bool = True) -> None:
        """Move the frozen models to `device` in the dtype of `precision`, the VAE in `vae_dtype`'s (float32
        under fp16); `vae=False` leaves it where it is."""
        dtype = PRECISIONS[precision]
        for module in (*self.text_encoders.values(), self.unet):
            module.to(device, dtype)
        if vae:
            self.vae.to(device, vae_dtype(dtype))

    def pipeline(self):
        """These parts as a diffusers `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`) sharing the
        same modules (no safety checker, no watermark). SDXL's second tokenizer is a copy of the first that
        pads as bigG does, so that each can take its own new tokens (diffusers' `load_textual_inversion`)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.family.name == "sdxl":
            tokenizer_2 = copy.deepcopy(self.tokenizer)
            tokenizer_2.pad_token = tokenizer_2.convert_ids_to_tokens(self.family.text_encoders[1].pad_id)
            text_encoder, text_encoder_2 = self.text_encoders.values()
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=tokenizer_2,
                unet=self.unet,
                scheduler=self.noise_scheduler,
                add_watermarker=False,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.noise_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
