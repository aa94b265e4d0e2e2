#!/usr/bin/env python3
"""Build the embedded toy model (`builtin:toy`): a tiny SD 1.x model that has learned the toy world.

Stages (each resumes; library/toy.py renders the world and holds the scorer):
  1. the scorer CNN (a subprocess, in parallel with 2);
  2. the VAE, then its latents are re-centred and re-scaled inside the weights so that SD1's
     scaling factor 0.18215 is exactly 1/std of its latents (any SD1 tool then decodes it right);
  3. the UNet and the CLIP text encoder together, from scratch, on a bank of encoded pictures;
  4. export (EMA weights, fp16) and an evaluation with the scorer.

On the GPU machine, where one call lasts at most 10 minutes, the trainer runs in its own session so that it
outlives the first call (the committed model: H100, 1,100 s, 9,563 steps of batch 1,024):
    mkdir -p /tmp/toy && setsid nohup python tools/toy_world.py train --work /tmp/toy --budget-s 1100 --final \
        --vae-seconds 120 > /tmp/toy/train.log 2>&1 &
    python tools/toy_world.py collect --work /tmp/toy --out $OUT --snapshot-at 505   # call 1: a snapshot
    python tools/toy_world.py collect --work /tmp/toy --out $OUT --max-wait 585      # call 2: the fp16 parts
A machine lost between calls: `train --work /tmp/toy --resume-from SNAPSHOT --budget-s 560 --final`.
A scorer.safetensors already in --work is kept (the committed one: `scorer --device cpu --steps 1500 --batch 64`).
Then, on any machine, from the fp16 parts:
    python tools/toy_world.py assemble --parts PARTS [--diffusers DIR]  # -> library/assets/toy/toy-sd1.safetensors
    python tools/toy_world.py evaluate --per-combo 32                  # sample accuracy with the scorer
    python tools/toy_world.py samples-grid --output docs/toy_samples.png  # its first 2 samples, labelled
    python tools/toy_world.py ti-eval --run output/demo --concept "orange star"
    python tools/toy_world.py dataset --concept "orange star" --out "dataset_layouts/demo/10_d3mo star"
    python tools/toy_world.py preview-grid --run output/demo --output docs/toy_demo.png
A CPU smoke run of everything: `python tools/toy_world.py train --work /tmp/t --tiny --final`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# isort: off
import library  # noqa: E402, F401  (first: it settles how the dependencies behave)

# isort: on
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from library import toy  # noqa: E402
from library.conditioning import Conditioner  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.families import ASSETS, FAMILIES  # noqa: E402
from library.parts import SDParts, load_tokenizer  # noqa: E402
from library.prompts import PromptTokenizer  # noqa: E402
from library.tables import SamplerSettings  # noqa: E402

SD1 = ASSETS / "configs" / "sd1"
SCALE = 0.18215  # SD1's VAE scaling factor; the toy VAE is re-scaled to make it exact
SHARD_BYTES = 15_000_000  # a device call brings back files of at most 16 MiB
# Caption mix: full caption, colour only, shape only, `a photo of a shape`, empty (for CFG).
CAPTION_MIX = (0.6, 0.1, 0.1, 0.1, 0.1)
NO_BACKGROUND = 0.3  # share of captions without ", neutral gray background"
EVAL_SEED = 1000  # the evaluation's first seed; docs/toy_samples.png shows its samples
GRID_MARGIN = 4  # pixels between the shape columns of the samples grid


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# --------------------------------------------------------------------------------------------------
# The model: SD 1.x classes and configs, few channels


def _sd1(part: str) -> dict:
    return {
        k: v for k, v in json.loads((SD1 / part / "config.json").read_text()).items() if not k.startswith("_")
    }


def unet_config() -> dict:
    """SD1's UNet layout (3 cross-attention levels, 1 plain), channels (64, 96, 96, 96), 1 layer each."""
    return dict(
        _sd1("unet"),
        block_out_channels=[64, 96, 96, 96],
        layers_per_block=1,
        cross_attention_dim=64,
        sample_size=16,
    )


