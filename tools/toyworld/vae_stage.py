"""Stage 2: the VAE. Trained for a fixed time on reconstruction, then its latents are re-centred and re-scaled
inside the weights so that SD1's scaling factor 0.18215 is exactly 1/std of its latents (any SD1 tool then
decodes it right). `finetune-decoder` later sharpens the decoder alone, keeping the latent space."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from library import toy

from .models import SCALE, bf16, fp16_state, log, read_parts
from .storage import save_weights


def _cosine(high: float, low: float, progress: float) -> float:
    """A cosine from `high` to `low` as `progress` runs from 0 to 1 (these stages run for a time, not a
    number of steps, so library.schedules, which counts steps, does not fit)."""
    return low + 0.5 * (high - low) * (1 + math.cos(math.pi * min(1.0, progress)))


def _reconstruction_loss(diff: torch.Tensor) -> torch.Tensor:
    """L1 + MSE + half the L1 of the image gradients (for crisp edges) of `recon - images`."""
    dy = (diff[..., 1:, :] - diff[..., :-1, :]).abs().mean()
    dx = (diff[..., 1:] - diff[..., :-1]).abs().mean()
    return diff.abs().mean() + diff.square().mean() + 0.5 * (dy + dx)


def train_vae(
    vae: AutoencoderKL, device: str, seconds: float, batch: int, seed: int, eval_n: int = 4096, crop: int = 64
) -> dict:
    """Reconstruction (L1 + MSE + L1 of image gradients, for crisp edges) with a tiny KL term, for a
    fixed time, cosine learning rate by elapsed time. `crop` < 64 trains on random crops (the VAE is
    convolutional: edges look the same in a crop, at a fraction of the cost; for CPU runs)."""
    gen = torch.Generator(device).manual_seed(seed)
    vae.to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99))
    started, step = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - started) < seconds:
        for group in optimizer.param_groups:
            group["lr"] = _cosine(1e-3, 1e-4, elapsed / seconds)
        images = toy.draw(toy.sample_scenes(batch, gen), gen)
        if crop < toy.SIZE:
            y, x = torch.randint(0, toy.SIZE - crop + 1, (2,), generator=gen, device=device).tolist()
            images = images[..., y : y + crop, x : x + crop]
        with bf16(device):
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample.float()
        loss = _reconstruction_loss(recon - images) + 1e-8 * posterior.kl().float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 500 == 0:
            log(f"vae step {step}: loss {loss.item():.4f}")
        step += 1
    vae.eval().requires_grad_(False)
    report = rescale_latents(vae, device, seed + 1, eval_n)
    report.update(steps=step, batch=batch, seconds=round(time.perf_counter() - started, 1))
    return report


@torch.no_grad()
def rescale_latents(vae: AutoencoderKL, device: str, seed: int, n: int = 4096) -> dict:
    """Bake a per-channel shift and scale into quant_conv / post_quant_conv so that the latent means are
    zero-mean with std 1/0.18215: the decoder sees exactly the same input, and SD1's scaling factor fits."""
    gen = torch.Generator(device).manual_seed(seed)
    chunk = min(n, 512)
    images = torch.cat([toy.draw(toy.sample_scenes(chunk, gen), gen) for _ in range(n // chunk)])
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(512)])
    mu = means.mean(dim=(0, 2, 3))
    k = (1 / SCALE) / means.std(dim=(0, 2, 3))
    c = len(mu)
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] *= k.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mu) * k
    q.bias[c:] += 2 * torch.log(k)
    p.bias += (p.weight[:, :, 0, 0] * mu).sum(1)
    p.weight /= k.view(1, -1, 1, 1)
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(512)]) * SCALE
    recon = torch.cat([vae.decode(z / SCALE).sample for z in latents.split(512)])
    return {
        "latent_std_before": [round(float(s), 4) for s in (1 / SCALE) / k],
        "scaled_latent_std": round(float(latents.std()), 4),
        "recon_mae_0_255": round(float((recon - images).abs().mean() * 127.5), 3),
    }


def finetune_decoder(
    vae: AutoencoderKL, device: str, seconds: float, batch: int, seed: int, crop: int = 64
) -> dict:
    """Train only the decoder (and post_quant_conv) on the frozen encoder's latent means: sharper pictures
    without moving the latent space a trained UNet relies on. `crop` (a multiple of 4) as in train_vae."""
    gen = torch.Generator(device).manual_seed(seed)
    vae.to(device).eval().requires_grad_(False)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for param in decoder:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder, lr=3e-4, weight_decay=0.0, betas=(0.9, 0.99))
    started, step, f = time.perf_counter(), 0, 4
    while (elapsed := time.perf_counter() - started) < seconds:
        for group in optimizer.param_groups:
            group["lr"] = _cosine(3e-4, 3e-5, elapsed / seconds)
        images = toy.draw(toy.sample_scenes(batch, gen), gen)
        with torch.no_grad():
            z = vae.encode(images).latent_dist.mean
        if crop < toy.SIZE:  # crop on the latent grid so every pixel keeps its latent cells
            y, x = (
                f * torch.randint(0, (toy.SIZE - crop) // f + 1, (2,), generator=gen, device=device)
            ).tolist()
            images, z = (
                images[..., y : y + crop, x : x + crop],
                z[..., y // f : (y + crop) // f, x // f : (x + crop) // f],
            )
        loss = _reconstruction_loss(vae.decode(z).sample.float() - images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            log(f"decoder step {step}: loss {loss.item():.4f}")
        step += 1
    vae.requires_grad_(False)
    with torch.no_grad():
        images = toy.draw(toy.sample_scenes(256, gen), gen)
        recon = vae.decode(vae.encode(images).latent_dist.mean).sample
    return {
        "steps": step,
        "batch": batch,
        "recon_mae_0_255": round(float((recon - images).abs().mean() * 127.5), 3),
    }


def cmd_finetune_decoder(args) -> None:
    """Sharpen the VAE decoder of a parts folder; writes a new vae.safetensors (fp16) to --output."""
    (vae,) = read_parts(Path(args.parts), ["vae"])
    report = finetune_decoder(vae, args.device, args.seconds, args.batch, args.seed, args.crop)
    save_weights(Path(args.output), fp16_state(vae))
    log("decoder", report)
