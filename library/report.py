"""What a sweep writes: each cell's images with A1111 infotext, the grids, scores.csv and report.html.

report.html is one page with no outside resources (inline SVG charts, a few lines of script) that shows
the grid PNGs beside it, the run's loss curve, the score curves per checkpoint and the recommendation.
"""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from library.charts import COLOURS, chart, moving_average
from library.files import atomic_write
from library.grid import join_grids_side_by_side, make_grid
from library.infotext import format_infotext, infotext_params, save_png
from library.recommendation import BASELINE_STEP, Recommendation, StepScores
from library.stats import wilson_interval

SCORE_COLUMNS = [
    "pass",
    "file",
    "checkpoint",
    "step",
    "x",
    "y",
    "z",
    "seed",
    "likeness",
    "seed_likeness",
    "adherence",
]


# --------------------------------------------------------------------------------------------------
# Images


def _slug(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text).strip("_")[:60]


def cell_paths(out: Path, plan, cell) -> list[Path]:
    """cells/<pass>/<z>-<y>-<x>_<labels>_<seed>.png, one per seed of the cell."""
    labels = "_".join(
        _slug(plan.axes[i].labels[index]) for i, index in enumerate((cell.x, cell.y, cell.z)) if plan.axes[i]
    )
    stem = f"{cell.z:02d}-{cell.y:02d}-{cell.x:02d}" + (f"_{labels}" if labels else "")
    return [out / "cells" / plan.name / f"{stem}_{seed}.png" for seed in cell.seeds]


def save_cell_images(
    out: Path, plan, cell, images: Sequence[Image.Image], parts, clip_skip: int = 0
) -> list[Path]:
    """Each image of a cell as a PNG with the infotext A1111 would write for it."""
    paths = cell_paths(out, plan, cell)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path, image, seed in zip(paths, images, cell.seeds, strict=True):
        params = infotext_params(cell.settings, seed, parts, clip_skip=clip_skip)
        info = format_infotext(cell.prompt, cell.negative, params)
        save_png(image, path, info)
    return paths


def save_grid(path: Path, plan, cell_images: dict[tuple[int, int, int], Image.Image], margin: int) -> Path:
    """The plan's X/Y/Z grid: X columns, Y rows, one grid per Z value side by side; first cell's infotext."""
    size = [len(axis.values) if axis else 1 for axis in plan.axes]
    grids = []
    for z in range(size[2]):
        rows = [[cell_images[(x, y, z)] for x in range(size[0])] for y in range(size[1])]
        grids.append(make_grid(rows, plan.labels(0), plan.labels(1), margin=margin))
    grid = join_grids_side_by_side(grids, plan.labels(2)) if plan.axes[2] else grids[0]
    first = plan.cells[0]
    info = format_infotext(
        first.prompt,
        first.negative,
        infotext_params(first.settings, first.seeds[0], {"checkpoint_name": first.checkpoint_label}),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(grid, path, info, overwrite=True)


def write_scores_csv(path: Path, rows: list[dict]) -> Path:
    """scores.csv; a cast's sweep adds `shows_other` (the other characters an image shows)."""
    buffer = io.StringIO()
    extra = ["shows_other"] if any("shows_other" in row for row in rows) else []
    writer = csv.DictWriter(buffer, SCORE_COLUMNS + extra)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())


def score_row(out: Path, plan, cell, i: int, path: Path, result) -> dict:
    """One scores.csv row: image i of a cell, with its scores when there are any."""

    def value(values, index):
        return f"{values[index]:.4f}" if values and index < len(values) else ""

    return {
        "pass": plan.name,
        "file": path.relative_to(out).as_posix(),
        "checkpoint": cell.checkpoint_label,
        "step": "" if cell.step is None else cell.step,
        "seed": cell.seeds[i],
        **{
            axis: (plan.axes[k].labels[(cell.x, cell.y, cell.z)[k]] if plan.axes[k] else "")
            for k, axis in enumerate("xyz")
        },
        "likeness": value(result and result.likeness, i),
        "seed_likeness": value(result and result.seed_likeness, i),
        "adherence": value(result and result.adherence, i),
    }


