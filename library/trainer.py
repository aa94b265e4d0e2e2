"""The training loop of a set of embeddings: one optimizer update, the loop around it with its saves,
previews, Ctrl-C and NaN handling. library/training.py sets a `Trainer` up.

Every random draw of a step (which images, captions, noise, timesteps) is a pure function of (seed, step),
so a resumed run and a data-parallel run give the same vectors as one uninterrupted run. A batch holds
`train.batch_size` samples of each source (each embedding with its own images), drawn as if it were trained
alone, so `NAME-N` means the same in a run of one embedding and in a cast.
"""

from __future__ import annotations

import collections
import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from library.cli import INTERRUPTED
from library.conditioning import Conditioner
from library.config import dump_config
from library.data import TrainingData
from library.denoiser import TrainingGraphs, UNetCall, size_ids
from library.embedding_set import EmbeddingSet
from library.embeddings import TRAINING_SETTINGS_KEY, Embedding, save_embedding
from library.errors import UserError
from library.infotext import format_infotext, infotext_params, save_png
from library.objectives import TextualInversion, TrainingBatch
from library.optim import clip_gradients
from library.parts import SDParts
from library.previews import PreviewImage, files_of, preview_images, write_sheet
from library.run_folder import LossLog, RunFolder, save_training_state
from library.sampling import generate, resolve_seed
from library.saver import BackgroundSaver, copies_ready, host_copy
from library.schedules import Schedule
from library.tables import SamplerSettings, TrainConfig

# make_graphed_callables warms up on a side stream; the vectors' gradient node then warns once that its stream
# differs. The replayed steps do not wait on it (the GPU is busy 92 % of a step), so the warning is noise.
warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")

LOSS_READ_EVERY = 25  # steps between reads of the loss from the GPU (each read is one sync)


