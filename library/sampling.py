"""Turn prompt encodings into images: samplers, seeded noise, classifier-free guidance, VAE decoding.

Used for training previews, dataset generation and validation sweeps. Everything is batched, and an
image depends only on its own prompt and seed, never on which batch it was drawn in:

- each seed has its own CPU `torch.Generator`; it draws the image's initial noise (float32, shape
  [C, H/f, W/f]) and, for ancestral samplers, the image's noise at every step. This is A1111's
  "RNG: CPU" scheme, so the initial noise equals A1111's for the same seed and size.
- the scheduler is built fresh for every call from the model's noise-schedule config, so sampling
  never disturbs the scheduler that training uses.
"""

from __future__ import annotations

import inspect
import secrets
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from PIL import Image

from library.errors import UserError

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


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: the knobs A1111's txt2img tab shows."""

    steps: int = 30
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler: str = "DPM++ 2M Karras"
    batch_size: int = 4
    # CUDA: replay the UNet as a CUDA graph per batch shape (same images, far fewer kernel launches)
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"steps = {self.steps}: sampling needs at least 1 step")
        if self.batch_size < 1:
            raise UserError(f"batch_size = {self.batch_size}: must be at least 1")
        if self.width < 1 or self.height < 1:
            raise UserError(f"size {self.width}x{self.height}: width and height must be positive")
        check_sampler(self.sampler)

    @classmethod
    def from_config(cls, table, default_size: tuple[int, int] = (512, 512)) -> SampleSettings:
        """From a config table with steps, cfg_scale, width, height, sampler, batch_size (0 = default size)."""
        return cls(
            steps=table.steps,
            cfg_scale=table.cfg_scale,
            width=table.width or default_size[0],
            height=table.height or default_size[1],
            sampler=table.sampler,
            batch_size=table.batch_size,
        )


