"""What a user meets when things go wrong during training: NaN, Ctrl-C, kills while saving, failed starts,
two runs in one folder, bad values; and what the saves and previews look like to A1111 and Kohya users."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.embeddings import load_embedding
from library.errors import UserError
from library.infotext import parse_infotext
from library.training import Trainer, TrainingStopped, run_training, setup
from tests.a1111 import a1111_check_pt, a1111_reads
from tests.helpers import interrupt_after, make_images, one_error_line
from tests.test_train import config
from train_textual_inversion import main

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda *_: None)


def args(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "presets/demo.toml"),
        "model.checkpoint=builtin:tiny",
        f"save.output_dir={tmp_path / 'run'}",
        f"dataset.image_dir={make_images(tmp_path / 'img')}",
        "dataset.resolution=32",
        "train.batch_size=4",
        "train.max_steps=4",
        "save.save_every_steps=2",
        "preview.every_steps=0",
        *overrides,
    ]


# --------------------------------------------------------------------------------------------------
# Files as A1111 reads them


def test_saves_are_named_name_step_inside_and_pass_a1111s_checks(tmp_path):
    cfg = config(tmp_path, "save.embed_in_png=true", "preview.every_steps=2", "preview.steps=1")
    final = run_training(cfg, **QUIET)
    run = tmp_path / "run"
    for step in (0, 2, 4):  # step 0: the starting vectors, the sweep's "before"
        path = run / "embeddings" / f"d3mo-{step}.pt"
        a1111_check_pt(path)
        assert torch.load(path, weights_only=True)["name"] == f"d3mo-{step}"
        assert load_embedding(path).step == step
        if step:
            keyword, vectors, saved_step, *_ = a1111_reads(run / "previews" / f"d3mo-{step}-embedding.png")
            assert keyword == f"d3mo-{step}" and saved_step == step  # the card's keyword is its stored name
    a1111_check_pt(final)
    assert a1111_reads(final)[0] == "d3mo" and torch.load(final, weights_only=True)["name"] == "d3mo"
    start = load_embedding(run / "embeddings" / "d3mo-0.pt")
    assert start.step == 0 and not torch.equal(start.vectors, load_embedding(final).vectors)


# --------------------------------------------------------------------------------------------------
# NaN


def _poison_update(monkeypatch, at_step: int) -> None:
    """The optimizer's update number `at_step` makes the vectors NaN while its loss was finite."""
    real = Trainer.step

    def step(self, index, lr, clip):
        loss = real(self, index, lr, clip)
        if index + 1 == at_step:
            for vectors in self.embeddings.parameters:
                vectors.data.fill_(float("nan"))
        return loss

    monkeypatch.setattr(Trainer, "step", step)


@pytest.mark.parametrize("bad_step", [4, 2], ids=["last step", "earlier step"])
def test_nan_vectors_stop_with_a_good_embedding_that_exists(tmp_path, monkeypatch, bad_step):
    cfg = config(tmp_path, "train.max_steps=4", "save.save_every_steps=0")
    _poison_update(monkeypatch, bad_step)
    with pytest.raises(TrainingStopped) as stopped:
        run_training(cfg, **QUIET)
    kept = tmp_path / "run" / "embeddings" / f"d3mo-{bad_step - 1}.pt"
    assert f"became non-finite at step {bad_step}; kept the last good embedding {kept}" in str(stopped.value)
    assert torch.isfinite(load_embedding(kept).vectors).all() and load_embedding(kept).step == bad_step - 1
    assert not (tmp_path / "run" / "d3mo.pt").exists()  # no final embedding from a failed run


