"""Every command in README.md and docs/ runs as written, in a fresh folder, after the two commands.

The commands are read from the documents themselves: each fenced `bash` block (continuation lines joined,
comments left out) and each inline `python ...` span, in the order a reader meets them. `make` lines are the two
commands themselves (CI runs them). They run with bash in a folder that holds the project's files and, as the
documents assume, a few things of the user's: `models/v1-5-pruned-emaonly.safetensors`, the SDXL files and the
other checkpoints the commands name (tiny models built in code), `models/clip-vit-large-patch14/` (a tiny CLIP), `datasets/my_face/`
and `raw_photos/` (pictures), and the selection a browser exports from review.html (in `~/Downloads`, HOME being
the folder's own). `.venv/bin` comes first on PATH, as after `source .venv/bin/activate`.

Two things are not as written: a placeholder such as `<time>` is filled in, and the sizes are made small
(overrides appended to the command line, which every script accepts anywhere) so that a CPU runs them in minutes:
pictures of 32 px, 1 sampling step and no gradient accumulation, every other setting as the command and its
preset say.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faces import drawn_face
from tests.helpers import make_images

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MADE = "20261201-115900"  # `make demo` names its run output/demo-<time>: the run it made before the reader starts
# `<time>` in a command the reader runs is a minute later; RUN is the demo run.
PLACEHOLDERS = {"<time>": "20261201-120000", "--run RUN": f"--run output/demo-{MADE}"}
# Small sizes, appended after the command as overrides (the scripts take them anywhere on the line).
SMALLER = {
    "train_textual_inversion.py": [
        *(
            "dataset.resolution=32",
            "train.batch_size=2",
            "train.gradient_accumulation_steps=1",
            "preview.steps=1",
        ),
        *("dataset.min_bucket_reso=16", "dataset.max_bucket_reso=64", "dataset.bucket_reso_steps=16"),
    ],
    "generate_dataset.py generate": [
        *("generate.width=32", "generate.height=32", "generate.steps=1"),
        *("generate.batch_count=1", "generate.batch_size=2"),
    ],
    "sweep_validate.py": ["render.steps=1", "render.width=32", "render.height=32", "render.batch_size=2"],
    "tools/toy_world.py evaluate": ["--per-combo", "1"],
    "tools/toy_world.py ti-eval": ["--n", "2", "--steps", "0", "25"],
}


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) in reading order."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        spans = [
            (m.start(), m.group(1), "block") for m in re.finditer(r"```(?:bash|sh)\n(.*?)```", text, re.S)
        ]
        spans += [(m.start(), m.group(1), "inline") for m in re.finditer(r"(?<!`)`(python [^`]+)`", text)]
        for _, body, kind in sorted(spans):
            lines = body.replace("\\\n", " ").splitlines() if kind == "block" else [" ".join(body.split())]
            for line in lines:
                line = line.split(" # ")[0].strip() if kind == "block" else line
                if line and not line.startswith(("#", "make ")):
                    found.append((doc.name, line))
    return found


def world(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder with the project's files and the user's things the documents name."""
    from library.convert import save_single_file
    from library.tiny import build_tiny_parts
    from tests.test_scoring import tiny_clip_folder

    here = tmp_path / "user"
    here.mkdir()
    for item in ROOT.iterdir():
        if item.name == "docs":  # a copy: a documented command writes its figure there (docs/toy_samples.png)
            shutil.copytree(item, here / item.name)
        elif item.name == ".venv" or (item.name != "output" and not item.name.startswith(".")):
            (here / item.name).symlink_to(item)
    models = here / "models"
    models.mkdir()
    save_single_file(build_tiny_parts("sd1", seed=0), models / "v1-5-pruned-emaonly.safetensors")
    for other in ("deliberate_v2.safetensors", "second_checkpoint.safetensors"):
        save_single_file(build_tiny_parts("sd1", seed=1), models / other)
    for sdxl in ("sd_xl_base_1.0.safetensors", "ponyDiffusionV6XL.safetensors"):
        save_single_file(build_tiny_parts("sdxl", seed=0), models / sdxl)
    shutil.move(tiny_clip_folder(tmp_path), models / "clip-vit-large-patch14")
    make_images(here / "datasets" / "my_face", count=8, size=32)
    make_images(here / "datasets" / "m1ku", count=4, size=32, caption="1girl, solo, blue hair")
    for folder in ("raw", "raw_photos"):
        (here / folder).mkdir()
        for i in range(3):
            drawn_face((500, 640), at=(50, 60 + 40 * i)).save(here / folder / f"photo{i}.jpg")
    (here / "home" / "Downloads").mkdir(parents=True)
    env = dict(
        os.environ, HOME=str(here / "home"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    )
    # After the two commands: `make demo` has made its run, which the documents' demo commands read.
    demo = f"python train_textual_inversion.py --config presets/demo.toml save.output_dir=output/demo-{MADE}"
    subprocess.run(["bash", "-c", smaller(demo)], cwd=here, env=env, check=True, capture_output=True)
    return here, env


def export_selection(here: Path) -> None:
    """What the review page's "Export selection" button downloads: keep every picture the review listed."""
    folder = (here / "output" / "character").resolve()
    flags = json.loads((folder / "flags.json").read_text())
    keep = [image["file"] for image in flags["images"]]
    selection = {"format": "ti-toolkit-selection", "version": 1, "folder": str(folder), "keep": keep}
    (here / "home" / "Downloads" / "selection.json").write_text(json.dumps(selection))


def smaller(command: str) -> str:
    """The command with small sizes appended (a reproduction keeps its recorded, already small, settings)."""
    extra = next((args for prefix, args in SMALLER.items() if prefix in command), [])
    if "--reproduce" in command:
        extra = []
    return " ".join([command, *extra])


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=[doc.name for doc in DOCS])
def test_every_documented_command_runs_as_written(tmp_path, doc):
    """A reader of `doc` starts in a fresh folder and runs its commands in order."""
    commands = [(name, command) for name, command in documented_commands() if name == doc.name]
    here, env = world(tmp_path)
    for _, command in commands:
        for placeholder, value in PLACEHOLDERS.items():
            command = command.replace(placeholder, value)
        if "~/Downloads/selection.json" in command:
            export_selection(here)
        result = subprocess.run(
            ["bash", "-c", smaller(command)], cwd=here, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, (
            f"{doc.name}: {command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )


def test_the_documents_show_the_commands_of_every_step():
    commands = " ".join(command for _, command in documented_commands())
    for script in (
        "train_textual_inversion.py",
        "generate_dataset.py",
        "sweep_validate.py",
        "tools/toy_world.py",
    ):
        assert script in commands
