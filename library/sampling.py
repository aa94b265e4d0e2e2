"""Turn prompt encodings into images: samplers, seeded noise, classifier-free guidance, VAE decoding.

Used for training previews, dataset generation and validation sweeps. Everything is batched, and an
image depends only on its own prompt and seed, never on which batch it was drawn in:

- each seed has its own CPU `torch.Generator`; it draws the image's initial noise (float32, shape
  [C, H/f, W/f]) and, for ancestral samplers, the image's noise at every step. This is A1111's
  "RNG: CPU" scheme, so the initial noise equals A1111's for the same seed and size.
- the scheduler is built fresh for every call from the model's noise-schedule config, so sampling
  never disturbs the scheduler that training uses.

The sampler's settings are the config's own table (library/tables.SamplerSettings: steps, CFG scale,
sampler, size), declared once for previews, generation and sweeps.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from PIL import Image

from library.conditioning import Conditioner, Conditioning
from library.denoiser import predict, render_size_ids
from library.errors import UserError
from library.tables import SamplerSettings

# A1111 draws random seeds with random.randrange(4294967294): [0, 2**32 - 2).
SEED_RANGE = 4294967294

# k-diffusion (which A1111's samplers come from) spreads the steps evenly over the whole trained range
# of timesteps; diffusers' SD default ("leading") never starts at the noisiest timestep. Karras sigmas
# always span the whole range, whatever the spacing.
_KDIFF = {"timestep_spacing": "linspace"}

# A1111 display name -> (scheduler class, options laid over the model's noise-schedule config).
SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "DPM++ 2M Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DPM++ 2M": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False, **_KDIFF},
    ),
    "Euler a": (EulerAncestralDiscreteScheduler, dict(_KDIFF)),
    "Euler": (EulerDiscreteScheduler, dict(_KDIFF)),
    # CompVis DDIM ends on alphas_cumprod[0], not on a clean alpha of 1; its steps are "leading".
    "DDIM": (DDIMScheduler, {"set_alpha_to_one": False, "timestep_spacing": "leading"}),
}


def check_sampler(name: str) -> str:
    """Return `name` if it is a known sampler, else raise UserError listing the valid names."""
    if name not in SAMPLERS:
        valid = ", ".join(f'"{n}"' for n in SAMPLERS)
        raise UserError(f"unknown sampler {name!r}; use one of {valid}")
    return name


def build_scheduler(sampler: str, scheduler_config: dict):
    """A new diffusers scheduler for an A1111 sampler name, on the model's noise schedule.

    `scheduler_config` is the model's scheduler config (betas, prediction_type, ...); the sampler's own
    options override it.
    """
    cls, options = SAMPLERS[check_sampler(sampler)]
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return cls.from_config({**config, **options})


def resolve_seed(seed: int) -> int:
    """A1111's rule: -1 means a fresh random seed in [0, 4294967294); any other seed is kept."""
    seed = int(seed)
    if seed == -1:
        # Not the `random` module: training may have seeded it, and "random" must stay random.
        return secrets.randbelow(SEED_RANGE)
    if seed < 0:
        raise UserError(f"seed = {seed}: use -1 for a random seed or a non-negative integer")
    return seed


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def _draw(generators: list[torch.Generator], shape: tuple[int, int, int]) -> torch.Tensor:
    # One draw per image keeps every image's noise independent of its batch-mates.
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])


