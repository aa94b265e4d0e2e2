"""Speed-ups of the training step and the sampler's UNet, each measured on the GPU against the default.

    python bench/step_lab.py train   --checkpoint CKPT --images DIR --out OUT   # one process, no compiling
    python bench/step_lab.py compile --checkpoint CKPT --images DIR --out OUT --how regional|full
    python bench/step_lab.py render  --checkpoint CKPT --out OUT
    python bench/step_lab.py first   --checkpoint CKPT --images DIR --out OUT [--order side]

`train` loads presets/face.toml's run (batch 8, bf16, 2 vectors, cached latents) once and times 30 steps of
each variant after 5 warm-up steps: the default (CUDA graphs), the UNet under bf16 autocast (as before
2026-12-02), channels-last weights, and the SDPA backends `--sdpa-backends` names (flash, efficient, cudnn);
it records the device's used memory as nvidia-smi shows it (sampled every 20 ms) beside PyTorch's own count,
and profiles the default's and the autocast variant's steps (kernels by kind, share of GPU time). `compile`
times the step with the UNet compiled (`regional`: each ResNet and transformer block; `full`: the whole UNet)
under our CUDA graphs, from process start to the first step done, so that running it twice shows the kernel
cache at work. `render` times the sampler (DPM++ 2M Karras, 30 steps, CFG 7, fp16, 512²) at several batch
sizes. `first` times a fresh process's set-up and first three steps (capture, replay), with `--order side`
after one eager step on a side stream first. Measured 2026-12-02: the first process to use the GPU on a
freshly started machine takes 13.5-14.4 s for its first step, whatever comes first (capture, eager step);
the next processes 1.9-2.4 s (an eager step 1.9 s, the capture after it 0.6 s). Every case prints one JSON line and appends it to OUT/lab.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from library.config import load_config  # noqa: E402
from library.denoiser import TrainingGraphs  # noqa: E402
from library.tables import TrainConfig  # noqa: E402
from library.training import setup  # noqa: E402

KINDS = (  # kernel name fragments -> kind, first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("fused (compiled)", ("triton",)),
    ("convolution", ("conv", "implicit_gemm", "fprop", "dgrad", "wgrad", "winograd")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "xmma")),
    ("layout", ("nchw", "nhwc", "transpose", "permute")),
    ("normalisation", ("group_norm", "groupnorm", "layer_norm", "layernorm", "batch_norm")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "copy", "fill", "reduce", "softmax")),
)


class DeviceMemory:
    """The device's used memory (total - free, as nvidia-smi shows it), sampled every 20 ms in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.02)

    def now(self) -> float:
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 1e9

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 1e9