def test_nan_stop_exits_non_zero_with_one_line(tmp_path, monkeypatch, capsys):
    _poison_update(monkeypatch, 3)
    assert main(args(tmp_path, "save.save_every_steps=1")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "non-finite at step 3" in line and "d3mo-2.pt" in line
    assert (tmp_path / "run" / "embeddings" / "d3mo-2.pt").is_file()


# --------------------------------------------------------------------------------------------------
# Ctrl-C, kills, resume


def test_ctrl_c_on_a_save_step_says_how_to_continue(tmp_path, monkeypatch, capsys):
    interrupt_after(monkeypatch, 3)
    assert main(args(tmp_path, "save.save_every_steps=1", "train.max_steps=6")) == 130
    line = one_error_line(capsys.readouterr().err)
    assert "interrupted after 3 steps" in line and f"--resume {tmp_path / 'run'}" in line
    monkeypatch.undo()
    assert main(["--resume", str(tmp_path / "run")]) == 0  # the run's own config.toml
    assert load_embedding(tmp_path / "run" / "d3mo.pt").step == 6


def test_a_save_cut_short_by_a_kill_is_redone_on_resume(tmp_path, monkeypatch):
    settings = ("train.max_steps=6", "save.save_every_steps=2")
    straight = load_embedding(run_training(config(tmp_path / "a", *settings), **QUIET)).vectors
    cfg = config(tmp_path / "b", *settings)
    interrupt_after(monkeypatch, 4)
    with pytest.raises(TrainingStopped):
        run_training(cfg, **QUIET)
    monkeypatch.undo()
    saves = tmp_path / "b" / "run" / "embeddings"
    # A kill during the save of step 6: its optimizer state and one format landed, the .pt (written last) not.
    shutil.copy(saves / "d3mo-4.optim", saves / "d3mo-6.optim")
    shutil.copy(saves / "d3mo-4.safetensors", saves / "d3mo-6.safetensors")
    messages = []
    resumed = run_training(cfg, resume=str(tmp_path / "b" / "run"), log=messages.append)
    assert "removed the incomplete save of step 6" in " ".join(messages)
    assert torch.equal(load_embedding(resumed).vectors, straight)
    assert load_embedding(saves / "d3mo-6.pt").step == 6


def test_a_failed_start_blocks_neither_a_rerun_nor_resume(tmp_path, monkeypatch):
    cfg = config(tmp_path, "save.save_every_steps=0")

    def crash(self, index, lr, clip):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Trainer, "step", crash)
    with pytest.raises(RuntimeError):
        run_training(cfg, **QUIET)
    assert (tmp_path / "run" / "config.toml").exists()
    monkeypatch.undo()
    assert load_embedding(run_training(cfg, **QUIET)).step == 4
    other = config(tmp_path / "c", "save.save_every_steps=0")
    monkeypatch.setattr(Trainer, "step", crash)
    with pytest.raises(RuntimeError):
        run_training(other, **QUIET)
    monkeypatch.undo()
    messages = []
    assert (
        load_embedding(run_training(other, resume=str(tmp_path / "c" / "run"), log=messages.append)).step == 4
    )
    assert "holds no save yet: starting from step 0" in " ".join(messages)


def test_one_folder_holds_one_run_at_a_time(tmp_path):
    first = setup(config(tmp_path), **QUIET)
    with pytest.raises(UserError, match="another training run is writing to this folder"):
        setup(config(tmp_path), **QUIET)
    first.lock.close()
    assert load_embedding(run_training(config(tmp_path), **QUIET)).step == 4


# --------------------------------------------------------------------------------------------------
# Bad values and names: one line, before anything loads or is written


@pytest.mark.parametrize(
    "override, fragment",
    [
        (
            "model.checkpoint=",
            "model.checkpoint is not set: name the model, e.g. model.checkpoint=builtin:toy",
        ),
        ("train.max_steps=0", "'train.max_steps' = 0 must be at least 1"),
        ("train.lr=0", "'train.lr' = 0 must be above 0"),
        ("train.lr_warmup_steps=-5", "'train.lr_warmup_steps' = -5 must be at least 0"),
        ("save.formats=['pt', 'safetensor']", "did you mean 'safetensors'?"),
        ("embedding.name=../../escape", "embedding.name = '../../escape' holds '/'"),
        ("embedding.name=/tmp/abs", "holds '/'"),
        ("embedding.num_vectors=0", "'embedding.num_vectors' = 0 must be 1 to 75"),
        ("train.lr=nan", "must be a finite number"),
        ("preview.steps=0", "'preview.steps' = 0 must be at least 1"),
        ("train.lr=0.05:2, 0.01:1", "step 1 does not come after step 2"),
    ],
)
def test_bad_values_are_refused_before_anything_loads(tmp_path, capsys, override, fragment):
    assert main(args(tmp_path, override)) == 2
    assert fragment in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "escape").exists()


