"""Textual-inversion training: set up, train, save. Only the new vectors are optimised.

Every random draw of a step (which images, captions, noise, timesteps) is a pure function of
(seed, step), so a resumed run and a data-parallel run give the same vectors as one uninterrupted run.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from library import checkpoints as ckpt
from library.cli import INTERRUPTED
from library.config import TrainConfig, check_model, check_name, dump_config, load_config
from library.data import TrainingData, dataset_config_batch_size, scan_images
from library.embeddings import (
    MODELSPEC_ARCHITECTURES,
    TRAINING_SETTINGS_KEY,
    Embedding,
    init_vectors,
    load_embedding,
    name_warnings,
    save_embedding,
)
from library.errors import UserError
from library.files import atomic_write
from library.infotext import format_infotext, infotext_params, save_png
from library.models import SDParts, load_parts
from library.optim import build_optimizer, clip_gradients, state_fits
from library.previews import PreviewImage, image_paths, preview_images, write_sheet
from library.prompts import CHUNK_LENGTH, PromptEncoder
from library.sampling import SampleSettings, generate, resolve_seed
from library.schedules import Schedule, build_schedule

# make_graphed_callables warms up on a side stream; the vectors' gradient node then warns once that its stream
# differs. The replayed steps do not wait on it (the GPU is busy 92 % of a step), so the warning is noise.
warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOSS_READ_EVERY = 25  # steps between reads of the loss from the GPU (each read is one sync)


@dataclass
class _Pending:
    """A step whose loss (and the finiteness of its result) is still on the GPU."""

    step: int  # updates done after it
    lr: float
    loss: torch.Tensor
    vectors_before: torch.Tensor


class _LossWriters:
    """loss.csv rows (A1111's columns), TensorBoard scalars and the progress bar's running mean."""

    def __init__(self, csv_log, tensorboard, data: TrainingData, accumulation: int, bar):
        self.csv_log, self.tensorboard, self.bar = csv_log, tensorboard, bar
        self.per_epoch = max(1, data.epoch_length // (data.batch_size * accumulation))
        self.recent: collections.deque[float] = collections.deque(maxlen=LOSS_READ_EVERY)

    def write(self, step: int, loss: float, lr: float) -> None:
        self.recent.append(loss)
        if self.csv_log is None:
            return
        self.csv_log.write(step, (step - 1) // self.per_epoch, (step - 1) % self.per_epoch + 1, loss, lr)
        self.tensorboard.add_scalar("loss", loss, step)
        self.tensorboard.add_scalar("lr", lr, step)

    def show(self, lr: float) -> None:
        """The mean loss of the last steps read (one step's loss jumps with its timestep and images)."""
        if self.recent:
            mean = sum(self.recent) / len(self.recent)
            self.bar.set_postfix({f"loss (mean of {len(self.recent)})": f"{mean:.4f}", "lr": f"{lr:.3g}"})


class TrainingStopped(UserError):
    """Training ended early (NaN loss, Ctrl-C) after saving the last good state."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _UNetCall(torch.nn.Module):
    """The UNet as a module of positional tensors returning a tensor, as CUDA-graph capture wants."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, noisy, timesteps, cond):
        return self.unet(noisy, timesteps, encoder_hidden_states=cond).sample


class GraphedUNet:
    """The UNet's forward and backward replayed as CUDA graphs, one pair per batch shape.

    A TI step is bound by kernel launches, not arithmetic: replaying a captured graph launches the UNet's
    thousands of kernels at once. The graphs are captured (under autocast without its weight cache, as
    capture requires) at the first step of a shape; gradients reach the text encoder as from the eager
    UNet. Batches of new shapes (a prompt over 75 tokens) past `MAX_SHAPES` run eagerly.
    """

    MAX_SHAPES = 2

    def __init__(self, unet, autocast_dtype: torch.dtype | None) -> None:
        self.module = _UNetCall(unet)
        self.autocast_dtype = autocast_dtype
        self.graphs: dict[tuple, callable] = {}

    def __call__(self, noisy, timesteps, cond) -> torch.Tensor:
        key = (tuple(noisy.shape), tuple(cond.shape), noisy.dtype, cond.dtype)
        graphed = self.graphs.get(key)
        if graphed is None and len(self.graphs) < self.MAX_SHAPES:
            samples = (noisy.detach().clone(), timesteps.clone(), cond.detach().clone().requires_grad_())
            with torch.autocast(
                "cuda", dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None,
                cache_enabled=False,
            ):  # fmt: skip
                graphed = torch.cuda.make_graphed_callables(self.module, samples)
            self.graphs[key] = graphed
        if graphed is None:
            with torch.autocast("cuda", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                return self.module(noisy, timesteps, cond)
        return graphed(noisy, timesteps, cond)


@dataclass
class Trainer:
    """The state of one run, built by `setup` and advanced by `train`."""

    config: TrainConfig
    accelerator: Accelerator
    parts: SDParts
    data: TrainingData
    encoder: PromptEncoder
    vectors: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    run: ckpt.RunFolder
    start_step: int
    lr_schedule: Schedule
    clip_schedule: Schedule | None
    log: callable = print
    saver: ckpt.BackgroundSaver = field(default_factory=ckpt.BackgroundSaver)
    graphed_unet: GraphedUNet | None = None
    saved_step: int | None = None  # the last step whose save was started
    preview_steps: list[int] = field(default_factory=list)
    lock: IO | None = None  # the run folder's lock (RunFolder.lock), closed when the run ends

    # ------------------------------------------------------------------ one optimizer update
    def loss_for(self, micro_step: int) -> torch.Tensor:
        """Mean loss of this process's share of the global micro-batch `micro_step`."""
        acc, cfg = self.accelerator, self.config.train
        size, rank, world = cfg.batch_size, acc.process_index, acc.num_processes
        batch = self.data.batch(micro_step, rank * size, size)
        latents = batch.latents.to(acc.device, torch.float32)
        gen = torch.Generator(acc.device).manual_seed(_mix(cfg.seed, micro_step))
        # Draw for the whole global batch, then take this rank's rows: same draws for any process count.
        noise = torch.randn((size * world, *latents.shape[1:]), generator=gen, device=acc.device)
        timesteps = torch.randint(0, 1000, (size * world,), generator=gen, device=acc.device)
        offsets = torch.randn((size * world, latents.shape[1], 1, 1), generator=gen, device=acc.device)
        rows = slice(rank * size, (rank + 1) * size)
        noise, timesteps = noise[rows] + cfg.noise_offset * offsets[rows], timesteps[rows]

        scheduler = self.parts.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise
            if self.parts.prediction_type == "epsilon"
            else scheduler.get_velocity(latents, noise, timesteps)
        )
        dtype = self.parts.unet.dtype
        with acc.autocast():
            cond = self.encoder.encode(batch.prompts)
            if self.graphed_unet is None:
                pred = self.parts.unet(
                    noisy.to(dtype), timesteps, encoder_hidden_states=cond.to(dtype)
                ).sample
        if self.graphed_unet is not None:
            pred = self.graphed_unet(noisy.to(dtype), timesteps, cond.to(dtype))
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        if batch.loss_weights is not None:
            loss = loss * batch.loss_weights.to(loss.device)
        loss = loss.mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0:
            loss = loss * _min_snr_weight(scheduler, timesteps, cfg.min_snr_gamma, self.parts.prediction_type)
        return loss.mean()

    def step(self, step: int, lr: float, clip: float | None) -> torch.Tensor:
        """One optimizer update (over gradient accumulation); returns the mean loss, detached."""
        acc, cfg = self.accelerator, self.config.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=acc.device)
        accum = cfg.gradient_accumulation_steps
        for micro in range(accum):
            loss = self.loss_for(step * accum + micro) / accum
            if loss.requires_grad:  # else no prompt of the batch held the word (a caption without it)
                acc.backward(loss)
            total += loss.detach()
        if self.vectors.grad is None:  # a zero gradient, as Kohya's and A1111's optimizers see then
            self.vectors.grad = torch.zeros_like(self.vectors)
        if acc.num_processes > 1:
            self.vectors.grad = acc.reduce(self.vectors.grad, reduction="mean")
            total = acc.reduce(total, reduction="mean")
        if clip is not None:
            clip_gradients(acc, [self.vectors], cfg.clip_grad_mode, clip)
        # No finiteness check here: it would make the CPU wait for the GPU every step. A non-finite loss is
        # caught when losses are read (`_flush_losses`), and the vectors from before that update are restored.
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        """Run from `start_step` to the end of the schedule, saving and previewing on the way."""
        cfg, acc = self.config, self.accelerator
        lr_schedule, clip_schedule = self.lr_schedule, self.clip_schedule
        end = min(cfg.train.max_steps, lr_schedule.end_step)
        if end < cfg.train.max_steps:
            self.log(f"the lr schedule ends at step {end}: training stops there (A1111 rule)")
        main = acc.is_main_process
        loss_log = ckpt.LossLog(self.run.loss_csv) if main else None
        writer = _tensorboard(self.run.logs_dir) if main else None
        if self.start_step == 0 and cfg.save.save_every_steps:
            self.save(0, final=False)  # the starting vectors: the sweep's "before"
        if main and cfg.preview.every_steps and self.start_step == 0:
            self.preview(0)
        stop = _StopRequest()
        loop_start = time.perf_counter()
        bar = tqdm(total=end, initial=self.start_step, disable=not main, desc=cfg.embedding.name, unit="step")
        step = self.start_step
        pending: list[_Pending] = []
        logs = _LossWriters(loss_log, writer, self.data, cfg.train.gradient_accumulation_steps, bar)
        try:
            while step < end:
                if stop.requested:
                    self._flush_losses(pending, logs)
                    self.save(step, final=False, wait=True)
                    raise TrainingStopped(
                        f"interrupted after {step} steps; saved {self.run.step_file(step, cfg.save.formats[0])}; "
                        f"continue with --resume {self.run.root}",
                        exit_code=INTERRUPTED,
                    )
                lr = lr_schedule.value(step)
                clip = clip_schedule.value(step) if clip_schedule else None
                before = self.vectors.detach().clone()  # on the device: no sync
                loss = self.step(step, lr, clip)
                step += 1
                bar.update(1)
                pending.append(_Pending(step, lr, loss, before))
                preview_due = main and cfg.preview.every_steps and step % cfg.preview.every_steps == 0
                if len(pending) >= LOSS_READ_EVERY or step == end or preview_due:
                    self._flush_losses(pending, logs)
                    logs.show(lr)
                if cfg.save.save_every_steps and step % cfg.save.save_every_steps == 0:
                    self.save(step, final=False)
                if preview_due:
                    self.preview(step)
            self._flush_losses(pending, logs)
        except BaseException:
            self.saver.drain()  # the error that stopped training is the one to report
            raise
        finally:
            stop.restore()
            bar.close()
            if main:
                loss_log.close()
                writer.close()
        self.saver.wait()
        final = self.save(step, final=True, wait=True)
        self.report_speed(step - self.start_step, time.perf_counter() - loop_start)
        return final

    def _flush_losses(self, pending: list[_Pending], logs: _LossWriters) -> None:
        """Read the queued losses, and whether each update left finite vectors, in one GPU sync; log them,
        and stop at the first non-finite loss or vectors, keeping the vectors from before that update."""
        if not pending:
            return
        after = [p.vectors_before for p in pending[1:]] + [self.vectors.detach()]
        finite = torch.stack([torch.isfinite(v).all() for v in after]).tolist()
        losses = torch.stack([p.loss for p in pending]).tolist()
        for entry, loss, vectors_finite in zip(pending, losses, finite, strict=True):
            if not (math.isfinite(loss) and vectors_finite):
                what = f"loss became {loss}" if not math.isfinite(loss) else "the vectors became non-finite"
                self._stop_with_good_vectors(entry, f"{what} at step {entry.step}")
            logs.write(entry.step, loss, entry.lr)
        pending.clear()

    def _stop_with_good_vectors(self, entry: _Pending, what: str) -> None:
        """Undo the update of `entry` (its starting vectors are finite: every earlier update was checked),
        make sure that state is saved, and stop."""
        self.vectors.data.copy_(entry.vectors_before)
        self.saver.wait()
        good = entry.step - 1
        kept = self.run.step_file(good, self.config.save.formats[0])
        if not kept.is_file():  # the optimizer state is spoilt: the kept save has none, resume restarts it
            self.save(good, final=False, wait=True, optimizer_state=False)
        raise TrainingStopped(
            f"{what}; kept the last good embedding {kept}; lower train.lr or use train.mixed_precision=bf16"
        )

    def report_speed(self, steps: int, seconds: float) -> None:
        """Log steps/s, samples/s (all processes) and peak GPU memory of the training loop."""
        cfg, acc = self.config.train, self.accelerator
        samples = steps * cfg.batch_size * cfg.gradient_accumulation_steps * acc.num_processes
        line = f"{steps} steps in {seconds:.1f} s: {steps / seconds:.2f} steps/s, {samples / seconds:.1f} samples/s"
        if acc.device.type == "cuda":
            line += f", peak GPU memory {torch.cuda.max_memory_allocated(acc.device) / 2**30:.2f} GiB"
        if acc.is_main_process and steps:
            self.log(line + " (loop incl. saves and previews)")

    # ------------------------------------------------------------------ outputs
    def embedding(self, step: int, vectors: torch.Tensor | None = None, *, final: bool = True) -> Embedding:
        """The embedding after `step` updates; saves of a step are named `NAME-STEP` inside, as A1111 does."""
        cfg = self.config
        return Embedding(
            name=cfg.embedding.name if final else f"{cfg.embedding.name}-{step}",
            vectors=(self.vectors.detach().float().cpu().clone() if vectors is None else vectors),
            step=step,
            checkpoint_hash=self.parts.checkpoint_hash or None,
            checkpoint_name=self.parts.checkpoint_name,
            metadata={
                TRAINING_SETTINGS_KEY: dump_config(cfg.train),
                "modelspec.architecture": MODELSPEC_ARCHITECTURES[self.parts.family],
            },
        )

    def save(self, step: int, *, final: bool, wait: bool = False, optimizer_state: bool = True) -> Path:
        """Write the embedding after `step` updates in every format (and the optimizer state).

        The GPU copies into pinned host memory are queued without waiting; a worker thread writes the files once
        they have arrived, so the loop never waits for the disk. `wait=True` writes before returning. A step
        saved already (a Ctrl-C right after a save) is not written twice. The first format's file is
        written last: its presence marks the save complete (RunFolder).
        """
        acc, cfg = self.accelerator, self.config
        formats = cfg.save.formats
        first = self.run.final_file(formats[0]) if final else self.run.step_file(step, formats[0])
        if acc.is_main_process and (final or step != self.saved_step):
            self.saved_step = None if final else step
            vectors = ckpt.host_copy(self.vectors.detach())
            state = None
            if not final and optimizer_state and cfg.save.save_optimizer_state:
                scaler = acc.scaler.state_dict() if acc.scaler is not None else None
                state = (ckpt.host_copy(self.optimizer.state_dict()), scaler)
            ready = ckpt.copies_ready(acc.device)

            def write() -> None:
                ready()
                if not torch.isfinite(vectors).all():
                    if final or wait:
                        raise RuntimeError(f"non-finite vectors reached a checked save of step {step}")
                    return  # a non-finite update: the loop finds it, restores and saves the last good vectors
                embedding = self.embedding(step, vectors.float(), final=final)
                if state is not None:
                    ckpt.save_training_state(self.run.optim_file(step), step, *state)
                for fmt in (*formats[1:], formats[0]):
                    path = self.run.final_file(fmt) if final else self.run.step_file(step, fmt)
                    save_embedding(embedding, path, overwrite=final)

            if wait:
                self.saver.wait()
                write()
            else:
                self.saver.submit(write)
        if final:
            acc.wait_for_everyone()
        return first

    def preview(self, step: int) -> list[Path]:
        """Render the preview images of `step` with the current vectors (A1111 infotext in each PNG), and
        refresh the sheet of every preview so far (previews/index.html)."""
        cfg, parts, name = self.config.preview, self.parts, self.config.embedding.name
        t = self.config.train
        images = preview_images(cfg, name, self.data.resolution, resolve_seed(cfg.seed))
        # An empty prompt is a line of the training template, as A1111 previews.
        template_prompt = self.data.batch(step, 0, 1).prompts[0]
        images = [replace(i, prompt=i.prompt or template_prompt) for i in images]
        if t.low_memory:
            parts.vae.to(self.accelerator.device)
        pictures = {}
        for settings, group in _by_settings(images, cfg.batch_size).items():
            # Graph capture keeps its own memory (not for low_memory) and does not mix with torch.compile.
            settings = replace(settings, cuda_graphs=t.cuda_graphs and not (t.low_memory or t.compile))
            rendered = generate(
                parts, self.encoder, [i.prompt for i in group], [i.negative for i in group],
                [i.seed for i in group], settings,
            )  # fmt: skip
            for image, picture in zip(group, rendered, strict=True):
                pictures[id(image)] = (picture, settings)
        if t.low_memory:
            parts.vae.to("cpu")
        paths = image_paths(self.run.previews_dir, name, step, len(images))
        for path, image in zip(paths, images, strict=True):
            picture, settings = pictures[id(image)]
            params = infotext_params(settings, image.seed, parts)
            save_png(picture, path, format_infotext(image.prompt, image.negative, params), overwrite=True)
        if self.config.save.embed_in_png:
            card = self.run.previews_dir / f"{name}-{step}-embedding.png"
            first = pictures[id(images[0])][0]
            save_embedding(self.embedding(step, final=False), card, overwrite=True, image=first)
        self.preview_steps.append(step)
        write_sheet(self.run.previews_dir, name, self.preview_steps, images)
        return paths


def _by_settings(images: list[PreviewImage], batch_size: int) -> dict[SampleSettings, list[PreviewImage]]:
    """Preview pictures grouped by their sampler settings, so each group renders in full batches."""
    groups: dict[SampleSettings, list[PreviewImage]] = {}
    for image in images:
        settings = SampleSettings(
            steps=image.steps, cfg_scale=image.cfg_scale, width=image.width, height=image.height,
            sampler=image.sampler, batch_size=batch_size,
        )  # fmt: skip
        groups.setdefault(settings, []).append(image)
    return groups


def load_training_config(path: str | None, resume: str | None, overrides: list[str]) -> TrainConfig:
    """The run's settings: the preset at `path`; without one, the config.toml of the run `--resume` names."""
    if path or not resume:
        return load_config(TrainConfig, path, overrides)
    target = Path(resume).expanduser()
    root = target if target.is_dir() else target.parent.parent
    record = root / "config.toml"
    if not record.is_file():
        raise UserError(f"--resume {resume}: no config.toml in its run folder; give the preset with --config")
    # The run continues where it is now: a folder that was moved or copied must not write to the old place.
    # (A TOML string, so any path survives; a later save.output_dir override still wins.)
    return load_config(
        TrainConfig, record, [f"save.output_dir={json.dumps(str(root), ensure_ascii=False)}", *overrides]
    )


def setup(config: TrainConfig, resume: str | None = None, log=print) -> Trainer:
    """Load the model and data, create or restore the vectors and optimizer, prepare the run folder."""
    cfg, t = config, config.train
    # Check what can be checked before loading anything, so bad input fails fast and writes nothing.
    check_name(cfg.embedding.name, "embedding.name")
    check_model(cfg.model)
    lr_schedule = build_schedule(t.lr, t.max_steps, t.lr_scheduler, t.lr_warmup_steps)
    clip_schedule = None
    if t.clip_grad_mode != "off":
        clip_schedule = build_schedule(t.clip_grad_value, t.max_steps, what="clip_grad_value")
    records = scan_images(cfg.dataset)
    if cfg.dataset.dataset_config:
        wanted = dataset_config_batch_size(cfg.dataset.dataset_config)
        if wanted is not None and wanted != t.batch_size:
            raise UserError(
                f"dataset_config {cfg.dataset.dataset_config}: batch_size = {wanted}, but train.batch_size = "
                f"{t.batch_size}; set train.batch_size={wanted} (or remove batch_size from the dataset TOML)"
            )
    size = records[0].resolution if records else (512, 512)
    _by_settings(preview_images(cfg.preview, cfg.embedding.name, size, seed=0), cfg.preview.batch_size)
    # Without a GPU, accelerate treats a multi-process launch (torchrun) as data parallel only when told cpu=True.
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available())
    _use_the_cpu_cores(accelerator)
    run = ckpt.RunFolder(Path(cfg.save.output_dir).expanduser(), cfg.embedding.name)
    lock = run.lock() if accelerator.is_main_process else None
    try:
        point = _resume_point(run, resume, cfg, log)
        global_batch = cfg.train.batch_size * accelerator.num_processes
        distinct = len({record.path for record in records})
        if global_batch > distinct:
            raise UserError(
                f"{cfg.dataset.dataset_config or cfg.dataset.image_dir}: batch of {global_batch} is larger than "
                f"its {distinct} images; lower train.batch_size or add images"
            )
        data = TrainingData(
            records, cfg.dataset, name=cfg.embedding.name, seed=cfg.train.seed, batch_size=global_batch
        )
        data.check_the_name_is_trained()
        trainer = _build(cfg, accelerator, data, run, point, (lr_schedule, clip_schedule), log)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    trainer.lock = lock
    return trainer


