"""Setting a training run up, and running it: `run_training(config)`.

Everything that can be checked is checked before anything loads (names, the model, schedules, datasets,
preview prompts), so bad input fails fast and writes nothing. Then the run folder is locked and its resume
point found, the model loaded, the latents of every embedding's images cached, the embedding set created
or restored, and one optimizer built over it. library/trainer.py runs the loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from library import dreamartist
from library.conditioning import Conditioner
from library.config import check_model, check_name, dump_config, load_config
from library.data import TrainingData
from library.denoiser import TrainingGraphs
from library.embedding_set import EmbeddingSet, blocks_from_file, starting_blocks
from library.embeddings import name_warnings
from library.errors import UserError
from library.files import atomic_write
from library.kohya_dataset import dataset_config_batch_size, scan_images
from library.model_kind import native_resolution
from library.models import load_parts
from library.objectives import TextualInversion
from library.optim import build_optimizer, state_fits
from library.parts import SDParts
from library.previews import preview_images
from library.run_folder import ResumePoint, RunFolder, check_no_later_saves, find_resume_point, trim_loss_log
from library.schedules import build_schedule
from library.tables import EmbeddingPlan, TrainConfig
from library.trainer import Trainer, TrainingStopped

__all__ = ["Trainer", "TrainingStopped", "load_training_config", "run_training", "setup"]


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


def run_training(config: TrainConfig, resume: str | None = None, log=print) -> Path:
    """Train the embeddings the config names; returns the path of the (primary) final embedding file."""
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


def setup(config: TrainConfig, resume: str | None = None, log=print) -> Trainer:
    """Load the model and data, create or restore the embeddings and optimizer, prepare the run folder."""
    check_model(config.model)
    if config.dataset.resolution == 0:  # the model's own size (SDXL 1024), recorded in the run's config.toml
        side = native_resolution(config.model)
        config = dataclasses.replace(config, dataset=dataclasses.replace(config.dataset, resolution=side))
    cfg, t, da = config, config.train, config.dreamartist
    plans = cfg.plans()
    for plan in plans:
        check_name(plan.embedding.name, "embedding.name")
    schedules = (
        build_schedule(t.lr, t.max_steps, t.lr_scheduler, t.lr_warmup_steps),
        build_schedule(t.clip_grad_value, t.max_steps, what="clip_grad_value")
        if t.clip_grad_mode != "off"
        else None,
    )
    learners = [plan for plan in plans if plan.own_images]  # DreamArtist's NAME-neg learns from NAME's images
    records = [_scan(plan, t.batch_size) for plan in learners]
    sizes = {plan.embedding.name: rs[0].resolution for plan, rs in zip(learners, records, strict=True)}
    if len(set(sizes.values())) > 1:
        raise UserError(
            f"the embeddings' datasets use different resolutions {sizes}; set one for all of them"
        )
    names = [plan.embedding.name for plan in plans]
    preview_images(cfg.preview, list(sizes), next(iter(sizes.values())), seed=0)  # prompts, sizes, samplers
    # Without a GPU, accelerate treats a multi-process launch (torchrun) as data parallel only when told cpu=True.
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available())
    _use_the_cpu_cores(accelerator)
    run = RunFolder(Path(cfg.save.output_dir).expanduser(), tuple(names))
    lock = run.lock() if accelerator.is_main_process else None
    try:
        point = _resume_point(run, resume, cfg, log)
        global_batch = t.batch_size * accelerator.num_processes
        sources = [
            _data(plan, found, global_batch, t.seed, attention_maps=da.enabled and da.attention_maps)
            for plan, found in zip(learners, records, strict=True)
        ]
        trainer = _build(cfg, plans, accelerator, sources, run, point, schedules, log)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    trainer.lock = lock
    return trainer


def _scan(plan: EmbeddingPlan, batch_size: int) -> list:
    """An embedding's training images; a Kohya dataset TOML's batch_size must agree with train.batch_size."""
    dataset = plan.dataset
    if dataset.dataset_config:
        wanted = dataset_config_batch_size(dataset.dataset_config)
        if wanted is not None and wanted != batch_size:
            raise UserError(
                f"dataset_config {dataset.dataset_config}: batch_size = {wanted}, but train.batch_size = "
                f"{batch_size}; set train.batch_size={wanted} (or remove batch_size from the dataset TOML)"
            )
    return scan_images(dataset)


def _data(
    plan: EmbeddingPlan, records: list, global_batch: int, seed: int, *, attention_maps: bool
) -> TrainingData:
    distinct = len({record.path for record in records})
    if global_batch > distinct:
        where = plan.dataset.dataset_config or plan.dataset.image_dir
        raise UserError(
            f"{where}: batch of {global_batch} is larger than its {distinct} images; lower train.batch_size "
            "or add images"
        )
    data = TrainingData(
        records,
        plan.dataset,
        name=plan.embedding.name,
        seed=seed,
        batch_size=global_batch,
        attention_maps=attention_maps,
    )
    data.check_the_name_is_trained()
    return data


def _resume_point(run: RunFolder, resume: str | None, cfg: TrainConfig, log) -> ResumePoint | None:
    """Where this run starts: a save to resume from, or None for step 0 in a folder that holds no run."""
    point = None
    if resume:
        point = find_resume_point(Path(resume).expanduser(), run, cfg.save.formats, log)
        if point is None:
            log(f"{run.root} holds no save yet: starting from step 0")
    if point is not None:
        check_no_later_saves(run, point.step)
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


def _build(cfg: TrainConfig, plans, accelerator, sources, run, point, schedules, log) -> Trainer:
    """Load the model onto the device, cache the latents, and set up the embeddings and the optimizer."""
    t = cfg.train
    device = accelerator.device
    parts = load_parts(cfg.model, precision=t.mixed_precision, device=device)
    if t.gradient_checkpointing or t.low_memory:
        parts.unet.enable_gradient_checkpointing()
    if t.gradient_checkpointing:
        for encoder in parts.text_encoders.values():
            encoder.gradient_checkpointing_enable()
    for data in sources:
        data.cache_latents(
            parts.vae, device=device, dtype=parts.vae.dtype, batch_size=1 if t.low_memory else 8
        )
    if t.low_memory and not (cfg.dreamartist.enabled and cfg.dreamartist.reconstruction_loss):
        parts.vae.to("cpu")  # back on the GPU only while previews decode
        torch.cuda.empty_cache()
    graphs = None
    use_graphs = t.cuda_graphs and device.type == "cuda" and not (t.low_memory or t.gradient_checkpointing)
    if t.compile:
        # Compiled kernels are cached in ~/.cache/ti-toolkit/torchinductor (library/__init__.py) for later runs.
        parts.unet.compile(mode="reduce-overhead" if use_graphs else None)
    elif use_graphs:
        graphs = TrainingGraphs(parts.unet, parts.family)

    embeddings = EmbeddingSet.of(
        [(p.embedding.name, _starting(p, parts, point, t.seed), p.lr_factor) for p in plans], device
    )
    conditioner = Conditioner.of(parts, clip_skip=t.clip_skip)
    embeddings.register(conditioner)
    for plan in plans:
        others = [p.embedding.name for p in plans if p is not plan]
        for warning in name_warnings(parts.tokenizer, plan.embedding.name, others):
            log(f"warning: {warning}")
    optimizer, start_step = _optimizer(t, embeddings, point, run, log)
    optimizer = accelerator.prepare(optimizer)
    if point is not None and point.state and point.state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(point.state["scaler"])
    if accelerator.is_main_process:
        atomic_write(run.config_file, dump_config(cfg))
    shapes = ", ".join(
        f"'{m.name}' ({m.num_vectors} vectors x {'+'.join(str(b.shape[1]) for b in m.parameters)})"
        for m in embeddings
    )
    images = sum(data.num_images for data in sources)
    log(
        f"training {shapes} on {parts.checkpoint_name} [{parts.family.name}], {images} images, "
        f"{accelerator.num_processes} process(es) on {device}, from step {start_step} -> {run.root}"
    )
    trainer = Trainer(
        cfg, accelerator, parts, sources, conditioner, embeddings, optimizer, run, start_step, *schedules,
        _objective(cfg, parts), log, graphs=graphs,
    )  # fmt: skip
    if cfg.dreamartist.enabled:
        dreamartist.attach(trainer, cfg.dreamartist, point)
    return trainer


def _objective(cfg: TrainConfig, parts: SDParts) -> TextualInversion:
    """Plain textual inversion, or DreamArtist's training CFG when [dreamartist] is enabled."""
    t, da = cfg.train, cfg.dreamartist
    if not da.enabled:
        return TextualInversion(parts.noise_scheduler, parts.prediction_type, t.min_snr_gamma)
    return dreamartist.DreamArtist(
        parts.noise_scheduler, parts.prediction_type, t.min_snr_gamma,
        name=cfg.embedding.name,
        negative=da.negative,
        cfg=dreamartist.parse_cfg_scale(da.cfg_scale),
        vae=parts.vae if da.reconstruction_loss else None,
        reconstruction_weight=da.reconstruction_weight if da.reconstruction_loss else 0.0,
    )  # fmt: skip


