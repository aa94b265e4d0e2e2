"""Several processes (torchrun, gloo on the CPU, as `accelerate launch --num_processes 2` starts them on two
GPUs): generation and sweeps split their work and write the same files as one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load

from tests.helpers import tiny_checkpoint
from tests.test_cast_sweep import make_cast_run

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model"))


def launch(processes: int, script: list[str], code: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    head = (
        [sys.executable]
        if processes == 1
        else [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(processes)]
    )
    result = subprocess.run([*head, *script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
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


def test_two_processes_sweep_a_cast_into_the_files_of_one(tmp_path):
    """The toy cast of tests/test_cast_sweep.py (one character leaks into another), scored and exported."""
    run = make_cast_run(tmp_path / "run")

    def sweep(processes: int) -> Path:
        out = tmp_path / f"p{processes}"
        launch(
            processes,
            [
                "sweep_validate.py",
                "--config",
                "presets/validate_demo.toml",
                f"run.folder={run}",
                "x.type=step",
                "x.values=0, 25",
                "render.batch_size=4",
                "render.steps=12",
                "sweep.images_per_batch=8",
                f"sweep.output_dir={out / 'sweep'}",
                "--export",
                "recommended",
                "--export-to",
                str(out / "webui"),
            ],
            # p0rp has no recommended step: one line, after the others' exports (torchrun exits 1 then)
            code=2 if processes == 1 else 1,
        )
        return out

    one, two = files_of(sweep(1)), files_of(sweep(2))
    assert sorted(one) == sorted(two)
    assert "sweep/leakage.csv" in one and "webui/h3xa.pt" in one and "sweep/tr1a/cells/coarse" not in one
    assert len([n for n in one if n.startswith("sweep/h3xa/cells/")]) == 8
    timing = re.compile(rb"[0-9.]+ s|[0-9.]+ images/s")  # report.html says how long it took
    for name in one:
        if name.endswith(".html"):
            assert timing.sub(b"", one[name]) == timing.sub(b"", two[name]), name
        elif name.endswith(".safetensors"):  # the export's date, and a header whose key order varies
            assert safetensors_content(one[name]) == safetensors_content(two[name]), name
        else:
            assert one[name] == two[name], name


def safetensors_content(data: bytes) -> tuple[dict, dict]:
    metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    metadata.pop("modelspec.date")
    return metadata, {k: v.tolist() for k, v in load(data).items()}
