"""Optimizers for the trained vectors, and gradient clipping on the true (unscaled) gradients."""

from __future__ import annotations

import torch

from library.errors import UserError


def build_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float):
    """The optimizer for the embedding vectors only (never the whole token table): one parameter group
    per embedding, `{"params": [...]}`.

    bitsandbytes' AdamW8bit keeps 32-bit state for tensors under 4,096 elements, which is every TI embedding
    of a few vectors: it then behaves as plain AdamW, as it does in Kohya.
    """
    params = groups
    if name == "adamw":
        fused = all(p.is_cuda for group in groups for p in group["params"])
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


def state_fits(name: str, state: dict, groups: list[dict]) -> bool:
    """Whether a saved optimizer state has the layout optimizer `name` gives these parameter groups: the
    same kind of state (keys) and tensor shapes. The state of other vectors or of another optimizer loads
    without a complaint and fails (or quietly misleads) at the first step; each optimizer lays its state out
    its own way (Prodigy keeps flat copies, bitsandbytes a nested dict), so it is compared with a fresh one."""
    probes = [{"params": [torch.nn.Parameter(torch.zeros_like(p)) for p in g["params"]]} for g in groups]
    fresh = build_optimizer(name, probes, lr=1e-3, weight_decay=0.0)
    for group in probes:
        for probe in group["params"]:
            probe.grad = torch.zeros_like(probe)
    fresh.step()
    expected = fresh.state_dict()
    saved = [g.get("params") for g in state.get("param_groups", ()) if isinstance(g, dict)]
    if [len(g) if isinstance(g, list) else None for g in saved] != [
        len(g["params"]) for g in expected["param_groups"]
    ]:
        return False
    return _same_layout(state.get("state"), expected["state"])


def _same_layout(saved, fresh) -> bool:
    if isinstance(fresh, dict):
        return (
            isinstance(saved, dict)
            and set(saved) == set(fresh)
            and all(_same_layout(saved[key], fresh[key]) for key in fresh)
        )
    if isinstance(fresh, torch.Tensor):
        # A 0-dim tensor may stand for a whole one: Prodigy keeps a scalar while the start vectors are zero.
        return isinstance(saved, torch.Tensor) and (
            saved.dim() == 0 or fresh.dim() == 0 or saved.shape == fresh.shape
        )
    return not isinstance(saved, dict | torch.Tensor)  # numbers: their values change with every step


def clip_gradients(accelerator, params: list[torch.nn.Parameter], mode: str, value: float) -> None:
    """Clip by element value or global L2 norm, after accelerate has unscaled fp16 gradients."""
    if mode == "value":
        accelerator.clip_grad_value_(params, value)
    elif mode == "norm":
        accelerator.clip_grad_norm_(params, value)
