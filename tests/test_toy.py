"""The embedded toy world: the committed model, the renderer, the scorer, the likeness hook, the demo preset,
and the proof that textual inversion really learns: the demo's embedding goes from the init word to the
concept of its 8 pictures, judged by the scorer, and a sweep of its saved steps recommends a step."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from library import toy
from library.conditioning import Conditioner
from library.config import load_config
from library.errors import UserError
from library.models import load_parts, load_sd, read_state_dict
from library.sampling import generate
from library.tables import ModelConfig, SamplerSettings, TrainConfig
from tests.helpers import one_error_line

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = SamplerSettings(steps=20, cfg_scale=4.0, width=64, height=64)


@pytest.fixture(scope="module")
def toy_parts(one_thread):
    return load_sd(toy.TOY_CHECKPOINT)


def test_checkpoint_is_a_small_fp16_single_file_in_sd1_layout():
    assert toy.TOY_CHECKPOINT.stat().st_size <= 25_000_000
    sd, metadata = read_state_dict(toy.TOY_CHECKPOINT)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    for prefix in (
        "model.diffusion_model.",
        "first_stage_model.",
        "cond_stage_model.transformer.text_model.",
    ):
        assert any(k.startswith(prefix) for k in sd), prefix
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"


def test_loads_offline_as_an_sd1_model(toy_parts):
    parts = toy_parts
    assert parts.family.name == "sd1" and parts.prediction_type == "epsilon"
    assert parts.vae.config.scaling_factor == pytest.approx(
        0.18215
    )  # the toy VAE's latents were scaled to fit SD1's factor
    assert parts.text_encoder.get_input_embeddings().weight.shape == (49408, 64)
    assert parts.unet.config.cross_attention_dim == 64
    assert parts.tokenizer("a photo of a woman").input_ids == [49406, 320, 1125, 539, 320, 2308, 49407]
    assert len(parts.checkpoint_hash) == 10


def test_builtin_toy_is_the_committed_file_and_builtin_tiny_still_works():
    parts = load_parts(ModelConfig(checkpoint="builtin:toy"))
    assert parts.checkpoint_name == toy.TOY_CHECKPOINT.stem and parts.family.name == "sd1"
    assert load_parts(ModelConfig(checkpoint="builtin:tiny")).checkpoint_name == "tiny-sd1"


def test_captions_and_concepts():
    assert toy.caption("red", "star") == "a photo of a red star, neutral gray background"
    assert toy.caption("red", None, background=False) == "a photo of a red shape"
    assert toy.caption(None, "star", background=False) == "a photo of a star"
    assert toy.caption(None, None) == "a photo of a shape, neutral gray background"
    assert toy.parse_concept("Orange Star") == ("orange", "star")
    with pytest.raises(UserError, match="colour"):
        toy.parse_concept("pink star")


def test_the_held_out_combination_is_never_drawn_for_training():
    scenes = toy.sample_scenes(3000, torch.Generator().manual_seed(0))
    held = (list(toy.COLOURS).index(toy.HELD_OUT[0]), toy.SHAPES.index(toy.HELD_OUT[1]))
    pairs = set(zip(scenes.colour.tolist(), scenes.shape.tolist(), strict=True))
    assert held not in pairs and len(pairs) == 35


def test_scorer_names_fresh_ground_truth():
    gen = torch.Generator().manual_seed(2024)
    scenes = toy.sample_scenes(216, gen, pairs=toy.combinations(include_held_out=True))
    found = toy.classify(toy.draw(scenes, gen))
    truth = [
        (list(toy.COLOURS)[c], toy.SHAPES[s])
        for c, s in zip(scenes.colour.tolist(), scenes.shape.tolist(), strict=True)
    ]
    right = sum(a == b for a, b in zip(found, truth, strict=True))
    assert right / len(truth) >= 0.99, [(a, b) for a, b in zip(found, truth, strict=True) if a != b]


def test_scorer_says_no_clear_shape_for_blobs_and_noise():
    gen = torch.Generator().manual_seed(7)
    blobs, _ = toy.draw_without_shape(64, gen)
    said = [shape for _, shape in toy.classify(blobs)]
    assert said.count(toy.NO_SHAPE) / len(said) >= 0.95
    noise = torch.rand(4, 3, 64, 64, generator=gen) * 2 - 1
    assert {shape for _, shape in toy.classify(noise)} == {toy.NO_SHAPE}


def test_likeness_hook_on_generated_images(toy_parts):
    encoder = Conditioner.of(toy_parts)
    prompt = "a photo of a red circle"
    images = generate(toy_parts, encoder, [prompt] * 4, [""] * 4, [11, 12, 13, 14], SETTINGS)
    assert toy.likeness(images, "red circle") >= 0.75
    assert toy.likeness(images, "blue square") == 0.0
    assert toy.concept_hit_rate(toy_parts, encoder, prompt, "red circle", [11, 12], SETTINGS) >= 0.5
    # The sweep's scorer protocol: the target comes from the references (rendered red circles).
    gen = torch.Generator().manual_seed(3)
    references = toy.to_pil(toy.draw(toy.sample_scenes(3, gen, pairs=[(0, 0)]), gen))
    scorer = toy.ToyScorer()
    assert sum(scorer.likeness(images, references)) >= 3
    assert min(scorer.adherence(references, "a photo of a red circle")) == 1.0
    with pytest.raises(UserError):
        toy.likeness(images, "red")


def test_demo_preset_trains_a_few_steps_on_the_toy_model(tmp_path):
    from library.embeddings import load_embedding
    from library.training import run_training

    out = tmp_path / "demo"
    overrides = [
        "train.max_steps=3",
        f"save.output_dir={out.as_posix()}",
        "save.save_every_steps=3",
        "preview.every_steps=3",
        "preview.batch_size=1",
        "preview.steps=4",
    ]
    config = load_config(TrainConfig, "presets/demo.toml", overrides)
    assert config.model.checkpoint == "builtin:toy"
    final = run_training(config, log=lambda *a: None)
    embedding = load_embedding(final)
    assert embedding.vectors.shape == (1, 64) and embedding.step == 3
    assert (out / "previews" / "d3mo-0.png").is_file() and (out / "previews" / "d3mo-3.png").is_file()
    assert embedding.checkpoint_name == toy.TOY_CHECKPOINT.stem


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo preset as users run it (8 pictures of an orange star, init word "shape", batch 8,
    lr 0.005), 75 steps, an embedding saved every 25 steps; previews off to save time."""
    from library.training import run_training

    out = tmp_path_factory.mktemp("toy") / "demo"
    overrides = [
        "train.max_steps=75",
        f"save.output_dir={out.as_posix()}",
        "save.save_every_steps=25",
        "preview.every_steps=0",
    ]
    run_training(load_config(TrainConfig, ROOT / "presets/demo.toml", overrides), log=lambda *a: None)
    return out