def _starting(
    plan: EmbeddingPlan, parts: SDParts, point: ResumePoint | None, seed: int
) -> dict[str, torch.Tensor]:
    """An embedding's vectors to start from: the resume point's, a file's, or copies of its init words
    (DreamArtist's negative with a tiny offset from its seed, so that it differs from the positive)."""
    embedding = plan.embedding
    if point is not None:
        return blocks_from_file(parts, point.source, point.embeddings[embedding.name])
    if embedding.init_from:
        return blocks_from_file(parts, embedding.init_from)
    blocks = starting_blocks(parts, embedding.init_text, embedding.num_vectors, embedding.init_rule)
    if not plan.own_images:
        blocks = dreamartist.offset(blocks, seed)
    return blocks


def _optimizer(t, embeddings: EmbeddingSet, point: ResumePoint | None, run: RunFolder, log):
    """One optimizer over the set (a parameter group per embedding), restored at the resume point."""
    # The schedule sets the rate before every update; this first value only has to be valid.
    optimizer = build_optimizer(t.optimizer, embeddings.param_groups(), lr=1e-3, weight_decay=t.weight_decay)
    if point is None:
        return optimizer, 0
    if point.state is not None:
        if not state_fits(t.optimizer, point.state["optimizer"], embeddings.param_groups()):
            raise UserError(
                f"{point.source.with_suffix('.optim')}: this optimizer state does not fit train.optimizer = "
                f"{t.optimizer!r} on the vectors {'; '.join(m.describe() for m in embeddings)}; use the run's "
                "optimizer, or delete the file "
                "to restart the optimizer"
            )
        optimizer.load_state_dict(point.state["optimizer"])
    else:
        log(f"warning: no optimizer state beside {point.source}; the optimizer restarts from zero")
    trim_loss_log(run, point.step)
    return optimizer, point.step


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
