"""DreamArtist's APT ([dreamartist]): NAME and NAME-neg trained together with a training CFG, on every
family, without the faults of DreamArtist's own extension (FACTS §10)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from library.config import load_config
from library.denoiser import UNetCall
from library.dreamartist import CfgScale, parse_cfg_scale
from library.embeddings import load_embedding
from library.errors import UserError
from library.tables import TrainConfig
from library.training import TrainingStopped, run_training, setup
from tests.helpers import interrupt_after, make_images, poison_unet_after, tiny_checkpoint

QUIET = dict(log=lambda *_: None)
NAME = "p41r"
pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path: Path, *overrides: str, checkpoint: str = "builtin:toy", run: str = "run") -> TrainConfig:
    """The toy model learning the pair p41r / p41r-neg from 4 pictures at 32 px."""
    images = tmp_path / "images"
    if not images.exists():
        make_images(images, count=4, caption="a square")
    toml = tmp_path / "da.toml"
    toml.write_text(
        f"""
[model]
checkpoint = "{checkpoint}"
[embedding]
name = "{NAME}"
init_text = "*"
num_vectors = 3
[dataset]
image_dir = "{images.as_posix()}"
resolution = 32
template = "a photo of a [name], [filewords]"
[train]
max_steps = 4
batch_size = 2
lr = 0.003
clip_grad_mode = "norm"
clip_grad_value = 1.0
[save]
output_dir = "{(tmp_path / run).as_posix()}"
save_every_steps = 2
[preview]
every_steps = 0
[dreamartist]
enabled = true
"""
    )
    return load_config(TrainConfig, toml, list(overrides))


def vectors(path: Path) -> torch.Tensor:
    return load_embedding(path).vectors


# ------------------------------------------------------------------ the loss


def reference_scale(low: float, high: float, curve: str, t: torch.Tensor) -> torch.Tensor:
    """DreamArtist's dynamic CFG, written out again: rate = t / 999, shaped by the curve."""
    rate = t.double() / 999
    shaped = {
        "ln": rate,
        "cos": torch.cos((rate - 1) * math.pi / 2),
        "cos2": 1 - torch.cos(rate * math.pi / 2),
    }
    return low + (high - low) * shaped[curve]


@pytest.mark.parametrize("cfg_scale", ["3", "'2.5-3.5:cos'"])
def test_the_loss_is_dreamartists_formula_on_a_tiny_model(tmp_path, cfg_scale):
    trainer = setup(config(tmp_path, f"dreamartist.cfg_scale={cfg_scale}"), **QUIET)
    loss, _ = trainer.loss_for(0)
    # The same step by hand: the UNet asked separately with the negative and the positive prompts.
    [(_, batch, noise, timesteps)] = trainer.batch_for(0)
    parts = trainer.parts
    noisy = parts.noise_scheduler.add_noise(batch.latents, noise, timesteps)
    negatives = [p.replace(NAME, f"{NAME}-neg") for p in batch.prompts]
    assert all(f"{NAME}-neg" in n for n in negatives)

    def predict(prompts):
        cond = trainer.conditioner.encode(prompts)
        return UNetCall(parts.unet, parts.family)(noisy, timesteps, *cond.tensors(), None).double()

    eps_neg, eps_pos = predict(negatives), predict(batch.prompts)
    if cfg_scale == "3":
        scale = torch.full(timesteps.shape, 3.0, dtype=torch.float64)
    else:
        scale = reference_scale(2.5, 3.5, "cos", timesteps)
    guided = eps_neg + scale.view(-1, 1, 1, 1) * (eps_pos - eps_neg)
    expected = ((guided - noise.double()) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # and it is not plain TI's loss
    assert abs(F.mse_loss(eps_pos, noise.double()).item() - expected.item()) > 1e-4


@pytest.mark.parametrize("curve", ["ln", "cos", "cos2"])
def test_dynamic_cfg_values(curve):
    t = torch.tensor([0, 250, 500, 999])
    got = parse_cfg_scale(f"2-4:{curve}").at(t)
    assert torch.allclose(got.double(), reference_scale(2, 4, curve, t), atol=1e-6)
    assert got[0].item() == pytest.approx(2) and got[-1].item() == pytest.approx(4)
    assert parse_cfg_scale(3) == CfgScale(3.0, 3.0)
    assert parse_cfg_scale("2.5-3.5") == CfgScale(2.5, 3.5, "ln")


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("dreamartist.cfg_scale='3-2:foo'", ["dreamartist.cfg_scale", "unknown curve", "cos2"]),
        ("dreamartist.cfg_scale='three'", ["dreamartist.cfg_scale", "low-high:curve"]),
        ("dreamartist.cfg_scale=0", ["dreamartist.cfg_scale", "above 0"]),
        ("dreamartist.neg_num_vectors=0", ["dreamartist.neg_num_vectors", "1 to 75"]),
        ("dreamartist.ema_rate=1.5", ["dreamartist.ema_rate", "below 1"]),
        ("dreamartist.neg_lr_factor=0", ["dreamartist.neg_lr_factor", "above 0"]),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, override, words):
    with pytest.raises(UserError) as error:
        config(tmp_path, override)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


