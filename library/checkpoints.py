"""The run folder: where a training run writes its files, and how a run is resumed from them.

output_dir/
  config.toml                 resolved config of the run
  NAME.pt, NAME.safetensors   final embedding (file stem = trigger word)
  embeddings/NAME-N.pt ...    the embedding after exactly N optimizer updates
  embeddings/NAME-N.optim     optimizer state after N updates (resume)
  previews/NAME-N.png         preview images with A1111 infotext
  loss.csv, logs/             loss per step (A1111's columns), TensorBoard events
"""

from __future__ import annotations

import csv
import fcntl
import glob
import io
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from library.embeddings import Embedding, load_embedding
from library.errors import UserError
from library.files import TORCH_LOAD_ERRORS, atomic_write, ensure_folder, torch_load_problem

LOSS_COLUMNS = ["step", "epoch", "epoch_step", "loss", "learn_rate"]


@dataclass(frozen=True)
class RunFolder:
    """The names inside a run folder, and what its saves are.

    A save of step N is complete once `embeddings/NAME-N.<first format>` exists: the trainer writes the
    optimizer state and the other formats first and that file last, so a run killed while saving leaves an
    incomplete save that resuming recognises and removes.
    """

    root: Path
    name: str

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    @property
    def previews_dir(self) -> Path:
        return self.root / "previews"

    @property
    def loss_csv(self) -> Path:
        return self.root / "loss.csv"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def final_file(self, fmt: str) -> Path:
        return self.root / f"{self.name}.{fmt}"

    def step_file(self, step: int, fmt: str) -> Path:
        return self.embeddings_dir / f"{self.name}-{step}.{fmt}"

    def optim_file(self, step: int) -> Path:
        return self.embeddings_dir / f"{self.name}-{step}.optim"

    def saved_steps(self) -> list[int]:
        """Steps that have an embedding file in embeddings/, ascending."""
        pattern = re.compile(rf"^{re.escape(self.name)}-(\d+)\.(pt|safetensors)$")
        if not self.embeddings_dir.is_dir():
            return []
        found = {int(m.group(1)) for p in self.embeddings_dir.iterdir() if (m := pattern.match(p.name))}
        return sorted(found)

    def complete_steps(self, formats: tuple[str, ...]) -> list[int]:
        """Saved steps whose save finished (their first format's file exists), ascending."""
        return [s for s in self.saved_steps() if self.step_file(s, formats[0]).is_file()]

    def files_of(self, step: int) -> list[Path]:
        """Every file a save of `step` may have written."""
        return [p for p in self.embeddings_dir.glob(f"{glob.escape(self.name)}-{step}.*") if p.is_file()]

    def holds_a_run(self) -> bool:
        """True once a run saved anything here (a start that failed before its first save leaves nothing
        that counts)."""
        return bool(self.saved_steps()) or any(self.final_file(f).is_file() for f in ("pt", "safetensors"))

    def lock(self) -> IO:
        """Hold the folder for one run (until the returned file is closed): a second run into the same
        folder is refused while this one lives. The lock goes with the process, so a killed run leaves none."""
        ensure_folder(self.root)
        try:
            handle = open(self.lock_file, "a")  # noqa: SIM115 - kept open for the whole run
        except OSError as error:  # the first file a run creates: a read-only or full folder shows here
            raise UserError(
                f"{self.root}: cannot write in this folder ({error.strerror}); set save.output_dir to a "
                "folder you can write to"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(
                f"{self.root}: another training run is writing to this folder; wait for it to finish "
                "or set save.output_dir to a new folder"
            ) from None
        return handle


def save_training_state(path: Path, step: int, optimizer_state: dict, scaler_state: dict | None) -> None:
    """Optimizer (and fp16 loss-scaler) state after `step` updates, loadable with weights_only=True."""
    buffer = io.BytesIO()
    torch.save({"step": step, "optimizer": optimizer_state, "scaler": scaler_state or {}}, buffer)
    atomic_write(path, buffer.getvalue())


def load_training_state(path: Path) -> dict:
    """The state `save_training_state` wrote; a damaged or foreign file is a UserError."""
    restart = "delete it to restart the optimizer"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as exc:
        raise UserError(
            f"{path}: cannot read optimizer state ({torch_load_problem(exc)}); {restart}"
        ) from None
    optimizer = state.get("optimizer") if isinstance(state, dict) else None
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)):
        raise UserError(f"{path}: not an optimizer state of this toolkit; {restart}")
    return state


@dataclass
class ResumePoint:
    embedding: Embedding
    step: int
    state: dict | None  # optimizer state, None when no .optim file is beside the embedding
    source: Path


