"""The run folder: every name inside it, how a run resumes from it, and how a sweep reads it.

output_dir/
  config.toml                  the resolved config (the run's record, with its format_version)
  NAME.pt, NAME.safetensors    final embedding of each trained NAME (file stem = trigger word)
  embeddings/NAME-N.pt ...     the embedding after exactly N optimizer updates (N = 0: the start)
  embeddings/NAME-N-neg.pt     DreamArtist's negative NAME-neg after N updates (A1111 DreamArtist's name)
  embeddings/NAME-ema-N.pt     the EMA copy of the vectors (and NAME-ema-N-neg), with ema_mode = "copy"
  embeddings/NAME-N.optim      optimizer state after N updates, beside the first embedding's save (resume)
  previews/NAME-N.png ...      preview images with A1111 infotext; previews/index.html shows them all
  loss.csv, logs/              loss per step (A1111's columns), TensorBoard events
  .lock                        held while a run writes here

A save of step N is complete once every embedding's `embeddings/NAME-N.<first format>` exists: the trainer
writes the optimizer state and the other formats first and those files last, so a run killed while saving
leaves an incomplete save that resuming recognises and removes.
"""

from __future__ import annotations

import csv
import fcntl
import glob
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from library.config import load_config
from library.embeddings import Embedding, load_embedding, save_embedding
from library.errors import UserError
from library.files import atomic_write, ensure_folder, read_torch
from library.tables import TrainConfig

NEGATIVE_SUFFIX = "-neg"  # DreamArtist's negative of NAME is NAME-neg
EMA_SUFFIX = "-ema"  # the saved EMA copy of NAME ([dreamartist] ema_mode = "copy") is NAME-ema
LOSS_COLUMNS = ["step", "epoch", "epoch_step", "loss", "learn_rate"]
SUFFIXES = ("pt", "safetensors")  # the formats a step can be read from, in order of preference