# ------------------------------------------------------------------ saves, names, formats


def test_the_pair_trains_and_saves_with_a1111_dreamartist_names(tmp_path):
    from tests.a1111 import a1111_reads

    cfg = config(tmp_path, "save.formats=['pt', 'safetensors', 'png']", "preview.every_steps=2",
                 "preview.steps=2", "save.embed_in_png=true", "dreamartist.cfg_scale='2.5-3.5:cos'")  # fmt: skip
    trainer = setup(cfg, **QUIET)
    assert trainer.embeddings.names == [NAME, f"{NAME}-neg"]
    assert [m.num_vectors for m in trainer.embeddings] == [3, 6]
    start = [m.parameters[0].detach().clone() for m in trainer.embeddings]
    assert not torch.equal(start[1][:3], start[0])  # the negative starts a little apart
    assert torch.allclose(start[1][:3], start[0], atol=1e-2)
    trainer.train()
    run = tmp_path / "run"
    for suffix in ("pt", "safetensors", "png"):
        for step in (0, 2, 4):
            positive = run / "embeddings" / f"{NAME}-{step}.{suffix}"
            negative = run / "embeddings" / f"{NAME}-{step}-neg.{suffix}"
            assert load_embedding(positive).step == step and load_embedding(negative).step == step
        assert (run / f"{NAME}.{suffix}").exists() and (run / f"{NAME}-neg.{suffix}").exists()
    assert not list((run / "embeddings").glob(f"{NAME}-neg-*"))
    keyword, vec, step, *_ = a1111_reads(run / "embeddings" / f"{NAME}-4-neg.pt")
    assert keyword == f"{NAME}-4-neg" and vec.shape == (6, 64) and step == 4
    keyword, vec, *_ = a1111_reads(run / f"{NAME}-neg.pt")
    assert keyword == f"{NAME}-neg" and torch.equal(vec, trainer.embeddings.parameters[1].detach())
    for step in (2, 4):  # PNG embeddings: the stored name is the keyword, as A1111 names its own
        assert a1111_reads(run / "embeddings" / f"{NAME}-{step}-neg.png")[0] == f"{NAME}-{step}-neg"
        assert (run / "previews" / f"{NAME}-{step}-neg-embedding.png").exists()
    # Previews: NAME in the prompt, NAME-neg in the negative, at the preview CFG (7), not the training one.
    from PIL import Image

    info = Image.open(run / "previews" / f"{NAME}-4.png").text["parameters"]
    prompt, negative = info.split("\n")[:2]
    assert NAME in prompt and f"{NAME}-neg" not in prompt
    assert negative.startswith("Negative prompt: ") and f"{NAME}-neg" in negative
    assert "CFG scale: 7" in info
    assert not list((run / "previews").glob(f"{NAME}-neg-*.png"))
    # loss.csv: one loss (the pair has one)
    header = (run / "loss.csv").read_text().splitlines()[0]
    assert header == "step,epoch,epoch_step,loss,learn_rate"


def test_the_files_load_in_diffusers(tmp_path):
    from library.tiny import build_tiny_parts

    final = run_training(config(tmp_path, checkpoint="builtin:tiny"), **QUIET)
    pipe = build_tiny_parts("sd1").pipeline()
    pipe.load_textual_inversion(str(final))
    pipe.load_textual_inversion(str(final.with_name(f"{NAME}-neg.pt")))
    pipe.load_textual_inversion(
        str(tmp_path / "run" / "embeddings" / f"{NAME}-2-neg.safetensors"), token="<n2>"
    )
    negative = vectors(final.with_name(f"{NAME}-neg.pt"))
    ids = pipe.tokenizer.convert_tokens_to_ids([f"{NAME}-neg"] + [f"{NAME}-neg_{i}" for i in range(1, 6)])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), negative)