def _resume_point(run: ckpt.RunFolder, resume: str | None, cfg: TrainConfig, log) -> ckpt.ResumePoint | None:
    """Where this run starts: a save to resume from, or None for step 0 in a folder that holds no run."""
    point = None
    if resume:
        point = ckpt.find_resume_point(Path(resume).expanduser(), cfg.embedding.name, cfg.save.formats, log)
        if point is None:
            log(f"{run.root} holds no save yet: starting from step 0")
    if point is not None:
        ckpt.check_no_later_saves(run, point.step)
        return point
    if run.holds_a_run():
        raise UserError(
            f"{run.root}: already holds a training run; continue it with --resume {run.root}, "
            "or set save.output_dir to a new folder"
        )
    # A start that failed before its first save leaves a config and a few log lines: start over.
    for stale in (run.loss_csv, run.config_file):
        stale.unlink(missing_ok=True)
    shutil.rmtree(run.logs_dir, ignore_errors=True)
    return None


def _build(
    cfg: TrainConfig, accelerator: Accelerator, data: TrainingData, run, point, schedules, log
) -> Trainer:
    """Load the model onto the device, cache the latents, and set up the vectors and the optimizer."""
    t = cfg.train
    weight_dtype = WEIGHT_DTYPES[t.mixed_precision]
    parts = load_parts(cfg.model, dtype=weight_dtype)
    device = accelerator.device
    parts.unet.to(device)
    parts.text_encoder.to(device)
    if t.gradient_checkpointing or t.low_memory:
        parts.unet.enable_gradient_checkpointing()
    if t.gradient_checkpointing:
        parts.text_encoder.gradient_checkpointing_enable()
    # The SD VAE overflows in fp16; encode latents in fp32 then (a one-time cost), else in the weight dtype.
    vae_dtype = torch.float32 if weight_dtype == torch.float16 else weight_dtype
    parts.vae.to(device, vae_dtype)
    data.cache_latents(parts.vae, device=device, dtype=vae_dtype, batch_size=1 if t.low_memory else 8)
    if t.low_memory:
        parts.vae.to("cpu")  # back on the GPU only while previews decode
        torch.cuda.empty_cache()
    graphed_unet = None
    use_graphs = t.cuda_graphs and device.type == "cuda" and not (t.low_memory or t.gradient_checkpointing)
    if t.compile:
        # Compiled kernels are cached in ~/.cache/ti-toolkit/torchinductor (library/__init__.py) for later runs.
        parts.unet.compile(mode="reduce-overhead" if use_graphs else None)
    elif use_graphs:
        graphed_unet = GraphedUNet(parts.unet, None if t.mixed_precision == "no" else weight_dtype)

    start = _initial_vectors(cfg, parts, point)
    vectors = torch.nn.Parameter(start.to(device, torch.float32))
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder)
    encoder.set_embedding(cfg.embedding.name, vectors)
    for warning in name_warnings(parts.tokenizer, cfg.embedding.name):
        log(f"warning: {warning}")

    # The schedule sets the rate before every update; this first value only has to be valid.
    optimizer = build_optimizer(t.optimizer, [vectors], lr=1e-3, weight_decay=t.weight_decay)
    start_step = 0
    if point is not None:
        start_step = point.step
        if point.state is not None:
            if not state_fits(t.optimizer, point.state["optimizer"], vectors):
                raise UserError(
                    f"{point.source.with_suffix('.optim')}: this optimizer state does not fit train.optimizer = "
                    f"{t.optimizer!r} on {vectors.shape[0]} x {vectors.shape[1]} vectors; use the run's optimizer, "
                    "or delete the file to restart the optimizer"
                )
            optimizer.load_state_dict(point.state["optimizer"])
        else:
            log(f"warning: no optimizer state beside {point.source}; the optimizer restarts from zero")
        ckpt.trim_loss_log(run, start_step)
    optimizer = accelerator.prepare(optimizer)
    if point is not None and point.state and point.state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(point.state["scaler"])
    if accelerator.is_main_process:
        atomic_write(run.config_file, dump_config(cfg))
    log(
        f"training '{cfg.embedding.name}' ({vectors.shape[0]} vectors x {vectors.shape[1]}) on {parts.checkpoint_name} "
        f"[{parts.family}], {data.num_images} images, {accelerator.num_processes} process(es) on {device}, "
        f"from step {start_step} -> {run.root}"
    )
    return Trainer(
        cfg, accelerator, parts, data, encoder, vectors, optimizer, run, start_step, *schedules, log,
        graphed_unet=graphed_unet,
    )  # fmt: skip


