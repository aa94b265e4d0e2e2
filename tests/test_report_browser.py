"""report.html opens in headless Chromium without script errors or broken images.

Needs the Debian package `chromium` (/usr/bin/chromium); nothing here downloads a browser. A copy of the
page gets a probe script in front of the page's own: it records errors (scripts and failed resources) and
broken images, and writes them into the DOM that `--dump-dom` prints. Chromium's console log (stderr) is
checked for "Uncaught" too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from library.recommendation import StepScores, recommend
from library.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium is not installed (Debian package 'chromium' at /usr/bin/chromium)",
)

_PROBE = """<script>
window.__problems = [];
window.addEventListener('error', function (e) {
  var what = e.message || (e.target && (e.target.src || e.target.href)) || e.type;
  window.__problems.push('error: ' + what);
}, true);
window.addEventListener('unhandledrejection', function (e) { window.__problems.push('rejection: ' + e.reason); });
window.addEventListener('load', function () {
  document.querySelectorAll('img').forEach(function (img) {
    if (!img.complete || img.naturalWidth === 0) window.__problems.push('broken image: ' + img.getAttribute('src'));
  });
  var out = document.createElement('pre');
  out.id = 'probe-result';
  out.textContent = JSON.stringify(window.__problems);
  document.body.appendChild(out);
});
</script>"""


def open_in_chromium(page: Path, tmp_path: Path) -> tuple[list[str], str, str]:
    """(problems the probe saw, the DOM after load, Chromium's console lines)."""
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(
        page.read_text(encoding="utf-8").replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8"
    )
    profile = tmp_path / f"chromium-profile-{page.stem}"
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri(),
    ]  # fmt: skip
    env = dict(os.environ, HOME=str(tmp_path))
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"the page never finished loading:\n{result.stdout[:500]}\n{result.stderr[-2000:]}"
    console = "\n".join(line for line in result.stderr.splitlines() if ":CONSOLE" in line)
    return (
        json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")),
        result.stdout,
        console,
    )


def _curves() -> list[StepScores]:
    rows = []
    for checkpoint, shift in (("v1-5-pruned-emaonly", 0.0), ("deliberate_v2", -0.05)):
        for i, step in enumerate(range(20, 141, 20)):
            likeness = 0.5 + 0.05 * i + shift
            rows.append(StepScores(checkpoint, step, (likeness, likeness + 0.02, likeness - 0.01, likeness + 0.03),
                                   (0.5 + 0.05 * i,) * 4, (0.31 - 0.02 * max(0, i - 3),) * 4))  # fmt: skip
    return rows


def test_report_opens_without_errors(tmp_path):
    grid = tmp_path / "grid.png"
    Image.new("RGB", (64, 32), (200, 120, 40)).save(grid)
    Image.new("RGB", (64, 32), (40, 120, 200)).save(tmp_path / "grid-fine.png")
    # Step 0, the embedding before training, as the trainer saves it: a baseline row and chart point.
    baseline = [StepScores(c, 0, (0.3, 0.32, 0.28, 0.31), (0.3,) * 4, (0.33,) * 4) for c in ("v1-5-pruned-emaonly", "deliberate_v2")]  # fmt: skip
    curves = baseline + _curves()
    rec = recommend(curves, 0.65, collapse_ratio=0.5, adherence_drop=0.1)
    loss = [(step, 0.2 + 0.1 * ((step * 7) % 5) / 5) for step in range(1, 141)]
    page = write_report(
        tmp_path / "report.html", title="Validation sweep of fr3nchl4dy <&>", grids=[("Coarse sweep", grid),
        ("Fine sweep", tmp_path / "grid-fine.png")], loss=loss, curves=curves, recommendation=rec,
        notes=["a note with <html> characters & more"], summary=[("run", "output/face"), ("images", "56")],
    )  # fmt: skip
    problems, dom, console = open_in_chromium(page, tmp_path)
    assert problems == [] and "Uncaught" not in console, (problems, console)
    assert f"Recommended step: {rec.step}" in dom and rec.step == 120
    assert dom.count('<svg class="chart"') == 4  # loss, likeness, adherence, seed variety
    assert 'src="grid.png"' in dom and 'src="grid-fine.png"' in dom
    assert "fr3nchl4dy &lt;&amp;&gt;" in dom
    assert "adherence falls" in rec.reason and "adherence falls" in dom
    # The numbers behind the verdicts, with 95 % intervals (4 of 4: 4 / (4 + 1.96²) = 0.51), and the band.
    assert "0 (before training)" in dom and "<td>4/4 (0.51–1.00)</td>" in dom and 'class="band"' in dom


def test_report_without_scores_or_loss_opens_without_errors(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "grid.png")
    page = write_report(tmp_path / "report.html", title="Validation sweep of d3mo", grids=[("Coarse sweep", tmp_path / "grid.png")],
                        loss=[], curves=[], recommendation=None, notes=["Scores are off."], summary=[])  # fmt: skip
    problems, dom, console = open_in_chromium(page, tmp_path)
    assert problems == [] and "Uncaught" not in console, (problems, console)
    assert "Scores are off" in dom and "no loss.csv" in dom


def test_the_check_catches_script_errors_and_broken_images(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>x</title></head><body><img src="missing.png">'
                    "<script>notDefined();</script></body></html>")  # fmt: skip
    problems, _, console = open_in_chromium(page, tmp_path)
    assert any("notDefined" in p for p in problems) and any("missing.png" in p for p in problems)
    assert "Uncaught ReferenceError" in console


def test_a_real_sweeps_report_opens_without_errors(tmp_path, capsys):
    from sweep_validate import main
    from tests.test_sweep import ROOT, make_run

    run = make_run(tmp_path)
    out = tmp_path / "out"
    code = main(["--config", str(ROOT / "presets/validate.toml"), f"run.folder={run}", f"sweep.output_dir={out}",
                 'model.checkpoints=["run:checkpoint"]', "y.type=none", "render.steps=1", "render.width=16",
                 "render.height=16", "render.batch_size=2", "fine.interval=40-60", "fine.every=20"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    problems, dom, console = open_in_chromium(out / "report.html", tmp_path)
    assert problems == [] and "Uncaught" not in console, (problems, console)
    assert 'src="grid.png"' in dom and 'src="grid-fine.png"' in dom and dom.count('<svg class="chart"') == 1