# ------------------------------------------------------------------ DreamArtist's faults do not happen here


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_it_runs_on_sd2_and_sdxl(tmp_path, family):
    """Fault: SD1 only."""
    checkpoint = tiny_checkpoint(tmp_path, family).as_posix()
    final = run_training(config(tmp_path, "dreamartist.cfg_scale='2-4:cos2'", checkpoint=checkpoint), **QUIET)
    positive, negative = load_embedding(final), load_embedding(final.with_name(f"{NAME}-neg.pt"))
    assert positive.num_vectors == 3 and negative.num_vectors == 6
    if family == "sdxl":
        assert positive.is_sdxl and negative.is_sdxl
        from library.embeddings import load_embedding as load

        pair = load(tmp_path / "run" / "embeddings" / f"{NAME}-2-neg.safetensors")
        assert set(pair.vectors) == {"clip_l", "clip_g"}


def test_the_negative_switched_off_is_ti_with_a_training_cfg(tmp_path):
    """Fault: a crash when the negative is switched off. Here the training CFG guides against ""."""
    trainer = setup(config(tmp_path, "dreamartist.negative=false"), **QUIET)
    assert trainer.embeddings.names == [NAME]
    [(_, batch, _, _)] = trainer.batch_for(0)
    assert trainer.objective.prompt_sets(batch) == [[""] * len(batch.prompts), batch.prompts]
    trainer.train()
    run = tmp_path / "run"
    assert (run / f"{NAME}.pt").exists() and not list(run.rglob("*-neg*"))


def test_previews_with_a_dynamic_cfg_string(tmp_path):
    """Fault: previews crash with a dynamic CFG string (they used the training CFG as the preview's)."""
    cfg = config(tmp_path, "dreamartist.cfg_scale='2.5-3.5:cos'", "preview.every_steps=2", "preview.steps=2",
                 "preview.cfg_scale=5", "preview.negative_prompt='blurry'")  # fmt: skip
    run_training(cfg, **QUIET)
    from PIL import Image

    info = Image.open(tmp_path / "run" / "previews" / f"{NAME}-2.png").text["parameters"]
    assert "CFG scale: 5" in info
    negative = info.split("\n")[1]
    assert f"{NAME}-neg" in negative and negative.endswith(", blurry")


def test_the_negatives_lr_weight_survives_every_schedule_change(tmp_path, monkeypatch):
    """Fault: the negative's lr weight is lost at the first change of a multi-step schedule."""
    cfg = config(tmp_path, "train.lr='0.003:2, 0.001:4, 0.0005'", "train.max_steps=6", "save.save_every_steps=0",
                 "dreamartist.neg_lr_factor=0.25")  # fmt: skip
    trainer = setup(cfg, **QUIET)
    seen = []
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        seen.append([g["lr"] for g in trainer.optimizer.param_groups])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", step)
    trainer.train()
    expected = [0.003, 0.003, 0.001, 0.001, 0.0005, 0.0005]
    assert [pytest.approx(pair) for pair in seen] == [[lr, lr * 0.25] for lr in expected]


def test_nan_stops_with_the_last_good_save_of_both(tmp_path, monkeypatch):
    """Fault: NaN losses. Here the loop stops and keeps the last good vectors of both embeddings."""
    trainer = setup(config(tmp_path, "train.max_steps=6", "save.save_every_steps=0"), **QUIET)
    poison_unet_after(monkeypatch, trainer, calls=3)
    with pytest.raises(TrainingStopped, match="loss became nan at step 4"):
        trainer.train()
    embeddings = tmp_path / "run" / "embeddings"
    for file, member in ((f"{NAME}-3.pt", 0), (f"{NAME}-3-neg.pt", 1)):
        kept = load_embedding(embeddings / file)
        assert kept.step == 3 and torch.isfinite(kept.vectors).all()
        assert torch.equal(kept.vectors, trainer.embeddings.parameters[member].detach().cpu())


def test_two_runs_give_identical_vectors(tmp_path):
    """Fault: results hard to reproduce."""
    first = run_training(config(tmp_path / "a", "dreamartist.cfg_scale='2-4'"), **QUIET)
    second = run_training(config(tmp_path / "b", "dreamartist.cfg_scale='2-4'"), **QUIET)
    for name in (f"{NAME}.pt", f"{NAME}-neg.pt"):
        assert torch.equal(vectors(first.with_name(name)), vectors(second.with_name(name)))