def vae_config() -> dict:
    """SD1's AutoencoderKL with 3 levels (32, 64, 64): 64x64 pictures -> 16x16x4 latents."""
    return dict(
        _sd1("vae"),
        block_out_channels=[32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=SCALE,
    )


def text_config() -> dict:
    """A CLIP text encoder 64 wide, 4 layers, over the full 49,408-token vocabulary."""
    return dict(
        _sd1("text_encoder"),
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=1,
        num_hidden_layers=4,
        projection_dim=64,
    )


def build_models(seed: int, tiny: bool = False, unet_channels: list[int] | None = None):
    """Freshly initialised UNet, text encoder and VAE (on the CPU, so a seed gives the same weights anywhere)."""
    torch.manual_seed(seed)
    u, v, t = unet_config(), vae_config(), text_config()
    if unet_channels:
        u.update(block_out_channels=unet_channels)
    if tiny:  # CPU smoke runs: same code paths, a fraction of the work
        u.update(block_out_channels=[32, 32, 32, 32])
        v.update(block_out_channels=[32, 32, 32])
    text = CLIPTextConfig.from_dict(t)
    return UNet2DConditionModel.from_config(u), CLIPTextModel(text), AutoencoderKL.from_config(v)


# --------------------------------------------------------------------------------------------------
# Saving and loading states in shards small enough to come back from a device call


def save_shards(tensors: dict[str, torch.Tensor], folder: Path, meta: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shard, size, index = {}, 0, 0
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        if shard and size + value.nbytes > SHARD_BYTES:
            save_file(shard, tmp / f"state-{index}.safetensors")
            shard, size, index = {}, 0, index + 1
        shard[key], size = value, size + value.nbytes
    save_file(shard, tmp / f"state-{index}.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_shards(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    for file in sorted(folder.glob("state-*.safetensors")):
        tensors.update(load_file(file))
    return tensors, json.loads((folder / "state.json").read_text())


def prefixed(prefix: str, tensors: dict) -> dict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------
# Stage 1: the scorer


def train_scorer(
    work: Path, device: str, steps: int, batch: int, seed: int, eval_n: int = 4096, width: int = 16
) -> dict:
    """Train the scorer on fresh pictures every step: the world (all 36 combinations, with more jitter,
    noise and slight blur than the world has) and pictures with no clear shape."""
    gen = torch.Generator(device).manual_seed(seed)
    torch.manual_seed(seed)
    scorer = toy.ShapeClassifier(width).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    n_none = batch // 5
    shape_ids = len(toy.SHAPES)
    started = time.perf_counter()
    for step in range(steps):
        images, colours, shapes = _scorer_batch(batch - n_none, n_none, gen)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            colour_logits, shape_logits = scorer(images.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(colour_logits.float(), colours, ignore_index=-1) + F.cross_entropy(
            shape_logits.float(), shapes
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"scorer step {step}: loss {loss.item():.4f}")
    scorer.eval()
    save_file(
        {k: v.float().cpu().contiguous() for k, v in scorer.state_dict().items()}, work / "scorer.safetensors"
    )
    report = scorer_accuracy(scorer, device, seed + 1, eval_n)
    report.update(
        steps=steps, batch=batch, seconds=round(time.perf_counter() - started, 1), shape_classes=shape_ids + 1
    )
    (work / "scorer.json").write_text(json.dumps(report, indent=1))
    log("scorer", report)
    return report


def _scorer_batch(n_world: int, n_none: int, gen: torch.Generator):
    device = gen.device
    scenes = toy.sample_scenes(
        n_world,
        gen,
        pairs=toy.combinations(include_held_out=True),
        colour_jitter=25,
        noise=(0.5, 8.0),
        background_jitter=15,
    )
    world = toy.draw(scenes, gen)
    soft = torch.rand(n_world, generator=gen, device=device) < 0.4
    sigma = torch.where(
        soft, 1.2 * torch.rand(n_world, generator=gen, device=device), torch.zeros(n_world, device=device)
    )
    world = toy.blur(world, sigma)
    none, none_colour = toy.draw_without_shape(n_none, gen)
    images = torch.cat([world, none])
    colours = torch.cat([scenes.colour, none_colour])
    shapes = torch.cat([scenes.shape, torch.full((n_none,), len(toy.SHAPES), device=device)])
    return images, colours, shapes


@torch.no_grad()
def scorer_accuracy(scorer, device: str, seed: int, n: int) -> dict:
    """Accuracy on fresh ground truth (all combinations, the world's own jitter) and on no-shape pictures."""
    gen = torch.Generator(device).manual_seed(seed)
    scorer.eval()
    scenes = toy.sample_scenes(n, gen, pairs=toy.combinations(include_held_out=True))
    found = toy.classify(toy.draw(scenes, gen), scorer)
    truth = [
        (list(toy.COLOURS)[c], toy.SHAPES[s])
        for c, s in zip(scenes.colour.tolist(), scenes.shape.tolist(), strict=True)
    ]
    none, _ = toy.draw_without_shape(n // 2, gen)
    said = toy.classify(none, scorer)
    return {
        "ground_truth_both": sum(a == b for a, b in zip(found, truth, strict=True)) / n,
        "ground_truth_colour": sum(a[0] == b[0] for a, b in zip(found, truth, strict=True)) / n,
        "ground_truth_shape": sum(a[1] == b[1] for a, b in zip(found, truth, strict=True)) / n,
        "no_shape_said": sum(s == toy.NO_SHAPE for _, s in said) / len(said),
    }


# --------------------------------------------------------------------------------------------------
# Stage 2: the VAE


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
            group["lr"] = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * min(1.0, elapsed / seconds)))
        images = toy.draw(toy.sample_scenes(batch, gen), gen)
        if crop < toy.SIZE:
            y, x = torch.randint(0, toy.SIZE - crop + 1, (2,), generator=gen, device=device).tolist()
            images = images[..., y : y + crop, x : x + crop]
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample.float()
        diff = recon - images
        edges = (diff[..., 1:, :] - diff[..., :-1, :]).abs().mean() + (
            diff[..., 1:] - diff[..., :-1]
        ).abs().mean()
        loss = diff.abs().mean() + diff.square().mean() + 0.5 * edges + 1e-8 * posterior.kl().float().mean()
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
            group["lr"] = 3e-5 + 0.5 * (3e-4 - 3e-5) * (1 + math.cos(math.pi * min(1.0, elapsed / seconds)))
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
        diff = vae.decode(z).sample.float() - images
        edges = (diff[..., 1:, :] - diff[..., :-1, :]).abs().mean() + (
            diff[..., 1:] - diff[..., :-1]
        ).abs().mean()
        loss = diff.abs().mean() + diff.square().mean() + 0.5 * edges
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


# --------------------------------------------------------------------------------------------------
# Stage 3: UNet and text encoder


class Bank:
    """Encoded pictures of the world (scaled latents, bf16) with their colour and shape; a slice is
    re-rendered now and then so the data keeps changing."""

    def __init__(self, vae, size: int, gen: torch.Generator, chunk: int) -> None:
        self.vae, self.gen, self.chunk, self.next = vae, gen, chunk, 0
        device = gen.device
        self.latents = torch.empty((size, 4, 16, 16), dtype=torch.bfloat16, device=device)
        self.colour = torch.empty(size, dtype=torch.long, device=device)
        self.shape = torch.empty(size, dtype=torch.long, device=device)
        for _ in range(0, size, chunk):
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        start = self.next
        end = min(start + self.chunk, len(self.latents))
        scenes = toy.sample_scenes(end - start, self.gen)
        images = toy.draw(scenes, self.gen)
        with torch.autocast(
            device_type=self.gen.device.type, dtype=torch.bfloat16, enabled=self.gen.device.type != "cpu"
        ):
            latents = self.vae.encode(images).latent_dist.mean.float() * SCALE
        self.latents[start:end] = latents.to(torch.bfloat16)
        self.colour[start:end], self.shape[start:end] = scenes.colour, scenes.shape
        self.next = end % len(self.latents)


def caption_table(tokenizer, text_encoder, device) -> tuple[torch.Tensor, list[str]]:
    """Token ids [289, 77] of every training caption, as the library's PromptTokenizer tokenizes them:
    row ((kind * 2 + no_background) * 6 + colour) * 6 + shape for kinds full / colour / shape / none,
    and the last row for the empty caption."""
    encoder = PromptTokenizer(tokenizer)
    texts = []
    for kind in range(4):
        for no_background in (0, 1):
            for colour in toy.COLOURS:
                for shape in toy.SHAPES:
                    texts.append(
                        toy.caption(
                            colour if kind in (0, 1) else None,
                            shape if kind in (0, 2) else None,
                            not no_background,
                        )
                    )
    texts.append("")
    ids = [encoder.tokenize_line(text)[0].tokens for text in texts]
    return torch.tensor(ids, dtype=torch.long, device=device), texts


class DiffusionTrainer:
    """Joint UNet + text-encoder training; one step is free of host syncs so it can run as a CUDA graph."""

    def __init__(self, unet, text_encoder, vae, tokenizer, args, device: str) -> None:
        self.device, self.args = device, args
        self.unet, self.text_encoder = unet.to(device).train(), text_encoder.to(device).train()
        for module in (self.unet, self.text_encoder):
            module.requires_grad_(True)
        self.ema_unet = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).eval().requires_grad_(False)
        self.params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.ema_params = [*self.ema_unet.parameters(), *self.ema_text.parameters()]
        cuda = device.startswith("cuda")
        self.lr = torch.tensor(args.lr, device=device) if cuda else args.lr
        # No weight decay: rows of the token table that no caption uses must stay as they were.
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=self.lr,
            betas=(0.9, 0.99),
            weight_decay=0.0,
            **(dict(fused=True, capturable=True) if cuda else {}),
        )
        self.captions, _ = caption_table(tokenizer, text_encoder, device)
        self.used_tokens = torch.unique(self.captions).cpu()
        scheduler = DDPMScheduler(**FAMILIES["sd1"].scheduler_config)
        alphas = scheduler.alphas_cumprod.to(device)
        self.sqrt_alpha, self.sqrt_sigma = alphas.sqrt(), (1 - alphas).sqrt()
        snr = alphas / (1 - alphas)
        self.snr_weight = snr.clamp(max=args.min_snr_gamma) / snr  # Min-SNR weighting (epsilon target)
        self.mix = torch.tensor(CAPTION_MIX, device=device).cumsum(0)[:-1]
        self.gen = torch.Generator(device).manual_seed(args.seed + 17)
        self.bank = Bank(vae.to(device), args.bank, self.gen, min(args.bank, 8192 if cuda else 512))
        self.step, self.samples, self.graph = 0, 0, None
        self.loss_sum = torch.zeros((), device=device)

    def loss(self) -> torch.Tensor:
        b, dev, bank = self.args.batch, self.device, self.bank
        index = torch.randint(0, len(bank.latents), (b,), device=dev)
        x0 = bank.latents[index].float()
        colour, shape = bank.colour[index], bank.shape[index]
        u = torch.rand(b, 2, device=dev)
        kind = (u[:, :1] > self.mix).sum(1)
        row = ((kind.clamp(max=3) * 2 + (u[:, 1] < NO_BACKGROUND).long()) * 6 + colour) * 6 + shape
        ids = self.captions[torch.where(kind == 4, len(self.captions) - 1, row)]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (b,), device=dev)
        noisy = self.sqrt_alpha[t].view(-1, 1, 1, 1) * x0 + self.sqrt_sigma[t].view(-1, 1, 1, 1) * noise
        with torch.autocast(
            device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=dev != "cpu", cache_enabled=False
        ):
            cond = self.text_encoder(input_ids=ids).last_hidden_state
            pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        loss = (pred.float() - noise).square().mean(dim=(1, 2, 3)) * self.snr_weight[t]
        return loss.mean()

    def _update(self) -> torch.Tensor:
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def capture(self) -> None:
        """Record one whole update (data, forward, backward, clipping, AdamW) as a CUDA graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up updates (they count as training steps)
                self.optimizer.zero_grad(set_to_none=True)
                self.loss_sum += self._update()
                self._after_update()
        torch.cuda.current_stream().wait_stream(stream)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_loss = self._update()
        self.graph = graph

    @torch.no_grad()
    def _after_update(self) -> None:
        decay = min(self.args.ema, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        self.step += 1
        self.samples += self.args.batch

    def train_step(self, lr: float) -> None:
        if isinstance(self.lr, torch.Tensor):
            self.lr.fill_(lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        if self.graph is not None:
            self.graph.replay()
            self.loss_sum += self.static_loss
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.loss_sum += self._update()
        self._after_update()
        if self.step % 500 == 0:
            self.bank.refresh()

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """fp32 weights, fp16 EMA weights; of the token table only the rows captions use (the rest
        is the seeded initialisation, rebuilt on resume)."""
        out = {}
        for name, model, dtype in (
            ("unet", self.unet, None),
            ("text", self.text_encoder, None),
            ("ema_unet", self.ema_unet, torch.float16),
            ("ema_text", self.ema_text, torch.float16),
        ):
            for key, value in model.state_dict().items():
                if key.endswith("token_embedding.weight"):
                    out[f"{name}.rows.{key}"] = value[self.used_tokens.to(value.device)].float()
                    continue
                out[f"{name}.{key}"] = value.to(dtype) if dtype and value.is_floating_point() else value
        return out

    def load_state(self, tensors: dict) -> None:
        for name, model in (
            ("unet", self.unet),
            ("text", self.text_encoder),
            ("ema_unet", self.ema_unet),
            ("ema_text", self.ema_text),
        ):
            own = model.state_dict()
            part = prefixed(name + ".", tensors)
            for key, value in part.items():
                if key.startswith("rows."):
                    own[key[5:]][self.used_tokens.to(value.device)] = value.to(own[key[5:]].device)
                else:
                    own[key].copy_(value)


def train_diffusion(
    trainer: DiffusionTrainer, args, deadline: float, work: Path, scorer_process=None
) -> None:
    """Steps until `deadline` (time.perf_counter()); with --final the lr falls linearly to 10 % over the
    last 40 % of this call's time. A file `snapshot.request` in `work` asks for a snapshot."""
    if args.device.startswith("cuda") and not args.no_graph:
        try:
            trainer.capture()
            log("captured the training step as a CUDA graph")
        except Exception as e:  # eager steps still work, only slower
            trainer.graph = None
            log(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); running eager")
    started = time.perf_counter()
    span = max(1.0, deadline - started)
    first = last_log = last_step = trainer.step
    last_time = started
    while (now := time.perf_counter()) < deadline:
        # Warm up from this process's first step: a resumed run starts with fresh AdamW moments.
        warm = min(1.0, (trainer.step - first + 1) / args.warmup_steps)
        fade = 1.0
        if args.final and (now - started) / span > 0.6:
            fade = 1.0 - 0.9 * ((now - started) / span - 0.6) / 0.4
        trainer.train_step(args.lr * warm * fade)
        if trainer.step % 50 == 0 and (work / "snapshot.request").exists():
            write_snapshot(trainer, work, quick_eval=True)
            (work / "snapshot.request").unlink(missing_ok=True)
        if trainer.step - last_log >= args.log_every:
            loss = (trainer.loss_sum / (trainer.step - last_log)).item()
            trainer.loss_sum.zero_()
            now = time.perf_counter()
            rate = (trainer.step - last_step) / (now - last_time)
            log(
                f"step {trainer.step}: loss {loss:.4f}, {rate:.1f} steps/s = {rate * args.batch:.0f} samples/s, lr {args.lr * warm * fade:.2e}"
            )
            last_log, last_step, last_time = trainer.step, trainer.step, now
            if scorer_process is not None and scorer_process.poll() is not None and args.train_threads:
                torch.set_num_threads(args.train_threads)  # the scorer's CPU threads are free again
                scorer_process = None


