"""library/files.py, the one writer: atomic, usual permissions, temporary files cleaned up, clear errors; and
every file the three scripts write comes out with the permissions any other program would give it."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from library.errors import UserError
from library.files import atomic_folder, atomic_write, copy_file
from tests.helpers import make_images

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bytes_text_and_writers_land_whole_with_the_usual_mode(tmp_path, umask_022):
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write(tmp_path / "deep" / "b.txt", "héllo")
    atomic_write(tmp_path / "c.txt", lambda temp: temp.write_text("from a writer"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "deep" / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "c.txt").read_text() == "from a writer"
    assert {mode(p) for p in tmp_path.rglob("*") if p.is_file()} == {0o644}
    assert mode(tmp_path / "deep") == 0o755
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary file left


def test_a_private_file_from_a_writer_gets_the_usual_mode(tmp_path, umask_022):
    def private(temp: Path) -> None:
        temp.unlink()
        temp.write_bytes(b"x")
        os.chmod(temp, 0o600)  # what safetensors' save_file does

    assert mode(atomic_write(tmp_path / "w.safetensors", private)) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = atomic_write(tmp_path / "keep.txt", "old")

    def disk_full(temp: Path) -> None:
        temp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match="keep.txt: cannot write .No space left on device"):
        atomic_write(target, disk_full)
    with pytest.raises(ZeroDivisionError):
        atomic_write(target, lambda temp: 1 / 0)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]


def test_existing_targets_and_folders_that_are_files(tmp_path):
    target = atomic_write(tmp_path / "x.txt", "one")
    with pytest.raises(UserError, match="x.txt: already exists; nothing was replaced"):
        atomic_write(target, "two", overwrite=False)
    with pytest.raises(UserError, match="x.txt: is a file, not a folder"):
        atomic_write(target / "inside.txt", "three")
    assert target.read_text() == "one"


def test_folders_are_written_whole(tmp_path, umask_022):
    def write(folder: Path) -> None:
        (folder / "sub").mkdir(mode=0o700)
        (folder / "sub" / "f").write_bytes(b"1")
        os.chmod(folder / "sub" / "f", 0o600)

    folder = atomic_folder(tmp_path / "model", write)
    assert (mode(folder), mode(folder / "sub"), mode(folder / "sub" / "f")) == (0o755, 0o755, 0o644)
    with pytest.raises(UserError, match="already exists"):
        atomic_folder(folder, write)
    copy = copy_file(folder / "sub" / "f", tmp_path / "copy")
    assert copy.read_bytes() == b"1" and mode(copy) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "model"]


def test_every_file_the_scripts_write_has_the_usual_permissions(tmp_path, umask_022):
    """Training (embeddings, previews, PNG cards, config.toml, loss.csv), a sweep and an export, a generation
    (PNGs, grids, manifests, flags, review page) and a selection: 0644 files in 0755 folders."""
    import generate_dataset
    import sweep_validate
    import train_textual_inversion

    images = make_images(tmp_path / "images", count=4, size=32)
    run = tmp_path / "run"
    assert (
        train_textual_inversion.main(
            [
                "--config",
                str(ROOT / "presets/demo.toml"),
                "model.checkpoint=builtin:tiny",
                f"dataset.image_dir={images}",
                "dataset.resolution=32",
                f"save.output_dir={run}",
                "train.max_steps=2",
                "train.batch_size=2",
                "save.save_every_steps=1",
                "save.embed_in_png=true",
                "preview.every_steps=1",
                "preview.steps=1",
            ]
        )
        == 0
    )
    sweep = [
        "--config",
        str(ROOT / "presets/validate_demo.toml"),
        f"run.folder={run}",
        "render.prompt=a photo of a [name]-1",
        "x.values=every 1",
        "render.steps=1",
        "render.batch_size=1",
        "scoring.model=",
    ]
    assert sweep_validate.main(sweep) == 0
    assert sweep_validate.main([*sweep, "--export", "2", "--export-to", str(tmp_path / "exported")]) == 0
    generated = tmp_path / "generated"
    assert (
        generate_dataset.main(
            [
                "generate",
                "--config",
                str(ROOT / "presets/generate_character.toml"),
                "model.checkpoint=builtin:tiny",
                f"generate.output_dir={generated}",
                "generate.width=16",
                "generate.height=16",
                "generate.steps=1",
                "generate.batch_count=1",
                "generate.batch_size=1",
                'generate.axes=["an extreme closeup, a closeup"]',
                "pick.faces=false",
            ]
        )
        == 0
    )
    selection = tmp_path / "selection.json"
    kept = sorted(p.name for p in generated.glob("0*.png"))
    selection.write_text(
        json.dumps({"format": "ti-toolkit-selection", "version": 1, "folder": str(generated), "keep": kept})
    )
    os.chmod(selection, 0o644)
    assert (
        generate_dataset.main(
            [
                "select",
                str(selection),
                f"select.output_dir={tmp_path / 'dataset'}",
                "select.name=d3mo",
                "select.class_tokens=star",
            ]
        )
        == 0
    )
    written = [p for p in tmp_path.rglob("*") if p.relative_to(tmp_path).parts[0] != "images"]
    assert len([p for p in written if p.suffix == ".png"]) > 10
    wrong = {
        str(p.relative_to(tmp_path)): oct(mode(p))
        for p in written
        if mode(p) != (0o755 if p.is_dir() else 0o644)
    }
    assert not wrong