def test_an_interrupted_pair_resumes_to_the_same_vectors(tmp_path, monkeypatch):
    settings = ("train.max_steps=6", "train.lr='0.003:3, 0.001'", "dreamartist.neg_lr_factor=0.5")
    straight = run_training(config(tmp_path / "a", *settings), **QUIET)
    cfg = config(tmp_path / "b", *settings)
    interrupt_after(monkeypatch, 3)
    with pytest.raises(TrainingStopped, match="interrupted after 3 steps"):
        run_training(cfg, **QUIET)
    monkeypatch.undo()
    assert load_embedding(tmp_path / "b" / "run" / "embeddings" / f"{NAME}-3-neg.pt").step == 3
    resumed = run_training(cfg, resume=str(tmp_path / "b" / "run"), **QUIET)
    for name in (f"{NAME}.pt", f"{NAME}-neg.pt"):
        assert torch.equal(vectors(resumed.with_name(name)), vectors(straight.with_name(name)))
    # and from one step file: its negative is found beside it
    other = config(tmp_path / "c", *settings)
    again = run_training(other, resume=str(tmp_path / "a" / "run" / "embeddings" / f"{NAME}-2.pt"), **QUIET)
    for name in (f"{NAME}.pt", f"{NAME}-neg.pt"):
        assert torch.equal(vectors(again.with_name(name)), vectors(straight.with_name(name)))


# ------------------------------------------------------------------ EMA, reconstruction


def test_ema_overwrite_makes_the_live_vectors_the_average(tmp_path):
    cfg = config(tmp_path, "dreamartist.ema_rate=0.5", "dreamartist.ema_every=2", "train.max_steps=2")
    trainer = setup(cfg, **QUIET)
    average = [p.detach().clone() for p in trainer.embeddings.parameters]
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):  # follow the average by hand: ema = ema * 0.5 + live * 0.5 after each update
        result = real_step(*args, **kwargs)
        for a, p in zip(average, trainer.embeddings.parameters, strict=True):
            a.mul_(0.5).add_(p.detach() * 0.5)
        return result

    trainer.optimizer.step = step
    trainer.train()
    for a, p in zip(average, trainer.embeddings.parameters, strict=True):
        assert torch.allclose(p.detach(), a)  # after 2 updates the live vectors became the average


def test_ema_copy_is_saved_beside_the_live_vectors_and_resumes(tmp_path, monkeypatch):
    settings = ("dreamartist.ema_rate=0.5", "dreamartist.ema_mode=copy", "train.max_steps=4")
    final = run_training(config(tmp_path / "a", *settings), **QUIET)
    run = tmp_path / "a" / "run"
    for step in (0, 2, 4):
        assert (run / "embeddings" / f"{NAME}-ema-{step}.pt").exists()
        assert (run / "embeddings" / f"{NAME}-ema-{step}-neg.pt").exists()
    ema, live = vectors(run / f"{NAME}-ema.pt"), vectors(final)
    assert ema.shape == live.shape and not torch.equal(ema, live)
    assert vectors(run / f"{NAME}-ema-neg.pt").shape == (6, 64)
    # the EMA copy resumes with the pair
    cfg = config(tmp_path / "b", *settings)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(TrainingStopped):
        run_training(cfg, **QUIET)
    monkeypatch.undo()
    resumed = run_training(cfg, resume=str(tmp_path / "b" / "run"), **QUIET)
    assert torch.equal(vectors(resumed.with_name(f"{NAME}-ema.pt")), ema)


def test_reconstruction_loss_adds_the_decoded_l1(tmp_path):
    plain = setup(config(tmp_path, run="plain"), **QUIET).loss_for(0)[0]
    trainer = setup(config(tmp_path, "dreamartist.reconstruction_loss=true", run="rec"), **QUIET)
    loss = trainer.loss_for(0)[0]
    assert loss.item() > plain.item()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainer.embeddings.parameters)
    trainer.optimizer.zero_grad()
    trainer.train()
    assert (tmp_path / "rec" / f"{NAME}-neg.pt").exists()


# ------------------------------------------------------------------ the sweep understands pairs