def _use_the_cpu_cores(accelerator: Accelerator) -> None:
    """`accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which leaves a lone CPU process on one
    core (the demo then takes half again as long); give it the cores it may run on."""
    if (
        accelerator.device.type == "cpu"
        and accelerator.num_processes == 1
        and os.environ.get("OMP_NUM_THREADS") == "1"
    ):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(cores)


def _initial_vectors(cfg: TrainConfig, parts: SDParts, point) -> torch.Tensor:
    width = parts.text_encoder.get_input_embeddings().weight.shape[1]
    if point is not None:
        vectors, source = point.embedding.vectors, point.source
    elif cfg.embedding.init_from:
        vectors, source = load_embedding(cfg.embedding.init_from).vectors, cfg.embedding.init_from
    else:
        return init_vectors(
            parts.tokenizer,
            parts.text_encoder,
            cfg.embedding.init_text,
            cfg.embedding.num_vectors,
            cfg.embedding.init_rule,
        )
    if not isinstance(vectors, torch.Tensor) or vectors.shape[-1] != width:
        shape = (
            {k: tuple(v.shape) for k, v in vectors.items()}
            if isinstance(vectors, dict)
            else tuple(vectors.shape)
        )
        raise UserError(
            f"{source}: embedding of shape {shape} does not fit this model's text encoder (width {width}); use an embedding made for this model family"
        )
    if vectors.shape[0] > CHUNK_LENGTH:
        raise UserError(
            f"{source}: {vectors.shape[0]} vectors, more than the {CHUNK_LENGTH} tokens of a prompt chunk; "
            "start from an embedding of fewer vectors"
        )
    return vectors.float()


def _mix(seed: int, step: int) -> int:
    """A per-step generator seed: distinct for every (seed, step), stable across runs and processes."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def _min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=gamma) / snr
    return weight if prediction_type == "epsilon" else weight * snr / (snr + 1)


def _tensorboard(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(path))


class _StopRequest:
    """First Ctrl-C asks the loop to save and stop at the next step boundary; a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners): keep default behaviour
            self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def run_training(config: TrainConfig, resume: str | None = None, log=print) -> Path:
    """Train an embedding as the config says; returns the path of the final embedding file."""
    started = time.perf_counter()
    trainer = setup(config, resume=resume, log=log)
    try:
        final = trainer.train()
    finally:
        if trainer.lock is not None:
            trainer.lock.close()
    trainer.accelerator.end_training()
    if trainer.accelerator.is_main_process:
        log(f"saved {final} after {time.perf_counter() - started:.1f} s")
    return final
