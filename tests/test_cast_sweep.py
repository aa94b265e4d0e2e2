"""The sweep of a cast on the toy world: each character swept on its own, leakage between them counted, each
character's recommended step exported.

The run folder is written by hand so that what each character's vectors show is known without training:
at step 25 a character's vectors are the toy text encoder's own rows for a concept's words. h3xa and tr1a
get their own concepts (their pictures' yellow hexagon and green triangle); p0rp, whose pictures are purple
circles, gets "yellow hexagon" too, so its prompts bring up h3xa: leakage the sweep must find.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from library.config import dump_config, load_config
from library.embedding_set import starting_blocks
from library.embeddings import Embedding, load_embedding, save_embedding
from library.errors import UserError
from library.models import load_parts
from library.tables import ModelConfig, SweepConfig, TrainConfig
from library.validation import run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
CAST = {"h3xa": "yellow hexagon", "tr1a": "green triangle", "p0rp": "yellow hexagon"}  # p0rp leaks


@pytest.fixture(scope="module")
def cast_run(tmp_path_factory) -> Path:
    return make_cast_run(tmp_path_factory.mktemp("cast") / "run")


def make_cast_run(run: Path) -> Path:
    """The run folder of the module docstring: config.toml and embeddings/NAME-0, NAME-25 of each character."""
    (run / "embeddings").mkdir(parents=True)
    entries = "".join(
        f'[[embeddings]]\nname = "{name}"\nimage_dir = "{(ROOT / "dataset_layouts/cast" / name).as_posix()}"\n\n'
        for name in CAST
    )
    preset = run.parent / "cast.toml"
    preset.write_text(
        '[model]\ncheckpoint = "builtin:toy"\n\n[embedding]\ninit_text = "shape"\nnum_vectors = 2\n\n'
        "[dataset]\nresolution = 64\n\n" + entries
    )
    (run / "config.toml").write_text(dump_config(load_config(TrainConfig, preset, [])))
    parts = load_parts(ModelConfig(checkpoint="builtin:toy"))
    for name, concept in CAST.items():
        for step, text in ((0, "shape"), (25, concept)):
            vectors = starting_blocks(parts, text, 2, "a1111")["clip_l"]
            save_embedding(Embedding(name, vectors, step=step), run / "embeddings" / f"{name}-{step}.pt")
    return run


def sweep_config(run: Path, out: Path, *overrides: str) -> SweepConfig:
    base = [
        f"run.folder={run}",
        "render.batch_size=4",
        "render.steps=12",
        "x.values='0, 25'",
        "x.type=step",
        f"sweep.output_dir={out}",
    ]
    return load_config(SweepConfig, ROOT / "presets/validate_demo.toml", base + list(overrides))


def test_a_cast_is_swept_per_character_with_leakage_and_exported(cast_run, tmp_path):
    lines = []
    out = tmp_path / "sweep"
    cfg = sweep_config(cast_run, out, f"export.folder={tmp_path / 'webui'}")
    with pytest.raises(
        UserError, match="no recommended step for p0rp; export it with run.name=NAME --export STEP"
    ):
        run_sweep(cfg, export="recommended", log=lines.append)
    # Each character has its own sweep, judged against its own pictures.
    for name in CAST:
        assert (out / name / "report.html").is_file() and (out / name / "grid.png").is_file()
        rows = list(csv.DictReader((out / name / "scores.csv").open()))
        assert {r["step"] for r in rows} == {"0", "25"} and len(rows) == 8
        assert all(r["file"].startswith("cells/") for r in rows)
    likeness = {
        name: [
            float(r["likeness"])
            for r in csv.DictReader((out / name / "scores.csv").open())
            if r["step"] == "25"
        ]
        for name in CAST
    }
    assert min(likeness["h3xa"]) == 1.0 and min(likeness["tr1a"]) == 1.0  # their own concept, every seed
    assert max(likeness["p0rp"]) == 0.0  # yellow hexagons, not p0rp's purple circles
    # Leakage: p0rp's prompts give h3xa; h3xa's and tr1a's give nobody else.
    leaks = list(csv.DictReader((out / "leakage.csv").open()))
    by = {(r["character"], r["step"], r["shows"]): (int(r["leaked"]), int(r["images"])) for r in leaks}
    assert by[("p0rp", "25", "h3xa")] == (4, 4)
    assert by[("p0rp", "25", "tr1a")] == (0, 4)
    assert all(
        by[(name, "25", other)][0] == 0 for name in ("h3xa", "tr1a") for other in CAST if other != name
    )
    shown = {r["step"]: r["shows_other"] for r in csv.DictReader((out / "p0rp" / "scores.csv").open())}
    assert shown == {"0": "", "25": "h3xa"}  # per image in scores.csv (every seed alike here)
    page = (out / "cast.html").read_text()
    assert "href='h3xa/report.html'" in page and "100% at step 25 (h3xa)" in page  # p0rp's worst step
    # Recommended steps: h3xa and tr1a at 25 (exported, each its own file); p0rp has none, said in one line.
    assert "h3xa: recommended step 25; leakage there: 0/4 show tr1a, 0/4 show p0rp" in lines
    assert any(line.startswith("p0rp: no recommended step") for line in lines)
    assert "Leakage at step 25: 0/4 show tr1a, 0/4 show p0rp" in (out / "h3xa" / "report.html").read_text()
    for name in ("h3xa", "tr1a"):
        exported = load_embedding(tmp_path / "webui" / f"{name}.pt")
        assert exported.name == name and exported.step == 25
        assert torch.equal(
            exported.vectors, load_embedding(cast_run / "embeddings" / f"{name}-25.pt").vectors
        )
    assert not (tmp_path / "webui" / "p0rp.pt").exists()


def test_a_cast_exports_one_step_for_every_character_and_sweeps_one_by_name(cast_run, tmp_path):
    cfg = sweep_config(cast_run, tmp_path / "one", f"export.folder={tmp_path / 'webui'}", "run.name=tr1a")
    run_sweep(cfg, export="25", log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "webui").iterdir()) == ["tr1a.pt", "tr1a.safetensors"]
    cfg = sweep_config(cast_run, tmp_path / "all", f"export.folder={tmp_path / 'webui2'}")
    run_sweep(cfg, export="0", log=lambda *_: None)
    assert {p.stem for p in (tmp_path / "webui2").iterdir()} == set(CAST)
    # One character by name: an ordinary sweep of it, judged against its own pictures.
    run_sweep(
        sweep_config(cast_run, tmp_path / "tr1a", "x.values='25'", "run.name=tr1a"), log=lambda *_: None
    )
    assert not (tmp_path / "tr1a" / "cast.html").exists()
    rows = list(csv.DictReader((tmp_path / "tr1a" / "scores.csv").open()))
    assert len(rows) == 4 and "shows_other" not in rows[0]


def test_a_cast_sweep_does_not_overwrite_an_earlier_one(cast_run, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "cast.html").write_text("earlier")
    with pytest.raises(UserError, match="already holds a sweep"):
        run_sweep(sweep_config(cast_run, out), log=lambda *_: None)
    assert (out / "cast.html").read_text() == "earlier"