@dataclass(frozen=True)
class RunFolder:
    """The names inside a run folder of the embeddings `names` (the first one is the run's primary)."""

    root: Path
    names: tuple[str, ...]

    @property
    def name(self) -> str:
        """The primary embedding's name: its saves carry the optimizer state."""
        return self.names[0]

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

    def final_file(self, fmt: str, name: str | None = None) -> Path:
        return self.root / f"{name or self.name}.{fmt}"

    def negative_of(self, name: str) -> str | None:
        """The positive NAME when `name` is DreamArtist's negative `NAME-neg` beside it in this run, else None."""
        base = name.removesuffix(NEGATIVE_SUFFIX)
        known = (
            base in self.names or base.removesuffix(EMA_SUFFIX) in self.names
        )  # NAME-ema-neg: an EMA copy's
        return base if base != name and known else None

    def step_name(self, name: str, step: int) -> str:
        """`NAME-N`, and `NAME-N-neg` for DreamArtist's negative (A1111's DreamArtist names them so, and its
        users write `NAME-N` in the prompt beside `NAME-N-neg` in the negative prompt)."""
        base = self.negative_of(name)
        return f"{base}-{step}{NEGATIVE_SUFFIX}" if base else f"{name}-{step}"

    def _step_pattern(self, name: str) -> str:
        base = self.negative_of(name)
        return rf"{re.escape(base)}-(\d+){NEGATIVE_SUFFIX}" if base else rf"{re.escape(name)}-(\d+)"

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The embeddings with a loss of their own (each with its images; not DreamArtist's negative)."""
        return tuple(n for n in self.names if not self.negative_of(n))

    def step_file(self, step: int, fmt: str, name: str | None = None) -> Path:
        return self.embeddings_dir / f"{self.step_name(name or self.name, step)}.{fmt}"

    def optim_file(self, step: int) -> Path:
        return self.embeddings_dir / f"{self.name}-{step}.optim"

    def saved_steps(self, name: str | None = None) -> list[int]:
        """Steps that have an embedding file of `name` (the primary) in embeddings/, ascending."""
        pattern = re.compile(rf"^{self._step_pattern(name or self.name)}\.(pt|safetensors)$")
        if not self.embeddings_dir.is_dir():
            return []
        found = {int(m.group(1)) for p in self.embeddings_dir.iterdir() if (m := pattern.match(p.name))}
        return sorted(found)

    def step_of(self, file: Path, name: str | None = None) -> int | None:
        """The step in the name of a save `NAME-STEP.fmt` of `name` (the primary), or None."""
        match = re.fullmatch(rf"{self._step_pattern(name or self.name)}\.\w+", file.name)
        return int(match.group(1)) if match else None

    def complete_steps(self, formats: tuple[str, ...]) -> list[int]:
        """Saved steps whose save finished (every embedding's first-format file exists), ascending."""
        steps = {s for name in self.names for s in self.saved_steps(name)}
        return sorted(s for s in steps if all(self.step_file(s, formats[0], n).is_file() for n in self.names))

    def files_of(self, step: int) -> list[Path]:
        """Every file a save of `step` may have written."""
        return [
            p
            for name in self.names
            for p in self.embeddings_dir.glob(f"{glob.escape(self.step_name(name, step))}.*")
            if p.is_file()
        ]

    def holds_a_run(self) -> bool:
        """True once a run saved anything here (a start that failed before its first save leaves nothing
        that counts)."""
        return any(
            self.saved_steps(name) or any(self.final_file(f, name).is_file() for f in SUFFIXES)
            for name in self.names
        )

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


# --------------------------------------------------------------------------------------------------
# Resume


def save_training_state(path: Path, step: int, optimizer_state: dict, scaler_state: dict | None) -> None:
    """Optimizer (and fp16 loss-scaler) state after `step` updates, loadable with weights_only=True."""
    buffer = io.BytesIO()
    torch.save({"step": step, "optimizer": optimizer_state, "scaler": scaler_state or {}}, buffer)
    atomic_write(path, buffer.getvalue())


def load_training_state(path: Path) -> dict:
    """The state `save_training_state` wrote; a damaged or foreign file is a UserError."""
    restart = "delete it to restart the optimizer"
    state = read_torch(path, "optimizer state", restart)
    optimizer = state.get("optimizer") if isinstance(state, dict) else None
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)):
        raise UserError(f"{path}: not an optimizer state of this toolkit; {restart}")
    return state


@dataclass
class ResumePoint:
    embeddings: dict[str, Embedding]  # by name: every embedding of the run at `step`
    step: int
    state: dict | None  # optimizer state, None when no .optim file is beside the primary's save
    source: Path  # the primary's file


def find_resume_point(
    target: Path, run: RunFolder, formats: tuple[str, ...], log: Callable[[str], None] = print
) -> ResumePoint | None:
    """Where to continue from: a run folder (its latest complete save) or one `NAME-N` embedding file of
    the primary (the others' saves of that step are beside it).

    A run folder with no complete save yet gives None (start from step 0). An incomplete save after the
    latest complete one (the run was killed while saving) is removed: training writes it again.
    """
    if target.is_dir():
        here = RunFolder(target, run.names)
        complete = here.complete_steps(formats)
        for step in [s for s in here.saved_steps() if s not in complete and s > max(complete, default=-1)]:
            for file in here.files_of(step):
                file.unlink()
            log(f"removed the incomplete save of step {step} (the run stopped while writing it)")
        if not complete:
            return None
        files = {name: here.step_file(complete[-1], formats[0], name) for name in run.names}
    elif target.is_file():
        files = {run.name: target}
        step = run.step_of(target)
        for other in run.names[1:]:
            if step is None:
                raise UserError(
                    f"{target}: not a {run.name}-N save; give a run folder or a {run.name}-N file"
                )
            files[other] = target.with_name(run.step_file(step, target.suffix.lstrip("."), other).name)
    else:
        raise UserError(f"{target}: not found; give a run folder or a NAME-N embedding file to --resume")
    embeddings = {name: _step_embedding(file, run.step_of(file, name)) for name, file in files.items()}
    step = embeddings[run.name].step
    if any(e.step != step for e in embeddings.values()):
        raise UserError(
            f"{target}: the embeddings of its step {step} disagree on their step; resume another one"
        )
    optim = files[run.name].with_suffix(".optim")
    state = load_training_state(optim) if optim.exists() else None
    if state is not None and state.get("step") != step:
        state = None
    return ResumePoint(embeddings, step, state, files[run.name])


