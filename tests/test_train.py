"""End-to-end training on tiny models: files written, only the vectors change, resume, stops, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from library.config import load_config
from library.embeddings import load_embedding
from library.errors import UserError
from library.infotext import parse_infotext
from library.tables import TrainConfig
from library.training import TrainingStopped, run_training, setup
from tests.helpers import interrupt_after, make_images, poison_unet_after, tiny_checkpoint
from train_textual_inversion import main

ROOT = Path(__file__).resolve().parent.parent


def config(tmp_path: Path, *overrides: str, preset: str = "presets/demo.toml") -> TrainConfig:
    base = [
        f"save.output_dir={tmp_path / 'run'}",
        "train.max_steps=4",
        "save.save_every_steps=2",
        "preview.every_steps=0",
        "dataset.resolution=32",
        f"dataset.image_dir={make_images(tmp_path / 'img')}",
        "train.batch_size=4",
    ]
    return load_config(TrainConfig, ROOT / preset, base + list(overrides))


def test_demo_preset_end_to_end_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "--config",
            str(ROOT / "presets/demo.toml"),
            f"save.output_dir={out}",
            "train.max_steps=4",
            "save.save_every_steps=2",
            "preview.every_steps=2",
            "preview.steps=2",
        ]
    )
    assert code == 0, capsys.readouterr().err
    final = load_embedding(out / "d3mo.pt")
    assert final.step == 4 and final.vectors.shape == (1, 64)  # the toy model's width
    assert torch.equal(load_embedding(out / "d3mo.safetensors").vectors, final.vectors)
    for step in (2, 4):
        saved = load_embedding(out / "embeddings" / f"d3mo-{step}.pt")
        assert saved.step == step and (out / "embeddings" / f"d3mo-{step}.optim").exists()
    assert torch.equal(load_embedding(out / "embeddings" / "d3mo-4.safetensors").vectors, final.vectors)
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"step", "epoch", "epoch_step", "loss", "learn_rate"}
    assert float(rows[0]["learn_rate"]) == 0.005
    from PIL import Image

    for step in (0, 2, 4):
        image = Image.open(out / "previews" / f"d3mo-{step}.png")
        prompt, negative, params = parse_infotext(image.text["parameters"])
        assert (
            prompt == "a photo of a d3mo"
            and params["Seed"] == "12345678"
            and params["Sampler"] == "DPM++ 2M Karras"
        )
    assert load_config(TrainConfig, out / "config.toml").train.max_steps == 4
    assert list((out / "logs").iterdir())


def test_only_the_new_vectors_change(tmp_path):
    trainer = setup(config(tmp_path, f"model.checkpoint={tiny_checkpoint(tmp_path)}"), log=lambda *_: None)
    models = trainer.parts.modules
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    (vectors,) = trainer.embeddings.parameters
    start = vectors.detach().clone()
    trainer.train()
    for model, snapshot in zip(models, before, strict=True):
        for key, value in model.state_dict().items():
            assert torch.equal(value, snapshot[key]), key
    assert not torch.equal(vectors.detach(), start)
    # The optimizer holds only the vectors: no token table, no UNet weights.
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(params) == 1 and params[0] is vectors


def test_interrupted_then_resumed_run_is_bitwise_identical(tmp_path, monkeypatch):
    settings = (
        "train.max_steps=6",
        "save.save_every_steps=0",
        "train.lr_scheduler=cosine",
        "train.lr_warmup_steps=2",
        "dataset.flip_aug=true",
        "dataset.shuffle_tags=true",
        "dataset.latent_sampling=random",
        "train.gradient_accumulation_steps=2",
        "train.batch_size=2",
    )
    straight = run_training(config(tmp_path / "a", *settings), log=lambda *_: None)

    cfg = config(tmp_path / "b", *settings)
    interrupt_after(monkeypatch, 3)
    with pytest.raises(TrainingStopped, match="interrupted after 3 steps"):
        run_training(cfg, log=lambda *_: None)
    monkeypatch.undo()
    assert load_embedding(tmp_path / "b" / "run" / "embeddings" / "d3mo-3.pt").step == 3
    resumed = run_training(cfg, resume=str(tmp_path / "b" / "run"), log=lambda *_: None)
    assert torch.equal(load_embedding(resumed).vectors, load_embedding(straight).vectors)
    rows = list(csv.DictReader((tmp_path / "b" / "run" / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_step_file_continues_the_schedule(tmp_path):
    cfg = config(tmp_path, "train.max_steps=4", "save.save_every_steps=2", "train.lr=0.01:2, 0.001")
    straight = load_embedding(run_training(cfg, log=lambda *_: None)).vectors
    other = config(tmp_path / "c", "train.max_steps=4", "train.lr=0.01:2, 0.001")
    resumed = run_training(
        other, resume=str(tmp_path / "run" / "embeddings" / "d3mo-2.pt"), log=lambda *_: None
    )
    assert torch.equal(load_embedding(resumed).vectors, straight)


def test_nan_loss_stops_and_keeps_the_last_good_embedding(tmp_path, monkeypatch):
    trainer = setup(config(tmp_path, "train.max_steps=6", "save.save_every_steps=0"), log=lambda *_: None)
    poison_unet_after(monkeypatch, trainer, calls=3)
    with pytest.raises(TrainingStopped, match="loss became nan at step 4"):
        trainer.train()
    kept = load_embedding(tmp_path / "run" / "embeddings" / "d3mo-3.pt")
    assert kept.step == 3 and torch.isfinite(kept.vectors).all()
    assert torch.equal(kept.vectors, trainer.embeddings.parameters[0].detach().cpu())


def test_existing_run_folder_is_never_overwritten(tmp_path):
    cfg = config(tmp_path, "train.max_steps=2")
    run_training(cfg, log=lambda *_: None)
    with pytest.raises(UserError, match="already holds a training run; continue it with --resume"):
        run_training(cfg, log=lambda *_: None)


@pytest.mark.parametrize("preset", ["face", "face_schedule", "kohya_face", "style", "demo"])
def test_every_preset_runs_a_few_steps(tmp_path, preset):
    images = make_images(
        tmp_path / "img" / "100_sks woman", caption=None if preset == "kohya_face" else "a, b, c"
    )
    cfg = load_config(
        TrainConfig,
        ROOT / "presets" / f"{preset}.toml",
        [
            f"model.checkpoint={tiny_checkpoint(tmp_path)}",
            f"dataset.image_dir={images.parent}",
            "dataset.resolution=32",
            "train.max_steps=2",
            "train.mixed_precision=no",
            "save.save_every_steps=1",
            "preview.every_steps=2",
            "preview.steps=2",
            f"save.output_dir={tmp_path / 'out'}",
            "train.batch_size=2",
            "train.gradient_accumulation_steps=1",
        ],
    )
    final = load_embedding(run_training(cfg, log=lambda *_: None))
    assert final.step == 2 and final.name == cfg.embedding.name
    assert final.num_vectors == cfg.embedding.num_vectors and torch.isfinite(final.vectors).all()


def test_v_prediction_bf16_min_snr_noise_offset_and_clipping_train(tmp_path):
    cfg = config(
        tmp_path,
        f"model.checkpoint={tiny_checkpoint(tmp_path, 'sd2')}",
        "model.family=sd2-v",
        "train.mixed_precision=bf16",
        "train.min_snr_gamma=5",
        "train.noise_offset=0.05",
        "train.clip_grad_mode=norm",
        "train.clip_grad_value=0.5:2, 0.1",
        "train.optimizer=lion",
        "train.gradient_checkpointing=true",
    )
    trainer = setup(cfg, log=lambda *_: None)
    assert trainer.parts.prediction_type == "v_prediction" and trainer.parts.unet.dtype == torch.bfloat16
    final = load_embedding(trainer.train())
    assert final.vectors.shape == (1, 32) and torch.isfinite(final.vectors).all()


@pytest.mark.parametrize("optimizer", ["adamw8bit", "prodigy"])
def test_other_optimizers_resume_exactly(tmp_path, optimizer, monkeypatch):
    settings = (
        "train.max_steps=4",
        "save.save_every_steps=0",
        f"train.optimizer={optimizer}",
        "train.lr=1.0" if optimizer == "prodigy" else "train.lr=0.01",
    )
    straight = load_embedding(run_training(config(tmp_path / "a", *settings), log=lambda *_: None)).vectors
    cfg = config(tmp_path / "b", *settings)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(TrainingStopped):
        run_training(cfg, log=lambda *_: None)
    monkeypatch.undo()
    resumed = run_training(cfg, resume=str(tmp_path / "b" / "run"), log=lambda *_: None)
    assert torch.equal(load_embedding(resumed).vectors, straight)


def _bad_input_error(tmp_path, capsys, *overrides):
    code = main(
        [
            "--config",
            str(ROOT / "presets/demo.toml"),
            f"save.output_dir={tmp_path / 'out'}",
            "train.max_steps=1",
            "dataset.resolution=32",
            *overrides,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pt"))
    return err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in _bad_input_error(tmp_path, capsys, f"dataset.image_dir={empty}")

    unprefixed = tmp_path / "unprefixed"
    make_images(unprefixed / "sks woman")
    assert "10_" in _bad_input_error(tmp_path, capsys, f"dataset.image_dir={unprefixed}")

    broken = make_images(tmp_path / "broken")
    (broken / "03.png").write_bytes(b"not a png")
    assert "03.png" in _bad_input_error(tmp_path, capsys, f"dataset.image_dir={broken}")

    latin = make_images(tmp_path / "latin")
    (latin / "02.txt").write_bytes("caf\xe9, portrait".encode("latin-1"))
    err = _bad_input_error(tmp_path, capsys, f"dataset.image_dir={latin}", "dataset.template=[filewords]")
    assert "02.txt" in err and "UTF-8" in err

    images = make_images(tmp_path / "ok")
    assert "'10.5' must be a whole number" in _bad_input_error(
        tmp_path, capsys, f"dataset.image_dir={images}", "train.lr=0.05:10.5"
    )
    assert "lower train.batch_size" in _bad_input_error(
        tmp_path, capsys, f"dataset.image_dir={images}", "train.batch_size=9"
    )
    assert "did you mean 'max_steps'" in _bad_input_error(tmp_path, capsys, "train.max_step=3")
    assert "tiny-missing" in _bad_input_error(
        tmp_path, capsys, f"model.checkpoint={tmp_path / 'tiny-missing.safetensors'}"
    )


def test_shipped_kohya_dataset_config_trains(tmp_path):
    cfg = load_config(
        TrainConfig,
        ROOT / "presets/demo.toml",
        [
            f"save.output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "save.save_every_steps=0",
            "preview.every_steps=0",
            f"dataset.dataset_config={ROOT / 'dataset_layouts/kohya_dataset.toml'}",
            "dataset.resolution=64",
        ],
    )
    final = load_embedding(run_training(cfg, log=lambda *_: None))
    assert final.step == 2 and torch.isfinite(final.vectors).all()


def test_embedding_of_another_width_is_a_clear_error(tmp_path, capsys):
    from library.embeddings import Embedding, save_embedding

    wide = save_embedding(Embedding("sd2face", torch.zeros(2, 1024), step=10), tmp_path / "sd2face.pt")
    err = _bad_input_error(tmp_path, capsys, f"embedding.init_from={wide}")
    assert "sd2face.pt: an embedding of width 1024 (SD 2.x) does not fit" in err and "[n, 64]" in err


def test_low_memory_switch_trains_and_previews(tmp_path):
    cfg = config(tmp_path, "train.low_memory=true", "preview.every_steps=2", "preview.steps=2")
    trainer = setup(cfg, log=lambda *_: None)
    assert trainer.parts.unet.is_gradient_checkpointing
    final = load_embedding(trainer.train())
    assert final.step == 4 and (tmp_path / "run" / "previews" / "d3mo-4.png").exists()


def test_compile_switch_compiles_the_unet_instead_of_graphing_it(tmp_path):
    trainer = setup(
        config(tmp_path, "model.checkpoint=builtin:tiny", "train.compile=true"), log=lambda *a: None
    )
    assert trainer.graphs is None  # on CUDA compile brings its own graphs ("reduce-overhead")
    assert hasattr(trainer.parts.unet, "_compiled_call_impl") and trainer.parts.unet._compiled_call_impl


def test_a_half_precision_unet_runs_in_its_own_dtype_not_under_autocast(tmp_path):
    """Autocast would run the UNet's norms in float32 and convert activations there and back (on the H200
    that cost 9 ms of a 73 ms step and 2 GB): the bf16 UNet runs outside autocast, every norm computing and
    returning bf16, while the text encoder keeps autocast and the vectors still learn."""
    trainer = setup(
        config(tmp_path, "model.checkpoint=builtin:tiny", "train.mixed_precision=bf16"), log=lambda *a: None
    )
    device = trainer.accelerator.device.type
    seen, autocast = set(), {}
    unet, encoder = trainer.parts.unet, trainer.parts.text_encoder
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm)]
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add((i[0].dtype, o.dtype))) for m in norms]
    for name, module in (("unet", unet), ("text encoder", encoder)):
        hooks.append(
            module.register_forward_pre_hook(
                lambda m, i, name=name: autocast.update({name: torch.is_autocast_enabled(device)})
            )
        )
    before = trainer.embeddings.parameters[0].detach().clone()
    trainer.step(0, 1e-2, None)
    for hook in hooks:
        hook.remove()
    assert autocast == {"unet": False, "text encoder": True}
    assert norms and seen == {(torch.bfloat16, torch.bfloat16)}
    assert not torch.equal(trainer.embeddings.parameters[0], before)