def write_snapshot(trainer: DiffusionTrainer, work: Path, quick_eval: bool) -> None:
    t0 = time.perf_counter()
    tensors = trainer.state()
    vae = trainer.bank.vae
    tensors.update({f"vae.{k}": v.float() for k, v in vae.state_dict().items()})
    meta = {"step": trainer.step, "samples": trainer.samples, "time": time.time()}
    for name in ("scorer", "vae"):
        if (work / f"{name}.json").exists():
            meta[name] = json.loads((work / f"{name}.json").read_text())
    if quick_eval and (work / "scorer.safetensors").exists():
        parts = make_parts(trainer.ema_unet, trainer.ema_text, vae)
        meta["eval"] = evaluate_parts(
            parts,
            trainer.device,
            per_combo=min(8, trainer.args.per_combo),
            batch=288,
            work=work,
            tag="snapshot",
        )
    save_shards(tensors, work / "snapshot", meta)
    if (work / "scorer.safetensors").exists():
        shutil.copy(work / "scorer.safetensors", work / "snapshot" / "scorer.safetensors")
    log(f"snapshot at step {trainer.step} ({time.perf_counter() - t0:.1f} s)")


# --------------------------------------------------------------------------------------------------
# Evaluation and export


def make_parts(unet, text_encoder, vae, name: str = "toy-sd1") -> SDParts:
    return SDParts.of("sd1", [text_encoder.eval()], unet.eval(), vae.eval(), name=name)


