"""CPU check of the random SDXL single file (bench/make_sdxl.py) with each tool's own loader.

    kohya: python sdxl_load_check.py kohya CKPT   (cwd = an sd-scripts tree, PYTHONPATH = site_kohya)
    ours:  python sdxl_load_check.py ours CKPT    (cwd = the repo root, PYTHONPATH = site_ours:.)

kohya: `sdxl_model_util.load_models_from_sdxl_checkpoint`, the loader of sdxl_train_textual_inversion.py, which
demands every key of its U-Net, both encoders and the VAE ("<All keys matched successfully>").
ours: `library.models.load_sd(CKPT, family="sdxl")`, strict about every key too.
Then, on the loaded weights in bf16: both encoders on a prompt and one UNet forward and backward at 256 px
(32x32 latents) with SDXL's conditioning: the loss and the gradient reaching the text states must be finite.
"""

from __future__ import annotations

import math
import sys
import time

import torch

LATENT = 32  # 256 px: a CPU-sized check; the device runs 1024 px


def load_kohya(ckpt: str):
    from library import sdxl_model_util

    te1, te2, vae, unet, logit_scale, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(
        sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, ckpt, "cpu", torch.bfloat16
    )
    print(f"kohya: loaded; logit_scale {'absent' if logit_scale is None else f'{float(logit_scale):.4f}'}")

    def run_unet(x, t, context, pooled, sizes):
        from library import sdxl_train_util

        embs = sdxl_train_util.get_size_embeddings(sizes[:, :2], sizes[:, 2:4], sizes[:, 4:], x.device)
        return unet(x, t, context, torch.cat([pooled, embs.to(pooled.dtype)], dim=1))

    return te1, te2, vae, unet, run_unet


def load_ours(ckpt: str):
    from library.models import load_sd

    parts = load_sd(ckpt, family="sdxl", dtype=torch.bfloat16)
    te1, te2 = parts.text_encoders.values()
    print(f"ours: library.models.load_sd read it as {parts.family.title}")

    def run_unet(x, t, context, pooled, sizes):
        return parts.unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample

    return te1, te2, parts.vae, parts.unet, run_unet


def check(te1, te2, vae, unet, run_unet) -> None:
    dtype = torch.bfloat16
    for module in (te1, te2, vae, unet):
        module.to(dtype).eval().requires_grad_(False)
    torch.manual_seed(0)
    ids = torch.tensor([[0] + [320 + i for i in range(8)] + [2] + [1] * 67])  # bos, 8 words, eos, pad
    ids[0, 9] = 49407  # CLIP's end token (the tokenizer's, whatever eos_token_id the config names)
    t0 = time.perf_counter()
    with torch.no_grad():
        out1 = te1(ids, output_hidden_states=True)
        out2 = te2(ids, output_hidden_states=True)
    context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1).float()
    pooled = out2.text_embeds.float()
    print(
        f"text states {tuple(context.shape)} |max| {context.abs().max():.3g}, pooled |max| {pooled.abs().max():.3g}"
    )
    with torch.no_grad():
        image = torch.rand(1, 3, 8 * LATENT, 8 * LATENT, dtype=dtype) * 2 - 1
        latents = vae.encode(image).latent_dist.sample() * 0.13025
    print(f"VAE latents {tuple(latents.shape)} |max| {latents.abs().max():.3g}")
    context.requires_grad_(True)
    noise = torch.randn_like(latents)
    t = torch.tensor([500])
    sizes = torch.tensor([[8.0 * LATENT, 8.0 * LATENT, 0, 0, 8.0 * LATENT, 8.0 * LATENT]])
    noisy = latents + noise  # the scale does not matter here, only finiteness
    pred = run_unet(noisy.to(dtype), t, context.to(dtype), pooled.to(dtype), sizes.to(dtype))
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    grad = context.grad.abs().max().item()
    print(
        f"UNet forward+backward in {time.perf_counter() - t0:.1f} s: loss {loss.item():.4g}, |grad| max {grad:.3g}"
    )
    values = [
        context.abs().max().item(),
        pooled.abs().max().item(),
        latents.abs().max().item(),
        loss.item(),
        grad,
    ]
    if not all(math.isfinite(v) for v in values):
        raise SystemExit("NOT FINITE")
    print("finite: ok")


if __name__ == "__main__":
    sys.path.insert(0, ".")  # the tool's own `library` package: the sd-scripts tree or our repo root
    tool, ckpt = sys.argv[1], sys.argv[2]
    start = time.perf_counter()
    models = load_kohya(ckpt) if tool == "kohya" else load_ours(ckpt)
    print(f"{tool}: loaded in {time.perf_counter() - start:.1f} s")
    check(*models)
