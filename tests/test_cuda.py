"""CUDA paths (run on the GPU machine; skipped elsewhere): CUDA graphs and torch.compile give the same
training as the eager UNet, in bf16 and fp16, for SD 1.x and SDXL (pooled vector and size ids)."""

from __future__ import annotations

import pytest
import torch

from library.training import run_training, setup
from tests.test_train import config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train(tmp_path, name: str, *overrides: str) -> torch.Tensor:
    cfg = config(
        tmp_path / name,
        "model.checkpoint=builtin:tiny",
        "train.max_steps=12",
        "save.save_every_steps=0",
        *overrides,
    )
    from library.embeddings import load_embedding

    vectors = load_embedding(run_training(cfg, log=lambda *a: None)).vectors
    return torch.cat(list(vectors.values()), dim=1) if isinstance(vectors, dict) else vectors


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_cuda_graphs_train_exactly_like_the_eager_unet(tmp_path, precision, family):
    run = (f"train.mixed_precision={precision}", f"model.family={family}")
    eager = train(tmp_path, "eager", *run, "train.cuda_graphs=false")
    graphed = train(tmp_path, "graphed", *run, "train.cuda_graphs=true")
    # bf16/fp16 replay the very kernels of the eager step; fp32 convolutions may pick other TF32 algorithms
    # (the tiny SDXL, deeper, drifted past 1e-4 on the H200).
    tolerance = (1e-3 if family == "sdxl" else 1e-4) if precision == "no" else 1e-6
    assert torch.allclose(graphed, eager, rtol=0, atol=tolerance), (graphed - eager).abs().max()


def second_shape(trainer):
    """UNet inputs of another shape than the training batches': 2 images of 24 x 24 latents, a long prompt."""
    word = trainer.embeddings.names[0]
    cond = trainer.conditioner.encode([f"a long prompt of {word} " * 12] * 2).to(trainer.parts.unet.dtype)
    latents = torch.randn(2, 4, 24, 24, device="cuda", dtype=trainer.parts.unet.dtype)
    return latents, torch.tensor([10, 500], device="cuda"), cond


def test_cuda_graphs_are_captured_once_per_batch_shape(tmp_path):
    trainer = setup(
        config(tmp_path, "model.checkpoint=builtin:tiny", "train.mixed_precision=bf16"), log=lambda *a: None
    )
    assert trainer.graphs is not None
    for step in range(3):
        trainer.step(step, 1e-3, None)
    assert len(trainer.graphs.graphs) == 1
    # A second shape (a prompt over 75 tokens, or another bucket) gets its own graph, the first still replays.
    long = trainer.graphs(*second_shape(trainer))
    assert len(trainer.graphs.graphs) == 2 and torch.isfinite(long).all()
    trainer.step(3, 1e-3, None)
    off = setup(
        config(
            tmp_path / "b",
            "model.checkpoint=builtin:tiny",
            "train.mixed_precision=bf16",
            "train.low_memory=true",
        ),
        log=lambda *a: None,
    )
    assert off.graphs is None  # gradient checkpointing and capture do not mix


def test_a_capture_holds_the_activations_once(tmp_path):
    """Capturing holds the UNet's activations once: not beside the blocks the latent caching left cached,
    nor beside the warm-up's (nvidia-smi counts cached blocks as used)."""
    trainer = setup(
        config(tmp_path, "model.checkpoint=builtin:tiny", "train.mixed_precision=bf16"), log=lambda *a: None
    )
    word = trainer.embeddings.names[0]

    def peak_of(call, cached: int = 0) -> int:
        cond = trainer.conditioner.encode([f"a photo of {word}"] * 8).to(torch.bfloat16)
        latents = torch.randn(8, 4, 128, 128, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_reserved()
        torch.empty(cached, dtype=torch.uint8, device="cuda")  # freed at once and kept cached, as the VAE's
        call(latents, torch.full((8,), 500, device="cuda"), cond).float().square().mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved() - before

    eager = peak_of(lambda latents, t, cond: trainer.graphs.module(latents, t, cond.context))
    captured = peak_of(trainer.graphs, cached=eager)
    assert len(trainer.graphs.graphs) == 1
    assert captured < 1.4 * eager, (
        f"capture reserved {captured / 2**20:.0f} MiB, eager {eager / 2**20:.0f} MiB"
    )


def test_compiled_unet_trains_like_the_eager_one(tmp_path):
    """Compiled kernels round differently in bf16, so the vectors move the same way, not bit for bit."""
    from library.embeddings import init_vectors
    from library.models import load_parts
    from library.tables import ModelConfig

    parts = load_parts(ModelConfig(checkpoint="builtin:tiny"))
    start = init_vectors(parts.tokenizer, parts.text_encoder, "shape", 1, "a1111")
    eager = train(tmp_path, "eager", "train.mixed_precision=bf16", "train.cuda_graphs=false")
    compiled = train(tmp_path, "compiled", "train.mixed_precision=bf16", "train.compile=true")
    moved, moved_compiled = (eager - start).flatten(), (compiled - start).flatten()
    cosine = torch.nn.functional.cosine_similarity(moved, moved_compiled, dim=0)
    assert cosine > 0.99 and (moved_compiled.norm() / moved.norm() - 1).abs() < 0.05, cosine


@pytest.mark.parametrize("model", ["builtin:toy", "builtin:tiny sdxl"])
@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Euler a", "DDIM"])
def test_sampling_from_cuda_graphs_gives_the_same_images(sampler, model):
    import numpy as np

    from library.conditioning import Conditioner
    from library.models import load_parts
    from library.sampling import generate
    from library.tables import ModelConfig, SamplerSettings

    checkpoint, _, family = model.partition(" ")
    parts = load_parts(ModelConfig(checkpoint=checkpoint, family=family or "auto"), precision="fp16")
    parts.place("cuda", "fp16")
    conditioner = Conditioner.of(parts)
    settings = SamplerSettings(steps=12, cfg_scale=4.0, width=64, height=64, sampler=sampler)
    prompts, seeds = ["a photo of a red star"] * 5, [7, 8, 9, 10, 11]  # batches of 3 and 2: two graphs
    run = dict(batch_size=3)
    eager = generate(parts, conditioner, prompts, [""] * 5, seeds, settings, graphs=False, **run)
    graphed = generate(parts, conditioner, prompts, [""] * 5, seeds, settings, graphs=True, **run)
    for a, b in zip(eager, graphed, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_loading_onto_the_gpu_gives_the_weights_loading_on_the_cpu_gives(tmp_path, precision):
    """A single file's weights cast on the GPU are bitwise the ones cast on the CPU and moved."""
    from types import SimpleNamespace

    from library.convert import save_single_file
    from library.models import load_parts
    from library.tiny import build_tiny_parts

    for family in ("sd1", "sdxl"):
        path = save_single_file(build_tiny_parts(family, seed=0), tmp_path / f"{family}.safetensors")
        table = SimpleNamespace(checkpoint=str(path), family="auto", vae="", config_dir="")
        on_cpu, on_gpu = (
            load_parts(table, precision=precision),
            load_parts(table, precision=precision, device="cuda"),
        )
        on_cpu.place("cuda", precision)
        for want, have in zip(on_cpu.modules, on_gpu.modules, strict=True):
            a, b = want.state_dict(), have.state_dict()
            assert a.keys() == b.keys() and all(b[k].is_cuda for k in b)
            assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
