"""Every file the stages write goes through library.files (written whole or not at all): weights, JSON,
marker files, and a trainer's state in shards small enough to come back from a device call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from library.files import atomic_folder, atomic_write

SHARD_BYTES = 15_000_000  # a device call brings back files of at most 16 MiB


def save_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda temp: save_file(tensors, temp))


def write_json(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=1))


def save_shards(
    tensors: dict[str, torch.Tensor], folder: Path, meta: dict, copies: tuple[Path, ...] = ()
) -> None:
    """`folder`/state-N.safetensors (each under SHARD_BYTES unless one tensor is larger), state.json with
    `meta`, and a copy of each file of `copies`; the folder is replaced whole."""

    def write(temp: Path) -> None:
        shard, size, index = {}, 0, 0
        for key, value in tensors.items():
            value = value.detach().cpu().contiguous()
            if shard and size + value.nbytes > SHARD_BYTES:
                save_file(shard, temp / f"state-{index}.safetensors")
                shard, size, index = {}, 0, index + 1
            shard[key], size = value, size + value.nbytes
        save_file(shard, temp / f"state-{index}.safetensors")
        (temp / "state.json").write_text(json.dumps(meta, indent=1))
        for file in copies:
            shutil.copyfile(file, temp / file.name)

    atomic_folder(folder, write, overwrite=True)


def load_shards(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    for file in sorted(folder.glob("state-*.safetensors")):
        tensors.update(load_file(file))
    return tensors, json.loads((folder / "state.json").read_text())


def prefixed(prefix: str, tensors: dict) -> dict:
    """The tensors whose keys start with `prefix`, without it."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
