"""A run of several embeddings ([[embeddings]]): one optimizer over all of them, each on its own images,
each saved, previewed and resumed, each trained as it would be alone."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from library.config import load_config
from library.embeddings import load_embedding
from library.errors import UserError
from library.tables import TrainConfig
from library.training import TrainingStopped, run_training, setup
from tests.helpers import interrupt_after, make_images

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda *_: None)
pytestmark = pytest.mark.usefixtures("one_thread")


def cast(tmp_path: Path, *overrides: str, second: str = "") -> TrainConfig:
    """The toy model learning `ann` from 4 pictures and `bob` from 6 others, at 32 px, in one run."""
    ann = make_images(tmp_path / "ann", count=4, caption="a square")
    bob = make_images(tmp_path / "bob", count=6, caption="a block")
    toml = tmp_path / "cast.toml"
    toml.write_text(
        f"""
[model]
checkpoint = "builtin:toy"
[embedding]
init_text = "shape"
[dataset]
resolution = 32
template = "a photo of a [name], [filewords]"
[train]
max_steps = 4
batch_size = 2
lr = 0.005
[save]
output_dir = "{(tmp_path / "run").as_posix()}"
save_every_steps = 2
[preview]
every_steps = 0
[[embeddings]]
name = "ann"
image_dir = "{ann.as_posix()}"
[[embeddings]]
name = "bob"
image_dir = "{bob.as_posix()}"
init_text = "star"
{second}
"""
    )
    return load_config(TrainConfig, toml, list(overrides))


def test_two_embeddings_train_save_and_preview_in_one_run(tmp_path):
    cfg = cast(tmp_path, "preview.every_steps=2", "preview.steps=2", "save.embed_in_png=true")
    trainer = setup(cfg, **QUIET)
    assert trainer.embeddings.names == ["ann", "bob"]
    # One optimizer, a parameter group per embedding, holding nothing but their vectors.
    groups = trainer.optimizer.param_groups
    assert [g["params"] for g in groups] == [m.parameters for m in trainer.embeddings]
    start = {m.name: m.parameters[0].detach().clone() for m in trainer.embeddings}
    trainer.train()
    run = tmp_path / "run"
    for name in ("ann", "bob"):
        final = load_embedding(run / f"{name}.pt")
        assert final.name == name and final.step == 4 and final.vectors.shape == (1, 64)
        assert not torch.equal(final.vectors, start[name])  # both learned
        for step in (0, 2, 4):
            assert load_embedding(run / "embeddings" / f"{name}-{step}.safetensors").step == step
        assert (run / "previews" / f"{name}-2-embedding.png").exists()
    # The starting vectors differ (shape / star) and so do the results.
    assert not torch.equal(load_embedding(run / "ann.pt").vectors, load_embedding(run / "bob.pt").vectors)
    rows = list(csv.DictReader((run / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"loss_ann", "loss_bob"} <= set(rows[0])
    for row in rows:  # the run's loss is the sum of each embedding's mean loss
        assert float(row["loss"]) == pytest.approx(float(row["loss_ann"]) + float(row["loss_bob"]), abs=1e-5)
    pictures = sorted(p.name for p in (run / "previews").glob("*-2*.png") if "embedding" not in p.name)
    assert any(p.startswith("ann-") for p in pictures) and any(p.startswith("bob-") for p in pictures)


def test_each_embedding_of_a_cast_learns_as_it_would_alone(tmp_path):
    """Its batches, noise and timesteps are those of a run of it alone, and no other word reaches its
    gradient: `ann` of the cast is `ann` trained alone (to float rounding of the larger UNet batch)."""
    together = run_training(cast(tmp_path / "cast"), **QUIET)
    alone_cfg = cast(
        tmp_path / "alone",
        "embeddings=[]",
        "embedding.name=ann",
        f"dataset.image_dir={tmp_path / 'alone' / 'ann'}",
    )
    alone = load_embedding(run_training(alone_cfg, **QUIET)).vectors
    in_cast = load_embedding(together.parent / "ann.pt").vectors
    assert torch.allclose(in_cast, alone, rtol=0, atol=1e-5), (in_cast - alone).abs().max()


def test_lr_factor_scales_one_embeddings_steps(tmp_path):
    """Adam's first update moves every element by about the learning rate: half the factor, half the move."""
    moved = {}
    for factor in (1.0, 0.5):
        cfg = cast(
            tmp_path / str(factor),
            "train.max_steps=1",
            "train.weight_decay=0",
            second=f"lr_factor = {factor}",
        )
        trainer = setup(cfg, **QUIET)
        start = [m.parameters[0].detach().clone() for m in trainer.embeddings]
        trainer.step(0, 0.005, None)
        moved[factor] = [
            (m.parameters[0].detach() - s).abs().mean().item()
            for m, s in zip(trainer.embeddings, start, strict=True)
        ]
    assert moved[0.5][0] == pytest.approx(moved[1.0][0], rel=1e-6)  # ann's factor is 1 in both runs
    assert moved[0.5][1] == pytest.approx(moved[1.0][1] / 2, rel=1e-3)


def test_an_interrupted_cast_resumes_to_the_same_vectors(tmp_path, monkeypatch):
    straight = run_training(cast(tmp_path / "a", "train.max_steps=6"), **QUIET).parent
    cfg = cast(tmp_path / "b", "train.max_steps=6")
    interrupt_after(monkeypatch, 3)
    with pytest.raises(TrainingStopped, match="interrupted after 3 steps"):
        run_training(cfg, **QUIET)
    monkeypatch.undo()
    resumed = run_training(cfg, resume=str(tmp_path / "b" / "run"), **QUIET).parent
    for name in ("ann", "bob"):
        assert torch.equal(
            load_embedding(resumed / f"{name}.pt").vectors, load_embedding(straight / f"{name}.pt").vectors
        )
    rows = list(csv.DictReader((resumed / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "entries, fragment",
    [
        ('[[embeddings]]\nname = "ann"\n[[embeddings]]\nname = "ANN"\n', "the name is given twice"),
        ('[[embeddings]]\nimage_dir = "x"\n', "has no name"),
        ('[[embeddings]]\nname = "ann"\nlr_factor = 0\n', "lr_factor"),
    ],
)
def test_bad_casts_are_one_clear_error(tmp_path, entries, fragment):
    toml = tmp_path / "bad.toml"
    toml.write_text(f'[model]\ncheckpoint = "builtin:tiny"\n{entries}')
    with pytest.raises(UserError, match=fragment):
        load_config(TrainConfig, toml)
