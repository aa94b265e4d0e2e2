"""A validation sweep as one session: render the plans on each checkpoint, save and score every cell as it
comes, optionally a fine pass where the scores point, then the grids, the recommendation and the report.

`run_sweep(config, export=...)` is what sweep_validate.py runs. The recipe: check and plan every cell before
loading anything (library/sweep.py); load each checkpoint once and render all its cells in full batches;
save and score each cell (library/report.py, library/scoring.py); recommend a step
(library/recommendation.py); export one (library/run_folder.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from library import leakage, report, scoring
from library.config import dump_config
from library.errors import UserError
from library.files import atomic_write
from library.recommendation import BASELINE_STEP, Recommendation, recommend, step_curves
from library.run_folder import Run, export_step, open_run
from library.sampling import resolve_seed
from library.shards import Shards
from library.sweep import (
    Plan,
    auto_interval,
    base_prompt,
    fine_plan,
    parse_axis,
    parse_interval,
    plan,
    step_axis_index,
)
from library.sweep_rendering import batch_grid, render_by_checkpoint
from library.tables import SweepConfig


def run_sweep(
    cfg: SweepConfig, *, export: str = "", overwrite: bool = False, log=print
) -> Recommendation | None:
    """The sweep `cfg` describes (or, with `export` a step number, only that step's export); `export`
    "recommended" exports the recommended step after the sweep."""
    export = export.strip().lower()
    if export and export != "recommended" and not export.isdigit():
        raise UserError(f"--export {export!r}: give a saved step number, or 'recommended'")
    if export and not cfg.export.folder:
        raise UserError("--export needs a folder: add --export-to DIR (e.g. your A1111 embeddings/ folder)")
    if export == "recommended" and not cfg.scoring.model:
        raise UserError(
            "--export recommended needs scores: set scoring.model (a local CLIP), or export a step with --export STEP"
        )
    run = open_run(cfg.run.folder, cfg.run.name)
    if export.isdigit():
        export_step(run, int(export), cfg.export.folder, cfg.export.formats, overwrite=overwrite, log=log)
        return None
    shards = Shards.of_launch()
    log = log if shards.main else (lambda *_: None)
    # One seed for the whole sweep (coarse and fine passes, every process), recorded in its config.toml.
    cfg = replace(cfg, render=replace(cfg.render, seed=shards.gather([resolve_seed(cfg.render.seed)])[0]))
    if run.cast:
        sweep_cast(cfg, run, shards, export=export, overwrite=overwrite, log=log)
        return None
    started = time.perf_counter()
    sweep = Sweep.setup(cfg, run, shards, log)
    sweep.render(sweep.plans, log)
    if cfg.fine.interval.strip().lower() == "auto":
        sweep.fine_pass_where_scores_point(log)
    page, rec = sweep.write(started, log)
    n, total, rendering = len(sweep.rows), time.perf_counter() - started, max(sweep.render_seconds, 1e-9)
    log(
        f"recommendation: {rec.reason}"
        if rec
        else "no recommended step (scores are off or name no step): compare the grid"
    )
    log(f"report: {page}")
    log(
        f"{n} images in {total:.1f} s total ({n / total:.2f} images/s overall, loading included); "
        f"rendering {rendering:.1f} s ({n / rendering:.2f} images/s)"
    )
    if export == "recommended":
        if rec is None or rec.step is None:
            raise UserError(
                "--export recommended: the sweep recommends no step; export one with --export STEP"
            )
        if shards.main:
            export_step(run, rec.step, cfg.export.folder, cfg.export.formats, overwrite=overwrite, log=log)
    shards.wait()
    return rec


@dataclass
class Sweep:
    """One validation sweep: its plans, the scorer, and what has been rendered and scored so far."""

    cfg: SweepConfig
    run: Run
    out: Path
    axes: tuple
    plans: list[Plan]
    shards: Shards
    scorer: scoring.Scorer | None = None
    references: list = field(default_factory=list)
    bar: float = 0.0
    notes: list[str] = field(default_factory=list)
    cells: dict = field(default_factory=dict)  # (plan name, cell index) -> its images' files (or one picture)
    scored: list = field(default_factory=list)  # (checkpoint label, step, CellScores)
    rows: list[dict] = field(default_factory=list)  # scores.csv
    render_seconds: float = 0.0
    rivals: list[leakage.Rival] = field(default_factory=list)  # the cast's other characters
    leaks: list[leakage.Leak] = field(default_factory=list)

    @classmethod
    def setup(
        cls, cfg: SweepConfig, run: Run, shards: Shards, log=print, scorer: scoring.Scorer | None = None
    ) -> Sweep:
        """Check the settings and plan every cell (every NAME-N must exist) before any model is loaded
        (`scorer`: one already loaded for scoring.model). `cfg.render.seed` is resolved already."""
        out = (
            Path(cfg.sweep.output_dir).expanduser()
            if cfg.sweep.output_dir
            else run.folder.root / "validation"
        )
        if (out / "report.html").exists() or (out / "cells").exists():
            raise UserError(f"{out}: already holds a sweep; set sweep.output_dir to a new folder")
        prompt = base_prompt(cfg, run)
        axes = tuple(
            parse_axis(a, n, cfg, run, prompt) for n, a in (("x", cfg.x), ("y", cfg.y), ("z", cfg.z))
        )
        interval = cfg.fine.interval.strip().lower()
        if interval == "auto" and not cfg.scoring.model:
            raise UserError(
                'fine.interval = "auto" follows the scores: set scoring.model, or name an interval like 40-80'
            )
        if not cfg.fine.coarse and interval in ("", "auto"):
            raise UserError(
                "fine.coarse = false renders only the fine pass: set fine.interval to FIRST-LAST, e.g. 40-80"
            )
        if cfg.fine.every < 1:
            raise UserError(f"fine.every = {cfg.fine.every}: must be at least 1")
        plans = [plan(cfg, run, axes)] if cfg.fine.coarse else []
        if interval not in ("", "auto"):
            plans.append(fine_plan(cfg, run, axes, parse_interval(interval)))
        sweep = cls(cfg, run, out, axes, plans, shards)
        if cfg.scoring.model:
            sweep.scorer = scorer or scoring.load_scorer(cfg.scoring.model, shards.device())
            sweep.references = scoring.load_references(cfg.scoring.reference_dir, run.dataset())
            sweep.bar = cfg.scoring.likeness_bar * scoring.reference_likeness(sweep.scorer, sweep.references)
            log(
                f"scores by {cfg.scoring.model}: {len(sweep.references)} training images, likeness bar {sweep.bar:.3f}"
            )
        else:
            sweep.notes.append(
                "Scores are off (scoring.model is empty): the sweep renders, but recommends no step."
            )
            log("scores are off: set scoring.model to a local CLIP folder to get a recommended step")
        shards.wait()  # every process has checked the folder before the first writes to it
        if shards.main:
            atomic_write(out / "config.toml", dump_config(cfg))
        return sweep

    def render(self, plans: list[Plan], log=print) -> None:
        """Render the plans checkpoint by checkpoint; save and score each cell."""
        render_together([(self, p) for p in plans], log)

    def take(self, job: int, p: Plan, index: int, batch: list[Image.Image], parts) -> Rendered:
        """Save and score one cell this process rendered (and say which of its images show another
        character of the cast)."""
        cell = p.cells[index]
        clip_skip = self.run.config.train.clip_skip if self.run.config else 0
        paths = report.save_cell_images(self.out, p, cell, batch, parts, clip_skip)
        self.cells[(p.name, index)] = batch_grid(batch)
        result, shown = None, [() for _ in batch]
        if self.scorer is not None:
            clip_prompt = scoring.adherence_prompt(cell.prompt, self.run.name, self.cfg.scoring.class_word)
            result = scoring.score_cell(self.scorer, batch, self.references, clip_prompt)
            if cell.step is not None and self.rivals:
                flags = [rival.shown_in(self.scorer, batch, result.likeness) for rival in self.rivals]
                names = [rival.name for rival in self.rivals]
                shown = [
                    tuple(n for n, f in zip(names, each, strict=True) if f)
                    for each in zip(*flags, strict=True)
                ]
        return Rendered(job, index, tuple(paths), result, tuple(shown))

    def keep(self, p: Plan, done: Rendered) -> None:
        """Record a cell that some process rendered: its scores.csv rows, its scores and leakage."""
        cell = p.cells[done.index]
        self.cells.setdefault((p.name, done.index), done.paths)
        if done.result is not None and cell.step is not None:
            self.scored.append((cell.checkpoint_label, cell.step, done.result))
            for rival in self.rivals:
                leaked = sum(rival.name in names for names in done.shown)
                self.leaks.append(
                    leakage.Leak(
                        self.run.name, cell.checkpoint_label, cell.step, rival.name, len(done.shown), leaked
                    )
                )
        rows = [
            report.score_row(self.out, p, cell, i, path, done.result) for i, path in enumerate(done.paths)
        ]
        if self.rivals:
            for row, names in zip(rows, done.shown, strict=True):
                row["shows_other"] = " ".join(names)
        self.rows += rows

    def picture(self, key: tuple[str, int]) -> Image.Image:
        """A cell's images as one picture (read back from their files when another process rendered it)."""
        found = self.cells[key]
        if isinstance(found, Image.Image):
            return found
        images = []
        for path in found:
            with Image.open(path) as saved:
                images.append(saved.convert("RGB"))
        return batch_grid(images)

    def recommendation(self) -> tuple[list, Recommendation | None]:
        curves = step_curves(self.scored)
        if not curves:
            return curves, None
        s = self.cfg.scoring
        return curves, recommend(
            curves, self.bar, collapse_ratio=s.collapse_ratio, adherence_drop=s.adherence_drop
        )

    def fine_pass_where_scores_point(self, log=print) -> None:
        _, rec = self.recommendation()
        index = step_axis_index(self.axes)
        if rec is None or rec.step is None or index is None:
            self.notes.append(
                "fine.interval = auto: the coarse scores point to no step, so there is no fine pass."
            )
            return
        lo, hi = auto_interval(sorted({c.step for c in self.plans[0].cells if c.step is not None}), rec.step)
        log(
            f"coarse-to-fine: the scores point to steps {lo}-{hi}; rendering every {self.cfg.fine.every} steps there"
        )
        self.plans.append(fine_plan(self.cfg, self.run, self.axes, (lo, hi)))
        self.render(self.plans[-1:], log)

    def write(self, started: float, log=print) -> tuple[Path, Recommendation | None]:
        """The grids, scores.csv and report.html (the first process writes them)."""
        curves, rec = self.recommendation() if self.scorer is not None else ([], None)
        if not self.shards.main:
            return self.out / "report.html", rec
        if self.scorer is not None and rec is None:
            self.notes.append("No cell names a single embedding step, so no step is recommended.")
        if any(c.step == BASELINE_STEP for p in self.plans for c in p.cells):
            self.notes.append(
                f"Step 0 ({self.run.name}-0) is the embedding before training, its starting vectors: "
                "the baseline to compare with, never recommended."
            )
        grids = []
        for p in self.plans:
            images = {(c.x, c.y, c.z): self.picture((p.name, i)) for i, c in enumerate(p.cells)}
            name = "grid.png" if p.name == "coarse" else f"grid-{p.name}.png"
            grids.append(
                (
                    f"{p.name.capitalize()} sweep",
                    report.save_grid(self.out / name, p, images, self.cfg.sweep.grid_margin),
                )
            )
            log(f"wrote {grids[-1][1]}")
        report.write_scores_csv(self.out / "scores.csv", self.rows)
        n, rendering = len(self.rows), max(self.render_seconds, 1e-9)
        checkpoints = dict.fromkeys(c.checkpoint_label for p in self.plans for c in p.cells)
        summary = [
            ("run", str(self.run.folder.root)),
            ("prompt", base_prompt(self.cfg, self.run)),
            ("checkpoints", ", ".join(checkpoints)),
            ("images", f"{n} in {rendering:.1f} s of rendering ({n / rendering:.2f} images/s)"),
            ("total time", f"{time.perf_counter() - started:.1f} s"),
        ]
        page = report.write_report(
            self.out / "report.html",
            title=f"Validation sweep of {self.run.name}",
            grids=grids,
            loss=self.run.loss(),
            curves=curves,
            recommendation=rec,
            notes=self.notes,
            summary=summary,
        )
        return page, rec


@dataclass(frozen=True)
class Rendered:
    """A cell as the process that rendered it saved and scored it: what every process keeps of it."""

    job: int  # the plan's place in render_together's jobs
    index: int  # the cell's place in its plan
    paths: tuple[Path, ...]
    result: scoring.CellScores | None
    shown: tuple[tuple[str, ...], ...]  # per image: the other characters of the cast it shows


def render_together(jobs: list[tuple[Sweep, Plan]], log=print) -> None:
    """Render the plans of one or more sweeps of a run (a cast's characters) in one pass over the
    checkpoints, each loaded once; every cell goes to its own sweep. Under a launch of several processes
    each renders its share of the cells; every process then keeps every cell's record, in plan order."""
    first = jobs[0][0]
    shards, plans = first.shards, [p for _, p in jobs]
    for _, parts, images, seconds in render_by_checkpoint(first.cfg, first.run, plans, shards, log):
        done = [jobs[k][0].take(k, jobs[k][1], index, batch, parts) for (k, index), batch in images.items()]
        everyone = sorted(shards.gather(done), key=lambda d: (d.job, d.index))
        seconds = max(shards.gather([seconds]))  # the slowest process's
        total = max(sum(len(d.paths) for d in everyone), 1)
        for d in everyone:
            sweep, p = jobs[d.job]
            sweep.keep(p, d)
            sweep.render_seconds += seconds * len(d.paths) / total  # each sweep's share of the time
        for scorer in {id(s.scorer): s.scorer for s, _ in jobs if s.scorer is not None}.values():
            scorer.forget()
        del parts, images  # let this checkpoint go before the next one loads


def sweep_cast(
    cfg: SweepConfig, run: Run, shards: Shards, *, export: str, overwrite: bool, log=print
) -> None:
    """The sweep of a cast (a run trained from [[embeddings]], run.name empty): each character's own sweep
    in <out>/NAME/, rendered together (each checkpoint loaded once), each character's images checked
    against every other character's (library/leakage.py), then leakage.csv and cast.html in <out>;
    `export` "recommended" writes each character's recommended step."""
    started = time.perf_counter()
    out = Path(cfg.sweep.output_dir).expanduser() if cfg.sweep.output_dir else run.folder.root / "validation"
    if (out / "cast.html").exists():
        raise UserError(f"{out}: already holds a sweep; set sweep.output_dir to a new folder")
    scorer = scoring.load_scorer(cfg.scoring.model, shards.device()) if cfg.scoring.model else None
    log(f"a cast of {len(run.cast)}: {', '.join(run.cast)}, each swept into {out}/NAME")
    sweeps = []
    for name in run.cast:
        own = replace(
            cfg, run=replace(cfg.run, name=name), sweep=replace(cfg.sweep, output_dir=str(out / name))
        )
        sweeps.append(Sweep.setup(own, run.character(name), shards, log, scorer=scorer))
    if scorer is not None:
        for sweep in sweeps:
            sweep.rivals = [leakage.Rival(o.run.name, o.references, o.bar) for o in sweeps if o is not sweep]
    render_together([(s, p) for s in sweeps for p in s.plans], log)
    if cfg.fine.interval.strip().lower() == "auto":
        for sweep in sweeps:
            sweep.fine_pass_where_scores_point(log)
    leaks = [leak for s in sweeps for leak in s.leaks]
    for sweep in sweeps:
        _, rec = sweep.recommendation() if scorer is not None else ([], None)
        if rec is not None and rec.step is not None and sweep.rivals:
            sweep.notes.append(
                f"Leakage at step {rec.step}: {leakage.describe(leaks, sweep.run.name, rec.step)} "
                "(the cast's leakage table is cast.html beside this folder)."
            )
    results = {s.run.name: s.write(started, log) for s in sweeps}
    missing = [name for name, (_, rec) in results.items() if rec is None or rec.step is None]
    try:
        if shards.main:
            _cast_outputs(cfg, run, out, results, leaks, scorer is not None, export, overwrite, log)
    finally:
        shards.wait()  # the others wait for the first process's files (also when it failed)
    if export == "recommended" and missing:
        raise UserError(
            f"--export recommended: no recommended step for {', '.join(missing)}; export it with "
            f"run.name=NAME --export STEP"
        )


def _cast_outputs(
    cfg, run: Run, out: Path, results: dict, leaks: list, scored: bool, export: str, overwrite: bool, log
) -> None:
    """leakage.csv, cast.html, a line per character, and the exports of `--export recommended`."""
    if scored:
        log(f"wrote {leakage.write_leakage_csv(out / 'leakage.csv', leaks)}")
    page = leakage.write_cast_page(out / "cast.html", run.folder.root, results, leaks)
    for name, (_, rec) in results.items():
        if rec is None or rec.step is None:
            log(f"{name}: no recommended step" + (f" ({rec.reason})" if rec else " (scores are off)"))
        else:
            where = f"; leakage there: {leakage.describe(leaks, name, rec.step)}" if leaks else ""
            log(f"{name}: recommended step {rec.step}{where}")
    log(f"cast report: {page}")
    if export == "recommended":
        for name, (_, rec) in results.items():
            if rec is not None and rec.step is not None:
                character = run.character(name, alone=True)
                export_step(
                    character, rec.step, cfg.export.folder, cfg.export.formats, overwrite=overwrite, log=log
                )
