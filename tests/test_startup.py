"""What every run starts with (library/__init__.py): no dependency chatter, nothing reaches the hub, and
compiled kernels land in a cache that outlives /tmp. Checked the way users run the scripts: as processes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Notices that dependencies print on some machines and that tell our users nothing (library/__init__.py).
CHATTER = ("Failed to load CPU gemm_4bit_forward", "There are modules in")


def run_script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "TORCHINDUCTOR"))}
    env.update(HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_notices_are_dropped_wherever_a_dependency_would_log_them(caplog):
    import library  # noqa: F401

    with caplog.at_level(logging.WARNING):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s", "No module named 'kernels'"
        )
        logging.getLogger("diffusers.models.modeling_utils").warning(
            "There are modules in AutoencoderKL that should be kept in float32: []."
        )
        logging.getLogger("diffusers.models.modeling_utils").warning("a real warning")
    assert [record.getMessage() for record in caplog.records] == ["a real warning"]
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_the_demo_prints_no_dependency_notices(tmp_path):
    out = tmp_path / "demo"
    result = run_script(
        tmp_path,
        "train_textual_inversion.py",
        "--config",
        "presets/demo.toml",
        f"save.output_dir={out}",
        "train.max_steps=2",
        "preview.every_steps=2",
        "preview.steps=2",
    )
    assert not [line for line in result.stderr.splitlines() if line.startswith(CHATTER)], result.stderr
    assert (out / "d3mo.pt").is_file()


@pytest.mark.slow
def test_compiled_kernels_land_in_the_lasting_cache(tmp_path):
    result = run_script(
        tmp_path,
        "train_textual_inversion.py",
        "--config",
        "presets/demo.toml",
        "model.checkpoint=builtin:tiny",
        "train.compile=true",
        "train.max_steps=1",
        "train.batch_size=2",
        "dataset.resolution=32",
        "preview.every_steps=0",
        "save.save_every_steps=0",
        f"save.output_dir={tmp_path / 'run'}",
    )
    cache = tmp_path / "home" / ".cache" / "ti-toolkit" / "torchinductor"
    assert cache.is_dir() and any(cache.iterdir()), result.stderr[-2000:]
