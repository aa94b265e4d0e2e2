"""Real launches in subprocesses: `accelerate launch`, and two-process data parallel through torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from library.config import load_config
from library.embeddings import load_embedding
from library.tables import TrainConfig
from library.training import run_training
from tests.helpers import make_images, one_error_line

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def launch(command: list[str], tmp_path: Path, code: int = 0) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"
    )
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def overrides(out: Path, images: Path, batch_size: int) -> list[str]:
    return [
        f"save.output_dir={out}",
        f"dataset.image_dir={images}",
        "dataset.resolution=32",
        "train.max_steps=3",
        f"train.batch_size={batch_size}",
        "save.save_every_steps=0",
        "preview.every_steps=0",
        "dataset.shuffle_tags=true",
        "dataset.flip_aug=true",
    ]


ACCELERATE = [
    str(BIN / "accelerate"),
    "launch",
    "-q",
    *("--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
]


def test_accelerate_launch_runs_the_script(tmp_path):
    out = tmp_path / "run"
    launch(
        [*ACCELERATE, "train_textual_inversion.py", "--config", "presets/demo.toml"]
        + overrides(out, make_images(tmp_path / "img"), 4),
        tmp_path,
    )
    final = load_embedding(out / "d3mo.safetensors")
    assert final.step == 3 and torch.isfinite(final.vectors).all()


def test_bad_input_under_accelerate_launch_and_python_is_our_one_line(tmp_path):
    bad = overrides(tmp_path / "run", make_images(tmp_path / "img"), 4) + ["train.lr=0"]
    script = ["train_textual_inversion.py", "--config", "presets/demo.toml", *bad]
    launched = launch([*ACCELERATE, *script], tmp_path, code=1)  # accelerate's own code for a failed child
    plain = launch([sys.executable, *script], tmp_path, code=2)
    for result in (launched, plain):
        assert "'train.lr' = 0 must be above 0" in one_error_line(result.stderr)


def test_two_processes_give_the_vectors_of_one_with_the_same_global_batch(tmp_path):
    images = make_images(tmp_path / "img")
    launch(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            "train_textual_inversion.py",
            "--config",
            "presets/demo.toml",
            *overrides(tmp_path / "two", images, 2),
        ],
        tmp_path,
    )
    one = run_training(
        load_config(TrainConfig, ROOT / "presets/demo.toml", overrides(tmp_path / "one", images, 4)),
        log=lambda *_: None,
    )
    two = load_embedding(tmp_path / "two" / "d3mo.pt")
    start = load_embedding(one).vectors
    assert two.step == 3
    assert torch.allclose(two.vectors, start, rtol=1e-5, atol=1e-6), (two.vectors - start).abs().max()
