"""Bad input to the three scripts ends as one line, `error: <file or key>: <what is wrong>; <the fix>`, exit
code 2, no traceback, and nothing half-written; valid but unusual datasets train.

Each case is a row: a builder that puts the bad file, folder or value in place and returns the command-line
arguments, and a piece of the one line the user must see (the file or key it names). The scripts' `main` runs
in-process on the tiny model (1 step, 16 px, 1 sampling step); a few cases run as real processes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import generate_dataset
import sweep_validate
import train_textual_inversion
from library.config import dump_config, load_config
from library.embeddings import Embedding, load_embedding, save_embedding
from library.tables import TrainConfig
from tests.helpers import make_images, one_error_line, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
NAME = "d3mo"
WIDTH = 32  # the tiny model's text-encoder width


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A good tiny single-file checkpoint, for cases that damage a copy of it."""
    return tiny_checkpoint(tmp_path_factory.mktemp("model"))


def fails(main: Callable, argv: list[str], capsys, expected: str) -> str:
    """Run a script's main; it must exit 2 with exactly one error line holding `expected`."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    line = one_error_line(err)
    assert expected in line, line
    return line


def no_leftovers(folder: Path) -> None:
    """No temporary file of an interrupted write anywhere below `folder`."""
    left = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left


def junk(size: int) -> bytes:
    """Random bytes, the same at every run (a failing case must fail again)."""
    return random.Random(size).randbytes(size)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def embedding_file(path: Path, vectors, **fields) -> Path:
    """An embedding file (any format, from the suffix) holding `vectors` (a tensor or an SDXL dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_embedding(Embedding(path.stem, vectors, **fields), path)


# ==================================================================================================
# train_textual_inversion.py


def train_args(tmp: Path, *overrides: str) -> list[str]:
    return [
        "--config",
        ROOT / "presets/demo.toml",
        "model.checkpoint=builtin:tiny",
        f"save.output_dir={tmp / 'run'}",
        f"dataset.image_dir={make_images(tmp / 'img', count=2, size=16)}",
        "dataset.resolution=16",
        "train.batch_size=1",
        "train.max_steps=1",
        "save.save_every_steps=0",
        "preview.every_steps=0",
        *overrides,
    ]


def assert_no_embedding_written(tmp: Path) -> None:
    """No embedding (an optimizer state without its embedding is an incomplete save: --resume removes it)."""
    run = tmp / "run"
    written = [p for p in run.rglob("*") if p.suffix in (".pt", ".safetensors")] if run.exists() else []
    assert not written, written
    no_leftovers(tmp)


# --------------------------------------------------------------------------------------------------
# Model files: half downloads, corrupt headers, folders with parts missing, a VAE that is not one


def _truncated(checkpoint: Path, tmp: Path, name: str, save_as_pickle: bool = False, zip_format=True) -> Path:
    if save_as_pickle:
        from safetensors.torch import load_file

        full = tmp / f"full-{name}"
        torch.save(load_file(checkpoint), full, _use_new_zipfile_serialization=zip_format)
        data = full.read_bytes()
        full.unlink()
    else:
        data = checkpoint.read_bytes()
    return write(tmp / name, data[: len(data) // 2])


def _damaged_zip(checkpoint: Path, tmp: Path) -> Path:
    """A .ckpt whose pickle is intact but whose tensor data was overwritten (a bad disk, a bad copy)."""
    from safetensors.torch import load_file

    path = tmp / "damaged.ckpt"
    torch.save(load_file(checkpoint), path)
    data = bytearray(path.read_bytes())
    start = data.find(b"data.pkl") + 40
    data[start : start + 200] = junk(200)
    return write(path, bytes(data))


def _corrupt_header(checkpoint: Path, tmp: Path) -> Path:
    data = bytearray(checkpoint.read_bytes())
    data[8:40] = b'{"broken": [1, 2, 3' + b" " * 13  # the JSON header, cut short
    return write(tmp / "header.safetensors", bytes(data))


def _huge_header_length(tmp: Path) -> Path:
    return write(tmp / "huge.safetensors", (2**62).to_bytes(8, "little") + b"{}")


def _diffusers_folder(checkpoint: Path, tmp: Path, damage: Callable[[Path], None]) -> Path:
    from library.convert import save_diffusers
    from library.models import load_sd

    folder = save_diffusers(load_sd(checkpoint), tmp / "diffusers-model")
    damage(folder)
    return folder


def _unlink_unet_weights(folder: Path) -> None:
    for file in (folder / "unet").iterdir():
        if file.suffix in (".safetensors", ".bin"):
            file.unlink()


def _truncate_unet_weights(folder: Path) -> None:
    for file in (folder / "unet").iterdir():
        if file.suffix == ".safetensors":
            data = file.read_bytes()
            file.write_bytes(data[: len(data) // 3])


SCHEDULER = Path("scheduler/scheduler_config.json")
BAD_UNET_CONFIG = json.dumps(
    {"_class_name": "UNet2DConditionModel", "block_out_channels": 5, "layers_per_block": "x"}
)

MODEL_CASES = {
    # name: (builder(checkpoint, tmp) -> overrides, what the line must name)
    "ckpt truncated zip": (
        lambda c, t: [f"model.checkpoint={_truncated(c, t, 'half.ckpt', save_as_pickle=True)}"],
        "half.ckpt: not a readable checkpoint",
    ),
    "ckpt truncated legacy pickle": (
        lambda c, t: [f"model.checkpoint={_truncated(c, t, 'old.ckpt', True, zip_format=False)}"],
        "old.ckpt: not a readable checkpoint",
    ),
    "safetensors truncated": (
        lambda c, t: [f"model.checkpoint={_truncated(c, t, 'half.safetensors')}"],
        "half.safetensors: not a readable .safetensors file",
    ),
    "safetensors corrupt header": (
        lambda c, t: [f"model.checkpoint={_corrupt_header(c, t)}"],
        "header.safetensors: not a readable .safetensors file",
    ),
    "safetensors header length beyond the file": (
        lambda c, t: [f"model.checkpoint={_huge_header_length(t)}"],
        "huge.safetensors: not a readable .safetensors file",
    ),
    "file of zeros": (
        lambda c, t: [f"model.checkpoint={write(t / 'zeros.safetensors', bytes(4096))}"],
        "zeros.safetensors: neither a .safetensors nor a torch checkpoint",
    ),
    "ckpt of zeros": (
        lambda c, t: [f"model.checkpoint={write(t / 'zeros.ckpt', bytes(4096))}"],
        "zeros.ckpt: neither a .safetensors nor a torch checkpoint",
    ),
    "random bytes behind a pickle header": (
        lambda c, t: [f"model.checkpoint={write(t / 'noise.ckpt', bytes([0x80, 2]) + junk(300))}"],
        "noise.ckpt: not a readable checkpoint",
    ),
    "ckpt with a damaged zip entry": (
        lambda c, t: [f"model.checkpoint={_damaged_zip(c, t)}"],
        "damaged.ckpt: not a readable checkpoint",
    ),
    "text file as ckpt": (
        lambda c, t: [f"model.checkpoint={write(t / 'notes.ckpt', 'this is a web page, not a model')}"],
        "notes.ckpt: neither a .safetensors nor a torch checkpoint",
    ),
    "empty file": (
        lambda c, t: [f"model.checkpoint={write(t / 'empty.safetensors', b'')}"],
        "empty.safetensors: the file is empty",
    ),
    "missing file": (
        lambda c, t: [f"model.checkpoint={t / 'absent.safetensors'}"],
        "absent.safetensors: no such file",
    ),
    "folder named x.safetensors": (
        lambda c, t: [f"model.checkpoint={(t / 'x.safetensors').mkdir() or t / 'x.safetensors'}"],
        "x.safetensors: not a diffusers SD folder",
    ),
    "an embedding as the model": (
        lambda c, t: [f"model.checkpoint={embedding_file(t / 'emb.safetensors', torch.ones(1, WIDTH))}"],
        "emb.safetensors: is a textual-inversion embedding",
    ),
    "diffusers folder without unet": (
        lambda c, t: [f"model.checkpoint={_diffusers_folder(c, t, lambda f: shutil.rmtree(f / 'unet'))}"],
        "diffusers-model: not a diffusers SD folder (no unet/config.json)",
    ),
    "diffusers folder without unet weights": (
        lambda c, t: [f"model.checkpoint={_diffusers_folder(c, t, _unlink_unet_weights)}"],
        "unet: cannot load the UNet2DConditionModel",
    ),
    "diffusers folder with truncated unet weights": (
        lambda c, t: [f"model.checkpoint={_diffusers_folder(c, t, _truncate_unet_weights)}"],
        "unet: cannot load the UNet2DConditionModel",
    ),
    "diffusers folder with broken text_encoder JSON": (
        lambda c, t: [
            "model.checkpoint="
            + str(
                _diffusers_folder(
                    c, t, lambda f: write(f / "text_encoder" / "config.json", '{"hidden_size": 3')
                )
            )
        ],
        "text_encoder/config.json: not valid JSON",
    ),
    "diffusers folder with broken unet JSON": (
        lambda c, t: [
            "model.checkpoint="
            + str(_diffusers_folder(c, t, lambda f: write(f / "unet" / "config.json", "[1, 2")))
        ],
        "unet",
    ),
    "SD2 diffusers folder with broken scheduler JSON": (
        lambda c, t: [
            "model.checkpoint="
            + str(_diffusers_folder(tiny_checkpoint(t, "sd2"), t, lambda f: write(f / SCHEDULER, "{oops")))
        ],
        "scheduler_config.json: not valid JSON",
    ),
    "diffusers folder whose text_encoder config is a list": (
        lambda c, t: [
            "model.checkpoint="
            + str(_diffusers_folder(c, t, lambda f: write(f / "text_encoder" / "config.json", "[]")))
        ],
        "text_encoder/config.json: not a JSON object",
    ),
    "diffusers folder with a unet config of wrong types": (
        lambda c, t: [
            "model.checkpoint="
            + str(_diffusers_folder(c, t, lambda f: write(f / "unet" / "config.json", BAD_UNET_CONFIG)))
        ],
        "unet: cannot load the UNet2DConditionModel",
    ),
    "diffusers folder with broken tokenizer": (
        lambda c, t: [
            "model.checkpoint="
            + str(
                _diffusers_folder(c, t, lambda f: write(f / "tokenizer" / "tokenizer_config.json", "{oops"))
            )
        ],
        "tokenizer: cannot load the tokenizer",
    ),
    "diffusers folder with a broken vocabulary": (
        lambda c, t: [
            "model.checkpoint="
            + str(
                _diffusers_folder(
                    c,
                    t,
                    lambda f: [write(f / "tokenizer" / n, "{x") for n in ("vocab.json", "tokenizer.json")],
                )
            )
        ],
        "tokenizer: cannot load the tokenizer",
    ),
    "diffusers folder without vae": (
        lambda c, t: [f"model.checkpoint={_diffusers_folder(c, t, lambda f: shutil.rmtree(f / 'vae'))}"],
        "vae: no config.json",
    ),
    "VAE file that is not a VAE": (
        lambda c, t: [
            "model.checkpoint=" + str(c),
            f"model.vae={_save(t / 'vae.safetensors', {'layers.0.weight': torch.ones(2, 2)})}",
        ],
        "vae.safetensors: holds no VAE weights",
    ),
    "VAE file with the wrong shapes": (
        lambda c, t: [
            "model.checkpoint=" + str(c),
            f"model.vae={_save(t / 'vae.safetensors', {'encoder.conv_in.weight': torch.ones(2, 2)})}",
        ],
        "vae.safetensors:",
    ),
    "truncated VAE": (
        lambda c, t: ["model.checkpoint=" + str(c), f"model.vae={_truncated(c, t, 'vae.safetensors')}"],
        "vae.safetensors: not a readable .safetensors file",
    ),
    "missing VAE": (
        lambda c, t: ["model.checkpoint=" + str(c), f"model.vae={t / 'absent-vae.safetensors'}"],
        "absent-vae.safetensors: no such file",
    ),
    "empty folder as VAE": (
        lambda c, t: ["model.checkpoint=" + str(c), f"model.vae={(t / 'vae').mkdir() or t / 'vae'}"],
        "vae: no config.json",
    ),
    "a UNet-only file as the VAE": (
        lambda c, t: ["model.checkpoint=" + str(c), f"model.vae={_only_unet(c, t)}"],
        "unet.safetensors: holds no VAE weights",
    ),
    "an embedding as the VAE": (
        lambda c, t: [
            "model.checkpoint=" + str(c),
            f"model.vae={embedding_file(t / 'emb.safetensors', torch.ones(1, WIDTH))}",
        ],
        "emb.safetensors: holds no VAE weights",
    ),
    "config_dir without configs": (
        lambda c, t: ["model.checkpoint=" + str(c), f"model.config_dir={(t / 'cfg').mkdir() or t / 'cfg'}"],
        "config.json: missing",
    ),
    "config_dir with broken JSON": (
        lambda c, t: [
            "model.checkpoint=" + str(c),
            f"model.config_dir={_config_dir(t, broken='unet')}",
        ],
        "unet/config.json: not valid JSON",
    ),
    "broken yaml beside the checkpoint": (
        lambda c, t: [f"model.checkpoint={_with_yaml(tiny_checkpoint(t, 'sd2'), t, 'model: [unclosed')}"],
        "m.yaml: not valid YAML",
    ),
}


def _only_unet(checkpoint: Path, tmp: Path) -> Path:
    from safetensors.torch import load_file

    unet = {k: v.contiguous() for k, v in load_file(checkpoint).items() if k.startswith("model.")}
    return _save(tmp / "unet.safetensors", unet)


def _save(path: Path, tensors: dict) -> Path:
    save_file(tensors, path)
    return path


def _config_dir(tmp: Path, broken: str) -> Path:
    folder = tmp / "cfg"
    for part in ("unet", "vae", "text_encoder"):
        write(folder / part / "config.json", "{oops" if part == broken else "{}")
    return folder


def _with_yaml(checkpoint: Path, tmp: Path, text: str) -> Path:
    copy = write(tmp / "m.safetensors", checkpoint.read_bytes())
    write(tmp / "m.yaml", text)
    return copy


def test_a_whole_model_as_the_vae_gives_its_vae(tmp_path, checkpoint, capsys):
    """A1111 users point "SD VAE" at a checkpoint or a diffusers folder: its VAE is what they mean."""
    from library.convert import save_diffusers
    from library.models import load_sd

    folder = save_diffusers(load_sd(checkpoint), tmp_path / "folder")
    for vae in (tiny_checkpoint(tmp_path, "sd2"), folder):
        argv = train_args(tmp_path, f"model.checkpoint={checkpoint}", f"model.vae={vae}")
        assert train_textual_inversion.main([str(a) for a in argv]) == 0, capsys.readouterr().err
        shutil.rmtree(tmp_path / "run")


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_files(case, tmp_path, checkpoint, capsys):
    build, expected = MODEL_CASES[case]
    fails(train_textual_inversion.main, train_args(tmp_path, *build(checkpoint, tmp_path)), capsys, expected)
    assert_no_embedding_written(tmp_path)


# --------------------------------------------------------------------------------------------------
# The output folder: a file, read-only, full


class _FullFile:
    """A file on a full disk: it opens, but every write fails as the kernel's would."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def refuse_writes(monkeypatch, folder: Path, *, full: bool, suffix: str = "") -> None:
    """Writes below `folder` (to files ending in `suffix`) fail as on a read-only (as root, chmod cannot
    make one) or full disk; the folder itself may already exist."""
    import builtins
    import io

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def blocked(path) -> bool:
        path = Path(os.fsdecode(path)) if not isinstance(path, int) else None
        return path is not None and folder in path.parents and suffix in path.name

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and blocked(file):
            if not full:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return _FullFile(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
            code = errno.ENOSPC if full else errno.EACCES
            raise OSError(code, os.strerror(code), str(path))
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if not full and blocked(path) and not suffix:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def test_output_folder_that_is_a_file(tmp_path, capsys):
    write(tmp_path / "run", "a file where the run folder should be")
    fails(train_textual_inversion.main, train_args(tmp_path), capsys, "run: is a file, not a folder")


def test_output_folder_inside_a_file(tmp_path, capsys):
    write(tmp_path / "file", "a file")
    argv = train_args(tmp_path, f"save.output_dir={tmp_path / 'file' / 'run'}")
    fails(train_textual_inversion.main, argv, capsys, "file/run: cannot create the folder")


def test_read_only_output_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    argv = train_args(tmp_path)
    refuse_writes(monkeypatch, tmp_path / "run", full=False)
    fails(train_textual_inversion.main, argv, capsys, f"{tmp_path / 'run'}: cannot write")
    assert_no_embedding_written(tmp_path)


def test_read_only_parent_of_the_output_folder(tmp_path, monkeypatch, capsys):
    argv = train_args(tmp_path, f"save.output_dir={tmp_path / 'locked' / 'run'}")
    (tmp_path / "locked").mkdir()
    refuse_writes(monkeypatch, tmp_path / "locked", full=False)
    fails(
        train_textual_inversion.main, argv, capsys, "locked/run: cannot create the folder (Permission denied)"
    )


def test_full_disk_at_the_first_write(tmp_path, monkeypatch, capsys):
    argv = train_args(tmp_path)
    refuse_writes(monkeypatch, tmp_path / "run", full=True)
    fails(train_textual_inversion.main, argv, capsys, "No space left on device")
    assert_no_embedding_written(tmp_path)


def test_disk_fills_while_saving_embeddings(tmp_path, monkeypatch, capsys):
    argv = train_args(tmp_path, "save.save_every_steps=1", "train.max_steps=2")
    refuse_writes(monkeypatch, tmp_path / "run", full=True, suffix=".safetensors")
    line = fails(
        train_textual_inversion.main, argv, capsys, ".safetensors: cannot write (No space left on device)"
    )
    assert f"embeddings/{NAME}-" in line  # the save of step 0 or 1, whichever the saver thread reports
    assert_no_embedding_written(tmp_path)


def test_a_run_folder_that_holds_a_run(tmp_path, capsys):
    embedding_file(tmp_path / "run" / "embeddings" / f"{NAME}-5.pt", torch.ones(1, WIDTH), step=5)
    fails(train_textual_inversion.main, train_args(tmp_path), capsys, "run: already holds a training run")


# --------------------------------------------------------------------------------------------------
# Valid but unusual datasets: they train


def _image(folder: Path, name: str, mode: str, size: tuple[int, int], colour, **save) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(folder / name, **save)


def _palette_with_transparency(folder: Path, name: str) -> None:
    image = Image.new("P", (24, 24), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (12, 0, 24, 24))
    image.save(folder / name, transparency=0)


def _transparent_corner(folder: Path, name: str) -> None:
    image = Image.new("RGBA", (24, 24), (200, 60, 60, 255))
    image.paste((0, 0, 0, 0), (0, 0, 12, 12))
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)


def _odd_dataset(build: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        folder = tmp / "odd"
        folder.mkdir()
        build(folder)
        return [f"dataset.image_dir={folder}"]

    return make


VALID_DATASETS = {
    "opaque RGBA with alpha_loss_weight": (
        lambda f: [_image(f, f"{i}.png", "RGBA", (16, 16), (200, 0, 0, 255)) for i in range(2)],
        ["dataset.alpha_loss_weight=true"],
    ),
    "RGBA and RGB mixed with alpha_loss_weight": (
        lambda f: [_transparent_corner(f, "a.png"), _image(f, "b.jpg", "RGB", (16, 16), (0, 0, 200))],
        ["dataset.alpha_loss_weight=true", "train.batch_size=2"],
    ),
    "opaque and transparent RGBA mixed with alpha_loss_weight": (
        lambda f: [_transparent_corner(f, "a.png"), _image(f, "b.png", "RGBA", (16, 16), (0, 0, 200, 255))],
        ["dataset.alpha_loss_weight=true", "train.batch_size=2"],
    ),
    "fully transparent RGBA with alpha_loss_weight": (
        lambda f: [_image(f, f"{i}.png", "RGBA", (16, 16), (9, 9, 9, 0)) for i in range(2)],
        ["dataset.alpha_loss_weight=true"],
    ),
    "grayscale with alpha": (
        lambda f: [_image(f, f"{i}.png", "LA", (16, 16), (100, 128)) for i in range(2)],
        ["dataset.alpha_loss_weight=true"],
    ),
    "palette with transparency": (
        lambda f: [_palette_with_transparency(f, f"{i}.png") for i in range(2)],
        ["dataset.alpha_loss_weight=true"],
    ),
    "very different sizes and aspect ratios": (
        lambda f: [
            _image(f, name, "RGB", size, (i * 40, 90, 90))
            for i, (name, size) in enumerate(
                [("a.png", (16, 16)), ("b.png", (300, 9)), ("c.png", (9, 300)), ("d.png", (1, 1))]
            )
        ],
        ["train.batch_size=4", "dataset.alpha_loss_weight=true"],
    ),
    "a 1x1 image": (lambda f: _image(f, "dot.png", "RGB", (1, 1), (255, 0, 0)), []),
    "a huge image": (lambda f: _image(f, "huge.png", "RGB", (6000, 4000), (30, 60, 90)), []),
    "a wide 1-pixel strip": (lambda f: _image(f, "strip.png", "RGB", (2000, 1), (30, 60, 90)), []),
    "16-bit grayscale and CMYK": (
        lambda f: [
            _image(f, "grey.png", "I;16", (16, 16), 30000),
            _image(f, "print.jpg", "CMYK", (16, 16), (0, 255, 255, 0)),
        ],
        ["train.batch_size=2"],
    ),
    "black-and-white (1-bit) image": (lambda f: _image(f, "bw.png", "1", (16, 16), 1), []),
    "upper-case extension": (lambda f: _image(f, "A.PNG", "RGB", (16, 16), (1, 2, 3)), []),
    "empty caption file and a caption of blank lines": (
        lambda f: [
            _image(f, "a.png", "RGB", (16, 16), (1, 2, 3)),
            write(f / "a.txt", ""),
            _image(f, "b.png", "RGB", (16, 16), (3, 2, 1)),
            write(f / "b.txt", "\n\n  \n"),
        ],
        ["train.batch_size=2"],
    ),
    "captions with unbalanced brackets, odd weights and 1000 tokens": (
        lambda f: [
            _image(f, "a.png", "RGB", (16, 16), (1, 2, 3)),
            write(f / "a.txt", "a (photo of [a woman, ((smile)"),
            _image(f, "b.png", "RGB", (16, 16), (3, 2, 1)),
            write(f / "b.txt", "a photo, " * 300),
            _image(f, "c.png", "RGB", (16, 16), (3, 2, 1)),
            write(f / "c.txt", "closeup ] ) of \\ (woman:1.5 BREAK BREAK :) (:1)"),
        ],
        ["train.batch_size=3", "train.max_steps=2"],
    ),
    "caption with a BOM and Windows line ends": (
        lambda f: [
            _image(f, "a.png", "RGB", (16, 16), (1, 2, 3)),
            write(f / "a.txt", "\ufeffa photo\r\nsecond line\r\n".encode()),
        ],
        [],
    ),
}


@pytest.mark.parametrize("case", list(VALID_DATASETS))
def test_valid_but_unusual_datasets_train(case, tmp_path, capsys):
    build, overrides = VALID_DATASETS[case]
    argv = train_args(tmp_path, *_odd_dataset(build)(tmp_path), *overrides)
    code = train_textual_inversion.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert (tmp_path / "run" / f"{NAME}.pt").is_file()


# --------------------------------------------------------------------------------------------------
# Images, captions, templates


def _images_with(tmp: Path, **files: bytes | str) -> Path:
    """Two good images plus `files` (name -> content) in one folder."""
    folder = make_images(tmp / "data", count=2, size=16)
    for name, content in files.items():
        write(folder / name, content)
    return folder


def _png_bytes(size=(16, 16)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims to be width x height (far beyond PIL's decompression-bomb limit), with no pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _template(tmp: Path, content: bytes | str) -> str:
    return f"dataset.template={write(tmp / 'mine.txt', content)}"


LATIN1 = "un caf\xe9".encode("latin-1")  # what an old Windows editor saves: not UTF-8

DATA_CASES = {
    "image_dir missing": (lambda t: [f"dataset.image_dir={t / 'absent'}"], "absent does not exist"),
    "image_dir is a file": (
        lambda t: [f"dataset.image_dir={write(t / 'pic.png', _png_bytes())}"],
        "pic.png does not exist or is not a folder",
    ),
    "image_dir empty": (
        lambda t: [f"dataset.image_dir={(t / 'empty').mkdir() or t / 'empty'}"],
        "empty has no images",
    ),
    "image_dir of text files only": (
        lambda t: [f"dataset.image_dir={write(t / 'texts' / 'a.txt', 'hello').parent}"],
        "texts has no images",
    ),
    "Kohya folders that are empty or have 0 repeats": (
        lambda t: [
            f"dataset.image_dir={(t / 'k' / '10_a').mkdir(parents=True) or make_images(t / 'k' / '0_b', 1).parent}"
        ],
        "none of its <repeats>_<class> subfolders holds any images",
    ),
    "a text file named .png": (
        lambda t: [f"dataset.image_dir={_images_with(t, **{'bad.png': 'not a picture'})}"],
        "bad.png",
    ),
    "a zero-byte image": (
        lambda t: [f"dataset.image_dir={_images_with(t, **{'zero.jpg': b''})}"],
        "zero.jpg",
    ),
    "a truncated image": (
        lambda t: [f"dataset.image_dir={_images_with(t, **{'cut.png': _png_bytes((64, 64))[:120]})}"],
        "cut.png",
    ),
    "an image beyond the decompression-bomb limit": (
        lambda t: [f"dataset.image_dir={_images_with(t, **{'giant.png': _png_header_only(30000, 30000)})}"],
        "giant.png: too large to open safely",
    ),
    "a caption that is not UTF-8": (
        lambda t: [f"dataset.image_dir={_images_with(t, **{'00.txt': LATIN1})}"],
        "00.txt is not valid UTF-8",
    ),
    "a binary caption": (
        lambda t: [f"dataset.image_dir={_images_with(t, **{'01.txt': bytes(range(256))})}"],
        "01.txt is not valid UTF-8",
    ),
    "a caption with a weight that is not a number": (
        lambda t: [f"dataset.image_dir={_images_with(t, **{'00.txt': 'a (woman:1.2.3) smiling'})}"],
        "00.txt: '1.2.3' is not a number",
    ),
    "caption_extension without a dot": (
        lambda t: ["dataset.caption_extension=txt"],
        "dataset.caption_extension 'txt' must start with a dot",
    ),
    "filename_word_regex that is not a regex": (
        lambda t: ["dataset.filename_word_regex=([a-z", "dataset.caption_extension=.none"],
        "filename_word_regex '([a-z' is not a valid regular expression",
    ),
    "template file missing": (lambda t: [f"dataset.template={t / 'absent.txt'}"], "absent.txt not found"),
    "template file empty": (lambda t: [_template(t, "")], "mine.txt has no prompt lines"),
    "template file not UTF-8": (
        lambda t: [_template(t, b"a photo of [name] \xff\xfe")],
        "mine.txt is not valid UTF-8",
    ),
    "template file binary": (lambda t: [_template(t, bytes(range(256)) * 4)], "mine.txt is not valid UTF-8"),
    "template that is a folder": (
        lambda t: [f"dataset.template={(t / 'tpl').mkdir() or t / 'tpl'}"],
        "is not a stock template",
    ),
    "inline template without [name] or [filewords]": (
        lambda t: ["dataset.template=a photo of a thing"],
        "template 'a photo of a thing' is not a stock template",
    ),
    "template line with a weight that is not a number": (
        lambda t: [_template(t, "a photo of [name]\n(a closeup:1..5) of [name]\n")],
        "mine.txt: '1..5' is not a number",
    ),
    "batch larger than the dataset": (
        lambda t: ["train.batch_size=3"],
        "batch of 3 is larger than its 2 images",
    ),
    "resolution not a multiple of 8": (lambda t: ["dataset.resolution=20"], "resolution [20, 20] must be"),
    "resolution of the wrong type": (lambda t: ["dataset.resolution='big'"], "'dataset.resolution' = 'big'"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_images_captions_and_templates(case, tmp_path, capsys):
    build, expected = DATA_CASES[case]
    fails(train_textual_inversion.main, train_args(tmp_path, *build(tmp_path)), capsys, expected)
    assert_no_embedding_written(tmp_path)


# --------------------------------------------------------------------------------------------------
# Kohya dataset TOMLs


def _dataset_toml(tmp: Path, text: str | bytes, images: bool = True) -> list[str]:
    if images:
        make_images(tmp / "dataset" / "pics", count=2, size=16)
    return [f"dataset.dataset_config={write(tmp / 'dataset' / 'ds.toml', text)}"]


SUBSET = '[[datasets.subsets]]\nimage_dir = "pics"\n'
GOOD_SUBSET = "[[datasets]]\n" + SUBSET
TOML_CASES = {
    "missing": (lambda t: [f"dataset.dataset_config={t / 'absent.toml'}"], "absent.toml not found"),
    "a folder": (
        lambda t: [f"dataset.dataset_config={(t / 'd.toml').mkdir() or t / 'd.toml'}"],
        "d.toml not found",
    ),
    "empty": (lambda t: _dataset_toml(t, ""), "ds.toml needs a [[datasets]] table"),
    "not TOML": (lambda t: _dataset_toml(t, "[[datasets]\nimage_dir = "), "ds.toml is not valid TOML"),
    "not UTF-8": (
        lambda t: _dataset_toml(t, b"# caf\xe9\n" + GOOD_SUBSET.encode()),
        "ds.toml is not valid UTF-8",
    ),
    "binary": (lambda t: _dataset_toml(t, bytes(range(256))), "ds.toml is not valid UTF-8"),
    "num_repeats a string": (
        lambda t: _dataset_toml(t, GOOD_SUBSET + 'num_repeats = "10"\n'),
        "num_repeats in [[datasets.subsets]] must be int",
    ),
    "num_repeats 0": (
        lambda t: _dataset_toml(t, GOOD_SUBSET + "num_repeats = 0\n"),
        "needs num_repeats >= 1",
    ),
    "dropout 2": (
        lambda t: _dataset_toml(t, GOOD_SUBSET + "caption_tag_dropout_rate = 2\n"),
        "0 <= caption_tag_dropout_rate < 1",
    ),
    "resolution a word": (
        lambda t: _dataset_toml(t, '[general]\nresolution = "big"\n' + GOOD_SUBSET),
        "ds.toml: resolution must be a number or [width, height], not 'big'",
    ),
    "resolutions that differ": (
        lambda t: _dataset_toml(
            t, "[[datasets]]\nresolution = 16\n" + SUBSET + "[[datasets]]\nresolution = 24\n" + SUBSET
        ),
        "ds.toml: datasets use different resolutions [(16, 16), (24, 24)]",
    ),
    "image_dir a number": (
        lambda t: _dataset_toml(t, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 5\n"),
        "image_dir in [[datasets.subsets]] must be str",
    ),
    "image_dir empty": (
        lambda t: _dataset_toml(t, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = ""\n'),
        "a [[datasets.subsets]] has an empty image_dir",
    ),
    "image_dir missing folder": (
        lambda t: _dataset_toml(t, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "nowhere"\n'),
        "image_dir nowhere does not exist",
    ),
    "image_dir a file": (
        lambda t: _dataset_toml(t, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "ds.toml"\n'),
        "does not exist or is not a folder",
    ),
    "no image_dir": (
        lambda t: _dataset_toml(t, "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n"),
        "a [[datasets.subsets]] has no image_dir",
    ),
    "datasets a table, not an array": (
        lambda t: _dataset_toml(t, "[datasets]\nresolution = 16\n"),
        "needs a [[datasets]] table",
    ),
    "subsets a table, not an array": (
        lambda t: _dataset_toml(t, '[[datasets]]\n[datasets.subsets]\nimage_dir = "pics"\n'),
        "every [[datasets]] needs at least one [[datasets.subsets]]",
    ),
    "subsets under general": (
        lambda t: _dataset_toml(t, '[[general.subsets]]\nimage_dir = "pics"\n' + GOOD_SUBSET),
        "key 'subsets' is not allowed in [general]",
    ),
    "datasets a list of numbers": (
        lambda t: _dataset_toml(t, "datasets = [1, 2]\n"),
        "[[datasets]] must be a table",
    ),
    "general a number": (
        lambda t: _dataset_toml(t, "general = 5\n" + GOOD_SUBSET),
        "needs a [[datasets]] table",
    ),
    "unknown key": (
        lambda t: _dataset_toml(t, GOOD_SUBSET + "num_repeat = 3\n"),
        "unknown key 'num_repeat' in [[datasets.subsets]]; did you mean 'num_repeats'?",
    ),
    "caption_extension without a dot": (
        lambda t: _dataset_toml(t, GOOD_SUBSET + 'caption_extension = "txt"\n'),
        "ds.toml: caption_extension 'txt' must start with a dot",
    ),
    "metadata_file (fine-tuning)": (
        lambda t: _dataset_toml(t, GOOD_SUBSET + 'metadata_file = "meta.json"\n'),
        "metadata_file: fine-tuning datasets",
    ),
    "only regularization images": (
        lambda t: _dataset_toml(t, GOOD_SUBSET + "is_reg = true\n"),
        "its subsets hold no training images",
    ),
}


@pytest.mark.parametrize("case", list(TOML_CASES))
def test_bad_kohya_dataset_tomls(case, tmp_path, capsys):
    build, expected = TOML_CASES[case]
    fails(train_textual_inversion.main, train_args(tmp_path, *build(tmp_path)), capsys, expected)
    assert_no_embedding_written(tmp_path)


# --------------------------------------------------------------------------------------------------
# Embeddings to start from (embedding.init_from)


def _pt_with(tmp: Path, name: str, data) -> Path:
    path = tmp / name
    torch.save(data, path)
    return path


def _half(path: Path) -> Path:
    data = path.read_bytes()
    return write(path.with_name("half-" + path.name), data[: len(data) // 2])


def _init(path: Path) -> list[str]:
    return [f"embedding.init_from={path}"]


INIT_CASES = {
    "missing": (lambda t: _init(t / "absent.pt"), "absent.pt: embedding file not found"),
    "empty": (lambda t: _init(write(t / "empty.pt", b"")), "empty.pt: the file is empty"),
    "random bytes": (
        lambda t: _init(write(t / "noise.pt", junk(512))),
        "noise.pt: not a readable torch file",
    ),
    "random bytes behind a pickle header": (
        lambda t: _init(write(t / "noise.pt", bytes([0x80, 2]) + junk(512))),
        "noise.pt: not a readable torch file",
    ),
    "text named .pt": (lambda t: _init(write(t / "note.pt", "hello")), "note.pt: not a readable torch file"),
    "truncated .pt": (
        lambda t: _init(_half(embedding_file(t / "e.pt", torch.ones(2, WIDTH)))),
        "half-e.pt: not a readable torch file",
    ),
    "truncated .safetensors": (
        lambda t: _init(_half(embedding_file(t / "e.safetensors", torch.ones(2, WIDTH)))),
        "half-e.safetensors: not a readable .safetensors file",
    ),
    "zeros named .safetensors": (
        lambda t: _init(write(t / "z.safetensors", bytes(64))),
        "z.safetensors: not a readable .safetensors file",
    ),
    "a .png holding no embedding": (
        lambda t: _init(write(t / "p.png", _png_bytes())),
        "p.png: this image holds no",
    ),
    "a broken .png": (
        lambda t: _init(write(t / "p.png", b"\x89PNG\r\n\x1a\nrest")),
        "p.png: not a readable image",
    ),
    "unknown suffix": (lambda t: _init(write(t / "e.txt", "0.1 0.2")), "e.txt: unknown embedding file type"),
    "a folder without learned_embeds": (
        lambda t: _init((t / "emb").mkdir() or t / "emb"),
        "emb: folder without learned_embeds",
    ),
    "wrong width (SD1 768 for a 32-wide model)": (
        lambda t: _init(embedding_file(t / "wide.pt", torch.ones(2, 768))),
        "wide.pt: an embedding of width 768 (SD 1.x) does not fit this SD 1.x model (clip_l [n, 32])",
    ),
    "SDXL pair for an SD1 model": (
        lambda t: _init(
            embedding_file(
                t / "xl.safetensors", {"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)}
            )
        ),
        "xl.safetensors: an embedding of clip_l [2, 768], clip_g [2, 1280] (SDXL) does not fit",
    ),
    "NaN vectors": (
        lambda t: _init(embedding_file(t / "nan.pt", torch.full((1, WIDTH), float("nan")))),
        "nan.pt: the embedding holds NaN or infinite numbers",
    ),
    "infinite vectors": (
        lambda t: _init(embedding_file(t / "inf.safetensors", torch.full((1, WIDTH), float("inf")))),
        "inf.safetensors: the embedding holds NaN or infinite numbers",
    ),
    "more vectors than a prompt chunk holds": (
        lambda t: _init(embedding_file(t / "long.pt", torch.ones(80, WIDTH))),
        "long.pt: 80 vectors",
    ),
    "integer tensor": (
        lambda t: _init(_pt_with(t, "int.pt", {"emb_params": torch.ones(1, WIDTH, dtype=torch.int64)})),
        "int.pt: 'emb_params' is not a floating-point tensor",
    ),
    "3-D tensor": (
        lambda t: _init(_pt_with(t, "cube.pt", {"emb_params": torch.ones(1, 2, WIDTH)})),
        "cube.pt: 'emb_params' has shape [1, 2, 32]",
    ),
    "a list, not a dict": (lambda t: _init(_pt_with(t, "list.pt", [1, 2])), "list.pt: holds a list"),
    "two tensors": (
        lambda t: _init(_pt_with(t, "two.pt", {"a": torch.ones(1, WIDTH), "b": torch.ones(1, WIDTH)})),
        "two.pt: holds 2 tensors",
    ),
    "a step that is not a number": (
        lambda t: _init(_pt_with(t, "step.pt", {"emb_params": torch.ones(1, WIDTH), "step": "ten"})),
        "step.pt: 'step' is 'ten', not a whole number",
    ),
    "a pickle that would run code": (
        lambda t: _init(_pt_with(t, "evil.pt", {"emb_params": torch.ones(1, WIDTH), "x": Path("/")})),
        "evil.pt: refused: the pickle would run",
    ),
}


@pytest.mark.parametrize("case", list(INIT_CASES))
def test_bad_embeddings_to_start_from(case, tmp_path, capsys):
    build, expected = INIT_CASES[case]
    fails(train_textual_inversion.main, train_args(tmp_path, *build(tmp_path)), capsys, expected)
    assert_no_embedding_written(tmp_path)


def test_zero_vectors_are_a_valid_start(tmp_path, capsys):
    argv = train_args(tmp_path, *_init(embedding_file(tmp_path / "zero.pt", torch.zeros(2, WIDTH))))
    assert train_textual_inversion.main([str(a) for a in argv]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# --resume


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run of 2 steps saved at every step (embeddings, optimizer states, loss.csv, config.toml)."""
    tmp = tmp_path_factory.mktemp("finished")
    argv = train_args(tmp, "save.save_every_steps=1", "train.max_steps=2")
    assert train_textual_inversion.main([str(a) for a in argv]) == 0
    return tmp


def _run_copy(finished: Path, tmp: Path, damage: Callable[[Path], object] = lambda run: None) -> Path:
    run = shutil.copytree(finished / "run", tmp / "run")
    shutil.copytree(finished / "img", tmp / "img", dirs_exist_ok=True)
    (run / ".lock").unlink(missing_ok=True)
    damage(run)
    return run


def _optimizer_state_of_other_shape(run: Path) -> None:
    vectors = torch.nn.Parameter(torch.zeros(3, WIDTH))
    optimizer = torch.optim.AdamW([vectors])
    vectors.grad = torch.ones_like(vectors)
    optimizer.step()
    torch.save(
        {"step": 2, "optimizer": optimizer.state_dict(), "scaler": {}}, run / "embeddings" / f"{NAME}-2.optim"
    )


RESUME_CASES = {
    # name: (damage(run folder), --resume target relative to the run, with --config?, expected)
    "a path that does not exist": (None, "nowhere", True, "nowhere: not found; give a run folder"),
    "a text file": (
        lambda r: write(r / "notes.txt", "hi"),
        "notes.txt",
        True,
        "notes.txt: unknown embedding file type",
    ),
    "random bytes as NAME-N.pt": (
        lambda r: write(r / "embeddings" / f"{NAME}-2.pt", junk(300)),
        f"embeddings/{NAME}-2.pt",
        True,
        f"{NAME}-2.pt: not a readable torch file",
    ),
    "an embedding that records no step": (
        lambda r: embedding_file(r / "nostep.pt", torch.ones(1, WIDTH)),
        "nostep.pt",
        True,
        "nostep.pt: this embedding does not record its step",
    ),
    "a run folder without config.toml (no --config)": (
        lambda r: (r / "config.toml").unlink(),
        ".",
        False,
        "no config.toml in its run folder; give the preset with --config",
    ),
    "garbage config.toml": (
        lambda r: write(r / "config.toml", "[train\nlr = ="),
        ".",
        False,
        "config.toml: not valid TOML",
    ),
    "binary config.toml": (
        lambda r: write(r / "config.toml", bytes(range(256))),
        ".",
        False,
        "config.toml: not valid TOML",
    ),
    "config.toml from a newer toolkit": (
        lambda r: write(
            r / "config.toml",
            (r / "config.toml").read_text().replace("format_version = 1", "format_version = 99"),
        ),
        ".",
        False,
        "config.toml: written by a newer version of the toolkit (format_version 99)",
    ),
    "config.toml with an unknown key": (
        lambda r: write(r / "config.toml", (r / "config.toml").read_text() + "\n[extra]\nx = 1\n"),
        ".",
        False,
        "config.toml: unknown key 'extra'",
    ),
    "config.toml that is a folder": (
        lambda r: [(r / "config.toml").unlink(), (r / "config.toml").mkdir()],
        ".",
        False,
        "no config.toml in its run folder",
    ),
    "garbage optimizer state": (
        lambda r: write(r / "embeddings" / f"{NAME}-2.optim", b"PK\x03\x04 nonsense"),
        ".",
        True,
        f"{NAME}-2.optim: not a readable optimizer state",
    ),
    "optimizer state without its optimizer": (
        lambda r: torch.save({"step": 2, "nothing": 1}, r / "embeddings" / f"{NAME}-2.optim"),
        ".",
        True,
        f"{NAME}-2.optim: not an optimizer state of this toolkit",
    ),
    "optimizer state of other vectors": (
        _optimizer_state_of_other_shape,
        ".",
        True,
        f"{NAME}-2.optim: this optimizer state does not fit train.optimizer = 'adamw' on the vectors {NAME} 1 x 32",
    ),
    "optimizer state that is a list": (
        lambda r: torch.save([1, 2], r / "embeddings" / f"{NAME}-2.optim"),
        ".",
        True,
        f"{NAME}-2.optim: not an optimizer state of this toolkit",
    ),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_bad_resume_targets(case, tmp_path, finished_run, capsys):
    damage, target, with_config, expected = RESUME_CASES[case]
    run = _run_copy(finished_run, tmp_path, damage or (lambda r: None))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    argv = ["--resume", run / target, "train.max_steps=3", "save.save_every_steps=1"]
    if with_config:
        argv = train_args(tmp_path, "train.max_steps=3", "save.save_every_steps=1") + [
            "--resume",
            run / target,
        ]
    fails(train_textual_inversion.main, argv, capsys, expected)
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # the run folder is left as it was
    no_leftovers(tmp_path)


def test_resume_with_another_optimizer(tmp_path, finished_run, capsys):
    run = _run_copy(finished_run, tmp_path)
    argv = ["--resume", run, "train.max_steps=3", "train.optimizer=prodigy"]
    fails(
        train_textual_inversion.main,
        argv,
        capsys,
        "this optimizer state does not fit train.optimizer = 'prodigy'",
    )


def test_resume_over_a_loss_log_with_garbage_rows(tmp_path, finished_run, capsys):
    """A kill while appending leaves half a row, an edit or a bad disk anything: resuming skips such rows.
    The run is a copy: it continues where it is now, not in the folder its config.toml was written in."""
    run = _run_copy(finished_run, tmp_path)
    with (run / "loss.csv").open("a") as log:
        log.write('3,0,1,0.12\nnot,a,row\n"' + "x" * 200_000 + "\n2,0,2\n4,0,2,0.1")
    argv = ["--resume", run, "train.max_steps=3", "save.save_every_steps=1"]
    assert train_textual_inversion.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    rows = (run / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    assert load_embedding(run / f"{NAME}.pt").step == 3
    assert load_embedding(finished_run / "run" / f"{NAME}.pt").step == 2  # the original is left alone


# --------------------------------------------------------------------------------------------------
# Previews and sample-prompt files


def _prompts_file(tmp: Path, content: bytes | str) -> list[str]:
    return [
        "preview.every_steps=1",
        "preview.steps=1",
        f"preview.prompts_file={write(tmp / 'prompts.txt', content)}",
    ]


PREVIEW_CASES = {
    "prompts file missing": (
        lambda t: ["preview.every_steps=1", f"preview.prompts_file={t / 'absent.txt'}"],
        "absent.txt not found",
    ),
    "prompts file that is a folder": (
        lambda t: ["preview.every_steps=1", f"preview.prompts_file={(t / 'p').mkdir() or t / 'p'}"],
        "p not found",
    ),
    "prompts file empty": (lambda t: _prompts_file(t, "# only a note\n\n"), "prompts.txt: no prompt lines"),
    "prompts file not UTF-8": (lambda t: _prompts_file(t, LATIN1), "prompts.txt is not valid UTF-8"),
    "prompts file binary": (lambda t: _prompts_file(t, bytes(range(256))), "prompts.txt is not valid UTF-8"),
    "unknown option": (
        lambda t: _prompts_file(t, "a [name] --x 5\n"),
        "prompts.txt:1: unknown option '--x 5'",
    ),
    "option that is not a number": (
        lambda t: _prompts_file(t, "a\na [name] --w wide\n"),
        "prompts.txt:2: --w 'wide'",
    ),
    "size not a multiple of 8": (
        lambda t: _prompts_file(t, "a [name] --w 20\n"),
        "prompts.txt:1: 'width' = 20 must be a multiple of 8",
    ),
    "unknown sampler": (
        lambda t: _prompts_file(t, "a [name] --ss magic\n"),
        "prompts.txt:1 (--ss): unknown sampler 'magic'",
    ),
    "weight that is not a number": (
        lambda t: _prompts_file(t, "a (b:1..2)\n"),
        "prompts.txt:1: '1..2' is not a number",
    ),
    "preview.prompt with a weight that is not a number": (
        lambda t: ["preview.every_steps=1", "preview.prompt=a (photo:..) of [name]"],
        "preview.prompt: '..' is not a number",
    ),
    "preview.negative_prompt with a weight that is not a number": (
        lambda t: ["preview.every_steps=1", "preview.negative_prompt=(ugly:1.2.)"],
        "preview.negative_prompt: '1.2.' is not a number",
    ),
    "preview.sampler unknown": (
        lambda t: ["preview.every_steps=1", "preview.sampler=Magic"],
        "'preview.sampler' = 'Magic' is not allowed",
    ),
    "preview.width not a multiple of 8": (
        lambda t: ["preview.every_steps=1", "preview.width=20"],
        "'preview.width' = 20 must be a multiple of 8",
    ),
}


@pytest.mark.parametrize("case", list(PREVIEW_CASES))
def test_bad_previews_fail_before_training(case, tmp_path, capsys):
    build, expected = PREVIEW_CASES[case]
    fails(train_textual_inversion.main, train_args(tmp_path, *build(tmp_path)), capsys, expected)
    assert_no_embedding_written(tmp_path)


def test_odd_but_valid_preview_prompts_render(tmp_path, capsys):
    prompts = _prompts_file(tmp_path, "a ((photo of [name] [unclosed\n" + "a photo, " * 300 + "\n")
    argv = train_args(tmp_path, *prompts, "preview.prompt=(([[x")
    assert train_textual_inversion.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "previews" / f"{NAME}-1-1.png").is_file()


# --------------------------------------------------------------------------------------------------
# The preset and the command line


def _preset(tmp: Path, content: bytes | str) -> list[str]:
    return ["--config", write(tmp / "preset.toml", content)]


def _train_cli(tmp: Path, *argv) -> list[str]:
    """Training arguments with the preset replaced."""
    return train_args(tmp)[2:] + list(argv)


CONFIG_CASES = {
    "preset missing": (lambda t: ["--config", t / "absent.toml"], "absent.toml: config file not found"),
    "preset a folder": (
        lambda t: ["--config", (t / "p").mkdir() or t / "p"],
        "p: cannot read the config file",
    ),
    "preset not TOML": (lambda t: _preset(t, "[train\nlr=1"), "preset.toml: not valid TOML"),
    "preset not UTF-8": (lambda t: _preset(t, b"# caf\xe9\n"), "preset.toml: not valid TOML"),
    "preset binary": (lambda t: _preset(t, junk(200) + b"\xff"), "preset.toml: not valid TOML"),
    "preset from a newer toolkit": (lambda t: _preset(t, "format_version = 7\n"), "format_version 7"),
    "preset with a format_version that is a word": (
        lambda t: _preset(t, 'format_version = "one"\n'),
        "format_version = 'one' is not a format number",
    ),
    "preset with a value for a table": (lambda t: _preset(t, "train = 5\n"), "'train' is not a table"),
    "preset with a table for a value": (
        lambda t: _preset(t, "[train.lr]\nx = 1\n"),
        "'train.lr' = {'x': 1} has the wrong type",
    ),
    "unknown key": (lambda t: ["train.lrr=0.1"], "unknown key 'train.lrr'; did you mean 'lr'?"),
    "wrong type": (lambda t: ["train.max_steps=many"], "'train.max_steps' = 'many' has the wrong type"),
    "out of range": (lambda t: ["train.max_steps=0"], "'train.max_steps' = 0 must be at least 1"),
    "NaN": (lambda t: ["train.noise_offset=nan"], "'train.noise_offset' = nan must be a finite number"),
    "schedule with a fractional step": (lambda t: ["train.lr=0.05:10.5"], "train.lr"),
    "a name that is a path": (lambda t: ["embedding.name=a/b"], "embedding.name = 'a/b' holds '/'"),
    "an override that is a table": (lambda t: ["train.lr.x=1"], "'train.lr'"),
    "no model": (lambda t: ["model.checkpoint=", f"embedding.name={NAME}"], "model.checkpoint is not set"),
    "an unknown option": (lambda t: ["--bogus", "x"], "unrecognized arguments: --bogus x"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_presets_and_values(case, tmp_path, capsys):
    build, expected = CONFIG_CASES[case]
    argv = _train_cli(tmp_path, *build(tmp_path))
    fails(train_textual_inversion.main, argv, capsys, expected)
    assert not (tmp_path / "run").exists()


# ==================================================================================================
# sweep_validate.py


def make_sweep_run(tmp: Path) -> Path:
    """A run folder as training writes it (config.toml on builtin:tiny, NAME-1 and NAME-2, loss.csv)."""
    run = tmp / "run"
    images = make_images(tmp / "img", count=2, size=16)
    config = load_config(
        TrainConfig,
        None,
        [
            "model.checkpoint=builtin:tiny",
            f"embedding.name={NAME}",
            f"dataset.image_dir={images}",
            "dataset.resolution=16",
        ],
    )
    write(run / "config.toml", dump_config(config))
    for step in (1, 2):
        embedding_file(run / "embeddings" / f"{NAME}-{step}.pt", torch.randn(1, WIDTH), step=step)
    write(run / "loss.csv", "step,epoch,epoch_step,loss,learn_rate\n1,0,1,0.3,0.005\n2,0,2,0.2,0.005\n")
    return run


def sweep_args(tmp: Path, run: Path, *overrides: str) -> list[str]:
    return [
        "--config",
        ROOT / "presets/validate.toml",
        f"run.folder={run}",
        'model.checkpoints=["run:checkpoint"]',
        "render.prompt=a photo of [name]-2",
        "x.type=none",
        "y.type=none",
        "render.steps=1",
        "render.width=16",
        "render.height=16",
        "render.batch_size=1",
        f"sweep.output_dir={tmp / 'out'}",
        *overrides,
    ]


def _embedding_step_2(run: Path, vectors) -> None:
    (run / "embeddings" / f"{NAME}-2.pt").unlink()
    embedding_file(run / "embeddings" / f"{NAME}-2.safetensors", vectors, step=2)


def _clip_folder(tmp: Path, damage: Callable[[Path], object] = lambda folder: None) -> Path:
    from tests.test_scoring import tiny_clip_folder

    folder = tiny_clip_folder(tmp)
    damage(folder)
    return folder


def _clip_file_of_wrong_shapes(tmp: Path) -> Path:
    from safetensors.torch import load_file

    folder = _clip_folder(tmp)
    state = load_file(folder / "model.safetensors")
    state["text_model.final_layer_norm.weight"] = torch.ones(3)
    return _save(tmp / "bent.safetensors", state)


def _scoring(path) -> list[str]:
    return [f"scoring.model={path}"]


SWEEP_CASES = {
    # name: (builder(run folder, tmp) -> extra arguments, what the line must name)
    "run folder missing": (lambda r, t: [f"run.folder={t / 'absent'}"], "absent: run folder not found"),
    "run folder a file": (lambda r, t: [f"run.folder={write(t / 'f', 'x')}"], "f: run folder not found"),
    "run folder empty": (
        lambda r, t: [f"run.folder={(t / 'e').mkdir() or t / 'e'}"],
        "e: no config.toml and embeddings of none; set run.name",
    ),
    "run without embeddings": (
        lambda r, t: shutil.rmtree(r / "embeddings"),
        f"no saved '{NAME}-N' embeddings",
    ),
    "config.toml from a newer toolkit": (
        lambda r, t: write(
            r / "config.toml",
            (r / "config.toml").read_text().replace("format_version = 1", "format_version = 5"),
        ),
        "config.toml: written by a newer version of the toolkit (format_version 5)",
    ),
    "garbage config.toml": (lambda r, t: write(r / "config.toml", "[model\n"), "config.toml: not valid TOML"),
    "binary config.toml": (
        lambda r, t: write(r / "config.toml", bytes(range(256))),
        "config.toml: not valid TOML",
    ),
    "config.toml with a bad value": (
        lambda r, t: write(
            r / "config.toml", (r / "config.toml").read_text().replace("max_steps = 1000", "max_steps = -1")
        ),
        "config.toml: 'train.max_steps' = -1 must be at least 1",
    ),
    "config.toml without a model for run:checkpoint": (
        lambda r, t: write(
            r / "config.toml", (r / "config.toml").read_text().replace('checkpoint = "builtin:tiny"', "")
        ),
        "names no model.checkpoint",
    ),
    "run.name that is not in the folder": (lambda r, t: ["run.name=other"], "no saved 'other-N' embeddings"),
    "a step that was not saved": (
        lambda r, t: ["render.prompt=a photo of [name]-7"],
        f"'{NAME}-7' is not a saved step",
    ),
    "garbage NAME-N.pt": (
        lambda r, t: write(r / "embeddings" / f"{NAME}-2.pt", junk(100)),
        f"{NAME}-2.pt: not a readable torch file",
    ),
    "NAME-N of the wrong width": (
        lambda r, t: _embedding_step_2(r, torch.ones(1, 768)),
        f"{NAME}-2.safetensors: an embedding of width 768 (SD 1.x) does not fit this SD 1.x model",
    ),
    "NAME-N of NaN vectors": (
        lambda r, t: _embedding_step_2(r, torch.full((1, WIDTH), float("nan"))),
        f"{NAME}-2.safetensors: the embedding holds NaN or infinite numbers",
    ),
    "NAME-N an SDXL pair": (
        lambda r, t: _embedding_step_2(r, {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}),
        f"{NAME}-2.safetensors: an embedding of clip_l [1, 768], clip_g [1, 1280] (SDXL) does not fit",
    ),
    "checkpoint missing": (
        lambda r, t: [f"model.checkpoints=[{json.dumps(str(t / 'absent.safetensors'))}]"],
        "absent.safetensors: no such file",
    ),
    "checkpoint truncated": (
        lambda r, t: [
            f"model.checkpoints=[{json.dumps(str(_truncated(tiny_checkpoint(t), t, 'half.safetensors')))}]"
        ],
        "half.safetensors: not a readable .safetensors file",
    ),
    "VAE that is not a VAE": (
        lambda r, t: [
            f"model.checkpoints=[{json.dumps(str(tiny_checkpoint(t)))}]",
            f"model.vae={_save(t / 'vae.safetensors', {'x.weight': torch.ones(2)})}",
        ],
        "vae.safetensors: holds no VAE weights",
    ),
    "scoring model missing": (lambda r, t: _scoring(t / "absent"), "absent: scoring model not found"),
    "scoring model an empty folder": (
        lambda r, t: _scoring((t / "c").mkdir() or t / "c"),
        "c: no config.json",
    ),
    "scoring model random bytes (.safetensors)": (
        lambda r, t: _scoring(write(t / "clip.safetensors", junk(300))),
        "clip.safetensors: neither a .safetensors nor a torch weights file",
    ),
    "scoring model random bytes (.bin)": (
        lambda r, t: _scoring(write(t / "clip.bin", junk(300))),
        "clip.bin: neither a .safetensors nor a torch weights file",
    ),
    "scoring model a file of other weights": (
        lambda r, t: _scoring(_save(t / "other.safetensors", {"weight": torch.zeros(2, 2)})),
        "other.safetensors: no 'vision_model.embeddings.patch_embedding.weight'",
    ),
    "scoring model a CLIP file of the wrong shapes": (
        lambda r, t: _scoring(_clip_file_of_wrong_shapes(t)),
        "bent.safetensors: not a transformers CLIP checkpoint (size mismatch for text_model.final_layer_norm.weight",
    ),
    "scoring model folder with broken config.json": (
        lambda r, t: _scoring(_clip_folder(t, lambda f: write(f / "config.json", "{oops"))),
        "clip: cannot load a CLIP model",
    ),
    "scoring model folder without weights": (
        lambda r, t: _scoring(_clip_folder(t, lambda f: (f / "model.safetensors").unlink())),
        "clip: cannot load a CLIP model",
    ),
    "scoring model folder with truncated weights": (
        lambda r, t: _scoring(
            _clip_folder(
                t, lambda f: write(f / "model.safetensors", (f / "model.safetensors").read_bytes()[:5000])
            )
        ),
        "clip: cannot load a CLIP model",
    ),
    "scoring model file with a broken config.json beside it": (
        lambda r, t: _scoring(
            _clip_folder(t, lambda f: write(f / "config.json", "[1,")) / "model.safetensors"
        ),
        "config.json: cannot read the CLIP config",
    ),
    "scoring model folder with a broken preprocessor_config.json": (
        lambda r, t: _scoring(_clip_folder(t, lambda f: write(f / "preprocessor_config.json", "{crop"))),
        "preprocessor_config.json: not valid JSON",
    ),
    "scoring model folder with a broken vocab.json": (
        lambda r, t: _scoring(
            _clip_folder(t, lambda f: [write(f / "vocab.json", "{x"), write(f / "merges.txt", "")])
        ),
        "clip: cannot load the tokenizer",
    ),
    "reference_dir missing": (
        lambda r, t: [*_scoring(_clip_folder(t)), f"scoring.reference_dir={t / 'refs'}"],
        "scoring.reference_dir",
    ),
    "reference_dir with a broken image": (
        lambda r, t: [
            *_scoring(_clip_folder(t)),
            f"scoring.reference_dir={write(t / 'refs' / 'a.png', 'no').parent}",
        ],
        "cannot read image",
    ),
    "render.prompt with a weight that is not a number": (
        lambda r, t: ["render.prompt=a (photo:1.2.) of [name]-2"],
        "render.prompt: '1.2.' is not a number",
    ),
    "render.negative_prompt with a weight that is not a number": (
        lambda r, t: ["render.negative_prompt=(ugly:..)"],
        "render.negative_prompt: '..' is not a number",
    ),
    "render.sampler unknown": (
        lambda r, t: ["render.sampler=Magic"],
        "'render.sampler' = 'Magic' is not allowed",
    ),
    "render.width not a multiple of 8": (
        lambda r, t: ["render.width=20"],
        "'render.width' = 20 must be a multiple of 8",
    ),
    "a size axis not a multiple of 8": (
        lambda r, t: ["x.type=size", "x.values=16x16, 30x16"],
        "x.values: size 30x16 must be multiples of 8",
    ),
    "a Prompt S/R value with a weight that is not a number": (
        lambda r, t: ["x.type=prompt_sr", "x.values=photo, (photo:1.2.3)"],
        "render.prompt: '1.2.3' is not a number",
    ),
    "a step axis of words": (
        lambda r, t: ["x.type=prompt_sr", "x.values=every x"],
        "x.values: the first Prompt S/R value 'every x' does not occur in render.prompt",
    ),
    "fine.interval that is not an interval": (
        lambda r, t: ["fine.interval=soon"],
        "fine.interval = 'soon': write FIRST-LAST",
    ),
    "output folder that is a file": (
        lambda r, t: [f"sweep.output_dir={write(t / 'o', 'x')}"],
        "o: is a file, not a folder",
    ),
    "output folder that holds a sweep": (
        lambda r, t: [f"sweep.output_dir={write(t / 'o' / 'report.html', 'x').parent}"],
        "o: already holds a sweep",
    ),
}


@pytest.mark.parametrize("case", list(SWEEP_CASES))
def test_bad_sweep_inputs(case, tmp_path, capsys):
    run = make_sweep_run(tmp_path)
    build, expected = SWEEP_CASES[case]
    extra = build(run, tmp_path)
    extra = extra if isinstance(extra, list) else []  # a builder that only damages the run adds no arguments
    fails(sweep_validate.main, sweep_args(tmp_path, run, *extra), capsys, expected)
    out = tmp_path / "out"
    assert not (out / "report.html").exists() and not (out / "cells").exists()
    no_leftovers(tmp_path)


def test_sweep_into_a_read_only_folder(tmp_path, monkeypatch, capsys):
    run = make_sweep_run(tmp_path)
    (tmp_path / "out").mkdir()
    refuse_writes(monkeypatch, tmp_path / "out", full=False)
    fails(
        sweep_validate.main,
        sweep_args(tmp_path, run),
        capsys,
        "out/config.toml: cannot write (Permission denied)",
    )


def test_odd_but_valid_sweeps_render(tmp_path, capsys):
    """Unbalanced brackets, a 1000-token prompt and a loss log with garbage rows still give a report."""
    run = make_sweep_run(tmp_path)
    with (run / "loss.csv").open("a") as log:
        log.write('3,0,3,not a number\nword\n"' + "x" * 200_000 + "\n4,0,4,0.1")
    prompt = "a ((photo [of [name]-2 " + "in a garden, " * 300
    argv = sweep_args(tmp_path, run, f"render.prompt={prompt}", "render.negative_prompt=(((ugly")
    assert sweep_validate.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "report.html").is_file()


EXPORT_CASES = {
    # name: (builder(run folder, tmp) -> arguments after the preset's, what the line must name)
    "a step that was not saved": (
        lambda r, t: ["--export", "7", "--export-to", t / "x"],
        "'d3mo-7' is not a saved step",
    ),
    "a step that is a word": (lambda r, t: ["--export", "last", "--export-to", t / "x"], "--export 'last'"),
    "no folder": (lambda r, t: ["--export", "2"], "--export needs a folder"),
    "a folder that is a file": (
        lambda r, t: ["--export", "2", "--export-to", write(t / "x", "file")],
        "x: is a file, not a folder",
    ),
    "a target that exists": (
        lambda r, t: ["--export", "2", "--export-to", write(t / "x" / f"{NAME}.pt", "old").parent],
        f"{NAME}.pt: already exists; pass --overwrite",
    ),
    "a garbage step file": (
        lambda r, t: [
            "--export",
            "2",
            "--export-to",
            t / "x",
            write(r / "embeddings" / f"{NAME}-2.pt", b"\x80\x02junk").name and "x.type=none",
        ],
        f"{NAME}-2.pt: not a readable torch file",
    ),
    "an unknown format": (
        lambda r, t: ["--export", "2", "--export-to", t / "x", 'export.formats=["safetensors", "exe"]'],
        "'export.formats' = 'exe' is not allowed. Choose one of: pt, safetensors, png, webp",
    ),
    "no formats": (
        lambda r, t: ["--export", "2", "--export-to", t / "x", "export.formats=[]"],
        "export.formats is empty",
    ),
    "recommended without scores": (
        lambda r, t: ["--export", "recommended", "--export-to", t / "x"],
        "--export recommended needs scores: set scoring.model",
    ),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_bad_exports(case, tmp_path, capsys):
    run = make_sweep_run(tmp_path)
    build, expected = EXPORT_CASES[case]
    fails(sweep_validate.main, sweep_args(tmp_path, run, *build(run, tmp_path)), capsys, expected)
    exported = [p for p in (tmp_path / "x").glob(f"{NAME}.*")] if (tmp_path / "x").is_dir() else []
    assert [p.read_text() for p in exported] in ([], ["old"])  # nothing new, nothing replaced
    assert not (tmp_path / "out").exists()  # no sweep was rendered first
    no_leftovers(tmp_path)


# ==================================================================================================
# generate_dataset.py: generate, photos, pick, select


def generate_args(tmp: Path, checkpoint: Path, *overrides: str) -> list[str]:
    return [
        "generate",
        f"model.checkpoint={checkpoint}",
        f"generate.output_dir={tmp / 'gen'}",
        "generate.prompt=a photo of a woman",
        "generate.steps=1",
        "generate.width=16",
        "generate.height=16",
        *overrides,
    ]


def _embeddings(*paths: Path) -> str:
    return f"generate.embeddings={json.dumps([str(p) for p in paths])}"


GENERATE_CASES = {
    # name: (builder(checkpoint, tmp) -> overrides, what the line must name)
    "model truncated": (
        lambda c, t: [f"model.checkpoint={_truncated(c, t, 'half.safetensors')}"],
        "half.safetensors: not a readable .safetensors file",
    ),
    "model a diffusers folder with broken JSON": (
        lambda c, t: [
            "model.checkpoint="
            + str(_diffusers_folder(c, t, lambda f: write(f / "text_encoder" / "config.json", "{")))
        ],
        "text_encoder/config.json: not valid JSON",
    ),
    "embedding missing": (
        lambda c, t: [_embeddings(t / "absent.pt")],
        "absent.pt is neither a file nor a folder",
    ),
    "embedding of random bytes": (
        lambda c, t: [_embeddings(write(t / "emb" / "junk.pt", junk(200)))],
        "junk.pt: not a readable torch file",
    ),
    "embedding truncated": (
        lambda c, t: [_embeddings(_half(embedding_file(t / "e.safetensors", torch.ones(1, WIDTH))))],
        "half-e.safetensors: not a readable .safetensors file",
    ),
    "a folder of embeddings with a corrupt one": (
        lambda c, t: [
            _embeddings(
                embedding_file(t / "emb" / "good.pt", torch.ones(1, WIDTH)).parent,
                write(t / "emb" / "sub" / "bad.safetensors", bytes(100)).parent.parent,
            )
        ],
        "bad.safetensors: not a readable .safetensors file",
    ),
    "embedding of NaN vectors": (
        lambda c, t: [_embeddings(embedding_file(t / "nan.pt", torch.full((1, WIDTH), float("nan"))))],
        "nan.pt: the embedding holds NaN or infinite numbers",
    ),
    "embedding a PNG without an embedding": (
        lambda c, t: [_embeddings(write(t / "pic.png", _png_bytes()))],
        "pic.png: this image holds no embedding",
    ),
    "prompt with a weight that is not a number": (
        lambda c, t: ["generate.prompt=a (photo:1.2.3) of a woman"],
        "'1.2.3' is not a number",
    ),
    "width not a multiple of 8": (
        lambda c, t: ["generate.width=20"],
        "'generate.width' = 20 must be a multiple of 8",
    ),
    "an axis whose first value is not in the prompt": (
        lambda c, t: ['generate.axes=["a closeup, a medium shot"]'],
        "generate.axes[1]",
    ),
    "output folder that is a file": (
        lambda c, t: [f"generate.output_dir={write(t / 'gen', 'x')}"],
        "gen is a file; choose a new folder for generate.output_dir",
    ),
    "output folder that is not empty": (
        lambda c, t: [f"generate.output_dir={write(t / 'gen' / 'old.png', 'x').parent}"],
        "gen already exists and is not empty",
    ),
    "output folder inside a file": (
        lambda c, t: [f"generate.output_dir={write(t / 'file', 'x') / 'gen'}"],
        "file/gen",
    ),
    "sampler unknown": (
        lambda c, t: ["generate.sampler=Magic"],
        "'generate.sampler' = 'Magic' is not allowed",
    ),
    "pick.background not a colour": (lambda c, t: ["pick.background=plaid"], "pick.background"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_bad_generate_inputs(case, tmp_path, checkpoint, capsys):
    build, expected = GENERATE_CASES[case]
    fails(
        generate_dataset.main,
        generate_args(tmp_path, checkpoint, *build(checkpoint, tmp_path)),
        capsys,
        expected,
    )
    gen = tmp_path / "gen"
    assert not gen.is_dir() or not list(gen.glob("*.png")) or (gen / "old.png").exists()
    no_leftovers(tmp_path)


def test_odd_but_valid_generate_inputs_render(tmp_path, checkpoint, capsys):
    """Unbalanced brackets, 1000 tokens, zero vectors, and embeddings for another model (skipped, as A1111)."""
    folder = tmp_path / "emb"
    embedding_file(folder / "zero.pt", torch.zeros(2, WIDTH))
    embedding_file(folder / "sd15.pt", torch.ones(2, 768))
    embedding_file(folder / "xl.safetensors", {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)})
    prompt = "a ((photo [of zero " + "in a garden, " * 300
    argv = generate_args(
        tmp_path, checkpoint, f"generate.prompt={prompt}", _embeddings(folder), "pick.faces=false"
    )
    assert generate_dataset.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert len(list((tmp_path / "gen").glob("*.png"))) >= 1


# --------------------------------------------------------------------------------------------------
# photos, pick, select, --reproduce


def _selection(tmp: Path, content) -> Path:
    return write(tmp / "selection.json", content if isinstance(content, bytes | str) else json.dumps(content))


def _select(tmp: Path, selection: Path) -> list:
    return [
        "select",
        selection,
        f"select.output_dir={tmp / 'kohya'}",
        f"select.name={NAME}",
        "select.class_tokens=woman",
    ]


OTHER_COMMAND_CASES = {
    # name: (builder(tmp) -> arguments, what the line must name)
    "photos: input folder missing": (
        lambda t: ["photos", f"photos.input_dir={t / 'raw'}", f"photos.output_dir={t / 'out'}"],
        "raw' is not a folder",
    ),
    "photos: input folder empty": (
        lambda t: [
            "photos",
            f"photos.input_dir={(t / 'raw').mkdir() or t / 'raw'}",
            f"photos.output_dir={t / 'out'}",
        ],
        "raw: holds no pictures",
    ),
    "photos: only broken images": (
        lambda t: [
            "photos",
            f"photos.input_dir={write(t / 'raw' / 'a.jpg', 'no').parent}",
            f"photos.output_dir={t / 'out'}",
        ],
        "raw: none of its 1 files could be prepared; the first: a.jpg: cannot read image",
    ),
    "photos: caption not UTF-8": (
        lambda t: [
            "photos",
            f"photos.input_dir={make_images(t / 'raw', count=1, size=32, caption=None)}",
            write(t / "raw" / "00.txt", LATIN1).name and f"photos.output_dir={t / 'out'}",
        ],
        "00.txt is not valid UTF-8",
    ),
    "photos: output folder is a file": (
        lambda t: [
            "photos",
            f"photos.input_dir={make_images(t / 'raw', 1)}",
            f"photos.output_dir={write(t / 'out', 'x')}",
        ],
        "out: is a file, not a folder",
    ),
    "pick: folder missing": (lambda t: ["pick", t / "absent"], "absent is not a folder"),
    "pick: folder without images": (lambda t: ["pick", (t / "e").mkdir() or t / "e"], "e holds no images"),
    "pick: a file instead of a folder": (
        lambda t: ["pick", write(t / "a.png", _png_bytes())],
        "a.png is not a folder",
    ),
    "select: selection missing": (lambda t: _select(t, t / "absent.json"), "absent.json: no such file"),
    "select: selection not JSON": (
        lambda t: _select(t, _selection(t, "{keep: [")),
        "selection.json: not a valid selection file",
    ),
    "select: selection not UTF-8": (
        lambda t: _select(t, _selection(t, b'{"a": "\xff"}')),
        "selection.json: not a valid selection file",
    ),
    "select: selection a list": (
        lambda t: _select(t, _selection(t, [1, 2])),
        "selection.json: not a selection exported",
    ),
    "select: selection a folder": (lambda t: _select(t, (t / "s.json").mkdir() or t / "s.json"), "s.json"),
    "reproduce: not a manifest": (
        lambda t: ["generate", "--reproduce", write(t / "m.json", "[]"), "--output", t / "again"],
        "m.json: not a generate_dataset.py manifest",
    ),
    "reproduce: manifest of garbage": (
        lambda t: [
            "generate",
            "--reproduce",
            write(t / "m.json", bytes(range(256))),
            "--output",
            t / "again",
        ],
        "m.json: not a valid manifest",
    ),
    "reproduce: folder without a manifest": (
        lambda t: ["generate", "--reproduce", (t / "run").mkdir() or t / "run", "--output", t / "again"],
        "no such manifest",
    ),
    "reproduce: a damaged image list": (
        lambda t: [
            "generate",
            "--reproduce",
            write(
                t / "m.json",
                json.dumps({"format": "ti-toolkit-generation", "images": [{"x": 1}], "config": {}}),
            ),
            "--output",
            t / "again",
        ],
        "m.json: image 0 must have exactly the keys file, prompt",
    ),
    "unknown command": (lambda t: ["paint"], "invalid choice: 'paint'"),
}


@pytest.mark.parametrize("case", list(OTHER_COMMAND_CASES))
def test_bad_photos_pick_select_and_reproduce(case, tmp_path, capsys):
    build, expected = OTHER_COMMAND_CASES[case]
    fails(generate_dataset.main, build(tmp_path), capsys, expected)
    no_leftovers(tmp_path)


# ==================================================================================================
# As real processes: the exit code and stderr the shell sees


PROCESS_CASES = {
    "train on a half-downloaded .ckpt": (
        lambda t, c: [
            "train_textual_inversion.py",
            *train_args(t, f"model.checkpoint={_truncated(c, t, 'half.ckpt', save_as_pickle=True)}"),
        ],
        "half.ckpt: not a readable checkpoint",
    ),
    "sweep a folder that holds no run": (
        lambda t, c: ["sweep_validate.py", *sweep_args(t, (t / "empty").mkdir() or t / "empty")],
        "empty: no config.toml and embeddings of none",
    ),
    "select a selection that is not JSON": (
        lambda t, c: ["generate_dataset.py", *_select(t, _selection(t, b"\x89PNG not json"))],
        "selection.json: not a valid selection file",
    ),
}


@pytest.mark.parametrize("case", list(PROCESS_CASES))
def test_real_processes_exit_2_with_one_line(case, tmp_path, checkpoint):
    build, expected = PROCESS_CASES[case]
    argv = [str(a) for a in build(tmp_path, checkpoint)]
    result = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=_offline_env()
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in one_error_line(result.stderr)
    assert result.stdout.count("error:") == 0  # the line goes to stderr only


def _offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ==================================================================================================
# Read-only and full folders for the other outputs


def _export_argv(tmp: Path, checkpoint: Path) -> list:
    return sweep_args(tmp, make_sweep_run(tmp), "--export", "2", "--export-to", tmp / "locked")


def _generate_argv(tmp: Path, checkpoint: Path) -> list:
    return generate_args(tmp, checkpoint, f"generate.output_dir={tmp / 'locked' / 'gen'}")


def _photos_argv(tmp: Path, checkpoint: Path) -> list:
    raw = make_images(tmp / "raw", count=1, size=32, caption=None)
    return ["photos", f"photos.input_dir={raw}", f"photos.output_dir={tmp / 'locked' / 'out'}"]


def _sweep_argv(tmp: Path, checkpoint: Path) -> list:
    return sweep_args(tmp, make_sweep_run(tmp), f"sweep.output_dir={tmp / 'locked'}")


OUTPUT_CASES = {
    # name: (script, arguments, full disk?, what the line must name)
    "export into a read-only folder": (
        sweep_validate.main,
        _export_argv,
        False,
        "locked/d3mo.pt: cannot write",
    ),
    "export onto a full disk": (sweep_validate.main, _export_argv, True, "No space left on device"),
    "sweep onto a full disk": (sweep_validate.main, _sweep_argv, True, "locked/config.toml: cannot write"),
    "generate into a read-only folder": (generate_dataset.main, _generate_argv, False, "locked/gen"),
    "photos onto a full disk": (generate_dataset.main, _photos_argv, True, "locked/out/00.png: cannot write"),
    "photos into a read-only folder": (generate_dataset.main, _photos_argv, False, "locked/out"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_read_only_and_full_output_folders(case, tmp_path, checkpoint, monkeypatch, capsys):
    main, argv, full, expected = OUTPUT_CASES[case]
    (tmp_path / "locked").mkdir()
    argv = argv(tmp_path, checkpoint)
    refuse_writes(monkeypatch, tmp_path / "locked", full=full)
    fails(main, argv, capsys, expected)
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "locked").rglob("*") if p.is_file()]  # not even an empty file
