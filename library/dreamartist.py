"""DreamArtist's APT (Dong et al. 2022; the A1111 extension, FACTS §10): a positive embedding `NAME` and a
negative `NAME-neg` trained together, with classifier-free guidance inside the training step.

The pair is two members of one embedding set (one optimizer; the negative's learning rate is train.lr times
`dreamartist.neg_lr_factor`, set again at every step, so it survives every change of a schedule). The
training CFG is an objective: the UNet is asked once about [negative prompts; positive prompts] (each
negative prompt is its positive prompt with `NAME` replaced by `NAME-neg`), and

    ε̂ = ε_neg + s(t) · (ε_pos − ε_neg),   loss = MSE(ε̂, ε)   (v-prediction models: the same on v)

where s(t) is `dreamartist.cfg_scale`: a number, or DreamArtist's `low-high:type` string whose scale moves
from `low` at t = 0 to `high` at t = T−1 (`ln` linearly in t/(T−1), `cos` = cos((r−1)·π/2), `cos2` =
1 − cos(r·π/2)). With the negative switched off the negative prompt is the empty prompt, the unconditional
of every A1111 render (DreamArtist itself crashes there: it doubles the latents but not the prompts).
Optional extras: a reconstruction loss (x̂0 from ε̂, decoded by the VAE with gradients, L1 against the
training image). DreamArtist's per-image attention maps (`<img>_att.png`) weight the loss per latent pixel
(library/images.py reads them, library/data.py cuts them with their images).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library.errors import UserError
from library.objectives import TextualInversion, TrainingBatch

CFG_CURVES = ("ln", "cos", "cos2")
NEGATIVE_SUFFIX = "-neg"


@dataclass(frozen=True)
class CfgScale:
    """The training CFG scale as a function of the timestep: `low` at t = 0, `high` at t = T−1."""

    low: float
    high: float
    curve: str = "ln"

    @property
    def constant(self) -> bool:
        return self.low == self.high

    def at(self, timesteps: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
        """The scale of each timestep, as a float tensor like `timesteps`."""
        if self.constant:
            return torch.full(timesteps.shape, self.low, device=timesteps.device)
        rate = timesteps.float() / (num_timesteps - 1)
        if self.curve == "cos":
            rate = torch.cos((rate - 1) * math.pi / 2)
        elif self.curve == "cos2":
            rate = 1 - torch.cos(rate * math.pi / 2)
        return (self.high - self.low) * rate + self.low


def parse_cfg_scale(value: float | str, key: str = "dreamartist.cfg_scale") -> CfgScale:
    """A number (`3`), or DreamArtist's dynamic string `low-high[:ln|cos|cos2]` (`2.5-3.5:cos`). DreamArtist
    evaluates any other curve name as Python; here it is an error naming the key and the choices."""
    fix = f"write a number such as {key}=3 or a string such as {key}='2.5-3.5:cos' (curves: {', '.join(CFG_CURVES)})"
    if isinstance(value, bool):
        raise UserError(f"{key} = {value!r} is not a scale; {fix}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"{key} = {value!r} must be above 0; {fix}")
        return CfgScale(float(value), float(value))
    text, _, curve = str(value).strip().partition(":")
    curve = curve.strip() or "ln"
    if curve not in CFG_CURVES:
        raise UserError(f"{key} = {value!r}: unknown curve {curve!r}; {fix}")
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?\d+)?)\s*(?:-\s*([0-9.]+(?:[eE][-+]?\d+)?)\s*)?", text)
    try:
        low = float(match[1]) if match else math.nan
        high = float(match[2]) if match and match[2] else low
    except ValueError:
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low > 0 and high > 0):
        raise UserError(
            f"{key} = {value!r} is not a scale or a 'low-high:curve' range of positive numbers; {fix}"
        )
    return CfgScale(low, high, curve)


def negative_name(name: str) -> str:
    return name + NEGATIVE_SUFFIX


def _word(name: str) -> re.Pattern:
    """`name` as a whole prompt word (not inside a longer word or a `name-...` continuation)."""
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])", re.IGNORECASE)


def negative_prompt_of(prompt: str, name: str) -> str:
    """The same template line with `NAME` replaced by `NAME-neg`, as DreamArtist writes its negative text."""
    return _word(name).sub(negative_name(name), prompt)


@dataclass
class DreamArtist(TextualInversion):
    """DreamArtist's training CFG as a loss (see the module docstring)."""

    name: str = ""  # the positive embedding's trigger word
    negative: bool = True  # False: the negative prompt is "" (the negative embedding is switched off)
    cfg: CfgScale = CfgScale(3.0, 3.0)
    vae: object = None  # set for the reconstruction loss
    reconstruction_weight: float = 0.0  # 0 = off

    def prompt_sets(self, batch: TrainingBatch) -> list[list[str]]:
        negatives = [negative_prompt_of(p, self.name) if self.negative else "" for p in batch.prompts]
        return [negatives, batch.prompts]

    def preview_negative(self, prompt: str, negative: str) -> str:
        """DreamArtist's previews: the prompt with NAME-neg for NAME as the negative (then the [preview]
        negative prompt, if any). Without the negative embedding the [preview] negative stays as it is."""
        if not self.negative or not _word(self.name).search(prompt):
            return negative
        return ", ".join(part for part in (negative_prompt_of(prompt, self.name), negative) if part)

    def guided(self, predictions: list[torch.Tensor], timesteps: torch.Tensor) -> torch.Tensor:
        """ε̂ (or v̂) = neg + s(t) · (pos − neg), in float32."""
        negative, positive = (p.float() for p in predictions)
        scale = self.cfg.at(timesteps, self.scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
        return negative + scale.to(negative.device) * (positive - negative)

    def loss(
        self, batch: TrainingBatch, predictions: list[torch.Tensor], target: torch.Tensor, timesteps
    ) -> tuple[torch.Tensor, torch.Tensor]:
        guided = self.guided(predictions, timesteps)
        per_sample = self.per_sample(batch, guided, target, timesteps)
        if self.reconstruction_weight > 0:
            per_sample = per_sample + self.reconstruction_weight * self.reconstruction(
                batch, guided, target, timesteps
            )
        return self.source_means(batch, per_sample)

    def reconstruction(self, batch: TrainingBatch, guided, target, timesteps) -> torch.Tensor:
        """Per-sample L1 between the image and x̂0 (from the guided prediction) decoded with gradients.

        x_t is not needed: with the true target, x̂0 = x0 + √(1−ᾱ)/√ᾱ · (ε − ε̂) for ε models and
        x̂0 = x0 − √(1−ᾱ) · (v̂ − v) for v models. The image is the decoded cached latent (the latents are what
        we keep; DreamArtist compares with the resized training picture, which differs by the VAE's error).
        """
        alphas = self.scheduler.alphas_cumprod.to(guided.device)[timesteps].float().view(-1, 1, 1, 1)
        x0 = batch.latents.float()
        if self.prediction_type == "epsilon":
            estimate = x0 + ((1 - alphas) / alphas).sqrt() * (target.float() - guided)
        else:
            estimate = x0 - (1 - alphas).sqrt() * (guided - target.float())
        vae = self.vae
        factor = vae.config.scaling_factor
        dtype = next(vae.parameters()).dtype
        decoded = vae.decode((estimate / factor).to(dtype)).sample.float()
        with torch.no_grad():
            image = vae.decode((x0 / factor).to(dtype)).sample.float()
        return F.l1_loss(decoded, image, reduction="none").mean(dim=(1, 2, 3))


class VectorEMA:
    """An exponential moving average of every vector of the set, updated after every optimizer update
    (DreamArtist: ema = ema · rate + live · (1 − rate)).

    mode "overwrite" is DreamArtist's: every `every` updates the live vectors become the average (they keep
    training from there). mode "copy" never touches the live vectors: the average is saved beside them as
    `NAME-ema` (and `NAME-ema-neg`), so the two can be compared.
    """

    def __init__(self, parameters: list[torch.Tensor], rate: float, mode: str, every: int) -> None:
        self.rate, self.mode, self.every = rate, mode, every
        self.average = [p.detach().clone() for p in parameters]

    def update(self, parameters: list[torch.Tensor], updates_done: int) -> None:
        with torch.no_grad():
            for average, live in zip(self.average, parameters, strict=True):
                average.mul_(self.rate).add_(live.detach(), alpha=1 - self.rate)
            if self.mode == "overwrite" and updates_done % self.every == 0:
                for average, live in zip(self.average, parameters, strict=True):
                    live.data.copy_(average)


def offset(blocks: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The negative's starting vectors: its init words plus N(0, 1e-3²) noise (DreamArtist's offset, so the
    two start apart), drawn from the run's seed so that two runs start alike."""
    generator = torch.Generator().manual_seed(seed + 7)
    return {k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype) * 1e-3 for k, v in blocks.items()}