def test_a_preset_without_a_model_is_an_error_not_a_random_model(tmp_path, capsys):
    preset = tmp_path / "mine.toml"
    preset.write_text('[embedding]\nname = "me"\n[dataset]\nresolution = 32\n')
    assert main(["--config", str(preset), f"dataset.image_dir={make_images(tmp_path / 'img')}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.checkpoint is not set" in line and "builtin:toy" in line


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert main(args(tmp_path)) == 2
    assert "run: is a file, not a folder" in one_error_line(capsys.readouterr().err)


def test_overrides_after_options_are_read(tmp_path):
    argv = args(tmp_path)
    assert main([*argv[2:], "--config", argv[1]]) == 0  # overrides first, then the option
    assert load_embedding(tmp_path / "run" / "d3mo.pt").step == 4


# --------------------------------------------------------------------------------------------------
# Previews: Kohya's sample-prompts file, the sheet


def test_a_kohya_sample_prompts_file_drives_the_previews(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# two pictures per preview\n"
        "a photo of [name] <script>alert(1)</script> --n blurry --w 48 --h 32 --d 7 --s 2 --l 5.5\n"
        "\n"
        "a drawing of [name] --d 9 --ss euler_a\n"
    )
    cfg = config(tmp_path, "preview.every_steps=2", f"preview.prompts_file={prompts}", "preview.steps=1")
    run_training(cfg, **QUIET)
    previews = tmp_path / "run" / "previews"
    first = Image.open(previews / "d3mo-2.png")
    prompt, negative, params = parse_infotext(first.text["parameters"])
    assert first.size == (48, 32) and prompt == "a photo of d3mo <script>alert(1)</script>"
    assert (negative, params["Seed"], params["Steps"], params["CFG scale"]) == ("blurry", "7", "2", "5.5")
    second = Image.open(previews / "d3mo-2-1.png")
    _, _, params = parse_infotext(second.text["parameters"])
    assert second.size == (32, 32) and (params["Seed"], params["Sampler"]) == ("9", "Euler a")
    sheet = (previews / "index.html").read_text()
    assert all(f'src="d3mo-{step}{suffix}.png"' in sheet for step in (0, 2, 4) for suffix in ("", "-1"))
    assert "<script>" not in sheet and "&lt;script&gt;" in sheet


def test_a_bad_sample_prompts_line_fails_before_the_model_loads(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of [name] --w wide\n")
    assert main(args(tmp_path, "preview.every_steps=2", f"preview.prompts_file={prompts}")) == 2
    assert "prompts.txt:1: --w 'wide' is not a number" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_prompts_without_the_trigger_word_are_caught_or_train_on(tmp_path, capsys):
    images = make_images(tmp_path / "plain", caption="a red shape")  # no caption holds "d3mo"
    assert main(args(tmp_path, f"dataset.image_dir={images}", "dataset.template=[filewords]")) == 2
    assert "no training prompt holds the trigger word 'd3mo'" in one_error_line(capsys.readouterr().err)
    # Some captions hold it (Kohya's way): a batch without it is a zero gradient, not a crash.
    mixed = make_images(tmp_path / "mixed", caption="a red shape")
    (mixed / "00.txt").write_text("d3mo, a red shape\n")
    argv = args(tmp_path, f"dataset.image_dir={mixed}", "dataset.template=[filewords]", "train.batch_size=1")
    assert main(argv) == 0 and load_embedding(tmp_path / "run" / "d3mo.pt").step == 4


def test_a_kohya_dataset_tomls_batch_size_is_not_ignored(tmp_path, capsys):
    dataset = tmp_path / "ds.toml"
    images = make_images(tmp_path / "img2")
    dataset.write_text(
        f'[general]\nbatch_size = 2\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\n'
    )
    assert main(args(tmp_path, f"dataset.dataset_config={dataset}", "train.batch_size=4")) == 2
    assert "batch_size = 2, but train.batch_size = 4" in one_error_line(capsys.readouterr().err)
    assert main(args(tmp_path, f"dataset.dataset_config={dataset}", "train.batch_size=2")) == 0


def test_out_of_memory_while_capturing_names_the_switches(monkeypatch):
    """A card too small for the CUDA graphs (SDXL's presets use them) gets the settings that need less."""
    from library import denoiser
    from library.conditioning import Conditioning
    from library.tiny import build_tiny_parts

    def no_room(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(denoiser, "_warm_up", no_room)
    parts = build_tiny_parts("sd1", seed=0)
    graphs = denoiser.TrainingGraphs(parts.unet, parts.family)
    width = parts.unet.config.cross_attention_dim
    cond = Conditioning(torch.zeros(2, 77, width, requires_grad=True))
    with pytest.raises(UserError, match=r"train\.cuda_graphs=false .*train\.low_memory=true") as error:
        graphs(torch.zeros(2, 4, 8, 8), torch.tensor([10, 20]), cond)
    assert "(2, 4, 8, 8)" in str(error.value) and not graphs.graphs