def record(out: Path, result: dict) -> None:
    print(json.dumps(result), flush=True)
    with open(out / "lab.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


def trainer_for(args, *overrides: str):
    cfg = load_config(
        TrainConfig,
        ROOT / "presets/face.toml",
        [
            f"model.checkpoint={args.checkpoint}",
            f"dataset.image_dir={args.images}",
            f"save.output_dir={args.out}/run-{time.time_ns()}",
            "save.save_every_steps=0",
            "preview.every_steps=0",
            "train.batch_size=8",
            *overrides,
        ],
    )
    return setup(cfg, log=lambda *_: None)


def timed_steps(trainer, first: int, warmup: int = 5, steps: int = 30) -> tuple[float, int]:
    for i in range(first, first + warmup):
        trainer.step(i, 0.002, None)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(first + warmup, first + warmup + steps):
        trainer.step(i, 0.002, None)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / steps, first + warmup + steps


def sdpa(backend: str) -> None:
    """Leave PyTorch's choice ("default") or allow only one SDPA backend."""
    b, every = torch.backends.cuda, backend == "default"
    b.enable_flash_sdp(every or backend == "flash")
    b.enable_mem_efficient_sdp(every or backend == "efficient")
    b.enable_cudnn_sdp(every or backend == "cudnn")
    b.enable_math_sdp(every)


def profile(trainer, first: int, name: str, out: Path, steps: int = 3) -> dict:
    """GPU time per step by kind of kernel, and the share of the wall time the GPU is busy."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    torch.cuda.synchronize()
    with run_profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(first, first + steps):
            trainer.step(i, 0.002, None)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kinds: dict[str, float] = {}
    names: dict[str, float] = {}
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        lower = event.name.lower()
        kind = next((k for k, parts in KINDS if any(p in lower for p in parts)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + event.device_time / 1000 / steps
        names[event.name[:90]] = names.get(event.name[:90], 0.0) + event.device_time / 1000 / steps
    busy = sum(kinds.values())
    top = sorted(names.items(), key=lambda kv: -kv[1])[:25]
    (out / f"profile-{name}.txt").write_text(
        f"{name}: {1000 * wall / steps:.1f} ms/step wall, GPU busy {busy:.1f} ms/step\n"
        + "".join(
            f"{k:<20}{v:8.2f} ms  {v / busy:5.1%}\n" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
        )
        + "\n"
        + "".join(f"{v:8.2f} ms  {k}\n" for k, v in top)
    )
    return {
        "profile": name,
        "wall_ms": 1000 * wall / steps,
        "busy_ms": busy,
        "kinds_ms": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
    }


class AutocastGraphs(TrainingGraphs):
    """The UNet captured under bf16 autocast, as the step ran before 2026-12-02."""

    def __call__(self, *args, **kwargs):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return super().__call__(*args, **kwargs)


def train_variants(args, out: Path) -> None:
    watch = DeviceMemory()
    trainer = trainer_for(args)
    after_setup = watch.now()
    parts = trainer.parts
    step = 0
    variants = [("default", {}), ("autocast", {"autocast": True}), ("channels-last", {"channels_last": True})]
    variants += [(f"sdpa-{b}", {"sdpa": b}) for b in args.sdpa_backends]
    for name, knobs in variants:
        sdpa(knobs.get("sdpa", "default"))
        layout = torch.channels_last if knobs.get("channels_last") else torch.contiguous_format
        parts.unet.to(memory_format=layout)
        trainer.graphs = None
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # The default runs the bf16 UNet in bf16 throughout; "autocast" as before 2026-12-02 (norms in fp32).
        graphs = AutocastGraphs if knobs.get("autocast") else TrainingGraphs
        trainer.graphs = graphs(parts.unet, parts.family)
        try:
            ms, step = timed_steps(trainer, step)
        except Exception as error:  # a backend that does not take these shapes
            record(out, {"case": name, "error": str(error).splitlines()[0][:200]})
            continue
        record(
            out,
            {
                "case": name,
                "ms_per_step": round(ms, 2),
                "samples_per_s": round(8000 / ms, 1),
                "allocated_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "reserved_peak_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                "device_used_gb": round(watch.now(), 2),
                "device_used_after_setup_gb": round(after_setup, 2),
            },
        )
        if name in ("default", "autocast"):
            record(out, profile(trainer, step, name, out))
            step += 3
    record(out, {"case": "train-variants", "device_peak_gb": round(watch.stop(), 2)})


def compile_blocks(unet) -> None:
    """torch.compile each ResNet block and transformer of the UNet (blocks of one shape share kernels)."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch._dynamo.config.cache_size_limit = 64  # one entry per block shape: SD1.5 has ~18
    for module in unet.modules():
        if isinstance(module, (ResnetBlock2D, Transformer2DModel)):
            module.compile(dynamic=False)


def train_compiled(args, out: Path) -> None:
    watch = DeviceMemory()
    sdpa(args.sdpa)
    trainer = trainer_for(args)
    if args.how == "regional":
        compile_blocks(trainer.parts.unet)
    else:
        trainer.parts.unet.compile(dynamic=False)
    t0 = time.perf_counter()
    trainer.step(0, 0.002, None)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    start_to_first = time.time() - psutil.Process().create_time()
    torch.cuda.reset_peak_memory_stats()
    ms, step = timed_steps(trainer, 1)
    result = {
        "case": f"compile-{args.how}-sdpa-{args.sdpa}",
        "first_step_s": round(first, 1),
        "process_start_to_first_step_s": round(start_to_first, 1),
        "ms_per_step": round(ms, 2),
        "samples_per_s": round(8000 / ms, 1),
        "allocated_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "device_peak_gb": round(watch.stop(), 2),
    }
    record(out, result)
    if args.profile:
        record(out, profile(trainer, step, f"compile-{args.how}", out))


def first_steps(args, out: Path) -> None:
    sdpa(args.sdpa)
    start = time.time() - psutil.Process().create_time()
    t0 = time.perf_counter()
    trainer = trainer_for(args)
    torch.cuda.synchronize()
    result = {"case": f"first-{args.order}-sdpa-{args.sdpa}", "process_start_to_setup_s": round(start, 2),
              "setup_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
    graphs = trainer.graphs
    if args.order == "side":  # a first eager step on another stream than the default one
        trainer.graphs = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            trainer.step(100, 0.002, None)
        torch.cuda.synchronize()
        result["side_stream_eager_s"] = round(time.perf_counter() - t0, 3)
        trainer.graphs = graphs
    for i in range(3):  # as the trainer runs them
        t0 = time.perf_counter()
        trainer.step(i, 0.002, None)
        torch.cuda.synchronize()
        result[f"step{i + 1}_s"] = round(time.perf_counter() - t0, 3)
    record(out, result)


def render(args, out: Path) -> None:
    from library.conditioning import Conditioner
    from library.models import load_parts
    from library.sampling import decode_images, sample_latents
    from library.tables import ModelConfig, SamplerSettings

    parts = load_parts(ModelConfig(checkpoint=args.checkpoint, family="sd1"), precision="fp16", device="cuda")
    conditioner = Conditioner.of(parts)
    settings = SamplerSettings(steps=30, cfg_scale=7.0, width=512, height=512, sampler="DPM++ 2M Karras")
    prompt = "a photo of a 30 year old woman, an extreme closeup, front shot, short wavy auburn hair"
    for batch in args.batches:
        with torch.inference_mode():
            cond, uncond = conditioner.encode_pair([prompt] * batch, ["lowres, blurry"] * batch)
        times = []
        for _ in range(3):  # the first builds the graph
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            latents = sample_latents(parts, cond, uncond, list(range(batch)), settings, graphs=True)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            decode_images(parts.vae, latents)
            times.append((t1 - t0, time.perf_counter() - t1))
        sample_s, decode_s = min(t[0] for t in times[1:]), min(t[1] for t in times[1:])
        record(
            out,
            {
                "case": f"render-batch{batch}",
                "images_per_s_sampling": round(batch / sample_s, 2),
                "images_per_s_with_decode": round(batch / (sample_s + decode_s), 2),
                "decode_ms_per_image": round(1000 * decode_s / batch, 1),
                "allocated_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            },
        )
    decodes(parts.vae, latents[:8], out)


def decodes(vae, latents, out: Path) -> None:
    """The VAE's decode of 8 images, 1, 2, 4 or 8 at a time (library.sampling.DECODE_PIXELS), float32 or bf16."""
    from library import sampling

    default = sampling.DECODE_PIXELS
    for at_once, dtype in ((1, torch.float32), (2, torch.float32), (4, torch.float32), (8, torch.float32),
                           (1, torch.bfloat16), (8, torch.bfloat16)):  # fmt: skip
        sampling.DECODE_PIXELS = at_once * 512 * 512
        vae.to(dtype)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sampling.decode_images(vae, latents)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        record(
            out,
            {
                "case": f"decode-{at_once}-at-once-{str(dtype).removeprefix('torch.')}",
                "ms_per_image": round(1000 * min(times[1:]) / len(latents), 1),
                "peak_above_start_gib": round((torch.cuda.max_memory_allocated() - before) / 2**30, 2),
            },
        )
    sampling.DECODE_PIXELS = default
    vae.to(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["train", "compile", "render", "first"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", default="")
    parser.add_argument("--out", required=True)
    parser.add_argument("--how", choices=["regional", "full"], default="regional")
    parser.add_argument("--sdpa", default="default")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sdpa-backends", nargs="*", default=[])
    parser.add_argument("--batches", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--order", choices=["graphs", "side"], default="graphs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    {"train": train_variants, "compile": train_compiled, "render": render, "first": first_steps}[args.what](
        args, out
    )


if __name__ == "__main__":
    main()
