#!/usr/bin/env python3
"""Pick the best step of a textual-inversion run: render its saved steps side by side, score them, export one.

    python sweep_validate.py --config presets/validate.toml run.folder=output/face
    python sweep_validate.py --config presets/validate.toml run.folder=output/face \\
        'model.checkpoints=["run:checkpoint", "/models/deliberate_v2.safetensors"]' \\
        scoring.model=/models/clip-vit-large-patch14 fine.interval=auto
    python sweep_validate.py --config presets/validate.toml run.folder=output/face --export 60 --export-to ~/webui/embeddings

Settings come from the TOML preset; `table.key=value` arguments override it (docs/sweep_validate.md).
The sweep writes grid.png, cells/, scores.csv and report.html into sweep.output_dir (default <run>/validation).

The recipe: check and plan every cell before loading anything; load each checkpoint once and render all its
cells in full batches; save and score every cell as it comes; optionally a fine pass every few steps where
the scores (or you) point; then the grids, the recommendation and the report.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from library import report, scoring
from library.cli import ArgumentParser, parse_command_line, run_script
from library.config import SweepConfig, dump_config, load_config
from library.errors import UserError
from library.files import atomic_write
from library.recommendation import BASELINE_STEP, Recommendation, recommend, step_curves
from library.runs import Run, export_step, open_run
from library.sampling import resolve_seed
from library.sweep import (
    Plan,
    auto_interval,
    base_prompt,
    batch_grid,
    fine_plan,
    parse_axis,
    parse_interval,
    plan,
    render,
    step_axis_index,
)


@dataclass
class Sweep:
    """One validation sweep: its plans, the scorer, and what has been rendered and scored so far."""

    cfg: SweepConfig
    run: Run
    out: Path
    axes: tuple
    plans: list[Plan]
    device: torch.device
    scorer: scoring.Scorer | None = None
    references: list = field(default_factory=list)
    bar: float = 0.0
    notes: list[str] = field(default_factory=list)
    cells: dict = field(default_factory=dict)  # (plan name, cell index) -> the cell's images as one picture
    scored: list = field(default_factory=list)  # (checkpoint label, step, CellScores)
    rows: list[dict] = field(default_factory=list)  # scores.csv
    render_seconds: float = 0.0

    @classmethod
    def setup(cls, cfg: SweepConfig, run: Run, log=print) -> Sweep:
        """Check the settings and plan every cell (every NAME-N must exist) before any model is loaded."""
        out = (
            Path(cfg.sweep.output_dir).expanduser()
            if cfg.sweep.output_dir
            else run.folder.root / "validation"
        )
        if (out / "report.html").exists() or (out / "cells").exists():
            raise UserError(f"{out}: already holds a sweep; set sweep.output_dir to a new folder")
        # One random seed for the whole sweep (coarse and fine passes), recorded in the written config.toml.
        cfg = replace(cfg, render=replace(cfg.render, seed=resolve_seed(cfg.render.seed)))
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
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sweep = cls(cfg, run, out, axes, plans, device)
        if cfg.scoring.model:
            sweep.scorer = scoring.load_scorer(cfg.scoring.model, device)
            sweep.references = scoring.load_references(
                cfg.scoring.reference_dir, run.config.dataset if run.config else None
            )
            sweep.bar = cfg.scoring.likeness_bar * scoring.reference_likeness(sweep.scorer, sweep.references)
            log(
                f"scores by {cfg.scoring.model}: {len(sweep.references)} training images, likeness bar {sweep.bar:.3f}"
            )
        else:
            sweep.notes.append(
                "Scores are off (scoring.model is empty): the sweep renders, but recommends no step."
            )
            log("scores are off: set scoring.model to a local CLIP folder to get a recommended step")
        atomic_write(out / "config.toml", dump_config(cfg))
        return sweep

    def render(self, plans: list[Plan], log=print) -> None:
        """Render the plans checkpoint by checkpoint; save and score each cell."""
        by_name = {p.name: p for p in plans}
        for _, parts, images, seconds in render(self.cfg, self.run, plans, self.device, log):
            self.render_seconds += seconds
            for (name, index), batch in images.items():
                p, cell = by_name[name], by_name[name].cells[index]
                paths = report.save_cell_images(self.out, p, cell, batch, parts)
                self.cells[(name, index)] = batch_grid(batch)
                result = None
                if self.scorer is not None:
                    clip_prompt = scoring.adherence_prompt(
                        cell.prompt, self.run.name, self.cfg.scoring.class_word
                    )
                    result = scoring.score_cell(self.scorer, batch, self.references, clip_prompt)
                    if cell.step is not None:
                        self.scored.append((cell.checkpoint_label, cell.step, result))
                self.rows += [
                    report.score_row(self.out, p, cell, i, path, result) for i, path in enumerate(paths)
                ]
            if self.scorer is not None:
                self.scorer.forget()
            del parts, images  # let this checkpoint go before the next one loads

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
        """The grids, scores.csv and report.html."""
        curves, rec = self.recommendation() if self.scorer is not None else ([], None)
        if self.scorer is not None and rec is None:
            self.notes.append("No cell names a single embedding step, so no step is recommended.")
        if any(c.step == BASELINE_STEP for p in self.plans for c in p.cells):
            self.notes.append(
                f"Step 0 ({self.run.name}-0) is the embedding before training, its starting vectors: "
                "the baseline to compare with, never recommended."
            )
        grids = []
        for p in self.plans:
            images = {(c.x, c.y, c.z): self.cells[(p.name, i)] for i, c in enumerate(p.cells)}
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML preset, e.g. presets/validate.toml")
    parser.add_argument(
        "--export",
        metavar="STEP",
        help="write NAME.pt / NAME.safetensors from this step (no sweep), "
        "or 'recommended' to sweep first and export the recommended step",
    )
    parser.add_argument("--export-to", metavar="DIR", help="folder for --export (same as export.folder=DIR)")
    parser.add_argument("--overwrite", action="store_true", help="let --export replace existing NAME.* files")
    parser.add_argument("overrides", nargs="*", metavar="table.key=value", help="override preset values")
    return parse_command_line(parser, argv)


def sweep(argv: list[str] | None) -> None:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"export.folder={args.export_to}"] if args.export_to else [])
    cfg = load_config(SweepConfig, args.config, overrides)
    export = (args.export or "").strip().lower()
    if export and export != "recommended" and not export.isdigit():
        raise UserError(f"--export {args.export!r}: give a saved step number, or 'recommended'")
    if export and not cfg.export.folder:
        raise UserError("--export needs a folder: add --export-to DIR (e.g. your A1111 embeddings/ folder)")
    if export == "recommended" and not cfg.scoring.model:
        raise UserError(
            "--export recommended needs scores: set scoring.model (a local CLIP), or export a step with --export STEP"
        )
    run = open_run(cfg.run.folder, cfg.run.name)
    if export.isdigit():
        export_step(run, int(export), cfg.export.folder, cfg.export.formats, overwrite=args.overwrite)
        return 0

    started = time.perf_counter()
    sweep = Sweep.setup(cfg, run)
    sweep.render(sweep.plans)
    if cfg.fine.interval.strip().lower() == "auto":
        sweep.fine_pass_where_scores_point()
    page, rec = sweep.write(started)

    n, total, rendering = len(sweep.rows), time.perf_counter() - started, max(sweep.render_seconds, 1e-9)
    print(
        f"recommendation: {rec.reason}"
        if rec
        else "no recommended step (scores are off or name no step): compare the grid"
    )
    print(f"report: {page}")
    print(
        f"{n} images in {total:.1f} s total ({n / total:.2f} images/s overall, loading included); "
        f"rendering {rendering:.1f} s ({n / rendering:.2f} images/s)"
    )
    if export == "recommended":
        if rec is None or rec.step is None:
            raise UserError(
                "--export recommended: the sweep recommends no step; export one with --export STEP"
            )
        export_step(run, rec.step, cfg.export.folder, cfg.export.formats, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    return run_script(lambda: sweep(argv))


if __name__ == "__main__":
    sys.exit(main())