def test_the_sweep_renders_and_exports_the_pair_together(tmp_path):
    import shutil

    from library.run_folder import export_step, open_run
    from library.sweep import parse_axis, plan
    from library.sweep_rendering import render_by_checkpoint
    from library.tables import SweepConfig

    ROOT = Path(__file__).resolve().parent.parent
    run_training(config(tmp_path, checkpoint="builtin:tiny"), **QUIET)
    run_dir = tmp_path / "run"
    run = open_run(str(run_dir))
    assert run.names == (NAME, f"{NAME}-neg")
    assert run.resolve(f"{NAME}-2-neg") == (f"{NAME}-2-neg", run_dir / "embeddings" / f"{NAME}-2-neg.pt")
    assert run.tokens_in(f"a {NAME}-2 x, {NAME}-2-neg") == [f"{NAME}-2", f"{NAME}-2-neg"]
    with pytest.raises(UserError, match="not a saved step"):
        run.resolve(f"{NAME}-3-neg")
    for x in ("prompt_sr", "step"):
        overrides = [f"run.folder={run_dir}", 'model.checkpoints=["run:checkpoint"]', "y.type=none",
                     "render.steps=1", "render.width=16", "render.height=16", "render.batch_size=1",
                     "render.prompt='a photo of [name]-2'", f"render.negative_prompt='{NAME}-2-neg, blurry'",
                     f"x.type={x}", "x.values='every 2'" if x == "prompt_sr" else "x.values='2, 4'",
                     f"sweep.output_dir={tmp_path / 'out'}"]  # fmt: skip
        cfg = load_config(SweepConfig, ROOT / "presets/validate.toml", overrides)
        prompt = cfg.render.prompt.replace("[name]", run.name)
        axes = tuple(
            parse_axis(a, n, cfg, run, prompt) for n, a in (("x", cfg.x), ("y", cfg.y), ("z", cfg.z))
        )
        cells = plan(cfg, run, axes).cells
        assert [c.step for c in cells][-2:] == [2, 4]
        assert cells[-1].prompt == f"a photo of {NAME}-4" and cells[-1].negative == f"{NAME}-4-neg, blurry"
    ((_, _, images, _),) = list(render_by_checkpoint(cfg, run, [plan(cfg, run, axes)], log=print))
    assert len(images) == 2
    # --export writes both, named as A1111 users load them
    paths = export_step(run, 4, tmp_path / "webui", ("pt",), log=lambda *_: None)
    assert [p.name for p in paths] == [f"{NAME}.pt", f"{NAME}-neg.pt"]
    assert torch.equal(vectors(paths[1]), vectors(run_dir / "embeddings" / f"{NAME}-4-neg.pt"))
    # An A1111 DreamArtist folder (no config.toml): the pair is found from its file names
    a1111 = tmp_path / "a1111"
    shutil.copytree(run_dir / "embeddings", a1111 / "embeddings")
    assert open_run(str(a1111)).names == (NAME, f"{NAME}-neg")


def test_the_presets_load_and_the_demo_runs_as_shipped(tmp_path):
    root = Path(__file__).resolve().parent.parent
    full = load_config(TrainConfig, root / "presets/dreamartist.toml")
    da = full.dreamartist
    assert (full.embedding.num_vectors, da.neg_num_vectors, full.train.lr, da.cfg_scale) == (3, 6, 0.003, 3.0)
    assert (full.train.clip_grad_mode, full.train.clip_grad_value, full.preview.cfg_scale) == (
        "norm",
        1.0,
        7.0,
    )
    demo = load_config(
        TrainConfig,
        root / "presets/dreamartist_demo.toml",
        ["train.max_steps=2", "save.save_every_steps=2", "preview.every_steps=2", "preview.steps=2",
         f"save.output_dir={tmp_path / 'demo'}"],
    )  # fmt: skip
    final = run_training(demo, **QUIET)
    assert final.name == "h3x.pt" and final.with_name("h3x-neg.pt").exists()
    assert (tmp_path / "demo" / "embeddings" / "h3x-2-neg.pt").exists()
    maps = load_config(TrainConfig, root / "presets/dreamartist.toml", ["dreamartist.attention_maps=true"])
    assert maps.dreamartist.attention_maps


# ------------------------------------------------------------------ attention maps (<image>_att.png)


def quadrant_map(path: Path, size: int = 32, greys=(0, 127, 191, 255)) -> None:
    """A grey picture of four quadrants: top-left, top-right, bottom-left, bottom-right."""
    from PIL import Image

    picture = Image.new("L", (size, size))
    half = size // 2
    for (x, y), grey in zip(((0, 0), (half, 0), (0, half), (half, half)), greys, strict=True):
        picture.paste(grey, (x, y, x + half, y + half))
    picture.save(path)