class PromptEncoder(Protocol):
    """What `generate` needs from a prompt encoder (library/prompts.py provides one)."""

    def encode_pair(self, prompts: list[str], negatives: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


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


def _latent_shape(settings: SampleSettings, channels: int, factor: int) -> tuple[int, int, int]:
    if settings.width % factor or settings.height % factor:
        raise UserError(
            f"size {settings.width}x{settings.height}: width and height must be multiples of {factor}"
        )
    return (channels, settings.height // factor, settings.width // factor)


def _match_batch(cond: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """Let one encoding serve a whole batch (one prompt, many seeds)."""
    if cond.shape[0] == n:
        return cond
    if cond.shape[0] == 1:
        return cond.expand(n, *cond.shape[1:])
    raise ValueError(f"{what} has batch {cond.shape[0]} but there are {n} seeds")


class _GraphedForward:
    """One UNet forward captured as a CUDA graph for one input shape, replayed with new inputs copied in."""

    def __init__(self, unet, latents, t, context) -> None:
        self.latents, self.t, self.context = latents.clone(), t.clone(), context.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: lazy kernel loading and library workspaces happen here
            for _ in range(2):
                unet(self.latents, self.t, encoder_hidden_states=self.context)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = unet(self.latents, self.t, encoder_hidden_states=self.context).sample

    def __call__(self, latents, t, context) -> torch.Tensor:
        self.latents.copy_(latents)
        self.t.copy_(t)
        self.context.copy_(context)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites `out`


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # unet -> {input shapes: _GraphedForward}
_MAX_GRAPHS = 3  # per UNet; each holds its own activation memory


def _unet(unet, latents, t, context, graphs: bool) -> torch.Tensor:
    """unet(latents, t, context).sample, replayed from a CUDA graph where `graphs` is on and room is left."""
    if graphs and latents.is_cuda and torch.is_tensor(t):
        t = t.to(latents.device)
        # The weights' address too: a graph replays the memory it was captured on (a moved UNet is recaptured).
        weights = next(unet.parameters()).data_ptr()
        key = (weights, latents.shape, latents.dtype, t.shape, t.dtype, context.shape, context.dtype)
        cache = _GRAPHS.setdefault(unet, {})
        if key not in cache and len(cache) < _MAX_GRAPHS:
            cache[key] = _GraphedForward(unet, latents, t, context)
        if key in cache:
            return cache[key](latents, t, context)
    return unet(latents, t, encoder_hidden_states=context).sample


def _guided_prediction(
    unet, latents, t, cond, uncond, cfg_scale: float, graphs: bool = False
) -> torch.Tensor:
    """The UNet's output under classifier-free guidance, in float32."""
    dtype = unet.dtype
    if cfg_scale == 1:
        # uncond + 1 * (cond - uncond) is cond: skip the unconditional half.
        return _unet(unet, latents.to(dtype), t, cond.to(dtype), graphs).float()
    if cond.shape[1:] == uncond.shape[1:]:
        both = _unet(
            unet, torch.cat([latents, latents]).to(dtype), t, torch.cat([uncond, cond]).to(dtype), graphs
        ).float()
        out_uncond, out_cond = both.chunk(2)
    else:
        # Prompts of different chunk counts cannot share one call (A1111 then runs them apart too).
        out_uncond = _unet(unet, latents.to(dtype), t, uncond.to(dtype), graphs).float()
        out_cond = _unet(unet, latents.to(dtype), t, cond.to(dtype), graphs).float()
    return out_uncond + cfg_scale * (out_cond - out_uncond)


def sample_latents(
    unet,
    scheduler_config: dict,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    seeds: list[int],
    settings: SampleSettings,
    *,
    latent_channels: int = 4,
    vae_scale_factor: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise one batch: image i starts from seeds[i]; returns float32 latents [len(seeds), C, h, w].

    `cond`/`uncond` are text encodings [batch or 1, tokens, width]; the prediction type (epsilon or
    v-prediction) comes from `scheduler_config`. `progress(done, total)` is called after every step.
    The latents stay float32 between steps; only the UNet's inputs are cast to its dtype.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("sample_latents needs at least one seed")
    device = next(unet.parameters()).device
    shape = _latent_shape(settings, latent_channels, vae_scale_factor)
    cond = _match_batch(cond, len(seeds), "cond").to(device)
    uncond = _match_batch(uncond, len(seeds), "uncond").to(device)

    scheduler = build_scheduler(settings.sampler, scheduler_config)
    scheduler.set_timesteps(settings.steps, device=device)
    # Ancestral samplers draw fresh noise every step, from each image's own generator.
    step_takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    generators = _generators(seeds)

    with torch.inference_mode():
        latents = _draw(generators, shape).to(device) * scheduler.init_noise_sigma
        total = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(latents, t)
            prediction = _guided_prediction(
                unet, model_input, t, cond, uncond, settings.cfg_scale, settings.cuda_graphs
            )
            extra = {"generator": generators} if step_takes_generator else {}
            latents = scheduler.step(prediction, t, latents, **extra).prev_sample
            if progress is not None:
                progress(i + 1, total)
    return latents


def decode_images(vae, latents: torch.Tensor) -> list[Image.Image]:
    """Decode latents to RGB images, one at a time (memory stays flat; batch-mates cannot interact)."""
    scale = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    device = next(vae.parameters()).device
    images = []
    with torch.inference_mode():
        for latent in latents:
            z = (latent[None].float() / scale + shift).to(device=device, dtype=vae.dtype)
            pixels = vae.decode(z).sample[0].float()
            pixels = ((pixels + 1) / 2).clamp(0, 1)
            array = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
            images.append(Image.fromarray(np.ascontiguousarray(array), mode="RGB"))
    return images


def generate(
    parts,
    prompt_encoder: PromptEncoder,
    prompts: list[str],
    negatives: list[str],
    seeds: list[int],
    settings: SampleSettings,
) -> list[Image.Image]:
    """Generate one image per (prompt, negative, seed), in batches of `settings.batch_size`.

    `parts` is a `library.models.SDParts`. Image i uses seeds[i] exactly as given (resolve -1 and apply
    A1111's seed + i before calling), and is the same whatever the batch size.
    """
    if not (len(prompts) == len(negatives) == len(seeds)):
        raise ValueError(
            f"generate needs one prompt, negative and seed per image; got {len(prompts)}, "
            f"{len(negatives)} and {len(seeds)}"
        )
    factor = vae_scale_factor(parts.vae)
    channels = parts.unet.config.in_channels
    scheduler_config = dict(parts.noise_scheduler.config)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), settings.batch_size):
        end = start + settings.batch_size
        with torch.inference_mode():
            cond, uncond = prompt_encoder.encode_pair(list(prompts[start:end]), list(negatives[start:end]))
        latents = sample_latents(
            parts.unet,
            scheduler_config,
            cond,
            uncond,
            list(seeds[start:end]),
            settings,
            latent_channels=channels,
            vae_scale_factor=factor,
        )
        images.extend(decode_images(parts.vae, latents))
    return images