class TrainingStopped(UserError):
    """Training ended early (NaN loss, Ctrl-C) after saving the last good state."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Pending:
    """A step whose losses (and the finiteness of its result) are still on the GPU."""

    step: int  # updates done after it
    lr: float
    loss: torch.Tensor
    each: torch.Tensor  # each source's mean loss
    before: list[torch.Tensor]  # every parameter before the update


class _LossWriters:
    """loss.csv rows (A1111's columns), TensorBoard scalars and the progress bar's running mean."""

    def __init__(self, run: RunFolder, main: bool, data: TrainingData, accumulation: int, bar):
        self.csv_log = LossLog(run) if main else None
        self.tensorboard = _tensorboard(run.logs_dir) if main else None
        self.names, self.bar = run.loss_names, bar
        self.per_epoch = max(1, data.epoch_length // (data.batch_size * accumulation))
        self.recent: collections.deque[float] = collections.deque(maxlen=LOSS_READ_EVERY)

    def write(self, step: int, loss: float, lr: float, each: list[float]) -> None:
        self.recent.append(loss)
        if self.csv_log is None:
            return
        epoch, epoch_step = (step - 1) // self.per_epoch, (step - 1) % self.per_epoch + 1
        several = len(self.names) > 1
        self.csv_log.write(step, epoch, epoch_step, loss, lr, each if several else ())
        self.tensorboard.add_scalar("loss", loss, step)
        self.tensorboard.add_scalar("lr", lr, step)
        for name, value in zip(self.names, each, strict=True) if several else ():
            self.tensorboard.add_scalar(f"loss/{name}", value, step)

    def show(self, lr: float) -> None:
        """The mean loss of the last steps read (one step's loss jumps with its timestep and images)."""
        if self.recent:
            mean = sum(self.recent) / len(self.recent)
            self.bar.set_postfix({f"loss (mean of {len(self.recent)})": f"{mean:.4f}", "lr": f"{lr:.3g}"})

    def close(self) -> None:
        if self.csv_log is not None:
            self.csv_log.close()
            self.tensorboard.close()


@dataclass
class Trainer:
    """The state of one run, built by library/training.setup and advanced by `train`."""

    config: TrainConfig
    accelerator: Accelerator
    parts: SDParts
    sources: list[TrainingData]  # one per embedding with its own images, in the set's order
    conditioner: Conditioner
    embeddings: EmbeddingSet
    optimizer: torch.optim.Optimizer
    run: RunFolder
    start_step: int
    lr_schedule: Schedule
    clip_schedule: Schedule | None
    objective: TextualInversion
    log: callable = print
    saver: BackgroundSaver = field(default_factory=BackgroundSaver)
    graphs: TrainingGraphs | None = None
    saved_step: int | None = None  # the last step whose save was started
    preview_steps: list[int] = field(default_factory=list)
    lock: IO | None = None  # the run folder's lock (RunFolder.lock), closed when the run ends
    # Called with the number of updates done after every optimizer update (DreamArtist's EMA of the vectors).
    after_update: list[Callable[[int], None]] = field(default_factory=list)
    # More embeddings to save beside the set's at every save: () -> {name: blocks} (an EMA copy).
    extra_saves: list[Callable[[], dict[str, dict[str, torch.Tensor]]]] = field(default_factory=list)

    # ------------------------------------------------------------------ one optimizer update
    def batch_for(self, micro_step: int) -> list[tuple[list[int], TrainingBatch, torch.Tensor, torch.Tensor]]:
        """This process's share of micro-batch `micro_step` of every source, with its noise and timesteps:
        one (source indices, batch, noise, timesteps) per latent shape (with aspect-ratio buckets the sources
        of a cast may draw different shapes at one step; each shape is one UNet call)."""
        acc, cfg = self.accelerator, self.config.train
        size, rank, world = cfg.batch_size, acc.process_index, acc.num_processes
        rows = slice(rank * size, (rank + 1) * size)
        by_shape: dict[tuple, list[int]] = {}
        drawn = []
        for index, data in enumerate(self.sources):
            batch = data.batch(micro_step, rank * size, size)
            latents = batch.latents.to(acc.device, torch.float32)
            # Each source draws as it would alone, for the whole global batch, then takes this rank's rows:
            # the same draws for any process count.
            gen = torch.Generator(acc.device).manual_seed(_mix(cfg.seed, micro_step))
            shape = (size * world, *latents.shape[1:])
            noise = torch.randn(shape, generator=gen, device=acc.device)
            timesteps = torch.randint(0, 1000, (size * world,), generator=gen, device=acc.device)
            offsets = torch.randn((*shape[:2], 1, 1), generator=gen, device=acc.device)
            drawn.append((batch, latents, noise[rows] + cfg.noise_offset * offsets[rows], timesteps[rows]))
            by_shape.setdefault(tuple(latents.shape[1:]), []).append(index)
        return [self._joined([drawn[i] for i in indices], indices) for indices in by_shape.values()]

    def _joined(
        self, drawn: list, indices: list[int]
    ) -> tuple[list[int], TrainingBatch, torch.Tensor, torch.Tensor]:
        """Sources of one latent shape as one batch."""
        device = self.accelerator.device
        prompts, sources = [], []
        for batch, *_ in drawn:
            sources.append((len(prompts), len(prompts) + len(batch.prompts)))
            prompts += batch.prompts
        weights = [batch.loss_weights for batch, *_ in drawn]
        loss_weights = None
        if any(w is not None for w in weights):  # sources without alpha weigh 1 everywhere: one batch shape
            loss_weights = _cat(
                [
                    torch.ones_like(x[:, :1]) if w is None else w
                    for w, (_, x, *_) in zip(weights, drawn, strict=True)
                ]
            )
        time_ids = None
        if self.parts.family.size_conditioning:
            time_ids = size_ids([s for batch, *_ in drawn for s in batch.sizes], device)
        joined = TrainingBatch(_cat([x for _, x, _, _ in drawn]), prompts, loss_weights, sources, time_ids)
        return indices, joined, _cat([n for _, _, n, _ in drawn]), _cat([t for *_, t in drawn])

    def loss_for(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss of this process's share of micro-batch `micro_step`, each source's mean loss)."""
        total, each = 0.0, [None] * len(self.sources)
        for indices, batch, noise, timesteps in self.batch_for(micro_step):
            loss, means = self._loss_of(batch, noise, timesteps)
            total = total + loss
            for index, mean in zip(indices, means, strict=True):
                each[index] = mean
        return total, torch.stack(each)

    def _loss_of(self, batch: TrainingBatch, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        scheduler, parts = self.parts.noise_scheduler, self.parts
        noisy = scheduler.add_noise(batch.latents, noise, timesteps)
        epsilon = parts.prediction_type == "epsilon"
        target = noise if epsilon else scheduler.get_velocity(batch.latents, noise, timesteps)
        sets = self.objective.prompt_sets(batch)
        dtype = parts.unet_dtype
        time_ids = batch.size_ids
        if len(sets) > 1:  # every prompt set asks about the same noisy latents, in one UNet call
            noisy, timesteps = noisy.repeat(len(sets), 1, 1, 1), timesteps.repeat(len(sets))
            time_ids = None if time_ids is None else time_ids.repeat(len(sets), 1)
        time_ids = None if time_ids is None else time_ids.to(dtype)
        with self.accelerator.autocast():
            cond = self.conditioner.encode([prompt for prompts in sets for prompt in prompts]).to(dtype)
        # The UNet runs in its own dtype throughout, as when sampling (and as diffusers' TI example trains):
        # under autocast its norms ran in float32, converting activations there and back (H200, batch 8:
        # 73 ms a step and 12.4 GB of the device, 64 ms and 10.1 GB without; README, Performance).
        if self.graphs is not None:
            pred = self.graphs(noisy.to(dtype), timesteps, cond, time_ids)
        else:
            pred = UNetCall(parts.unet, parts.family)(noisy.to(dtype), timesteps, *cond.tensors(), time_ids)
        predictions = list(pred.chunk(len(sets))) if len(sets) > 1 else [pred]
        return self.objective.loss(batch, predictions, target, timesteps[: len(batch.prompts)])

    def step(self, step: int, lr: float, clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer update (over gradient accumulation); returns its loss and each source's, detached."""
        acc, cfg = self.accelerator, self.config.train
        for group, member in zip(self.optimizer.param_groups, self.embeddings, strict=True):
            group["lr"] = lr * member.lr_factor
        total = torch.zeros((), device=acc.device)
        each = torch.zeros(len(self.sources), device=acc.device)
        accum = cfg.gradient_accumulation_steps
        for micro in range(accum):
            loss, per_source = self.loss_for(step * accum + micro)
            loss = loss / accum
            if loss.requires_grad:  # else no prompt of the batch held a trained word (a caption without it)
                acc.backward(loss)
            total += loss.detach()
            each += per_source / accum
        for parameter in self.embeddings.parameters:
            if parameter.grad is None:  # a zero gradient, as Kohya's and A1111's optimizers see then
                parameter.grad = torch.zeros_like(parameter)
            if acc.num_processes > 1:
                parameter.grad = acc.reduce(parameter.grad, reduction="mean")
        if acc.num_processes > 1:
            total, each = acc.reduce(total, reduction="mean"), acc.reduce(each, reduction="mean")
        if clip is not None:
            for member in self.embeddings:  # per embedding, so each is clipped as if it were trained alone
                clip_gradients(acc, member.parameters, cfg.clip_grad_mode, clip)
        # No finiteness check here: it would make the CPU wait for the GPU every step. A non-finite loss is
        # caught when losses are read (`_flush_losses`), and the vectors from before that update are restored.
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for hook in self.after_update:
            hook(step + 1)
        return total, each

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        """Run from `start_step` to the end of the schedule, saving and previewing on the way."""
        cfg, acc = self.config, self.accelerator
        end = min(cfg.train.max_steps, self.lr_schedule.end_step)
        if end < cfg.train.max_steps:
            self.log(f"the lr schedule ends at step {end}: training stops there (A1111 rule)")
        main = acc.is_main_process
        if self.start_step == 0 and cfg.save.save_every_steps:
            self.save(0, final=False)  # the starting vectors: the sweep's "before"
        if main and cfg.preview.every_steps and self.start_step == 0:
            self.preview(0)
        stop = _StopRequest()
        loop_start = time.perf_counter()
        bar = tqdm(total=end, initial=self.start_step, disable=not main, desc=self.run.name, unit="step")
        step, pending = self.start_step, []
        logs = _LossWriters(self.run, main, self.sources[0], cfg.train.gradient_accumulation_steps, bar)
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
                lr = self.lr_schedule.value(step)
                clip = self.clip_schedule.value(step) if self.clip_schedule else None
                before = self.embeddings.snapshot()  # on the device: no sync
                loss, each = self.step(step, lr, clip)
                step += 1
                bar.update(1)
                pending.append(_Pending(step, lr, loss, each, before))
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
            logs.close()
        self.saver.wait()
        final = self.save(step, final=True, wait=True)
        self.report_speed(step - self.start_step, time.perf_counter() - loop_start)
        return final

    def _flush_losses(self, pending: list[_Pending], logs: _LossWriters) -> None:
        """Read the queued losses, and whether each update left finite vectors, in one GPU sync; log them,
        and stop at the first non-finite loss or vectors, keeping the vectors from before that update."""
        if not pending:
            return
        after = [p.before for p in pending[1:]] + [[p.detach() for p in self.embeddings.parameters]]
        finite = torch.stack([EmbeddingSet.finite(tensors) for tensors in after]).tolist()
        losses = torch.stack([p.loss for p in pending]).tolist()
        each = torch.stack([p.each for p in pending]).tolist()
        for entry, loss, vectors_finite, per_source in zip(pending, losses, finite, each, strict=True):
            if not (math.isfinite(loss) and vectors_finite):
                what = f"loss became {loss}" if not math.isfinite(loss) else "the vectors became non-finite"
                self._stop_with_good_vectors(entry, f"{what} at step {entry.step}")
            logs.write(entry.step, loss, entry.lr, per_source)
        pending.clear()

    def _stop_with_good_vectors(self, entry: _Pending, what: str) -> None:
        """Undo the update of `entry` (its starting vectors are finite: every earlier update was checked),
        make sure that state is saved, and stop."""
        self.embeddings.restore(entry.before)
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
        per_step = cfg.batch_size * len(self.sources) * cfg.gradient_accumulation_steps * acc.num_processes
        samples = steps * per_step
        line = f"{steps} steps in {seconds:.1f} s: {steps / seconds:.2f} steps/s, {samples / seconds:.1f} samples/s"
        if acc.device.type == "cuda":
            line += f", peak GPU memory {torch.cuda.max_memory_allocated(acc.device) / 2**30:.2f} GiB"
        if acc.is_main_process and steps:
            self.log(line + " (loop incl. saves and previews)")

    # ------------------------------------------------------------------ outputs
    def embedding(self, name: str, step: int, blocks: dict[str, torch.Tensor], *, final: bool) -> Embedding:
        """An embedding of the set after `step` updates; saves of a step are named `NAME-STEP` inside, as
        A1111 names its own."""
        return Embedding(
            name=name if final else self.run.step_name(name, step),
            vectors=self.parts.family.file_vectors({k: v.float() for k, v in blocks.items()}),
            step=step,
            checkpoint_hash=self.parts.checkpoint_hash or None,
            checkpoint_name=self.parts.checkpoint_name,
            metadata={TRAINING_SETTINGS_KEY: dump_config(self.config.train)},
            family=self.parts.family.name,
        )

    def save(self, step: int, *, final: bool, wait: bool = False, optimizer_state: bool = True) -> Path:
        """Write every embedding after `step` updates in every format (and the optimizer state).

        The GPU copies into pinned host memory are queued without waiting; a worker thread writes the files once
        they have arrived, so the loop never waits for the disk. `wait=True` writes before returning. A step
        saved already (a Ctrl-C right after a save) is not written twice. Each embedding's first-format file
        is written last: their presence marks the save complete (RunFolder).
        """
        acc, cfg = self.accelerator, self.config
        formats = cfg.save.formats
        first = self.run.final_file(formats[0]) if final else self.run.step_file(step, formats[0])
        if acc.is_main_process and (final or step != self.saved_step):
            self.saved_step = None if final else step
            blocks = {
                m.name: host_copy({k: v.detach() for k, v in m.blocks.items()}) for m in self.embeddings
            }
            for extra in self.extra_saves:
                blocks.update({name: host_copy(b) for name, b in extra().items()})
            state = None
            if not final and optimizer_state and cfg.save.save_optimizer_state:
                scaler = acc.scaler.state_dict() if acc.scaler is not None else None
                state = (host_copy(self.optimizer.state_dict()), scaler)
            ready = copies_ready(acc.device)

            def write() -> None:
                ready()
                if not all(torch.isfinite(v).all() for b in blocks.values() for v in b.values()):
                    if final or wait:
                        raise RuntimeError(f"non-finite vectors reached a checked save of step {step}")
                    return  # a non-finite update: the loop finds it, restores and saves the last good vectors
                if state is not None:
                    save_training_state(self.run.optim_file(step), step, *state)
                for fmt in (*formats[1:], formats[0]):
                    for name, vectors in blocks.items():
                        path = (
                            self.run.final_file(fmt, name) if final else self.run.step_file(step, fmt, name)
                        )
                        save_embedding(
                            self.embedding(name, step, vectors, final=final), path, overwrite=final
                        )

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
        refresh the sheet of every preview so far (previews/index.html); the saver's thread writes the files
        (31 preview PNGs took 1.7 s of encoding in the profiled face recipe)."""
        cfg, parts, t = self.config.preview, self.parts, self.config.train
        images = preview_images(
            cfg, [data.name for data in self.sources], self.sources[0].resolution, resolve_seed(cfg.seed)
        )
        # An empty prompt is a line of that embedding's training template, as A1111 previews.
        templates = {data.name: data.batch(step, 0, 1).prompts[0] for data in self.sources}
        images = [replace(i, prompt=i.prompt or templates[i.name]) for i in images]
        # The objective may add to the negative prompt (DreamArtist: NAME-neg where the prompt has NAME).
        images = [replace(i, negative=self.objective.preview_negative(i.prompt, i.negative)) for i in images]
        if t.low_memory:
            parts.vae.to(self.accelerator.device)
        pictures = {}
        # Graph capture keeps its own memory for good (not for low_memory; and not beside the training graphs
        # of a large model, whose room it would take) and does not mix with torch.compile.
        graphs = t.cuda_graphs and not (t.low_memory or t.compile or parts.family.size_conditioning)
        for settings, group in _by_settings(images).items():
            # A cast's characters render together (each image from its own seed, so batching changes nothing
            # but the time), up to 4 at once beyond preview.batch_size; low_memory keeps to batch_size.
            batch = cfg.batch_size if t.low_memory else min(len(group), max(cfg.batch_size, 4))
            rendered = generate(
                parts, self.conditioner, [i.prompt for i in group], [i.negative for i in group],
                [i.seed for i in group], settings, batch_size=batch, graphs=graphs,
            )  # fmt: skip
            pictures.update({id(image): picture for image, picture in zip(group, rendered, strict=True)})
        if t.low_memory:
            parts.vae.to("cpu")
        paths = files_of(self.run.previews_dir, step, images)
        pngs = []
        for path, image in zip(paths, images, strict=True):
            params = infotext_params(image.settings, image.seed, parts, clip_skip=t.clip_skip)
            pngs.append((pictures[id(image)], path, format_infotext(image.prompt, image.negative, params)))
        cards = []
        if self.config.save.embed_in_png:
            for member in self.embeddings:
                card = self.run.previews_dir / f"{self.run.step_name(member.name, step)}-embedding.png"
                shown = self.run.negative_of(member.name) or member.name  # a negative: its positive's picture
                first = next(pictures[id(i)] for i in images if i.name == shown)
                blocks = {k: v.detach().cpu() for k, v in member.blocks.items()}
                cards.append((self.embedding(member.name, step, blocks, final=False), card, first))
        self.preview_steps.append(step)
        title, steps = ", ".join(self.embeddings.names), list(self.preview_steps)

        def write() -> None:  # PNG encoding off the loop's thread, in order with the saves
            for picture, path, infotext in pngs:
                save_png(picture, path, infotext, overwrite=True)
            for embedding, card, first in cards:
                save_embedding(embedding, card, overwrite=True, image=first)
            write_sheet(self.run.previews_dir, title, steps, images)

        self.saver.submit(write)
        return paths


def _by_settings(images: list[PreviewImage]) -> dict[SamplerSettings, list[PreviewImage]]:
    """Preview pictures grouped by their sampler settings, so each group renders in full batches."""
    groups: dict[SamplerSettings, list[PreviewImage]] = {}
    for image in images:
        groups.setdefault(image.settings, []).append(image)
    return groups


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _mix(seed: int, step: int) -> int:
    """A per-step generator seed: distinct for every (seed, step), stable across runs and processes."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


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
