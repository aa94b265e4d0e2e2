"""Stage 3: the UNet and the CLIP text encoder trained together, from scratch, on a bank of encoded pictures,
and the snapshots a later call resumes from.

This trainer trains whole models (every weight, EMA copies, one step captured as a CUDA graph), which the
library's trainer (a few embedding vectors, frozen models) does not; it shares the library's pieces where they
are the same: the prompt tokenizer, the UNet call, the noise schedule and the evaluation's sampler.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from library import toy
from library.denoiser import UNetCall
from library.families import family
from library.prompts import PromptTokenizer

from .evaluation import evaluate_parts
from .models import SCALE, bf16, log, make_parts
from .storage import prefixed, save_shards

# Caption mix: full caption, colour only, shape only, `a photo of a shape`, empty (for CFG).
CAPTION_MIX = (0.6, 0.1, 0.1, 0.1, 0.1)
NO_BACKGROUND = 0.3  # share of captions without ", neutral gray background"


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
        with bf16(self.gen.device.type):
            latents = self.vae.encode(images).latent_dist.mean.float() * SCALE
        self.latents[start:end] = latents.to(torch.bfloat16)
        self.colour[start:end], self.shape[start:end] = scenes.colour, scenes.shape
        self.next = end % len(self.latents)


def caption_table(tokenizer, device) -> tuple[torch.Tensor, list[str]]:
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
    """Joint UNet + text-encoder training; one step is free of host syncs so it can run as a CUDA graph.

    The EMA copies are updated with one `torch._foreach_lerp_` per step, decay min(ema, (1 + step) /
    (10 + step)); torch.optim.swa_utils.AveragedModel would copy on its first update and syncs with the host
    on every one (it tests its update count), so it is not used."""

    def __init__(self, unet, text_encoder, vae, tokenizer, args, device: str) -> None:
        self.device, self.args = device, args
        self.unet, self.text_encoder = unet.to(device).train(), text_encoder.to(device).train()
        for module in (self.unet, self.text_encoder):
            module.requires_grad_(True)
        self.denoise = UNetCall(self.unet, family("sd1"))
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
        self.captions, _ = caption_table(tokenizer, device)
        self.used_tokens = torch.unique(self.captions).cpu()
        alphas = DDPMScheduler(**family("sd1").scheduler_config).alphas_cumprod.to(device)
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
        with bf16(dev, cache_enabled=False):
            pred = self.denoise(noisy, t, self.text_encoder(input_ids=ids).last_hidden_state)
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
    def _models(self):
        return (
            ("unet", self.unet, None),
            ("text", self.text_encoder, None),
            ("ema_unet", self.ema_unet, torch.float16),
            ("ema_text", self.ema_text, torch.float16),
        )

    def state(self) -> dict[str, torch.Tensor]:
        """fp32 weights, fp16 EMA weights; of the token table only the rows captions use (the rest
        is the seeded initialisation, rebuilt on resume)."""
        out = {}
        for name, model, dtype in self._models():
            for key, value in model.state_dict().items():
                if key.endswith("token_embedding.weight"):
                    out[f"{name}.rows.{key}"] = value[self.used_tokens.to(value.device)].float()
                    continue
                out[f"{name}.{key}"] = value.to(dtype) if dtype and value.is_floating_point() else value
        return out

    def load_state(self, tensors: dict) -> None:
        for name, model, _ in self._models():
            own = model.state_dict()
            for key, value in prefixed(name + ".", tensors).items():
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
    """`work`/snapshot: the trainer's state, the VAE, step and sample counts, the scorer and VAE reports
    (and, with `quick_eval`, a short evaluation), and a copy of the scorer: all a later call resumes from."""
    t0 = time.perf_counter()
    tensors = trainer.state()
    vae = trainer.bank.vae
    tensors.update({f"vae.{k}": v.float() for k, v in vae.state_dict().items()})
    meta = {"step": trainer.step, "samples": trainer.samples, "time": time.time()}
    for name in ("scorer", "vae"):
        if (work / f"{name}.json").exists():
            meta[name] = json.loads((work / f"{name}.json").read_text())
    scorer = work / "scorer.safetensors"
    if quick_eval and scorer.exists():
        parts = make_parts(trainer.ema_unet, trainer.ema_text, vae)
        meta["eval"] = evaluate_parts(
            parts,
            trainer.device,
            per_combo=min(8, trainer.args.per_combo),
            batch=288,
            work=work,
            tag="snapshot",
        )
    save_shards(tensors, work / "snapshot", meta, copies=(scorer,) if scorer.exists() else ())
    log(f"snapshot at step {trainer.step} ({time.perf_counter() - t0:.1f} s)")
