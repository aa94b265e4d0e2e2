"""sweep_validate.py on tiny models: step resolution, axes, grid layout, coarse-to-fine, export, end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.config import dump_config, load_config
from library.embeddings import Embedding, load_embedding, save_embedding
from library.errors import UserError
from library.infotext import parse_infotext
from library.recommendation import StepScores, recommend
from library.report import save_grid, write_report
from library.run_folder import export_step, open_run
from library.sweep import Axis, auto_interval, expand_numbers, fine_plan, parse_axis, plan
from library.sweep_rendering import render_by_checkpoint
from library.tables import SweepConfig, TrainConfig
from sweep_validate import main
from tests.helpers import make_images, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
NAME = "d3mo"


def make_run(tmp_path: Path, steps=(20, 40, 60), *, final: bool = False, width: int = 32) -> Path:
    """A run folder as training writes it: config.toml, embeddings/NAME-N.pt, loss.csv (random vectors)."""
    run = tmp_path / "run"
    (run / "embeddings").mkdir(parents=True)
    images = make_images(tmp_path / "img", count=3, size=32)
    config = load_config(
        TrainConfig,
        None,
        [
            "model.checkpoint=builtin:tiny",
            f"embedding.name={NAME}",
            f"dataset.image_dir={images}",
            "dataset.resolution=16",
        ],
    )
    (run / "config.toml").write_text(dump_config(config))
    generator = torch.Generator().manual_seed(0)
    for step in steps:
        vectors = torch.randn(2, width, generator=generator)
        save_embedding(Embedding(NAME, vectors, step=step), run / "embeddings" / f"{NAME}-{step}.pt")
    if final:
        save_embedding(
            Embedding(NAME, torch.randn(2, width, generator=generator), step=steps[-1]), run / f"{NAME}.pt"
        )
    rows = "".join(f"{i},0,{i},{0.3 - i / 1000:.4f},0.005\n" for i in range(1, steps[-1] + 1))
    (run / "loss.csv").write_text("step,epoch,epoch_step,loss,learn_rate\n" + rows)
    return run


def sweep_config(run: Path, *overrides: str) -> SweepConfig:
    base = [
        f"run.folder={run}",
        'model.checkpoints=["run:checkpoint"]',
        "y.type=none",
        "render.steps=1",
        "render.width=16",
        "render.height=16",
        "render.batch_size=2",
        f"sweep.output_dir={run.parent / 'out'}",
    ]
    return load_config(SweepConfig, ROOT / "presets/validate.toml", base + list(overrides))


def axes_of(cfg: SweepConfig, run) -> tuple:
    prompt = cfg.render.prompt.replace("[name]", run.name)
    return tuple(parse_axis(a, n, cfg, run, prompt) for n, a in (("x", cfg.x), ("y", cfg.y), ("z", cfg.z)))


# --------------------------------------------------------------------------------------------------
# Steps and embeddings


def test_preset_loads_and_reproduces_the_guide():
    cfg = load_config(SweepConfig, ROOT / "presets/validate.toml")
    assert cfg.render.prompt == "a medium closeup color portrait photo of [name]-20 on a greek island"
    assert (cfg.render.seed, cfg.render.batch_size, cfg.render.sampler) == (12345678, 4, "DPM++ 2M Karras")
    assert (cfg.render.steps, cfg.render.cfg_scale, cfg.render.width, cfg.render.height) == (
        30,
        7.0,
        512,
        512,
    )
    assert cfg.render.negative_prompt == "" and cfg.sweep.grid_margin == 16
    assert (cfg.x.type, cfg.x.values, cfg.y.type) == ("prompt_sr", "every 20", "checkpoint")
    assert len(cfg.model.checkpoints) == 2 and cfg.model.checkpoints[0] == "run:checkpoint"


def test_every_shorthand_expands_from_the_run_folder(tmp_path):
    run_dir = make_run(tmp_path, steps=tuple(range(10, 151, 10)))
    run = open_run(str(run_dir))
    assert run.name == NAME and run.steps == list(range(10, 151, 10))
    cfg = sweep_config(run_dir)
    x = axes_of(cfg, run)[0]
    assert x.values == tuple(f"{NAME}-{s}" for s in range(20, 141, 20)) and x.search == f"{NAME}-20"
    # The shorthand replaces whichever step the prompt names.
    x = parse_axis(cfg.x.__class__("prompt_sr", "every 70"), "x", cfg, run, f"a photo of {NAME}-20")
    assert (x.values, x.search) == ((f"{NAME}-70", f"{NAME}-140"), f"{NAME}-20")
    step_axis = parse_axis(cfg.x.__class__("step", "every 50"), "x", cfg, run, "")
    assert step_axis.values == (50, 100, 150) and step_axis.labels == (
        f"{NAME}-50",
        f"{NAME}-100",
        f"{NAME}-150",
    )
    assert parse_axis(cfg.x.__class__("step", "30-60"), "x", cfg, run, "").values == (30, 40, 50, 60)
    assert parse_axis(cfg.x.__class__("step", "20-60 (+20)"), "x", cfg, run, "").values == (20, 40, 60)
    with pytest.raises(UserError, match="matches no saved step"):
        parse_axis(cfg.x.__class__("step", "every 1000"), "x", cfg, run, "")


def test_name_step_resolves_to_its_file_and_a_missing_step_is_an_error(tmp_path):
    run = open_run(str(make_run(tmp_path, final=True)))
    name, file = run.resolve(f"{NAME}-40")
    assert name == f"{NAME}-40" and file == run.folder.root / "embeddings" / f"{NAME}-40.pt"
    assert run.resolve(NAME) == (NAME, run.folder.root / f"{NAME}.pt")
    # NAME-25 was never saved: an error listing the saved steps, even though the final NAME.pt exists.
    with pytest.raises(UserError, match=r"'d3mo-25' is not a saved step.*20, 40, 60"):
        run.resolve(f"{NAME}-25")
    cfg = sweep_config(run.folder.root, "render.prompt=a photo of [name]-25", "x.type=none")
    with pytest.raises(UserError, match="d3mo-25"):
        plan(cfg, run, axes_of(cfg, run))
    cfg = sweep_config(run.folder.root, "x.values=d3mo-20, d3mo-25")
    with pytest.raises(UserError, match="d3mo-25"):
        plan(cfg, run, axes_of(cfg, run))


def test_bare_name_without_a_final_file_is_an_error(tmp_path):
    run = open_run(str(make_run(tmp_path)))
    with pytest.raises(UserError, match="means the final embedding"):
        run.resolve(NAME.upper())


def test_cells_render_with_their_own_steps_vectors(tmp_path, capsys):
    from library.conditioning import Conditioner
    from library.sampling import generate
    from library.tiny import build_tiny_parts

    run_dir = make_run(tmp_path, final=True)
    run = open_run(str(run_dir))
    cfg = sweep_config(run_dir, "x.values=d3mo-20, d3mo-40, d3mo")
    coarse = plan(cfg, run, axes_of(cfg, run))
    assert [c.step for c in coarse.cells] == [20, 40, 60]
    lines = []
    ((_, _, images, _),) = list(render_by_checkpoint(cfg, run, [coarse], log=lines.append))
    # A line as the checkpoint loads, a progress bar of the images on stderr, nothing printed to stdout.
    assert lines[0] == "builtin:tiny: loading builtin:tiny" and "rendering 6 images" in lines[1]
    captured = capsys.readouterr()
    assert captured.out == "" and "builtin:tiny: 100%" in captured.err and "6/6 images" in captured.err
    assert " images/s]" in captured.err
    parts = build_tiny_parts("sd1", seed=0)
    conditioner = Conditioner.of(parts)
    vectors = load_embedding(run_dir / "embeddings" / f"{NAME}-40.pt").vectors
    conditioner.set_embedding(f"{NAME}-40", {"clip_l": vectors})
    cell = coarse.cells[1]
    expected = generate(parts, conditioner, [cell.prompt] * 2, [""] * 2, list(cell.seeds), cell.settings)
    for got, want in zip(images[(0, 1)], expected, strict=True):
        assert got.tobytes() == want.tobytes()
    assert images[(0, 0)][0].tobytes() != images[(0, 1)][0].tobytes()


# --------------------------------------------------------------------------------------------------
# Axes and planning


def test_axes_of_every_type(tmp_path):
    run_dir = make_run(tmp_path)
    run = open_run(str(run_dir))
    cfg = sweep_config(run_dir)

    def axis(kind, values):
        return parse_axis(
            cfg.x.__class__(kind, values), "x", cfg, run, cfg.render.prompt.replace("[name]", NAME)
        )

    assert axis("cfg_scale", "5-7 (+1)").labels == ("CFG scale: 5", "CFG scale: 6", "CFG scale: 7")
    assert axis("seed", "1, 2").values == (1, 2) and axis("steps", "10-30 [3]").values == (10, 20, 30)
    assert axis("size", "512x512, 768x512").values == ((512, 512), (768, 512))
    assert axis("sampler", "Euler a, DDIM").values == ("Euler a", "DDIM")
    checkpoints = axis("checkpoint", "")
    assert checkpoints.values == ("builtin:tiny",) and checkpoints.labels == ("builtin:tiny",)
    assert axis("checkpoint", "/m/a.safetensors, /n/a.safetensors").labels == ("a", "a (2)")
    assert axis("prompt_sr", '"greek island", "beach, at night"').values == (
        "greek island",
        "beach, at night",
    )
    with pytest.raises(UserError, match="unknown sampler"):
        axis("sampler", "Euler b")
    with pytest.raises(UserError, match="does not occur"):
        axis("prompt_sr", "mountain, beach")
    with pytest.raises(UserError, match="not a float"):
        axis("cfg_scale", "7, high")
    assert expand_numbers("1-10 [4]", float, "v") == [1.0, 4.0, 7.0, 10.0]


def test_plan_applies_axes_and_checks_checkpoints(tmp_path):
    run_dir = make_run(tmp_path)
    run = open_run(str(run_dir))
    cfg = sweep_config(run_dir, "y.type=cfg_scale", "y.values=4, 9", "z.type=step", "z.values=60")
    cells = plan(cfg, run, axes_of(cfg, run)).cells
    assert len(cells) == 3 * 2
    # The Z step axis rewrites every NAME-N the X axis put in the prompt.
    assert {c.prompt for c in cells} == {"a medium closeup color portrait photo of d3mo-60 on a greek island"}
    assert [c.settings.cfg_scale for c in cells] == [4, 4, 4, 9, 9, 9] and {c.step for c in cells} == {60}
    assert cells[0].seeds == (12345678, 12345679)
    two = sweep_config(run_dir, 'model.checkpoints=["builtin:tiny", "other.safetensors"]')
    with pytest.raises(UserError, match='type = "checkpoint"'):
        plan(two, run, axes_of(two, run))


def test_fine_pass_replaces_the_step_axis(tmp_path):
    run_dir = make_run(tmp_path, steps=tuple(range(5, 101, 5)))
    run = open_run(str(run_dir))
    cfg = sweep_config(run_dir, "fine.every=10")
    fine = fine_plan(cfg, run, axes_of(cfg, run), (40, 80))
    assert fine.axes[0] == Axis(
        "step", (40, 50, 60, 70, 80), tuple(f"{NAME}-{s}" for s in (40, 50, 60, 70, 80))
    )
    assert [c.step for c in fine.cells] == [40, 50, 60, 70, 80]
    assert auto_interval([20, 40, 60], 60) == (41, 60) and auto_interval([20, 40], 20) == (0, 20)
    with pytest.raises(UserError, match="no saved step in 41-49"):
        fine_plan(cfg, run, axes_of(cfg, run), (41, 49))


# --------------------------------------------------------------------------------------------------
# Grid layout


CELL = 128  # grid.py enlarges smaller pictures


def _colour(x, y, z):
    return (250 - 40 * x, 30 + 40 * y, 90 + 80 * z)  # never grey, so label pixels never match


def _grid_for(tmp_path, cfg, run) -> tuple[Image.Image, object]:
    p = plan(cfg, run, axes_of(cfg, run))
    images = {(c.x, c.y, c.z): Image.new("RGB", (CELL, CELL), _colour(c.x, c.y, c.z)) for c in p.cells}
    return Image.open(save_grid(tmp_path / "grid.png", p, images, margin=4)).convert("RGB"), p


def _box(grid: Image.Image, colour) -> tuple[int, int, int, int]:
    mask = Image.new("L", grid.size)
    mask.putdata([255 if px == colour else 0 for px in grid.getdata()])
    return mask.getbbox()


def _has_ink(grid: Image.Image, box) -> bool:
    return any(px != (255, 255, 255) for px in grid.crop(box).getdata())


@pytest.mark.parametrize("count", [1, 2, 3])
def test_grid_size_and_label_layout(tmp_path, count):
    run_dir = make_run(tmp_path)
    run = open_run(str(run_dir))
    axes = ["y.type=seed", "y.values=1, 2"] if count >= 2 else []
    axes += ["z.type=cfg_scale", "z.values=3, 8"] if count == 3 else []
    grid, p = _grid_for(tmp_path, sweep_config(run_dir, *axes), run)
    sizes = [len(a.values) if a else 1 for a in p.axes]
    boxes = {
        (x, y, z): _box(grid, _colour(x, y, z))
        for x in range(sizes[0])
        for y in range(sizes[1])
        for z in range(sizes[2])
    }
    assert all(b is not None and (b[2] - b[0], b[3] - b[1]) == (CELL, CELL) for b in boxes.values())
    # X runs left to right, Y top to bottom, Z grids side by side, with the margin between cells.
    for (x, y, z), box in boxes.items():
        if x + 1 < sizes[0]:
            right = boxes[(x + 1, y, z)]
            assert right[0] - box[2] == 4 and right[1] == box[1]
        if y + 1 < sizes[1]:
            below = boxes[(x, y + 1, z)]
            assert below[1] - box[3] == 4 and below[0] == box[0]
        if z + 1 < sizes[2]:
            assert boxes[(0, y, z + 1)][0] > boxes[(sizes[0] - 1, y, z)][2]
    first = boxes[(0, 0, 0)]
    assert _has_ink(grid, (first[0], 0, first[2], first[1]))  # X label above the first column
    assert _has_ink(grid, (0, first[1], first[0], first[3])) == (count >= 2)  # Y label left of the first row
    if count == 3:
        assert _has_ink(grid, (0, 0, grid.width, first[1] // 2))  # Z labels above the side-by-side grids
        assert _has_ink(grid, (boxes[(0, 0, 1)][0], 0, grid.width, first[1] // 2))  # ... over each of them
    assert grid.width >= sizes[0] * sizes[2] * CELL and grid.height > sizes[1] * CELL
    assert parse_infotext(Image.open(tmp_path / "grid.png").text["parameters"])[2]["Seed"]


# --------------------------------------------------------------------------------------------------
# The report


def _step(checkpoint, step, likeness, adherence=0.3, seeds=0.5):
    return StepScores(
        checkpoint, step, tuple(likeness), (seeds,) * len(likeness), (adherence,) * len(likeness)
    )


def _page(tmp_path, curves, *, collapse_ratio=0.5, loss=()) -> str:
    rec = recommend(curves, 0.65, collapse_ratio=collapse_ratio, adherence_drop=0.1)
    page = write_report(tmp_path / "report.html", title="t", grids=[], loss=list(loss), curves=curves,
                        recommendation=rec, notes=[], summary=[])  # fmt: skip
    return page.read_text()


def test_per_step_table_shows_the_numbers_behind_each_verdict(tmp_path):
    checkpoint = "base<i>&"
    curves = [
        _step(checkpoint, 0, [0.5] * 8, adherence=0.35, seeds=0.4),
        _step(checkpoint, 20, [0.9] * 6 + [0.5] * 2, adherence=0.3, seeds=0.5),
        _step(checkpoint, 40, [0.9] * 8, adherence=0.31, seeds=0.6),
        _step(checkpoint, 60, [0.9] * 8, adherence=0.3, seeds=0.6),
    ]
    page = _page(tmp_path, curves)
    # Step 20: 6 of 8 at the bar, Wilson 95 % 0.41-0.93; mean 0.8, sd 0.185, t(7) = 2.365 -> 0.645-0.955;
    # lowest 0.5, adherence 0.3, seed variety 1 - 0.5.
    assert (
        "<tr><th>20</th><td>6/8 (0.41–0.93)</td><td>0.800 (0.645–0.955)</td><td>0.500</td><td>0.300</td>"
        '<td>0.500</td><td class="fail">below bar</td></tr>'
    ) in page
    # 8 of 8: 8 / (8 + 1.96²) = 0.68; the mean of eight equal values has no spread. 40 is the recommended row.
    assert (
        '<tr class="chosen" title="recommended step"><th>40</th><td>8/8 (0.68–1.00)</td><td>0.900 (0.900–0.900)</td>'
    ) in page
    assert "<tr><th>0 (before training)</th><td>0/8 (0.00–0.32)</td>" in page
    assert '<td class="base">baseline</td>' in page
    assert "An image passes when its likeness reaches the bar, 0.650" in page
    assert (
        "Each step was judged on 8 images per checkpoint, so even 8 of 8 at the bar only shows a pass rate above 0.68"
        in page
    )
    assert (
        "Recommended step: 40" in page and '<polygon class="band"' in page
    )  # the likeness chart's 95 % band
    # What the user wrote reaches the page escaped: header, legends, reason.
    assert "<i>" not in page and page.count("base&lt;i&gt;&amp;") >= 4


def test_charts_that_carry_no_information_are_not_drawn(tmp_path):
    rising = [_step("toy", step, [1.0] * k + [0.0] * (8 - k), adherence=1.0, seeds=1.0) for step, k in
              ((25, 3), (50, 5), (75, 8), (100, 8))]  # fmt: skip
    page = _page(tmp_path, rising, collapse_ratio=0.0, loss=[(1, 0.2), (2, 0.1)])
    assert page.count('<svg class="chart"') == 2  # the loss and the likeness
    assert "No adherence chart: every value is 1." in page
    assert "No seed variety chart: scoring.collapse_ratio = 0, so seed variety is not judged" in page
    assert "<th>seed variety</th>" not in page
    # 0/1 likeness: the mean is a share, with Wilson's interval (3 of 8: 0.14-0.69)
    assert "<td>0.375 (0.137–0.694)</td>" in page
    single = [StepScores("c", step, (0.7,), (), (0.2 + step / 1000,)) for step in (20, 40)]
    page = _page(tmp_path, single)
    assert "No seed variety chart: every cell holds one image." in page
    assert "No likeness chart: every value is 0.7." in page and page.count('<svg class="chart"') == 1
    page = _page(tmp_path, [_step("c", 20, [0.7, 0.8])], loss=[(1, 0.3)])
    assert "No training loss chart: there is only one step." in page
    assert "No likeness chart: there is only one step." in page and '<svg class="chart"' not in page


# --------------------------------------------------------------------------------------------------
# Export


def _diffusers_pipeline():
    from library.tiny import build_tiny_parts

    return build_tiny_parts("sd1").pipeline()


def test_export_writes_files_that_load_embedding_and_diffusers_read(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    target = tmp_path / "webui" / "embeddings"
    assert (
        main(
            [
                "--config",
                str(ROOT / "presets/validate.toml"),
                f"run.folder={run_dir}",
                "--export",
                "40",
                "--export-to",
                str(target),
            ]
        )
        == 0
    )
    source = load_embedding(run_dir / "embeddings" / f"{NAME}-40.pt")
    for suffix in ("pt", "safetensors"):
        exported = load_embedding(target / f"{NAME}.{suffix}")
        assert exported.name == NAME and exported.step == 40 and "stored_name" not in exported.metadata
        assert torch.equal(exported.vectors, source.vectors)
    assert torch.load(target / f"{NAME}.pt", weights_only=True)["name"] == NAME
    pipe = _diffusers_pipeline()
    pipe.load_textual_inversion(str(target / f"{NAME}.pt"))
    pipe.load_textual_inversion(str(target / f"{NAME}.safetensors"), token="<other>")
    rows = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids([NAME, f"{NAME}_1", "<other>", "<other>_1"])
    assert torch.equal(rows[ids].detach(), torch.cat([source.vectors, source.vectors]))
    # Nothing is silently overwritten; --overwrite replaces.
    args = [
        "--config",
        str(ROOT / "presets/validate.toml"),
        f"run.folder={run_dir}",
        "--export",
        "60",
        "--export-to",
        str(target),
    ]
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0 and load_embedding(target / f"{NAME}.pt").step == 60
    with pytest.raises(UserError, match="'d3mo-50' is not a saved step"):
        export_step(open_run(str(run_dir)), 50, target, ("pt",), log=lambda *_: None)


# --------------------------------------------------------------------------------------------------
# End to end


def test_sweep_end_to_end_on_two_checkpoints_without_scores(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    second = tiny_checkpoint(tmp_path)
    out = tmp_path / "out"
    code = main(
        [
            "--config",
            str(ROOT / "presets/validate.toml"),
            f"run.folder={run_dir}",
            f"sweep.output_dir={out}",
            f'model.checkpoints=["run:checkpoint", "{second}"]',
            "render.steps=1",
            "render.width=16",
            "render.height=16",
            "render.batch_size=2",
            "fine.interval=40-60",
            "fine.every=20",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "scores are off" in captured.out and "images/s" in captured.out and "total" in captured.out
    assert (
        (out / "grid.png").is_file() and (out / "grid-fine.png").is_file() and (out / "report.html").is_file()
    )
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == (3 + 2) * 2 * 2  # (coarse + fine steps) x checkpoints x seeds
    assert {r["checkpoint"] for r in rows} == {"builtin:tiny", second.stem} and rows[0]["likeness"] == ""
    cell = Image.open(out / rows[-1]["file"])
    prompt, negative, params = parse_infotext(cell.text["parameters"])
    assert prompt == "a medium closeup color portrait photo of d3mo-60 on a greek island" and negative == ""
    assert params["Model"] == second.stem and params["Seed"] == "12345679" and params["Steps"] == "1"
    assert load_config(SweepConfig, out / "config.toml").fine.interval == "40-60"
    assert "Scores are off" in (out / "report.html").read_text()
    # A folder that already holds a sweep is not overwritten.
    assert (
        main(
            [
                "--config",
                str(ROOT / "presets/validate.toml"),
                f"run.folder={run_dir}",
                f"sweep.output_dir={out}",
                'model.checkpoints=["run:checkpoint"]',
                "y.type=none",
            ]
        )
        == 2
    )
    assert "already holds a sweep" in capsys.readouterr().err


def test_sweep_with_scores_and_auto_fine_pass(tmp_path, capsys, monkeypatch):
    from library import scoring
    from tests.test_scoring import tiny_clip_folder

    monkeypatch.setattr(scoring, "reference_likeness", lambda scorer, refs: 1.0)  # a random CLIP's may be < 0

    run_dir = make_run(tmp_path, steps=(10, 15, 20, 25, 30, 35, 40))
    out = tmp_path / "out"
    code = main(
        [
            "--config",
            str(ROOT / "presets/validate.toml"),
            f"run.folder={run_dir}",
            f"sweep.output_dir={out}",
            'model.checkpoints=["run:checkpoint"]',
            "y.type=none",
            "x.values=every 20",
            "render.steps=1",
            "render.width=16",
            "render.height=16",
            "render.batch_size=2",
            f"scoring.model={tiny_clip_folder(tmp_path)}",
            "scoring.likeness_bar=-100",
            "fine.interval=auto",
            "render.seed=-1",
            "--export",
            "recommended",
            "--export-to",
            str(tmp_path / "embeddings"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # Every image passes a bar of -100: the coarse pass points to its first step (20), the fine pass covers
    # 0-20 and finds that 10 already passes.
    assert "the scores point to steps 0-20" in captured.out and "recommendation: step 10:" in captured.out
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert {r["step"] for r in rows if r["pass"] == "fine"} == {"10", "15", "20"}
    assert all(
        -1.0001 <= float(r["likeness"]) <= 1.0001 and r["seed_likeness"] and r["adherence"] for r in rows
    )
    assert "Recommended step: 10" in (out / "report.html").read_text()
    assert load_embedding(tmp_path / "embeddings" / f"{NAME}.safetensors").step == 10
    # seed -1: one random seed for both passes, recorded in the sweep's config.toml
    seed = load_config(SweepConfig, out / "config.toml").render.seed
    assert seed >= 0 and {int(r["seed"]) for r in rows} == {seed, seed + 1}


def test_step_0_shows_as_the_baseline_and_is_never_recommended(tmp_path, capsys, monkeypatch):
    from library import scoring
    from tests.test_scoring import tiny_clip_folder

    monkeypatch.setattr(scoring, "reference_likeness", lambda scorer, refs: 1.0)  # a random CLIP's may be < 0
    run_dir = make_run(tmp_path, steps=(0, 20, 40, 60))  # NAME-0: the starting vectors the trainer saves
    out = tmp_path / "out"
    args = ["--config", str(ROOT / "presets/validate.toml"), f"run.folder={run_dir}", f"sweep.output_dir={out}",
            'model.checkpoints=["run:checkpoint"]', "y.type=none", "x.values=every 20", "render.steps=1",
            "render.width=16", "render.height=16", "render.batch_size=2",
            f"scoring.model={tiny_clip_folder(tmp_path)}", "scoring.likeness_bar=-100"]  # fmt: skip
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # Every image passes a bar of -100, step 0's too: the first trained step, confirmed by the next, wins.
    assert (
        "recommendation: step 20: " in captured.out and "the next saved step (40) confirms it" in captured.out
    )
    assert "step 0 (before training) already reaches the bar" in captured.out
    assert {r["step"] for r in csv.DictReader((out / "scores.csv").open())} == {"0", "20", "40", "60"}
    page = (out / "report.html").read_text()
    assert "Recommended step: 20" in page and "<tr><th>0 (before training)</th><td>2/2" in page
    assert "Step 0 (d3mo-0) is the embedding before training, its starting vectors" in page
    # No silence while rendering: a line as the checkpoint loads, then a progress bar on stderr.
    assert "builtin:tiny: loading builtin:tiny" in captured.out and "8/8 images" in captured.err


def test_checkpoints_are_loaded_one_at_a_time(tmp_path, monkeypatch):
    import gc
    import weakref

    from library import models

    run_dir = make_run(tmp_path)
    second = tiny_checkpoint(tmp_path)
    real_load, alive, overlaps = models.load_parts, [], []

    def load_parts(model, **kwargs):
        gc.collect()
        overlaps.append(sum(ref() is not None for ref in alive))
        parts = real_load(model, **kwargs)
        alive.append(weakref.ref(parts.unet))
        return parts

    monkeypatch.setattr(models, "load_parts", load_parts)
    args = ["--config", str(ROOT / "presets/validate.toml"), f"run.folder={run_dir}", f"sweep.output_dir={tmp_path / 'o'}",
            f'model.checkpoints=["run:checkpoint", "{second}"]', "render.steps=1", "render.width=16",
            "render.height=16", "render.batch_size=1", "x.values=every 60"]  # fmt: skip
    assert main(args) == 0
    assert overlaps == [0, 0]  # the first checkpoint was gone before the second one loaded


def test_sweep_errors_before_rendering(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    args = [
        "--config",
        str(ROOT / "presets/validate.toml"),
        f"run.folder={run_dir}",
        'model.checkpoints=["run:checkpoint"]',
        "y.type=none",
        f"sweep.output_dir={tmp_path / 'out'}",
    ]
    assert main([*args, "fine.interval=auto"]) == 2 and "set scoring.model" in capsys.readouterr().err
    assert main([*args, "fine.interval=80-40"]) == 2 and "FIRST-LAST" in capsys.readouterr().err
    assert main([*args, "x.values=every 1000"]) == 2 and "matches no saved step" in capsys.readouterr().err
    assert (
        main([*args, "x.values=every 20", "render.prompt=a photo"]) == 2
        and "no 'd3mo'" in capsys.readouterr().err
    )
    assert (
        main([*args, f"run.folder={tmp_path / 'nowhere'}"]) == 2
        and "run folder not found" in capsys.readouterr().err
    )
    assert main([*args, "--export", "abc", "--export-to", str(tmp_path)]) == 2
    assert not (tmp_path / "out").exists()
