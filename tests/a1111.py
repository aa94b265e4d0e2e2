"""A1111's rules for embedding files, written here from its sources (FACTS §1, §8) and independent of the
library's code: the safe loader's checks of a `.pt` file, and what EmbeddingDatabase.load_from_file reads."""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image


def reference_lcg():
    """A1111's generator: Numerical Recipes LCG from seed 0, each state reduced modulo 255."""
    seed = 0
    while True:
        seed = (1664525 * seed + 1013904223) % 2**32
        yield seed % 255


def reference_extract(picture: Image.Image) -> dict | None:
    """A1111's extract_image_data_embed, re-derived: crop black, split at black columns, unscramble."""
    rgb = np.array(picture.convert("RGB"), dtype=np.uint8)
    lit = np.all(rgb > 0, axis=2)
    cols, rows = lit.any(axis=0), lit.any(axis=1)
    left, right = int(np.argmax(cols)), rgb.shape[1] - int(np.argmax(cols[::-1]))
    top, bottom = int(np.argmax(rows)), rgb.shape[0] - int(np.argmax(rows[::-1]))
    nibbles = rgb[top:bottom, left:right] & 0x0F
    black = np.where(nibbles.sum(axis=(0, 2)) == 0)[0]
    if len(black) < 2:
        return None

    def unscramble(block):
        stream = reference_lcg()
        noise = np.array([next(stream) for _ in range(block.size)], dtype=np.uint8).reshape(block.shape)
        return block ^ (noise & 0x0F)

    low = unscramble(nibbles[:, : black.min()])
    high = unscramble(nibbles[:, black.max() + 1 :])
    return json.loads(
        zlib.decompress(((high << 4) | low).astype(np.uint8).tobytes()), object_hook=_tensor_hook
    )


def _tensor_hook(obj):
    return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float64) if "TORCHTENSOR" in obj else obj


def a1111_reads(path: Path):
    """A1111's EmbeddingDatabase.load_from_file decisions: returns (keyword, vectors, step, hash, ckpt name)."""
    name, ext = os.path.splitext(path.name)
    if ext.upper() in (".PNG", ".WEBP"):
        picture = Image.open(path)
        if hasattr(picture, "text") and "sd-ti-embedding" in picture.text:
            data = json.loads(base64.b64decode(picture.text["sd-ti-embedding"]), object_hook=_tensor_hook)
        else:
            data = reference_extract(picture)
        name = data.get("name", name)
    elif ext.upper() in (".PT", ".BIN"):
        a1111_check_pt(path)
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        data = safetensors.torch.load_file(path, device="cpu")
    if "string_to_param" in data:
        assert len(data["string_to_param"]) == 1, "embedding file has multiple terms in it"
        vec = next(iter(data["string_to_param"].values())).detach().float()
    elif "clip_g" in data and "clip_l" in data:
        vec = {key: value.detach().float() for key, value in data.items()}  # every item must be a tensor
    elif type(next(iter(data.values()))) is torch.Tensor:
        assert len(data) == 1, "embedding file has multiple terms in it"
        vec = next(iter(data.values())).detach().float()
    else:
        raise AssertionError("A1111 would not recognise this file")
    return name, vec, data.get("step"), data.get("sd_checkpoint"), data.get("sd_checkpoint_name")


# modules/safe.py: the archive entries it accepts, and the only globals its unpickler will build.
_A1111_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
_A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "IntStorage"),
    ("torch", "LongStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "ByteStorage"),
    ("torch", "float32"),
    ("torch", "BFloat16Storage"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("__builtin__", "set"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """The globals A1111 allows; tensors are not rebuilt (the check only needs the pickle to unpickle)."""

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage", saved_id

    def find_class(self, module, name):
        if (module, name) not in _A1111_GLOBALS:
            raise AssertionError(f"A1111 refuses the file: global '{module}/{name}' is forbidden")
        if name.startswith("_rebuild"):
            return lambda *args: None
        return set if module == "__builtin__" else getattr(__import__(module, fromlist=[name]), name)


def a1111_check_pt(path: Path) -> None:
    """A1111's check_pt: every zip entry has an allowed name, and data.pkl unpickles with only the allowed
    globals. Raises AssertionError (A1111: "Error verifying pickled file ... may be malicious")."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            assert _A1111_ENTRY.match(name), f"A1111 refuses the file: bad file inside {path}: {name}"
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        assert len(pickles) == 1, f"{len(pickles)} data.pkl in {path}"
        with archive.open(pickles[0]) as handle:
            _RestrictedUnpickler(handle).load()
