"""Line charts for report.html as inline SVG (no outside resources), and a check that a chart is worth drawing.

`chart(series, what, ...)` draws a chart, or says in a short note why it is left out: a chart with no values,
with a single step, or whose every value is the same carries no information the table does not.
"""

from __future__ import annotations

import html
import math

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def why_not_drawn(series: list[dict]) -> str | None:
    """Why a chart of these series would carry no information; None when it would."""
    points = [(x, y) for s in series for x, y in s["points"] if math.isfinite(y)]
    if not points:
        return "there are no values"
    if len({x for x, _ in points}) < 2:
        return "there is only one step"
    ys = [y for _, y in points]
    # Equal up to float noise (1e-9 of the values' size): a flat line says nothing a number does not.
    if max(ys) - min(ys) <= 1e-9 * max(1.0, max(abs(y) for y in ys)):
        return f"every value is {ys[0]:.4g}"
    return None


def chart(series: list[dict], what: str, **kwargs) -> str:
    """`svg_chart(series, **kwargs)`, or a note saying why the chart of `what` is not drawn."""
    why = why_not_drawn(series)
    if why:
        return f'<p class="note">No {html.escape(what)} chart: {html.escape(why)}.</p>'
    return svg_chart(series, **kwargs)


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
    """A line chart as inline SVG. Each series: {"label", "points": [(x, y)], "colour", "dashed", and
    optionally "band": [(x, low, high)], drawn as a shaded band around the line (a 95 % interval)}."""
    points = [p for s in series for p in s["points"] if math.isfinite(p[1])]
    if not points:
        return '<p class="note">no data</p>'
    bands = [b for s in series for b in s.get("band", ())]
    xs = [p[0] for p in points] + ([vline[0]] if vline else [])
    ys = [p[1] for p in points] + [v for b in bands for v in b[1:]] + ([hline[0]] if hline else [])
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
        band = sorted(s.get("band", ()))
        if len(band) > 1:  # upper edge left to right, then the lower edge back
            outline = [(x, hi) for x, _, hi in band] + [(x, lo) for x, lo, _ in reversed(band)]
            parts.append(
                f'<polygon class="band" fill="{s["colour"]}" fill-opacity="0.15" stroke="none" '
                f'points="{" ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in outline)}">'
                f"<title>{html.escape(s['label'])}: 95 % interval</title></polygon>"
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


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out