def _step_embedding(file: Path, named_step: int | None) -> Embedding:
    """A save to resume from, with its step: recorded in the file, or else in its run-folder name (an SDXL
    `.pt` holds only the `clip_l`/`clip_g` pair, since A1111 fails on anything beside it)."""
    if not file.is_file():
        raise UserError(f"{file}: missing; --resume needs every embedding of the run at that step")
    embedding = load_embedding(file)
    if embedding.step is None and embedding.is_sdxl:
        embedding.step = named_step
    if embedding.step is None:
        raise UserError(
            f"{file}: this embedding does not record its step; it can seed a run (embedding.init_from) but not resume one"
        )
    return embedding


def check_no_later_saves(run: RunFolder, step: int) -> None:
    """Refuse to resume from an earlier step into a folder whose later saves would be overwritten."""
    later = [s for name in run.names for s in run.saved_steps(name) if s > step]
    if later:
        raise UserError(
            f"{run.embeddings_dir}: holds saves after step {step} (up to {max(later)}); "
            "resuming would overwrite them: move them away or set save.output_dir to a new folder"
        )


# --------------------------------------------------------------------------------------------------
# loss.csv


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


def loss_columns(names: tuple[str, ...]) -> list[str]:
    """A1111's columns; with several embeddings, each one's own loss after them (`loss_NAME`)."""
    return LOSS_COLUMNS + ([f"loss_{name}" for name in names] if len(names) > 1 else [])


def trim_loss_log(run: RunFolder, step: int) -> None:
    """Drop loss rows past `step` (and unreadable ones) so a resumed run's log has each step once."""
    if not run.loss_csv.exists():
        return
    rows = [r for r in read_loss_rows(run.loss_csv) if int(r["step"]) <= step]
    out = io.StringIO()
    writer = csv.DictWriter(out, loss_columns(run.loss_names), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run.loss_csv, out.getvalue())


class LossLog:
    """Appends A1111-style loss rows (step, epoch, epoch_step, loss, learn_rate[, loss_NAME ...])."""

    def __init__(self, run: RunFolder):
        new = not run.loss_csv.exists()
        ensure_folder(run.root)
        self.handle = run.loss_csv.open("a", newline="")
        self.writer = csv.writer(self.handle)
        if new:
            self.writer.writerow(loss_columns(run.loss_names))

    def write(self, step: int, epoch: int, epoch_step: int, loss: float, lr: float, each=()) -> None:
        self.writer.writerow(
            [step, epoch, epoch_step, f"{loss:.7f}", f"{lr:.10g}", *(f"{v:.7f}" for v in each)]
        )

    def close(self) -> None:
        self.handle.close()


# --------------------------------------------------------------------------------------------------
# A finished run, as the sweep reads it