def initial_noise(
    seeds: list[int], shape: tuple[int, int, int], device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Initial latents [len(seeds), *shape]: float32 noise from one CPU generator per seed, then moved.

    Drawing on the CPU makes a seed give the same noise on every device and in every batch size.
    """
    return _draw(_generators(seeds), shape).to(device=device, dtype=dtype)


def vae_scale_factor(vae) -> int:
    """How many pixels one latent cell spans (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _latent_shape(settings: SamplerSettings, channels: int, factor: int) -> tuple[int, int, int]:
    if settings.width % factor or settings.height % factor:
        raise UserError(
            f"size {settings.width}x{settings.height}: width and height must be multiples of {factor}"
        )
    return (channels, settings.height // factor, settings.width // factor)


def _guided_prediction(
    parts, latents, t, cond: Conditioning, uncond: Conditioning, cfg_scale: float, time_ids, graphs: bool
) -> torch.Tensor:
    """The UNet's output under classifier-free guidance, in float32."""
    family, unet, dtype = parts.family, parts.unet, parts.unet_dtype
    if cfg_scale == 1:
        # uncond + 1 * (cond - uncond) is cond: skip the unconditional half.
        return predict(unet, family, latents.to(dtype), t, cond.to(dtype), time_ids, graphs).float()
    if cond.context.shape[1:] == uncond.context.shape[1:]:
        both = Conditioning.cat([uncond, cond]).to(dtype)
        twice = None if time_ids is None else torch.cat([time_ids, time_ids])
        out = predict(unet, family, torch.cat([latents, latents]).to(dtype), t, both, twice, graphs).float()
        out_uncond, out_cond = out.chunk(2)
    else:
        # Prompts of different chunk counts cannot share one call (A1111 then runs them apart too).
        out_uncond = predict(unet, family, latents.to(dtype), t, uncond.to(dtype), time_ids, graphs).float()
        out_cond = predict(unet, family, latents.to(dtype), t, cond.to(dtype), time_ids, graphs).float()
    return out_uncond + cfg_scale * (out_cond - out_uncond)


def sample_latents(
    parts,
    cond: Conditioning,
    uncond: Conditioning,
    seeds: list[int],
    settings: SamplerSettings,
    *,
    graphs: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise one batch: image i starts from seeds[i]; returns float32 latents [len(seeds), C, h, w].

    `cond`/`uncond` are the prompts' conditionings (batch 1 serves every seed); the prediction type (epsilon
    or v) comes from the model's noise schedule; SDXL gets the size ids of an uncropped picture of the size.
    `graphs` replays the UNet from CUDA graphs on a GPU (the same images, far fewer kernel launches).
    `progress(done, total)` is called after every step. The latents stay float32 between steps; only the
    UNet's inputs are cast to its dtype.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("sample_latents needs at least one seed")
    unet = parts.unet
    device = next(unet.parameters()).device
    shape = _latent_shape(settings, unet.config.in_channels, vae_scale_factor(parts.vae))
    cond, uncond = cond.expand(len(seeds)), uncond.expand(len(seeds))
    time_ids = None
    if parts.family.size_conditioning:
        time_ids = render_size_ids(settings.height, settings.width, len(seeds), device).to(parts.unet_dtype)

    scheduler = build_scheduler(settings.sampler, dict(parts.noise_scheduler.config))
    scheduler.set_timesteps(settings.steps, device=device)
    # Ancestral samplers draw fresh noise every step, from each image's own generator.
    step_takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    generators = _generators(seeds)

    with torch.inference_mode():
        cond, uncond = _on(cond, device), _on(uncond, device)
        latents = _draw(generators, shape).to(device) * scheduler.init_noise_sigma
        total = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(latents, t)
            prediction = _guided_prediction(
                parts, model_input, t, cond, uncond, settings.cfg_scale, time_ids, graphs
            )
            extra = {"generator": generators} if step_takes_generator else {}
            latents = scheduler.step(prediction, t, latents, **extra).prev_sample
            if progress is not None:
                progress(i + 1, total)
    return latents


def _on(cond: Conditioning, device) -> Conditioning:
    return Conditioning(cond.context.to(device), None if cond.pooled is None else cond.pooled.to(device))


# Images the VAE decodes at once: 2 at 512², 1 at 1024². Measured on an H200 (SD1.5 VAE, float32, 512²):
# 1 / 2 / 4 / 8 at once 34.4 / 28.5 / 24.4 / 22.4 ms an image, needing 1.2 / 2.0 / 4.0 / 8.0 GiB more.
DECODE_PIXELS = 2 * 512 * 512


def decode_images(vae, latents: torch.Tensor) -> list[Image.Image]:
    """Decode latents to RGB images, a few at a time (DECODE_PIXELS; the VAE's norms are per image, so
    batch-mates cannot interact)."""
    scale = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    weight = next(vae.parameters())  # its device and dtype (diffusers' `vae.dtype` walks every module)
    pixels_each = latents.shape[-2] * latents.shape[-1] * vae_scale_factor(vae) ** 2
    images = []
    with torch.inference_mode():
        for chunk in latents.split(max(1, DECODE_PIXELS // pixels_each)):
            z = (chunk.float() / scale + shift).to(device=weight.device, dtype=weight.dtype)
            pixels = ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)
            arrays = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
            images.extend(Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in arrays)
    return images


def generate(
    parts,
    conditioner: Conditioner,
    prompts: list[str],
    negatives: list[str],
    seeds: list[int],
    settings: SamplerSettings,
    *,
    batch_size: int = 4,
    graphs: bool = True,
) -> list[Image.Image]:
    """Generate one image per (prompt, negative, seed), `batch_size` at a time.

    `parts` is a `library.parts.SDParts`. Image i uses seeds[i] exactly as given (resolve -1 and apply
    A1111's seed + i before calling), and is the same whatever the batch size.
    """
    if not (len(prompts) == len(negatives) == len(seeds)):
        raise ValueError(
            f"generate needs one prompt, negative and seed per image; got {len(prompts)}, "
            f"{len(negatives)} and {len(seeds)}"
        )
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        with torch.inference_mode():
            cond, uncond = conditioner.encode_pair(list(prompts[start:end]), list(negatives[start:end]))
        latents = sample_latents(parts, cond, uncond, list(seeds[start:end]), settings, graphs=graphs)
        images.extend(decode_images(parts.vae, latents))
    return images
