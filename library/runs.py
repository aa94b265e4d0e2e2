"""A finished training run as the sweep reads it, and the export of one of its steps.

- `open_run` reads the run folder (ours, or A1111's embeddings/NAME-N files); `Run.resolve` says which file a
  prompt word stands for: `NAME-20` is embeddings/NAME-20.pt, `NAME` the final file, and a step that was not
  saved is an error (never a silent fall-back to `NAME`).
- `export_step` copies one step out as `NAME.pt` / `NAME.safetensors` (file stem = trigger word).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from library.checkpoints import RunFolder, read_loss_rows
from library.config import TrainConfig, load_config
from library.embeddings import Embedding, load_embedding, save_embedding
from library.errors import UserError

# --------------------------------------------------------------------------------------------------
# The run folder


@dataclass(frozen=True)
class Run:
    """A training run: its saved steps by file, its config (when it has one) and its loss log."""

    folder: RunFolder
    files: dict[int, Path]  # step -> embeddings/NAME-N.pt (or .safetensors)
    config: TrainConfig | None

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def steps(self) -> list[int]:
        return sorted(self.files)

    def final_file(self) -> Path | None:
        return next(
            (p for fmt in ("pt", "safetensors") if (p := self.folder.final_file(fmt)).is_file()), None
        )

    def pattern(self) -> re.Pattern:
        """`NAME` or `NAME-<suffix>` as a whole word, case-insensitive (CLIP lowercases prompts)."""
        return re.compile(rf"(?<![\w-]){re.escape(self.name)}(?:-(\w+))?(?![\w])", re.IGNORECASE)

    def resolve(self, token: str) -> tuple[str, Path]:
        """The embedding name a prompt word stands for and its file: `NAME-20` -> embeddings/NAME-20.pt."""
        match = self.pattern().fullmatch(token)
        suffix = match.group(1) if match else None
        if suffix is None:
            final = self.final_file()
            if final is None:
                raise UserError(
                    f"'{self.name}' without a step means the final embedding, but {self.folder.root} has no "
                    f"{self.name}.pt; write {self.name}-N with a saved step ({describe_steps(self.steps)})"
                )
            return self.name, final
        if not suffix.isdigit() or int(suffix) not in self.files:
            raise UserError(
                f"'{token}' is not a saved step of {self.folder.embeddings_dir}; saved steps: "
                f"{describe_steps(self.steps)}; write {self.name}-N with one of them"
            )
        return f"{self.name}-{int(suffix)}", self.files[int(suffix)]

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
    name = name or (config.embedding.name if config else _only_name(root))
    run = RunFolder(root, name)
    files: dict[int, Path] = {}
    for step in run.saved_steps():
        files[step] = next(p for fmt in ("pt", "safetensors") if (p := run.step_file(step, fmt)).is_file())
    if not files and not run.final_file("pt").is_file() and not run.final_file("safetensors").is_file():
        raise UserError(
            f"{run.embeddings_dir}: no saved '{name}-N' embeddings; check run.folder and run.name"
        )
    return Run(run, files, config)


def _only_name(root: Path) -> str:
    names = {
        m.group(1)
        for p in (root / "embeddings").glob("*")
        if (m := re.match(r"(.+)-\d+\.(pt|safetensors)$", p.name))
    }
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise UserError(f"{root}: no config.toml and embeddings of {found}; set run.name to the trigger word")
    return names.pop()


# --------------------------------------------------------------------------------------------------
# Export


def export_step(
    run: Run,
    step: int,
    folder: str | Path,
    formats: tuple[str, ...],
    *,
    overwrite: bool = False,
    log: Callable = print,
) -> list[Path]:
    """Write step `step` of the run as `NAME.<fmt>` in `folder` (the file stem is the trigger word)."""
    if not str(folder):
        raise UserError(
            "--export needs a folder: --export-to DIR or export.folder (e.g. your A1111 embeddings/)"
        )
    _, source = run.resolve(f"{run.name}-{step}")
    embedding = load_embedding(source)
    out = Embedding(
        run.name,
        embedding.vectors,
        embedding.step,
        embedding.checkpoint_hash,
        embedding.checkpoint_name,
        dict(embedding.metadata),
    )
    out.metadata.pop("stored_name", None)
    folder = Path(folder).expanduser()
    targets = [folder / f"{run.name}.{fmt.lstrip('.')}" for fmt in formats]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]}: already exists; pass --overwrite or choose another export folder")
    paths = [save_embedding(out, target, overwrite=overwrite) for target in targets]
    log(f"exported {source.name} (step {embedding.step}) as {', '.join(str(p) for p in paths)}")
    return paths