@dataclass(frozen=True)
class Run:
    """A training run (ours, or an A1111 folder of embeddings/NAME-N files): its saved steps by file, its
    config (when it has one) and its loss log.

    `resolve` says which file a prompt word stands for: `NAME-20` is embeddings/NAME-20.pt, `NAME` the final
    file, and a step that was not saved is an error (never a silent fall-back to `NAME`).
    """

    folder: RunFolder
    files: dict[str, dict[int, Path]]  # name -> step -> embeddings/NAME-N.pt (or .safetensors)
    config: TrainConfig | None

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def names(self) -> tuple[str, ...]:
        return self.folder.names

    @property
    def steps(self) -> list[int]:
        """The saved steps of the primary embedding (every embedding of a run is saved at the same steps)."""
        return sorted(self.files[self.name])

    def final_file(self, name: str | None = None) -> Path | None:
        return next((p for fmt in SUFFIXES if (p := self.folder.final_file(fmt, name)).is_file()), None)

    @property
    def cast(self) -> tuple[str, ...]:
        """The characters of a run trained from [[embeddings]], when it is read whole (empty for one
        character of it, one embedding or a DreamArtist pair)."""
        return (
            self.names if self.config is not None and self.config.embeddings and len(self.names) > 1 else ()
        )

    def character(self, name: str, *, alone: bool = False) -> Run:
        """The run seen from one character of its cast: `name` is the primary (the sweep's [name], its
        steps); the others still resolve in prompts, or are left out with `alone` (an export of `name`)."""
        names = (name,) if alone else (name, *(n for n in self.names if n != name))
        return Run(RunFolder(self.folder.root, names), {n: self.files[n] for n in names}, self.config)

    def dataset(self):
        """The primary embedding's training images ([dataset], or its own [[embeddings]] folder); None
        without a config."""
        if self.config is None:
            return None
        return next(
            (p.dataset for p in self.config.plans() if p.embedding.name == self.name), self.config.dataset
        )

    def pattern(self) -> re.Pattern:
        """Any embedding's `NAME` or `NAME-<suffix>` as a whole word, case-insensitive (CLIP lowercases
        prompts); longer names first, so one that continues another (`NAME-neg`) is read whole."""
        names = "|".join(re.escape(n) for n in sorted(self.names, key=len, reverse=True))
        # DreamArtist's negative of a step is `NAME-N-neg` (its file's name), so `-neg` may follow the step.
        negative = f"(?P<neg>{NEGATIVE_SUFFIX})?"
        return re.compile(rf"(?<![\w-])(?P<name>{names})(?:-(?P<step>\w+){negative})?(?![\w])", re.IGNORECASE)

    def resolve(self, token: str) -> tuple[str, Path]:
        """The embedding name a prompt word stands for and its file: `NAME-20` -> embeddings/NAME-20.pt."""
        match = self.pattern().fullmatch(token)
        if match is None:
            raise UserError(f"{token!r} is none of this run's embeddings ({', '.join(self.names)})")
        name = next(n for n in self.names if n.lower() == match["name"].lower())
        suffix = match["step"]
        if match["neg"]:
            negative = next((n for n in self.names if n.lower() == (name + NEGATIVE_SUFFIX).lower()), None)
            if negative is None or not self.folder.negative_of(negative):
                raise UserError(
                    f"{token!r}: this run has no negative {name}{NEGATIVE_SUFFIX}; write {name}-N"
                )
            name = negative
        if suffix is None:
            final = self.final_file(name)
            if final is None:
                raise UserError(
                    f"'{name}' without a step means the final embedding, but {self.folder.root} has no "
                    f"{name}.pt; write {name}-N with a saved step ({describe_steps(self.steps)})"
                )
            return name, final
        steps = self.files.get(name, {})
        if not suffix.isdigit() or int(suffix) not in steps:
            raise UserError(
                f"'{token}' is not a saved step of {self.folder.embeddings_dir}; saved steps: "
                f"{describe_steps(sorted(steps))}; write {name}-N with one of them"
            )
        return self.folder.step_name(name, int(suffix)), steps[int(suffix)]

    def at_step(self, text: str, step: int) -> str:
        """`text` with every embedding word of the run naming `step`: `NAME` -> `NAME-20`, and DreamArtist's
        negative `NAME-neg` (or `NAME-5-neg`) -> `NAME-20-neg`, the word its file gives it."""

        def named(match: re.Match) -> str:
            name = next(n for n in self.names if n.lower() == match["name"].lower())
            if match["neg"] and not self.folder.negative_of(name):
                name = next((n for n in self.names if n.lower() == (name + NEGATIVE_SUFFIX).lower()), name)
            return self.folder.step_name(name, step)

        return self.pattern().sub(named, text)

    def tokens_in(self, text: str) -> list[str]:
        return [m.group(0) for m in self.pattern().finditer(text)]

    def loss(self) -> list[tuple[int, float]]:
        """(step, loss) rows of loss.csv; empty when the run has none."""
        if not self.folder.loss_csv.is_file():
            return []
        return [(int(r["step"]), float(r["loss"])) for r in read_loss_rows(self.folder.loss_csv)]


