"""The UNet as one call, for every family: (latents, timesteps, conditioning[, size ids]) -> its prediction,
run eagerly or replayed from CUDA graphs.

A TI step and a sampler step are bound by kernel launches, not arithmetic, at the batch sizes used here:
replaying a captured CUDA graph launches the UNet's thousands of kernels at once. Training replays the
forward and the backward (`TrainingGraphs`, through `make_graphed_callables`); sampling replays the forward
(`predict` with `graphs=True`). Both capture one graph per input shape, a few at most, and fall back to the
eager UNet beyond that.

SDXL's UNet also takes the pooled vector and six size ids per image: (original height, width, crop top,
left, target height, width) — the training picture's own, or, when rendering, the picture's size uncropped.
"""

from __future__ import annotations

import weakref

import torch

from library.conditioning import Conditioning
from library.errors import UserError
from library.families import Family


def size_ids(sizes: list[tuple[int, ...]], device) -> torch.Tensor:
    """SDXL's size conditioning [B, 6] from each image's (original h, w, crop top, left, target h, w)."""
    return torch.tensor(sizes, dtype=torch.float32, device=device)


def render_size_ids(height: int, width: int, n: int, device) -> torch.Tensor:
    """The size ids of `n` pictures rendered at height x width: uncropped, original = target (A1111's)."""
    return size_ids([(height, width, 0, 0, height, width)] * n, device)


class UNetCall(torch.nn.Module):
    """The UNet as a module of positional tensors returning a tensor, as CUDA-graph capture wants:
    (latents, timesteps, context[, pooled, size ids])."""

    def __init__(self, unet, family: Family) -> None:
        super().__init__()
        self.unet = unet
        self.family = family

    def forward(self, latents, timesteps, context, pooled=None, time_ids=None):
        kwargs = {"encoder_hidden_states": context}
        if self.family.size_conditioning:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return self.unet(latents, timesteps, **kwargs).sample


def _inputs(latents, timesteps, cond: Conditioning, time_ids) -> tuple:
    extra = () if cond.pooled is None else (cond.pooled, time_ids)
    return (latents, timesteps, cond.context, *extra)


def _warm_up(module, inputs: tuple, *, backward: bool) -> None:
    """Run `module` (and its backward to the inputs that want gradients) twice on a side stream before a
    capture, so that lazy kernel loading and library workspaces happen here and not in the graph. The memory
    cached before (the latent caching's) goes back to the driver first, and the warm-up's after it: the side
    stream cannot reuse the first, nor the graph's pool the second, and the device would hold them together
    (measured on an SD 1.5 step at batch 8: 13.3 GB while capturing, against 9.6 GB for the whole run now)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    with torch.cuda.stream(torch.cuda.Stream()):
        for _ in range(2):
            out = module(*inputs)
            if backward:
                wanted = tuple(x for x in inputs if x.requires_grad)
                torch.autograd.grad(out, wanted, grad_outputs=torch.ones_like(out))
            del out
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


class TrainingGraphs:
    """The UNet's forward and backward replayed as CUDA graphs, one pair per batch shape.

    The graphs are captured at the first step of a shape; gradients reach the text encoders as from the
    eager UNet. Batches of new shapes (a prompt over 75 tokens, another aspect-ratio bucket) past
    `MAX_SHAPES` run eagerly. Each shape is captured on its own wrapper of the UNet: capture replaces the
    forward of the module it is given. Each graph keeps its own memory: SDXL at 1024² with two buckets does
    not fit a 24 GB card (measured), one does.
    """

    MAX_SHAPES = 2

    def __init__(self, unet, family: Family) -> None:
        self.unet, self.family = unet, family
        self.module = UNetCall(unet, family)  # the eager UNet, for shapes past MAX_SHAPES
        self.graphs: dict[tuple, callable] = {}

    def __call__(self, latents, timesteps, cond: Conditioning, time_ids=None) -> torch.Tensor:
        inputs = _inputs(latents, timesteps, cond, time_ids)
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        graphed = self.graphs.get(key)
        if graphed is None and len(self.graphs) < self.MAX_SHAPES:
            # The conditioning carries the gradient (to the trained vectors); latents and times do not.
            samples = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
            module = UNetCall(self.unet, self.family)
            try:
                _warm_up(module, samples, backward=True)
                graphed = torch.cuda.make_graphed_callables(module, samples, num_warmup_iters=0)
            except torch.cuda.OutOfMemoryError:
                raise UserError(
                    f"out of memory capturing the CUDA graphs of a batch of {tuple(latents.shape)} latents "
                    f"(graph {len(self.graphs) + 1}; each picture shape keeps its own graph's memory): set "
                    "train.cuda_graphs=false (eager: less memory, slower; SDXL on a 16 GB card), or "
                    "train.low_memory=true"
                ) from None
            self.graphs[key] = graphed
        return self.module(*inputs) if graphed is None else graphed(*inputs)


class _GraphedForward:
    """One UNet forward captured as a CUDA graph for one input shape, replayed with new inputs copied in."""

    def __init__(self, module: UNetCall, inputs: tuple) -> None:
        self.inputs = tuple(x.clone() for x in inputs)
        _warm_up(module, self.inputs, backward=False)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = module(*self.inputs)

    def __call__(self, inputs: tuple) -> torch.Tensor:
        for slot, value in zip(self.inputs, inputs, strict=True):
            slot.copy_(value)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites `out`


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # unet -> {input shapes: _GraphedForward}
_MAX_GRAPHS = 3  # per UNet; each holds its own activation memory


@torch.inference_mode()
def predict(unet, family: Family, latents, t, cond: Conditioning, time_ids=None, graphs: bool = False):
    """The UNet's prediction for inference, replayed from a CUDA graph where `graphs` is on and room is left."""
    module = UNetCall(unet, family)
    if graphs and latents.is_cuda and torch.is_tensor(t):
        inputs = _inputs(latents, t.to(latents.device), cond, time_ids)
        # The weights' address too: a graph replays the memory it was captured on (a moved UNet is recaptured).
        weights = next(unet.parameters()).data_ptr()
        key = (weights, *((tuple(x.shape), x.dtype) for x in inputs))
        cache = _GRAPHS.setdefault(unet, {})
        if key not in cache and len(cache) < _MAX_GRAPHS:
            cache[key] = _GraphedForward(module, inputs)
        if key in cache:
            return cache[key](inputs)
    return module(*_inputs(latents, t, cond, time_ids))
