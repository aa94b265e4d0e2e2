"""Optimizers for the trained vectors, and gradient clipping on the true (unscaled) gradients."""

from __future__ import annotations

import torch

from library.errors import UserError


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    """The optimizer for the embedding vectors only (never the whole token table).

    bitsandbytes' AdamW8bit keeps 32-bit state for tensors under 4,096 elements, which is every TI embedding
    of a few vectors: it then behaves as plain AdamW, as it does in Kohya.
    """
    if name == "adamw":
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "lion":
        import bitsandbytes as bnb

        return bnb.optim.Lion(params, lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy finds its own step size; `lr` is a multiplier on it (1.0 is the usual value).
        return Prodigy(params, lr=lr, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}; choose adamw, adamw8bit, lion or prodigy")


def clip_gradients(accelerator, params: list[torch.nn.Parameter], mode: str, value: float) -> None:
    """Clip by element value or global L2 norm, after accelerate has unscaled fp16 gradients."""
    if mode == "value":
        accelerator.clip_grad_value_(params, value)
    elif mode == "norm":
        accelerator.clip_grad_norm_(params, value)