@torch.no_grad()
def evaluate_parts(
    parts: SDParts,
    device: str,
    per_combo: int,
    batch: int,
    work: Path | None,
    tag: str,
    seed: int = EVAL_SEED,
) -> dict:
    """Generate `per_combo` images for each of the 36 combinations from its plain prompt (`a photo of a
    red star`; DPM++ 2M Karras, 20 steps, CFG 4) and score them; a grid of the first two of each."""
    from library.sampling import generate

    scorer = toy.load_classifier(work / "scorer.safetensors" if work else toy.SCORER_FILE).to(device)
    conditioner = Conditioner.of(parts)
    combos = [(c, s) for c in toy.COLOURS for s in toy.SHAPES]
    prompts, seeds = sample_prompts(per_combo, per_combo, seed)
    images = generate(parts, conditioner, prompts, [""] * len(prompts), seeds, SAMPLES, batch_size=batch)
    found = toy.classify(images, scorer)
    per, seen = {}, {"both": 0, "colour": 0, "shape": 0, "n": 0}
    for i, (c, s) in enumerate(combos):
        answers = found[i * per_combo : (i + 1) * per_combo]
        both = sum(a == (c, s) for a in answers) / per_combo
        per[f"{c} {s}"] = round(both, 3)
        if (c, s) != toy.HELD_OUT:
            seen["both"] += both * per_combo
            seen["colour"] += sum(a[0] == c for a in answers)
            seen["shape"] += sum(a[1] == s for a in answers)
            seen["n"] += per_combo
    by_shape = {
        s: round(
            sum(per[f"{c} {s}"] for c in toy.COLOURS if (c, s) != toy.HELD_OUT)
            / (6 - (s == toy.HELD_OUT[1])),
            3,
        )
        for s in toy.SHAPES
    }
    report = {
        "seen_both": round(seen["both"] / seen["n"], 4),
        "seen_colour": round(seen["colour"] / seen["n"], 4),
        "seen_shape": round(seen["shape"] / seen["n"], 4),
        "held_out": per[" ".join(toy.HELD_OUT)],
        "per_shape": by_shape,
        "per_combination": per,
        "no_clear_shape_answers": sum(a[1] == toy.NO_SHAPE for a in found) / len(found),
        "per_combo": per_combo,
    }
    if work is not None:
        grid_image(images, per_combo, work / f"grid-{tag}.png")
    log(
        f"eval ({tag}): seen both {report['seen_both']:.3f} colour {report['seen_colour']:.3f} shape {report['seen_shape']:.3f}, held-out {report['held_out']:.3f}, per shape {by_shape}"
    )
    return report


