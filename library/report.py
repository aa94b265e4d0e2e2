"""What a sweep writes: each cell's images with A1111 infotext, the grids, scores.csv and report.html.

report.html is one page with no outside resources (inline SVG charts, a few lines of script) that shows
the grid PNGs beside it, the run's loss curve, the score curves per checkpoint and the recommendation.
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from library.files import atomic_write
from library.grid import join_grids_side_by_side, make_grid
from library.infotext import format_infotext, infotext_params, save_png

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
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


def save_cell_images(out: Path, plan, cell, images: Sequence[Image.Image], parts) -> list[Path]:
    """Each image of a cell as a PNG with the infotext A1111 would write for it."""
    paths = cell_paths(out, plan, cell)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path, image, seed in zip(paths, images, cell.seeds, strict=True):
        info = format_infotext(cell.prompt, cell.negative, infotext_params(cell.settings, seed, parts))
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
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, SCORE_COLUMNS)
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
# Charts


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def svg_chart(
    series: list[dict],
    *,
    x_label: str,
    y_label: str,
    hline: tuple[float, str] | None = None,
    vline: tuple[float, str] | None = None,
    width: int = 640,
    height: int = 300,
) -> str:
    """A line chart as inline SVG. Each series: {"label", "points": [(x, y)], "colour", "dashed"}."""
    points = [p for s in series for p in s["points"] if math.isfinite(p[1])]
    if not points:
        return '<p class="note">no data</p>'
    xs = [p[0] for p in points] + ([vline[0]] if vline else [])
    ys = [p[1] for p in points] + ([hline[0]] if hline else [])
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = (max(ys) - min(ys)) * 0.05 or 0.05
    y0, y1 = min(ys) - pad, max(ys) + pad
    left, right, top, bottom = 60, 10, 10, 40
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>',
    ]
    for tick in _ticks(y0, y1):
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" stroke="#e4e4e4"/>'
            f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>'
        )
    for tick in _ticks(x0, x1, 8):
        parts.append(f'<text x="{px(tick):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{tick:g}</text>')
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">{html.escape(x_label)}</text>'
        f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" transform="rotate(-90 14 {top + plot_h / 2})">'
        f"{html.escape(y_label)}</text>"
    )
    if hline:
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{py(hline[0]):.1f}" y2="{py(hline[0]):.1f}" '
            f'stroke="#555" stroke-dasharray="2 3"><title>{html.escape(hline[1])}</title></line>'
        )
    if vline:
        parts.append(
            f'<line x1="{px(vline[0]):.1f}" x2="{px(vline[0]):.1f}" y1="{top}" y2="{top + plot_h}" '
            f'stroke="#2a2" stroke-width="2"><title>{html.escape(vline[1])}</title></line>'
        )
    for s in series:
        pts = [(x, y) for x, y in sorted(s["points"]) if math.isfinite(y)]
        dash = ' stroke-dasharray="6 4"' if s.get("dashed") else ""
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(
            f'<polyline fill="none" stroke="{s["colour"]}" stroke-width="1.6"{dash} points="{coords}">'
            f"<title>{html.escape(s['label'])}</title></polyline>"
        )
        if len(pts) <= 60:
            parts += [
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{s["colour"]}"/>' for x, y in pts
            ]
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><span class="swatch{" dashed" if s.get("dashed") else ""}" style="border-color:{s["colour"]}">'
        f"</span>{html.escape(s['label'])}</span>"
        for s in series
    )
    return f"<figure>{''.join(parts)}<figcaption>{legend}</figcaption></figure>"


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


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
td.pass { background: #e4f4e4; } td.flag { background: #fcefd9; } td.fail { color: #999; }
"""
_SCRIPT = """
document.querySelectorAll('.grid img').forEach(function (img) {
  img.addEventListener('click', function () { img.classList.toggle('full'); });
});
"""


def _score_sections(curves, recommendation) -> str:
    checkpoints = list(dict.fromkeys(s.checkpoint for s in curves))
    colour = {c: COLOURS[i % len(COLOURS)] for i, c in enumerate(checkpoints)}
    rec = (
        (recommendation.step, f"recommended step {recommendation.step}")
        if recommendation and recommendation.step is not None
        else None
    )

    def lines(metric, label, dashed=False):
        return [
            {
                "label": f"{label} — {c}",
                "colour": colour[c],
                "dashed": dashed,
                "points": [
                    (s.step, metric(s)) for s in curves if s.checkpoint == c and metric(s) is not None
                ],
            }
            for c in checkpoints
        ]

    bar = (recommendation.bar, f"likeness bar {recommendation.bar:.3f}") if recommendation else None
    likeness = lines(lambda s: s.mean_likeness, "mean") + lines(
        lambda s: s.min_likeness, "lowest image", dashed=True
    )
    out = [
        "<h3>Likeness to the training images</h3>",
        svg_chart(likeness, x_label="embedding step", y_label="likeness", hline=bar, vline=rec),
        "<h3>Prompt adherence</h3>",
        svg_chart(
            lines(lambda s: s.mean_adherence, "mean"),
            x_label="embedding step",
            y_label="adherence",
            vline=rec,
        ),
        "<h3>Likeness between the seeds of a cell (high = one look)</h3>",
        svg_chart(
            lines(lambda s: None if s.variety is None else 1 - s.variety, "mean"),
            x_label="embedding step",
            y_label="seed likeness",
            vline=rec,
        ),
    ]
    if recommendation:
        steps = sorted({s.step for s in curves})
        head = "".join(f"<th>{html.escape(c)}</th>" for c in checkpoints)
        body = []
        for step in steps:
            cells = []
            for c in checkpoints:
                v = recommendation.verdict(c, step)
                if v is None:
                    cells.append("<td></td>")
                    continue
                kind = "flag" if v.flags else "pass" if v.passes else "fail"
                text = ("pass" if v.passes else "below bar") + (f" · {', '.join(v.flags)}" if v.flags else "")
                cells.append(f'<td class="{kind}">{html.escape(text)}</td>')
            body.append(f"<tr><th>{step}</th>{''.join(cells)}</tr>")
        out.append(f"<h3>Per step</h3><table><tr><th>step</th>{head}</tr>{''.join(body)}</table>")
    return "\n".join(out)


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

    `curves` are scoring.StepScores, `recommendation` a scoring.Recommendation or None (scores off);
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
                "points": list(zip(steps, _moving_average(values, 10), strict=True)),
            },
        ]
        body.append(svg_chart(series, x_label="step", y_label="loss"))
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