def test_attention_map_grey_becomes_dreamartists_weights():
    from library.images import attention_weight

    # DreamArtist's table: 0 % -> 0, 25 % -> 0.5, 50 % -> 1, 75 % -> 3, 100 % -> 5 (127 is its 50 %).
    grey = torch.tensor([[0.0, 63.5], [127.0, 159.0], [191.0, 255.0]]).repeat_interleave(2, 0)
    grey = grey.repeat_interleave(2, 1)  # [6, 4]: every value a 2x2 block
    weight = attention_weight(grey, (3, 2))
    assert weight.shape == (1, 3, 2)
    assert torch.allclose(weight[0], torch.tensor([[0.0, 0.5], [1.0, 2.0], [3.0, 5.0]]))


def test_att_files_are_not_training_images(tmp_path):
    from library.kohya_dataset import scan_images
    from library.tables import DatasetConfig

    images = make_images(tmp_path / "images", count=3)
    quadrant_map(images / "00_att.png")
    quadrant_map(images / "01_att.png")
    quadrant_map(images / "lonely_att.png")  # no lonely.png beside it: an ordinary picture
    found = sorted(r.path.name for r in scan_images(DatasetConfig(image_dir=str(images))))
    assert found == ["00.png", "01.png", "02.png", "lonely_att.png"]


def test_a_run_with_attention_maps_trains_with_the_weighted_loss(tmp_path):
    images = make_images(tmp_path / "images", count=4, caption="a square")
    quadrant_map(images / "00_att.png")
    trainer = setup(config(tmp_path, "dreamartist.attention_maps=true"), **QUIET)
    data = trainer.sources[0]
    h, w = data._latents[(0, False)][0].shape[-2:]
    expected_map = (
        torch.tensor([[0.0, 1.0], [3.0, 5.0]]).repeat_interleave(h // 2, 0).repeat_interleave(w // 2, 1)
    )
    # The map weighs image 00 quadrant by quadrant; the images without a map weigh 1 everywhere.
    for step in range(4):
        batch = data.batch(step, 0, 2)
        for weight, index in zip(batch.loss_weights, batch.sample_ids, strict=True):
            want = expected_map if index == 0 else torch.ones(h, w)
            assert torch.allclose(weight[0].cpu(), want, atol=1e-5), (step, index)

    # One step's loss by hand: DreamArtist's guided MSE, weighted per latent pixel.
    loss, _ = trainer.loss_for(0)
    [(_, batch, noise, timesteps)] = trainer.batch_for(0)
    assert batch.loss_weights is not None
    parts = trainer.parts
    noisy = parts.noise_scheduler.add_noise(batch.latents, noise, timesteps)
    negatives = [p.replace(NAME, f"{NAME}-neg") for p in batch.prompts]

    def predict(prompts):
        cond = trainer.conditioner.encode(prompts)
        return UNetCall(parts.unet, parts.family)(noisy, timesteps, *cond.tensors(), None).double()

    eps_neg, eps_pos = predict(negatives), predict(batch.prompts)
    guided = eps_neg + 3.0 * (eps_pos - eps_neg)
    expected = (((guided - noise.double()) ** 2) * batch.loss_weights.double()).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)

    # and the run trains: both vectors move and are saved.
    run_training(config(tmp_path, "dreamartist.attention_maps=true", run="trained"), **QUIET)
    start = vectors(tmp_path / "trained" / "embeddings" / f"{NAME}-0.pt")
    assert not torch.allclose(vectors(tmp_path / "trained" / f"{NAME}.pt"), start)
    assert (tmp_path / "trained" / f"{NAME}-neg.pt").is_file()


def test_attention_maps_on_without_any_map_is_an_error(tmp_path):
    with pytest.raises(UserError, match="attention map"):
        setup(config(tmp_path, "dreamartist.attention_maps=true"), **QUIET)


def test_attention_maps_flip_with_their_image(tmp_path):
    images = make_images(tmp_path / "images", count=4, caption="a square")
    quadrant_map(images / "00_att.png")
    trainer = setup(config(tmp_path, "dreamartist.attention_maps=true", "dataset.flip_aug=true"), **QUIET)
    data = trainer.sources[0]
    seen = set()
    for step in range(40):
        batch = data.batch(step, 0, 2)
        for weight, index, flipped in zip(batch.loss_weights, batch.sample_ids, batch.flipped, strict=True):
            if index == 0:
                top_left = weight[0, 0, 0].item()
                assert top_left == pytest.approx(1.0 if flipped else 0.0)  # mirrored: the 50 % quadrant
                seen.add(flipped)
    assert seen == {False, True}
