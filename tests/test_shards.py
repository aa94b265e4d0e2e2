"""Several processes (torchrun, gloo on the CPU, as `accelerate launch --num_processes 2` starts them on two
GPUs): generation and sweeps split their work and write the same files as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model"))


def launch(processes: int, script: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    head = (
        [sys.executable]
        if processes == 1
        else [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(processes)]
    )
    result = subprocess.run([*head, *script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with the folder's own path taken out of text files."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix in (".json", ".csv", ".toml", ".html"):
            data = data.replace(str(folder).encode(), b"OUT")
        found[path.relative_to(folder).as_posix()] = data
    return found


def test_two_processes_generate_the_files_of_one(tmp_path, checkpoint):
    def generate(processes: int) -> Path:
        out = tmp_path / f"p{processes}" / "out"  # the same folder name: review.html shows it
        launch(processes, [
            "generate_dataset.py", "generate", "--config", "presets/generate_character.toml",
            f"model.checkpoint={checkpoint}", f"generate.output_dir={out}", "generate.width=16",
            "generate.height=16", "generate.steps=2", "generate.batch_count=2", "generate.grids=true",
            "generate.seed=1234",
        ])  # fmt: skip
        return out

    one, two = files_of(generate(1)), files_of(generate(2))
    assert sorted(one) == sorted(two)
    pngs = [name for name in one if name.endswith(".png")]
    assert len([n for n in pngs if "/" not in n]) == 72  # 3 zooms x 3 angles x 2 batches x 4
    assert any(name.startswith("grids/") for name in one)
    for name in one:
        assert one[name] == two[name], name