def test_textual_inversion_learns_the_demo_concept(toy_parts, demo_run):
    """From the init word to the concept: under 20 % of the images are orange stars with the init vector,
    at least 85 % after 75 steps (the same 16 seeds)."""
    from library.embeddings import init_vectors, load_embedding

    encoder = Conditioner.of(toy_parts)
    seeds = list(range(500, 516))
    settings = SamplerSettings(steps=20, cfg_scale=4.0, width=64, height=64)
    start = init_vectors(toy_parts.tokenizer, toy_parts.text_encoder, "shape", 1, "a1111")
    encoder.set_embedding("d3mo", {"clip_l": start})
    before = toy.concept_hit_rate(toy_parts, encoder, "a photo of a d3mo", "orange star", seeds, settings)
    encoder.set_embedding(
        "d3mo", {"clip_l": load_embedding(demo_run / "embeddings" / "d3mo-75.pt").vectors.float()}
    )
    after = toy.concept_hit_rate(toy_parts, encoder, "a photo of a d3mo", "orange star", seeds, settings)
    assert before < 0.2 and after >= 0.85, (before, after)
    loss = [float(row["loss"]) for row in csv.DictReader((demo_run / "loss.csv").open())]
    assert sum(loss[-10:]) < sum(loss[:10])


def test_sweep_of_the_demo_run_recommends_a_step_by_the_toy_scorer(demo_run, capsys):
    from sweep_validate import main

    out = demo_run.parent / "validation"
    code = main(
        [
            "--config",
            str(ROOT / "presets/validate_demo.toml"),
            f"run.folder={demo_run.as_posix()}",
            f"sweep.output_dir={out.as_posix()}",
            "render.batch_size=6",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = list(csv.DictReader((out / "scores.csv").open()))
    rate = {
        step: sum(float(r["likeness"]) for r in rows if r["step"] == step) / 6 for step in ("25", "50", "75")
    }
    # A real curve: the hit rate rises with the steps, and the recommended step is the first where all
    # six seeds are orange stars.
    assert rate["25"] <= rate["50"] <= rate["75"] == 1.0, rate
    first = min(int(step) for step, value in rate.items() if value == 1.0)
    assert f"recommendation: step {first}:" in captured.out
    assert f"Recommended step: {first}" in (out / "report.html").read_text()


def test_the_toy_model_runs_in_diffusers(tmp_path, toy_parts):
    """Written as a diffusers folder, the toy model draws what diffusers' own pipeline is asked for."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from library.convert import save_diffusers

    folder = save_diffusers(toy_parts, tmp_path / "toy")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a photo of a blue triangle"] * 4,
        height=64,
        width=64,
        num_inference_steps=20,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert toy.likeness(images, "blue triangle") >= 0.75


def test_toy_world_script_trains_resumes_and_assembles_on_cpu(tmp_path):
    """tools/toy_world.py end to end at tiny sizes: scorer, VAE, joint training, a resumed second call,
    export, then the single file (SD layout) and diffusers folder it assembles load offline."""
    script = [sys.executable, str(ROOT / "tools/toy_world.py")]
    work = tmp_path / "work"
    run = lambda *args: subprocess.run([*script, *args], capture_output=True, text=True, timeout=300)  # noqa: E731
    first = run(
        "train", "--work", str(work), "--tiny", "--budget-s", "12", "--reserve-s", "4", "--threads", "1"
    )
    assert first.returncode == 0, first.stderr[-2000:]
    step = json.loads((work / "snapshot" / "state.json").read_text())["step"]
    second = run("train", "--work", str(work), "--tiny", "--final", "--budget-s", "8", "--reserve-s", "2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resuming from {work / 'snapshot'} at step {step}" in second.stdout
    assert json.loads((work / "parts" / "eval.json").read_text())["step"] > step
    single, diffusers_dir = tmp_path / "toy.safetensors", tmp_path / "toy-diffusers"
    done = run(
        "assemble", "--parts", str(work / "parts"), "--output", str(single), "--diffusers", str(diffusers_dir)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for source in (single, diffusers_dir):
        parts = load_sd(source)
        assert parts.family.name == "sd1" and parts.text_encoder.get_input_embeddings().weight.shape == (
            49408,
            64,
        )
    config = json.loads((diffusers_dir / "text_encoder" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"


def test_dataset_command_renders_a_kohya_folder_and_never_overwrites(tmp_path):
    folder = tmp_path / "10_z1ggy cross"
    command = [sys.executable, str(ROOT / "tools/toy_world.py"), "dataset", "--concept", "purple cross"]
    done = subprocess.run([*command, "--out", str(folder), "--n", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    images = sorted(folder.glob("*.png"))
    assert len(images) == 4 and (folder / "00.txt").read_text().strip() == toy.BACKGROUND
    from PIL import Image

    assert toy.likeness([Image.open(p) for p in images], "purple cross") == 1.0
    again = subprocess.run([*command, "--out", str(folder)], capture_output=True, text=True)
    assert again.returncode != 0 and "not empty" in again.stderr
    bad = subprocess.run(
        [*command[:-1], "pink star", "--out", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "colour from red" in one_error_line(bad.stderr)


def test_samples_grid_shows_the_evaluation_samples_with_labels(tmp_path, monkeypatch):
    """docs/toy_samples.png: `samples-grid` renders the first 2 samples of each of the 36 prompts of
    `evaluate --per-combo 32` (same prompts, seeds, sampler and CFG) as a grid, rows labelled with the
    colours and columns with the shapes."""
    import importlib.util

    import library.sampling

    spec = importlib.util.spec_from_file_location("toy_world", ROOT / "tools/toy_world.py")
    toy_world = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy_world)
    asked = {}

    def fake_generate(parts, conditioner, prompts, negatives, seeds, settings, **_):
        """Each picture a flat colour that says which one it is, so the test can find it in the grid."""
        from PIL import Image

        asked.update(prompts=prompts, negatives=negatives, seeds=seeds, settings=settings)
        return [Image.new("RGB", (64, 64), (i, 255 - i, 128)) for i in range(len(prompts))]

    monkeypatch.setattr(library.sampling, "generate", fake_generate)
    output = tmp_path / "samples.png"
    assert toy_world.main(["samples-grid", "--output", str(output)]) == 0

    combos = [(c, s) for c in toy.COLOURS for s in toy.SHAPES]
    assert asked["prompts"] == [f"a photo of a {c} {s}" for c, s in combos for _ in range(2)]
    assert asked["seeds"] == [1000 + 32 * k + j for k in range(36) for j in range(2)]  # evaluate's seeds
    assert set(asked["negatives"]) == {""}
    settings = asked["settings"]
    assert (settings.sampler, settings.steps, settings.cfg_scale, settings.width) == (
        "DPM++ 2M Karras",
        20,
        4.0,
        64,
    )

    from PIL import Image

    grid = np.asarray(Image.open(output).convert("RGB")).astype(int)
    margin = toy_world.evaluation.GRID_MARGIN
    left = grid.shape[1] - 6 * 128 - 5 * margin  # the colour labels' column
    top = grid.shape[0] - 6 * 64 - 5 * margin  # the shape labels' row
    assert left > 0 and top > 0
    for r in range(6):
        y = top + r * (64 + margin)
        assert grid[y : y + 64, :left].min() < 100, f"no label for row {r}"  # dark text on white
        for c in range(6):
            x = left + c * (128 + margin)
            assert grid[:top, x : x + 128].min() < 100, f"no label for column {c}"
            for j in range(2):
                i = (r * 6 + c) * 2 + j  # the picture of colour r, shape c, sample j
                assert tuple(grid[y + 32, x + 64 * j + 32]) == (i, 255 - i, 128)