# How the evaluation samples are rendered: DPM++ 2M Karras, 20 steps, CFG 4, 64x64.
SAMPLES = SamplerSettings(steps=20, cfg_scale=4.0, sampler="DPM++ 2M Karras", width=64, height=64)


def sample_prompts(per_combo: int, count: int, seed: int) -> tuple[list[str], list[int]]:
    """The first `count` of the `per_combo` samples of each combination (colour-major, as the grid rows),
    with the seeds the evaluation gives them: sample j of combination k has seed `seed + k*per_combo + j`."""
    combos = [(c, s) for c in toy.COLOURS for s in toy.SHAPES]
    prompts = [toy.caption(c, s, background=False) for c, s in combos for _ in range(count)]
    seeds = [seed + k * per_combo + j for k in range(len(combos)) for j in range(count)]
    return prompts, seeds


def grid_image(images, per_combo: int, path: Path, columns_per_combo: int = 2) -> None:
    """Rows: colours; columns: shapes, `columns_per_combo` samples each side by side; labelled by
    library.grid.make_grid (the pictures at their own 64 px)."""
    from PIL import Image

    from library.files import atomic_write
    from library.grid import make_grid

    k = min(columns_per_combo, per_combo)
    rows = []
    for ci in range(len(toy.COLOURS)):
        row = []
        for si in range(len(toy.SHAPES)):
            cell = Image.new("RGB", (64 * k, 64))
            for j in range(k):
                cell.paste(images[(ci * len(toy.SHAPES) + si) * per_combo + j], (j * 64, 0))
            row.append(cell)
        rows.append(row)
    grid = make_grid(rows, list(toy.SHAPES), list(toy.COLOURS), margin=GRID_MARGIN)
    atomic_write(path, lambda temp: grid.save(temp, format="PNG"))