# --------------------------------------------------------------------------------------------------
# The page

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1400px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
.recommendation { background: #eef7ee; border-left: 4px solid #2a2; padding: 10px 14px; }
.recommendation.none { background: #fbefe9; border-color: #c52; }
.note { color: #666; } figure { margin: 8px 0 20px; } figcaption { font-size: 13px; }
.grid img { max-width: 100%; cursor: zoom-in; border: 1px solid #ddd; } .grid img.full { max-width: none; cursor: zoom-out; }
.grid { overflow-x: auto; } .chart text { font-size: 11px; fill: #444; }
.key { margin-right: 14px; white-space: nowrap; } .swatch { display: inline-block; width: 22px; margin-right: 5px;
  vertical-align: middle; border-top: 2px solid; } .swatch.dashed { border-top-style: dashed; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
td.pass { background: #e4f4e4; } td.flag { background: #fcefd9; } td.fail { color: #999; } td.base { color: #666; }
td, tr > th:first-child { white-space: nowrap; } th[colspan] { text-align: center; }
tr.chosen th { background: #cfeccf; } .wide { overflow-x: auto; }
"""
_SCRIPT = """
document.querySelectorAll('.grid img').forEach(function (img) {
  img.addEventListener('click', function () { img.classList.toggle('full'); });
});
"""


def _score_sections(curves: list[StepScores], recommendation: Recommendation | None) -> str:
    checkpoints = list(dict.fromkeys(s.checkpoint for s in curves))
    colour = {c: COLOURS[i % len(COLOURS)] for i, c in enumerate(checkpoints)}
    rec = (
        (recommendation.step, f"recommended step {recommendation.step}")
        if recommendation and recommendation.step is not None
        else None
    )

    def lines(metric, label, dashed=False, band=None):
        return [
            {
                "label": f"{label} — {c}",
                "colour": colour[c],
                "dashed": dashed,
                "points": [
                    (s.step, metric(s)) for s in curves if s.checkpoint == c and metric(s) is not None
                ],
                "band": [
                    (s.step, *band(s)) for s in curves if s.checkpoint == c and band and band(s) is not None
                ],
            }
            for c in checkpoints
        ]

    bar = (recommendation.bar, f"likeness bar {recommendation.bar:.3f}") if recommendation else None
    likeness = lines(
        lambda s: s.mean_likeness, "mean (shaded: 95 % interval)", band=lambda s: s.likeness_interval
    ) + lines(lambda s: s.min_likeness, "lowest image", dashed=True)
    out = [
        "<h3>Likeness to the training images</h3>",
        chart(likeness, "likeness", x_label="embedding step", y_label="likeness", hline=bar, vline=rec),
        "<h3>Prompt adherence</h3>",
        chart(
            lines(lambda s: s.mean_adherence, "mean"),
            "adherence",
            x_label="embedding step",
            y_label="adherence",
            vline=rec,
        ),
        "<h3>Seed variety (1 − likeness between the seeds of a cell; low = one look)</h3>",
    ]
    if all(s.variety is None for s in curves):
        out.append('<p class="note">No seed variety chart: every cell holds one image.</p>')
    elif recommendation and recommendation.collapse_ratio <= 0:
        out.append(
            '<p class="note">No seed variety chart: scoring.collapse_ratio = 0, so seed variety is not '
            "judged (for scorers where every right image looks alike by design).</p>"
        )
    else:
        out.append(
            chart(
                lines(lambda s: s.variety, "mean"),
                "seed variety",
                x_label="embedding step",
                y_label="seed variety",
                vline=rec,
            )
        )
    if recommendation:
        out.append(_step_table(curves, checkpoints, recommendation))
    return "\n".join(out)


def _step_table(curves: list[StepScores], checkpoints: list[str], rec: Recommendation) -> str:
    """The numbers behind each verdict, per step and checkpoint, with their 95 % intervals."""
    scores = {(s.checkpoint, s.step): s for s in curves}
    variety = rec.collapse_ratio > 0 and any(s.variety is not None for s in curves)
    columns = ["at the bar", "mean likeness", "lowest", "adherence", *(["seed variety"] * variety), "verdict"]
    head = "".join(f'<th colspan="{len(columns)}">{html.escape(c)}</th>' for c in checkpoints)
    rows = [
        f'<tr><th rowspan="2">step</th>{head}</tr>',
        "<tr>" + "".join(f"<th>{c}</th>" for c in columns) * len(checkpoints) + "</tr>",
    ]
    for step in sorted({s.step for s in curves}):
        cells = []
        for c in checkpoints:
            s, v = scores.get((c, step)), rec.verdict(c, step)
            if s is None or v is None:
                cells.append("<td></td>" * len(columns))
                continue
            low, high = s.pass_interval(rec.bar)
            mean = f"{s.mean_likeness:.3f}"
            if (interval := s.likeness_interval) is not None:
                mean += f" ({interval[0]:.3f}–{interval[1]:.3f})"
            numbers = [
                f"{s.at_bar(rec.bar)}/{len(s.likeness)} ({low:.2f}–{high:.2f})",
                mean,
                f"{s.min_likeness:.3f}",
                f"{s.mean_adherence:.3f}",
                *([f"{s.variety:.3f}" if s.variety is not None else ""] * variety),
            ]
            if v.baseline:
                kind, text = "base", "baseline"
            else:
                kind = "flag" if v.flags else "pass" if v.passes else "fail"
                text = ("pass" if v.passes else "below bar") + (f" · {', '.join(v.flags)}" if v.flags else "")
            cells += [f"<td>{html.escape(n)}</td>" for n in numbers]
            cells.append(f'<td class="{kind}">{html.escape(text)}</td>')
        label = f"{step} (before training)" if step == BASELINE_STEP else str(step)
        chosen = ' class="chosen" title="recommended step"' if step == rec.step else ""
        rows.append(f"<tr{chosen}><th>{label}</th>{''.join(cells)}</tr>")
    trained = [s for s in curves if s.step != BASELINE_STEP] or curves
    counts = sorted({len(s.likeness) for s in trained})
    n = counts[0]
    images = f"{n}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    return (
        "<h3>Per step</h3>"
        f'<p class="note">An image passes when its likeness reaches the bar, {rec.bar:.3f} '
        "(scoring.likeness_bar × how alike the training images are to each other); a step passes when "
        "all its images do. "
        f"Each step was judged on {images} images per checkpoint, so even {n} of {n} at the bar only "
        f"shows a pass rate above {wilson_interval(n, n)[0]:.2f}: the ranges in brackets are 95 % "
        "intervals (Wilson's for shares, Student's t for means), and steps whose ranges overlap may not "
        "differ at all.</p>"
        f'<div class="wide"><table>{"".join(rows)}</table></div>'
    )


def write_report(
    path: Path,
    *,
    title: str,
    grids: list[tuple[str, Path]],
    loss: list[tuple[int, float]],
    curves: list,
    recommendation,
    notes: list[str],
    summary: list[tuple[str, str]],
) -> Path:
    """Write report.html: recommendation, grids (linked relative to the page), loss and score curves.

    `curves` are recommendation.StepScores, `recommendation` a Recommendation or None (scores off);
    `notes` are shown under the recommendation; `summary` rows (key, value) describe the sweep.
    """
    esc = html.escape
    if recommendation is None:
        verdict = '<div class="recommendation none">Scores are off: no recommended step. Compare the grids by eye.</div>'
    else:
        kind = "" if recommendation.step is not None else " none"
        head = (
            f"Recommended step: {recommendation.step}"
            if recommendation.step is not None
            else "No recommended step"
        )
        verdict = (
            f'<div class="recommendation{kind}"><b>{esc(head)}</b><br>{esc(recommendation.reason)}</div>'
        )
    body = [f"<h1>{esc(title)}</h1>", verdict, *(f'<p class="note">{esc(n)}</p>' for n in notes)]
    body.append(
        "<table>"
        + "".join(f"<tr><th>{esc(k)}</th><td style='text-align:left'>{esc(v)}</td></tr>" for k, v in summary)
        + "</table>"
    )
    for caption, grid in grids:
        src = esc(
            grid.relative_to(path.parent).as_posix() if grid.is_relative_to(path.parent) else grid.as_uri()
        )
        body.append(f'<h2>{esc(caption)}</h2><div class="grid"><img src="{src}" alt="{esc(caption)}"></div>')
    body.append("<h2>Training loss</h2>")
    if loss:
        steps, values = [s for s, _ in loss], [v for _, v in loss]
        series = [
            {"label": "loss", "colour": "#bbb", "points": list(zip(steps, values, strict=True))},
            {
                "label": "moving average (10 steps)",
                "colour": "#1f77b4",
                "points": list(zip(steps, moving_average(values, 10), strict=True)),
            },
        ]
        body.append(chart(series, "training loss", x_label="step", y_label="loss"))
    else:
        body.append('<p class="note">The run folder has no loss.csv.</p>')
    body.append("<h2>Scores</h2>")
    body.append(_score_sections(curves, recommendation) if curves else '<p class="note">No scores.</p>')
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>'
        f"<body>\n{chr(10).join(body)}\n<script>{_SCRIPT}</script></body></html>\n"
    )
    return atomic_write(path, page)