def describe_steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 12:
        return ", ".join(map(str, steps))
    return f"{len(steps)} steps from {steps[0]} to {steps[-1]}: {', '.join(map(str, steps[:5]))}, ..., {steps[-1]}"


def open_run(folder: str, name: str = "") -> Run:
    """Read a run folder (ours, or any folder with embeddings/NAME-N files such as A1111's)."""
    if not folder:
        raise UserError(
            "run.folder is empty: set it to the training run's output folder, e.g. run.folder=output/face"
        )
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: run folder not found; set run.folder to the folder training wrote")
    config = load_config(TrainConfig, root / "config.toml") if (root / "config.toml").is_file() else None
    names = (
        (name,) if name else tuple(p.embedding.name for p in config.plans()) if config else _only_names(root)
    )
    run = RunFolder(root, names)
    files = {n: {} for n in names}
    for n in names:
        for step in run.saved_steps(n):
            files[n][step] = next(p for fmt in SUFFIXES if (p := run.step_file(step, fmt, n)).is_file())
    found = Run(run, files, config)
    if not files[run.name] and found.final_file() is None:
        raise UserError(
            f"{run.embeddings_dir}: no saved '{run.name}-N' embeddings; check run.folder and run.name"
        )
    return found


def _only_names(root: Path) -> tuple[str, ...]:
    """The one NAME of a folder of embeddings/NAME-N files, with NAME-neg when NAME-N-neg files are there
    (an A1111 DreamArtist run)."""
    found = [
        m.groups()
        for p in (root / "embeddings").glob("*")
        if (m := re.match(rf"(.+)-\d+({NEGATIVE_SUFFIX})?\.(pt|safetensors)$", p.name))
    ]
    names = {name for name, _, _ in found}
    if len(names) != 1:
        listed = ", ".join(sorted(names)) or "none"
        raise UserError(
            f"{root}: no config.toml and embeddings of {listed}; set run.name to the trigger word"
        )
    name = names.pop()
    return (name, name + NEGATIVE_SUFFIX) if any(neg for _, neg, _ in found) else (name,)


def export_step(
    run: Run,
    step: int,
    folder: str | Path,
    formats: tuple[str, ...],
    *,
    overwrite: bool = False,
    log: Callable = print,
) -> list[Path]:
    """Write step `step` of every embedding of the run as `NAME.<fmt>` in `folder` (file stem = trigger word)."""
    if not str(folder):
        raise UserError(
            "--export needs a folder: --export-to DIR or export.folder (e.g. your A1111 embeddings/)"
        )
    folder = Path(folder).expanduser()
    plans = []
    for name in run.names:
        _, source = run.resolve(run.folder.step_name(name, step))
        targets = [folder / f"{name}.{fmt.lstrip('.')}" for fmt in formats]
        plans.append((name, source, targets))
    existing = [str(t) for _, _, targets in plans for t in targets if t.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]}: already exists; pass --overwrite or choose another export folder")
    paths = []
    for name, source, targets in plans:
        embedding = load_embedding(source)
        out = Embedding(
            name, embedding.vectors, embedding.step, embedding.checkpoint_hash, embedding.checkpoint_name,
            dict(embedding.metadata), embedding.family,
        )  # fmt: skip
        out.metadata.pop("stored_name", None)
        paths += [save_embedding(out, target, overwrite=overwrite) for target in targets]
        log(f"exported {source.name} (step {embedding.step}) as {', '.join(str(t) for t in targets)}")
    return paths