def export_parts(trainer: DiffusionTrainer, folder: Path) -> None:
    """The EMA model as fp16 weight files (diffusers / transformers keys) and their configs."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in (
        ("unet", trainer.ema_unet),
        ("text_encoder", trainer.ema_text),
        ("vae", trainer.bank.vae),
    ):
        save_file(
            {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()},
            folder / f"{name}.safetensors",
        )
    configs = {
        "unet": dict(trainer.ema_unet.config),
        "vae": dict(trainer.bank.vae.config),
        "text_encoder": trainer.ema_text.config.to_dict(),
    }
    (folder / "configs.json").write_text(json.dumps(configs, indent=1, default=list))


# --------------------------------------------------------------------------------------------------
# Commands


def cmd_train(args) -> None:
    started = time.perf_counter()
    deadline = started + args.budget_s - args.reserve_s
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "trainer.done").unlink(missing_ok=True)
    (work / "trainer.pid").write_text(str(os.getpid()))
    if args.tiny:
        args.batch, args.bank, args.scorer_steps, args.scorer_batch, args.vae_seconds, args.vae_batch = (
            4,
            64,
            3,
            16,
            2,
            4,
        )
        args.eval_n, args.per_combo = 32, 1
        args.warmup_steps, args.log_every = 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    channels = [int(c) for c in args.unet_channels.split(",")] if args.unet_channels else None
    unet, text_encoder, vae = build_models(args.seed, tiny=args.tiny, unet_channels=channels)
    resume = (
        Path(args.resume_from)
        if args.resume_from
        else (work / "snapshot" if (work / "snapshot" / "state.json").exists() else None)
    )
    state, meta = load_shards(resume) if resume else ({}, {})
    if state:
        log(f"resuming from {resume} at step {meta['step']}")
        vae.load_state_dict(prefixed("vae.", state))
        if resume != work / "snapshot" and (resume / "scorer.safetensors").exists():
            shutil.copy(resume / "scorer.safetensors", work / "scorer.safetensors")
        for name in ("scorer", "vae"):
            if name in meta:
                (work / f"{name}.json").write_text(json.dumps(meta[name], indent=1))
    scorer_process = None
    if not (work / "scorer.safetensors").exists():
        command = [
            sys.executable,
            __file__,
            "scorer",
            "--work",
            str(work),
            "--device",
            args.device,
            "--steps",
            str(args.scorer_steps),
            "--batch",
            str(args.scorer_batch),
            "--seed",
            str(args.seed),
            "--eval-n",
            str(args.eval_n),
            "--threads",
            str(args.threads),
            "--width",
            str(args.scorer_width),
        ]
        scorer_process = subprocess.Popen(command)
    if not state:
        report = train_vae(
            vae, args.device, args.vae_seconds, args.vae_batch, args.seed, args.eval_n, args.vae_crop
        )
        (work / "vae.json").write_text(json.dumps(report, indent=1))
        log("vae", report)
    vae.to(args.device).eval().requires_grad_(False)
    trainer = DiffusionTrainer(unet, text_encoder, vae, load_tokenizer("sd1"), args, args.device)
    if state:
        trainer.load_state(state)
        trainer.step, trainer.samples = meta["step"], meta["samples"]
    log(f"bank of {args.bank} pictures ready; training UNet + text encoder, batch {args.batch}")
    train_diffusion(trainer, args, deadline, work, scorer_process)
    if scorer_process is not None:
        scorer_process.wait()
    write_snapshot(trainer, work, quick_eval=not args.final)
    if args.final:
        export_parts(trainer, work / "parts")
        report = evaluate_parts(
            make_parts(trainer.ema_unet, trainer.ema_text, vae),
            args.device,
            args.per_combo,
            576,
            work,
            "final",
        )
        report.update(step=trainer.step, samples=trainer.samples)
        (work / "parts" / "eval.json").write_text(json.dumps(report, indent=1))
    (work / "trainer.done").write_text(str(trainer.step))
    log(f"done at step {trainer.step} ({trainer.samples} samples) in {time.perf_counter() - started:.0f} s")


def cmd_scorer(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    train_scorer(Path(args.work), args.device, args.steps, args.batch, args.seed, args.eval_n, args.width)


def cmd_collect(args) -> None:
    """Copy the trainer's results to `--out`: at `--snapshot-at` seconds ask for a snapshot and copy it;
    otherwise wait for the trainer to finish (or `--max-wait`) and copy its final parts. Stops waiting
    as soon as the trainer process is gone."""
    work, out = Path(args.work), Path(args.out)
    started = time.perf_counter()

    def trainer_alive() -> bool:
        if not (work / "trainer.pid").exists():  # a trainer started just before may not have written it yet
            return time.perf_counter() - started < 120
        try:
            os.kill(int((work / "trainer.pid").read_text()), 0)
        except (OSError, ValueError):
            return False
        return not (work / "trainer.done").exists()

    if args.snapshot_at is not None:
        while time.perf_counter() - started < args.snapshot_at and trainer_alive():
            time.sleep(2)
        state = work / "snapshot" / "state.json"
        stamp = state.stat().st_mtime if state.exists() else 0
        if trainer_alive():
            (work / "snapshot.request").write_text("1")
        while time.perf_counter() - started < args.snapshot_at + args.max_wait and trainer_alive():
            if state.exists() and state.stat().st_mtime > stamp and not (work / "snapshot.request").exists():
                break
            time.sleep(1)
        files = [*sorted((work / "snapshot").glob("*")), *sorted(work.glob("grid-*.png"))]
    else:
        while time.perf_counter() - started < args.max_wait and trainer_alive():
            time.sleep(2)
        files = [*sorted((work / "parts").glob("*")), *sorted(work.glob("grid-final.png"))]
    out.mkdir(parents=True, exist_ok=True)
    for file in [*files, work / "train.log"]:
        if file.is_file():
            shutil.copy(file, out / file.name)
            print("collected", file.name, file.stat().st_size)


def cmd_assemble(args) -> None:
    """fp16 parts -> the committed single-file checkpoint (and optionally a diffusers folder)."""
    from library.convert import save_diffusers, save_single_file

    parts_dir = Path(args.parts)
    configs = json.loads((parts_dir / "configs.json").read_text())
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    text = CLIPTextModel(
        CLIPTextConfig.from_dict(
            {k: v for k, v in configs["text_encoder"].items() if k not in ("dtype", "torch_dtype")}
        )
    )
    files = {"unet": parts_dir / "unet.safetensors", "text_encoder": parts_dir / "text_encoder.safetensors"}
    files["vae"] = Path(args.vae) if args.vae else parts_dir / "vae.safetensors"
    for name, model in (("unet", unet), ("text_encoder", text), ("vae", vae)):
        model.load_state_dict({k: v.float() for k, v in load_file(files[name]).items()})
    parts = make_parts(unet, text, vae)
    out = Path(args.output)
    save_single_file(parts, out, overwrite=True)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if args.scorer:
        shutil.copyfile(args.scorer, toy.SCORER_FILE)
        print(f"wrote {toy.SCORER_FILE}")
    if args.diffusers:
        for model in (unet, text, vae):
            model.to(torch.float16)
        folder = save_diffusers(parts, args.diffusers, overwrite=True)
        # fp16 weights, but a float32 config: a plain from_pretrained on the CPU must not mix dtypes.
        config_file = folder / "text_encoder" / "config.json"
        config = json.loads(config_file.read_text())
        config.update({k: "float32" for k in ("dtype", "torch_dtype") if k in config} or {"dtype": "float32"})
        config_file.write_text(json.dumps(config, indent=2))
        print(f"wrote {folder}")


def cmd_finetune_decoder(args) -> None:
    """Sharpen the VAE decoder of a parts folder; writes a new vae.safetensors (fp16) to --output."""
    if args.threads:
        torch.set_num_threads(args.threads)
    parts_dir = Path(args.parts)
    vae = AutoencoderKL.from_config(json.loads((parts_dir / "configs.json").read_text())["vae"])
    vae.load_state_dict({k: v.float() for k, v in load_file(parts_dir / "vae.safetensors").items()})
    report = finetune_decoder(vae, args.device, args.seconds, args.batch, args.seed, args.crop)
    save_file(
        {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in vae.state_dict().items()},
        args.output,
    )
    log("decoder", report)


def cmd_evaluate(args) -> None:
    """Sample accuracy of the committed (or given) model with the scorer, plus the scorer's own accuracy."""
    from library.models import load_sd

    torch.set_num_threads(args.threads) if args.threads else None
    parts = load_sd(args.checkpoint)
    for module in (parts.unet, parts.text_encoder, parts.vae):
        module.to(args.device)
    scorer = toy.load_classifier()
    report = {"scorer": scorer_accuracy(scorer, "cpu", args.seed, args.scorer_n)} if args.scorer_n else {}
    log("scorer", report.get("scorer"))
    work = Path(args.out) if args.out else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy(toy.SCORER_FILE, work / "scorer.safetensors")
    report["samples"] = evaluate_parts(parts, args.device, args.per_combo, args.batch, work, "evaluate")
    print(json.dumps(report, indent=1))


