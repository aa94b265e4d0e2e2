"""What training minimises: a small function of (batch, predictions) that another objective can replace.

An objective says which prompts the UNet is asked about (`prompt_sets`: the trainer encodes every set in
one text-encoder call and runs the UNet once over them all, on the batch's noisy latents repeated) and how
the predictions become the loss (`loss`). Plain textual inversion asks once, with the training prompts;
DreamArtist (library/dreamartist.py) asks with its negative and positive prompts and combines the two.

A batch may hold several sources (the characters of a cast, each `batch_size` samples): each source's mean
loss counts on its own, and they are summed, so every embedding gets the gradient it would get trained alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TrainingBatch:
    """One process's share of a micro-batch, all sources together, ready for the UNet."""

    latents: torch.Tensor  # [B, C, h, w], scaled
    prompts: list[str]
    loss_weights: torch.Tensor | None  # [B, 1, h, w] (PNG alpha, min 0 mean 1 per image) or None
    sources: list[tuple[int, int]]  # rows [start, end) of each source, in order
    # SDXL: each sample's (original h, w, crop top, left, target h, w), as the UNet's size ids [B, 6]
    size_ids: torch.Tensor | None = None


@dataclass
class TextualInversion:
    """MSE between the UNet's prediction and the noise (epsilon models) or the velocity (v models), per
    element, weighted by PNG alpha where asked, averaged per sample, optionally min-SNR weighted."""

    scheduler: object  # the model's DDPM noise schedule
    prediction_type: str
    min_snr_gamma: float = 0.0  # 0 = off

    def prompt_sets(self, batch: TrainingBatch) -> list[list[str]]:
        return [batch.prompts]

    def preview_negative(self, prompt: str, negative: str) -> str:
        """The negative prompt a preview of `prompt` renders with."""
        return negative

    def loss(
        self, batch: TrainingBatch, predictions: list[torch.Tensor], target: torch.Tensor, timesteps
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to minimise, each source's mean loss [sources])."""
        return self.source_means(batch, self.per_sample(batch, predictions[0], target, timesteps))

    def per_sample(self, batch: TrainingBatch, prediction, target, timesteps) -> torch.Tensor:
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
        if batch.loss_weights is not None:
            loss = loss * batch.loss_weights.to(loss.device)
        loss = loss.mean(dim=(1, 2, 3))
        if self.min_snr_gamma > 0:
            loss = loss * min_snr_weight(self.scheduler, timesteps, self.min_snr_gamma, self.prediction_type)
        return loss

    @staticmethod
    def source_means(batch: TrainingBatch, per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means = torch.stack([per_sample[start:end].mean() for start, end in batch.sources])
        return means.sum(), means.detach()


def min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR, and / (SNR + 1) for v models."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=gamma) / snr
    return weight if prediction_type == "epsilon" else weight * snr / (snr + 1)