def find_resume_point(
    target: Path, name: str, formats: tuple[str, ...], log: Callable[[str], None] = print
) -> ResumePoint | None:
    """Where to continue from: a run folder (its latest complete save) or one `NAME-N` embedding file.

    A run folder with no complete save yet gives None (start from step 0). An incomplete save after the
    latest complete one (the run was killed while saving) is removed: training writes it again.
    """
    if target.is_dir():
        run = RunFolder(target, name)
        complete = run.complete_steps(formats)
        for step in [s for s in run.saved_steps() if s not in complete and s > max(complete, default=-1)]:
            for file in run.files_of(step):
                file.unlink()
            log(f"removed the incomplete save of step {step} (the run stopped while writing it)")
        if not complete:
            return None
        file = run.step_file(complete[-1], formats[0])
        optim = run.optim_file(complete[-1])
    elif target.is_file():
        file = target
        optim = target.with_suffix(".optim")
    else:
        raise UserError(f"{target}: not found; give a run folder or a NAME-N embedding file to --resume")
    embedding = load_embedding(file)
    if embedding.step is None:
        raise UserError(
            f"{file}: this embedding does not record its step; it can seed a run (embedding.init_from) but not resume one"
        )
    state = load_training_state(optim) if optim.exists() else None
    if state is not None and state.get("step") != embedding.step:
        state = None
    return ResumePoint(embedding, embedding.step, state, file)


def check_no_later_saves(run: RunFolder, step: int) -> None:
    """Refuse to resume from an earlier step into a folder whose later saves would be overwritten."""
    later = [s for s in run.saved_steps() if s > step]
    if later:
        raise UserError(
            f"{run.embeddings_dir}: holds saves after step {step} (up to {later[-1]}); "
            "resuming would overwrite them: move them away or set save.output_dir to a new folder"
        )


def read_loss_rows(path: Path) -> list[dict[str, str]]:
    """The rows of loss.csv whose step and loss are numbers. A run killed while appending leaves half a
    row, and a hand edit may leave anything: such rows are skipped, the log is only a record."""

    def numbers(row: dict) -> bool:
        try:
            int(row["step"]), float(row["loss"])
        except (KeyError, TypeError, ValueError):  # a missing column, a short row, a word
            return False
        return True

    rows = []
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return rows
            except csv.Error:  # binary junk: a "field" longer than csv's limit
                continue
            if numbers(row):
                rows.append(row)


def trim_loss_log(run: RunFolder, step: int) -> None:
    """Drop loss rows past `step` (and unreadable ones) so a resumed run's log has each step once."""
    if not run.loss_csv.exists():
        return
    rows = [r for r in read_loss_rows(run.loss_csv) if int(r["step"]) <= step]
    out = io.StringIO()
    writer = csv.DictWriter(out, LOSS_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run.loss_csv, out.getvalue())


class LossLog:
    """Appends A1111-style loss rows (step, epoch, epoch_step, loss, learn_rate) to loss.csv."""

    def __init__(self, path: Path):
        self.path = path
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("a", newline="")
        self.writer = csv.writer(self.handle)
        if new:
            self.writer.writerow(LOSS_COLUMNS)

    def write(self, step: int, epoch: int, epoch_step: int, loss: float, lr: float) -> None:
        self.writer.writerow([step, epoch, epoch_step, f"{loss:.7f}", f"{lr:.10g}"])

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class BackgroundSaver:
    """Runs save jobs in order on one worker thread, so training never waits for the disk.

    A job's exception is raised in the training thread at the next `submit` or `wait`.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ti-saver")
        self._jobs: list[Future] = []

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.append(self._pool.submit(job))
        while self._jobs and self._jobs[0].done():
            self._jobs.pop(0).result()

    def wait(self) -> None:
        """Block until every submitted job has finished; re-raise the first failure."""
        jobs, self._jobs = self._jobs, []
        failures = [error for job in jobs if (error := job.exception()) is not None]
        if failures:
            raise failures[0]

    def drain(self) -> None:
        """Block until every submitted job has finished, keeping quiet about failures: for when training
        already stops with an error of its own, which is the one the user should see."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.exception()


def host_copy(value):
    """A host copy of a tensor (or a dict/list/tuple of them) queued without waiting for the GPU.

    CUDA tensors go into pinned memory with non-blocking copies; call `copies_ready` before reading them.
    """
    if isinstance(value, torch.Tensor):
        if value.device.type != "cuda":
            return value.detach().clone()
        out = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        return out.copy_(value.detach(), non_blocking=True)
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(host_copy(v) for v in value)
    return value


def copies_ready(device: torch.device) -> Callable[[], None]:
    """A function that blocks until the host copies queued so far on `device` have landed."""
    if torch.device(device).type != "cuda":
        return lambda: None
    event = torch.cuda.Event()
    event.record()
    return event.synchronize