def cmd_samples_grid(args) -> None:
    """The README's figure of the toy model (docs/toy_samples.png): the first `--columns` samples of
    each of the 36 prompts of `evaluate --per-combo N` (the same prompts, seeds, sampler and CFG, so
    the same pictures), rows colours, columns shapes, labelled."""
    from library.models import load_sd
    from library.sampling import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.columns <= args.per_combo:
        raise UserError(f"--columns {args.columns}: use 1 to --per-combo ({args.per_combo})")
    parts = load_sd(args.checkpoint)
    conditioner = Conditioner.of(parts)
    prompts, seeds = sample_prompts(args.per_combo, args.columns, args.seed)
    images = generate(parts, conditioner, prompts, [""] * len(prompts), seeds, SAMPLES, batch_size=args.batch)
    grid_image(images, args.columns, Path(args.output), args.columns)
    print(f"wrote {args.output}: {len(images)} samples, seeds {seeds[0]}..{seeds[-1]}")


def cmd_ti_eval(args) -> None:
    """Likeness (hit rate) of a textual-inversion run: the init word (step 0), then every saved step."""
    from library.embedding_set import starting_blocks
    from library.embeddings import load_embedding
    from library.models import load_sd

    if args.threads:
        torch.set_num_threads(args.threads)
    parts = load_sd(args.checkpoint)
    conditioner = Conditioner.of(parts)
    settings = SamplerSettings(steps=20, cfg_scale=args.cfg, width=64, height=64)
    seeds = list(range(args.seed, args.seed + args.n))
    files = sorted(Path(args.run, "embeddings").glob("*-*.pt"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not files:
        raise SystemExit(f"{args.run}/embeddings: no NAME-N.pt files")
    name = files[0].stem.rsplit("-", 1)[0]
    count = load_embedding(files[0]).num_vectors
    steps = [(0, starting_blocks(parts, args.init_text, count, "a1111"))]
    steps += [
        (int(f.stem.rsplit("-", 1)[1]), parts.family.blocks(load_embedding(f).vectors, str(f), parts.widths))
        for f in files
    ]
    prompt = args.prompt.replace("[name]", name)
    for step, blocks in steps:
        if args.steps and step not in args.steps:
            continue
        conditioner.set_embedding(name, blocks)
        started = time.perf_counter()
        rate = toy.concept_hit_rate(
            parts, conditioner, prompt, args.concept, seeds, settings, batch_size=args.n
        )
        print(
            f"step {step}: likeness {rate:.3f} ({args.n} images of '{prompt}', {time.perf_counter() - started:.1f} s)",
            flush=True,
        )


def cmd_dataset(args) -> None:
    """Render `--n` pictures of one concept as a Kohya folder: NN.png plus a NN.txt caption each."""
    colour, shape = toy.parse_concept(args.concept)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; give a new folder (nothing was written)")
    gen = torch.Generator().manual_seed(args.seed)
    pair = (list(toy.COLOURS).index(colour), toy.SHAPES.index(shape))
    images = toy.to_pil(toy.draw(toy.sample_scenes(args.n, gen, pairs=[pair]), gen))
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"{i:02d}.png")
        (out / f"{i:02d}.txt").write_text(args.caption + "\n")
    print(f"wrote {args.n} pictures ({colour} {shape}) to {out}")


def cmd_preview_grid(args) -> None:
    """One row per preview step of a training run (step 0 = the init word), its preview images side by side."""
    from PIL import Image, ImageDraw

    folder = Path(args.run) / "previews"
    rows: dict[int, list[tuple[int, Path]]] = {}
    for file in folder.glob("*.png"):
        parts = file.stem.split("-")
        if parts[-1] == "embedding" or not parts[-1].isdigit():
            continue
        step, index = (
            (int(parts[-2]), int(parts[-1]))
            if len(parts) > 2 and parts[-2].isdigit()
            else (int(parts[-1]), 0)
        )
        rows.setdefault(step, []).append((index, file))
    if not rows:
        raise SystemExit(f"{folder}: no preview images")
    scale, margin = args.scale, 90
    columns = max(len(v) for v in rows.values())
    grid = Image.new("RGB", (margin + 64 * scale * columns, 64 * scale * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, step in enumerate(sorted(rows)):
        draw.text((8, r * 64 * scale + 28 * scale // 2), f"step {step}", fill=(0, 0, 0))
        for c, (_, file) in enumerate(sorted(rows[step])):
            image = Image.open(file).convert("RGB").resize((64 * scale, 64 * scale), Image.Resampling.NEAREST)
            grid.paste(image, (margin + c * 64 * scale, r * 64 * scale))
    grid.save(args.output)
    print(f"wrote {args.output}: steps {sorted(rows)}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    p = sub.add_parser("train", help="all stages, resuming from --work or --resume-from")
    p.add_argument("--work", required=True)
    p.add_argument(
        "--budget-s", type=float, default=540, help="wall seconds this call may use, export included"
    )
    p.add_argument(
        "--reserve-s", type=float, default=45, help="seconds kept for the snapshot, export and evaluation"
    )
    p.add_argument("--resume-from", help="a snapshot folder brought back from an earlier call")
    p.add_argument("--final", action="store_true", help="anneal the lr at the end and export the fp16 parts")
    p.add_argument("--device", default=default_device)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup-steps", type=int, default=400)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--bank", type=int, default=1 << 19, help="encoded pictures kept on the device")
    p.add_argument("--vae-seconds", type=float, default=100)
    p.add_argument("--vae-batch", type=int, default=256)
    p.add_argument("--vae-crop", type=int, default=64, help="train the VAE on random crops of this size")
    p.add_argument("--scorer-steps", type=int, default=3000)
    p.add_argument("--scorer-batch", type=int, default=512)
    p.add_argument("--scorer-width", type=int, default=16)
    p.add_argument("--per-combo", type=int, default=32)
    p.add_argument("--eval-n", type=int, default=4096, help="fresh pictures for the scorer and VAE checks")
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--unet-channels", help="e.g. 32,64,64,64 for a CPU-sized UNet (default 64,96,96,96)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--train-threads", type=int, default=0, help="CPU threads once the scorer has finished")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny sizes, a few steps")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("scorer", help="train the scorer only")
    p.add_argument("--work", required=True)
    p.add_argument("--device", default=default_device)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eval-n", type=int, default=4096)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_scorer)

    p = sub.add_parser("collect", help="copy a snapshot or the final parts of a running trainer to --out")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--snapshot-at", type=float)
    p.add_argument("--max-wait", type=float, default=40)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("assemble", help="fp16 parts -> single-file checkpoint (+ diffusers folder)")
    p.add_argument("--parts", required=True)
    p.add_argument("--output", default=str(toy.TOY_CHECKPOINT))
    p.add_argument("--scorer", help="a scorer.safetensors to install as the committed scorer")
    p.add_argument("--diffusers", help="also write a diffusers folder here")
    p.add_argument(
        "--vae", help="a vae.safetensors to use instead of the parts' (e.g. from finetune-decoder)"
    )
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser("finetune-decoder", help="sharpen the VAE decoder of a parts folder (encoder frozen)")
    p.add_argument("--parts", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--device", default=default_device)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--seed", type=int, default=99)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_finetune_decoder)

    p = sub.add_parser("evaluate", help="sample accuracy of a checkpoint, judged by the scorer")
    p.add_argument("--checkpoint", default=str(toy.TOY_CHECKPOINT))
    p.add_argument("--device", default="cpu")
    p.add_argument("--per-combo", type=int, default=8)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--scorer-n", type=int, default=1024)
    p.add_argument("--seed", type=int, default=77)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", help="folder for the sample grid")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "samples-grid", help="the labelled figure of evaluation samples (docs/toy_samples.png)"
    )
    p.add_argument("--output", default="docs/toy_samples.png")
    p.add_argument("--checkpoint", default=str(toy.TOY_CHECKPOINT))
    p.add_argument("--per-combo", type=int, default=32, help="the evaluation whose seeds are shown")
    p.add_argument("--columns", type=int, default=2, help="samples shown per prompt")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_samples_grid)

    p = sub.add_parser("ti-eval", help="likeness of each saved embedding of a TI run (and of the init word)")
    p.add_argument("--run", required=True)
    p.add_argument("--concept", required=True)
    p.add_argument("--checkpoint", default=str(toy.TOY_CHECKPOINT))
    p.add_argument("--prompt", default="a photo of a [name]")
    p.add_argument("--init-text", default="shape")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=5000)
    p.add_argument("--steps", type=int, nargs="*", help="only these steps (0 = the init word)")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_ti_eval)

    p = sub.add_parser("dataset", help="render pictures of one concept as a Kohya training folder")
    p.add_argument("--concept", required=True, help='"<colour> <shape>", e.g. "orange star"')
    p.add_argument("--out", required=True, help='e.g. "dataset_layouts/demo/10_d3mo star"')
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--caption", default=toy.BACKGROUND, help="the caption file's text ([filewords])")
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("preview-grid", help="before/after grid of a TI run's preview images")
    p.add_argument("--run", required=True)
    p.add_argument("--output", default="docs/toy_demo.png")
    p.add_argument("--scale", type=int, default=2)
    p.set_defaults(func=cmd_preview_grid)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        args.func(args)
    except UserError as error:  # bad input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