def attach(trainer, cfg, point) -> None:
    """Hook DreamArtist's EMA of the vectors (when `cfg.ema_rate` > 0) onto a Trainer. With mode "copy" the
    average is saved at every save as `NAME-ema` (`NAME-ema-neg`) and a resumed run continues it from there;
    with mode "overwrite" a resumed run restarts the average from the resumed vectors."""
    if cfg.ema_rate <= 0:
        return
    members = list(trainer.embeddings)
    ema = VectorEMA(trainer.embeddings.parameters, cfg.ema_rate, cfg.ema_mode, cfg.ema_every)
    trainer.after_update.append(lambda updates: ema.update(trainer.embeddings.parameters, updates))
    trainer.ema = ema
    if cfg.ema_mode != "copy":
        return
    names = [ema_name(m.name) for m in members]
    if point is not None:
        run, fmt = trainer.run, point.source.suffix.lstrip(".")
        files = [run.step_file(point.step, fmt, name) for name in names]
        if all(f.is_file() for f in files):
            from library.embedding_set import blocks_from_file

            averages = [b for f in files for b in blocks_from_file(trainer.parts, f).values()]
            for average, saved in zip(ema.average, averages, strict=True):
                average.copy_(saved.to(average.device))

    def copies() -> dict[str, dict[str, torch.Tensor]]:
        averages = iter(ema.average)
        return {name: {k: next(averages) for k in m.blocks} for name, m in zip(names, members, strict=True)}

    trainer.extra_saves.append(copies)


def ema_name(name: str) -> str:
    """`NAME` -> `NAME-ema`, `NAME-neg` -> `NAME-ema-neg` (the copy's pair keeps DreamArtist's shape)."""
    if name.endswith(NEGATIVE_SUFFIX):
        return name.removesuffix(NEGATIVE_SUFFIX) + "-ema" + NEGATIVE_SUFFIX
    return name + "-ema"
