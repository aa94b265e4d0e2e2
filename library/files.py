"""Every file the toolkit writes goes through here, and so does the `.pt` container A1111 accepts.

- Atomic: the data goes to a temporary file in the target's folder, which is then renamed over the target,
  so a kill never leaves half a file; the temporary file is removed whatever happens.
- Usual permissions: the file gets the mode a plain `open()` gives (0666 minus the umask), never the
  owner-only 0600 of `tempfile.mkstemp`, whichever library writes the bytes.
- Nothing is replaced by surprise: with `overwrite=False` an existing target is a one-line `UserError`.
- A folder that is a file, is read-only or is full is a one-line `UserError` naming the path.

`pt_bytes` writes a `torch.save` archive that A1111's safe loader (`modules/safe.py`, FACTS §8) accepts.

Every weights file the toolkit reads goes through here too (`read_weights`, `read_torch`,
`read_safetensors`): a pickle that would run code is refused and never run, and a damaged or foreign file is
one line naming it.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import secrets
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from library.errors import UserError, first_line

Writer = Callable[[Path], None]  # writes the whole file at the path it is given


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create `folder` (and its parents); a path that is a file, or a read-only place, is a UserError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{folder}: is a file, not a folder; choose another output folder") from None
    except OSError as error:
        raise UserError(f"{folder}: cannot create the folder ({error.strerror})") from None
    return folder


def atomic_write(path: str | os.PathLike, data: bytes | str | Writer, *, overwrite: bool = True) -> Path:
    """Write `data` (bytes, UTF-8 text, or a function that writes a file at a given path) to `path`.

    See the module docstring for what is guaranteed. Returns `path`.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise UserError(f"{path}: already exists; nothing was replaced (choose another name or folder)")
    ensure_folder(path.parent)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as handle:
            if isinstance(data, str):
                handle.write(data.encode("utf-8"))
            elif isinstance(data, bytes | bytearray | memoryview):
                handle.write(data)
        if callable(data):
            data(temp)
        os.chmod(temp, 0o666 & ~_umask())  # some writers (safetensors) replace the file with a private one
        os.replace(temp, path)
    except OSError as error:
        raise UserError(
            f"{path}: cannot write ({error.strerror or error}); check the folder and free space"
        ) from None
    finally:
        temp.unlink(missing_ok=True)
    return path


def atomic_folder(folder: str | os.PathLike, write: Writer, *, overwrite: bool = False) -> Path:
    """Write a whole folder through `write(temporary_folder)`, then rename it into place (replacing an
    existing folder only with `overwrite=True`). Everything inside gets the usual permissions, whatever
    the libraries that wrote it chose (safetensors writes owner-only files)."""
    folder = Path(folder)
    if not overwrite and folder.exists():
        raise UserError(f"{folder}: already exists; nothing was replaced (choose another name or folder)")
    ensure_folder(folder.parent)
    temp = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.tmp")
    old = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.old")
    try:
        temp.mkdir()
        write(temp)
        file_mode, folder_mode = 0o666 & ~_umask(), 0o777 & ~_umask()
        for inner, folders, files in os.walk(temp):
            for name in files:
                os.chmod(os.path.join(inner, name), file_mode)
            for name in folders:
                os.chmod(os.path.join(inner, name), folder_mode)
        if folder.exists():
            os.replace(folder, old)
        os.replace(temp, folder)
    except OSError as error:
        raise UserError(
            f"{folder}: cannot write ({error.strerror or error}); check the folder and free space"
        ) from None
    finally:
        for leftover in (temp, old):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    return folder


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def copy_file(source: str | os.PathLike, target: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Copy the bytes of `source` to `target` atomically (never through a symbolic link's target)."""
    source = Path(source)

    def copy(temp: Path) -> None:
        # O_NOFOLLOW: a source swapped for a symbolic link after it was checked is refused, not followed.
        with (
            os.fdopen(os.open(source, os.O_RDONLY | os.O_NOFOLLOW), "rb") as reader,
            open(temp, "wb") as writer,
        ):
            shutil.copyfileobj(reader, writer)

    return atomic_write(target, copy, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------
# The `.pt` container

# Entries A1111's check_pt accepts inside the archive folder; `torch.save` also writes `.format_version` and
# `.storage_alignment`, which make A1111 refuse the file as "bad file inside ..." (possibly malicious).
_A1111_ENTRIES = ("data.pkl", "version", "byteorder", ".data/serialization_id")
_ALIGNMENT = 64  # torch aligns tensor data to 64 bytes so that it can be memory-mapped; keep that
_PADDING_HEADER = b"\xfe\xca"  # an unregistered zip extra-field id, used only to pad


def pt_bytes(obj: Any, archive: str) -> bytes:
    """`torch.save(obj)` as A1111 writes it: a zip holding only `archive/data.pkl`, `archive/data/N`,
    `archive/version`, `archive/byteorder` and `archive/.data/serialization_id`.

    A1111 names the archive folder after the file's stem (`NAME-500/data.pkl`). The pickle is torch's own,
    so it uses only the globals A1111's restricted unpickler allows for plain dicts of tensors and numbers.
    """
    import torch

    if not archive or "/" in archive or "\\" in archive:
        raise ValueError(f"archive name {archive!r} must be a plain name")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            entry = info.filename.split("/", 1)[1]
            if entry in _A1111_ENTRIES or entry.startswith("data/"):
                name = f"{archive}/{entry}"
                record = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                record.compress_type = zipfile.ZIP_STORED
                # Pad the local header so the data starts on a 64-byte boundary (30 = fixed header size).
                start = out.tell() + 30 + len(name.encode()) + 4
                padding = -start % _ALIGNMENT
                record.extra = _PADDING_HEADER + padding.to_bytes(2, "little") + b"\0" * padding
                target.writestr(record, source.read(info))
    return out.getvalue()


# --------------------------------------------------------------------------------------------------
# Reading weights safely

# What `torch.load(weights_only=True)` raises for bytes it did not write, or wrote but were cut short or
# damaged (found by truncating and corrupting real files, zip and legacy): the file's fault, not a bug.
TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    IndexError,
    KeyError,
    AssertionError,
    struct.error,
    zipfile.BadZipFile,
    OSError,
)

# Training bookkeeping that old LDM .ckpt files pickle beside the weights (Lightning callbacks, numpy step
# counters). These names are read as an inert stand-in, so none of their code runs; any other Python
# object in a pickle is refused.
_BOOKKEEPING_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "_codecs.encode",
)


class _Inert:
    """Stands in for a bookkeeping object: accepts anything, keeps nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def read_torch(path: Path, what: str, fix: str, *, allowed: tuple = ()) -> Any:
    """A `.pt`/`.ckpt`/`.bin` read by `torch.load(weights_only=True)`: a pickle that would run code is refused
    and never run, a damaged one is a UserError "`path`: not a readable `what` (...); `fix`". `allowed` adds
    classes that only restore attributes (e.g. the ParameterDict of original textual-inversion files)."""
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except TORCH_LOAD_ERRORS:
        found = []  # legacy format or damaged: the weights-only unpickler checks every global itself
    known = {f"{cls.__module__}.{cls.__qualname__}" for cls in allowed}
    refused = [name for name in found if name not in _BOOKKEEPING_GLOBALS and name not in known]
    if refused:
        raise UserError(
            f"{path}: refused: the pickle would run {refused[0]}, which a weights file never needs; {fix}"
        )
    inert = [(_Inert, name) for name in found if name in _BOOKKEEPING_GLOBALS]
    try:
        with torch.serialization.safe_globals([*inert, *allowed]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as error:
        if name := _refused_global(error):
            raise UserError(
                f"{path}: refused: the pickle would run {name}, which a weights file never needs; {fix}"
            ) from None
        raise UserError(f"{path}: not a readable {what} ({_torch_load_problem(error)}); {fix}") from None


def read_safetensors(path: Path, what: str, fix: str, *, aligned: bool = True) -> tuple[dict, dict[str, str]]:
    """The tensors and metadata of a `.safetensors` file; a damaged one is a UserError. `aligned=False` leaves
    them where they lie in the file's buffer, for a reader that copies them anyway."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            if aligned:
                tensors = {key: _aligned(tensor) for key, tensor in tensors.items()}
            return tensors, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: not a readable .safetensors {what} ({first_line(error)}); {fix}") from None


def read_weights(
    path: str | os.PathLike, what: str, fix: str, *, aligned: bool = True
) -> tuple[dict, dict[str, str]]:
    """The tensors and metadata of a weights file: `.safetensors`, or a torch pickle read weights-only (a
    nested `"state_dict"` unwrapped, its `"metadata"` kept). The format is told from the first bytes.
    `aligned`: as `read_safetensors`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the path (a diffusers model is a folder)")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        raise UserError(f"{path}: the file is empty; {fix}")
    # safetensors: an 8-byte header length, then the JSON header, which must start with "{" (the format's
    # rule); torch: a zip archive or a bare pickle. Anything else is a broken download or another file.
    if head[8:9] == b"{":
        return read_safetensors(path, "file", fix, aligned=aligned)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UserError(
            f"{path}: neither a .safetensors nor a torch {what} (it starts with {head[:8]!r}); {fix}"
        )
    data, metadata = read_torch(path, what, fix), {}
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        if isinstance(data.get("metadata"), dict):
            metadata = {str(k): str(v) for k, v in data["metadata"].items()}
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a dict of weights; {fix}")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, metadata


def _aligned(tensor):
    """A copy when the tensor sits at an odd address inside the file's buffer: CPU kernels take other
    code paths on unaligned memory (slower, and not bitwise equal to the same weights aligned)."""
    return tensor.clone() if tensor.data_ptr() % 64 else tensor


def _torch_load_problem(error: BaseException) -> str:
    """What was wrong with the bytes, in a few words (torch's messages run to paragraphs of advice, some of
    it, "re-run with weights_only=False", wrong for a file from the internet)."""
    text = str(error)
    detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(error).__name__}: {first}"[:200] if len(first) < 20 else first[:200]


def _refused_global(error: BaseException) -> str | None:
    """The Python global a weights-only `torch.load` refused to call (e.g. "pathlib.PosixPath"): such a
    file would run code. None when the bytes were simply not a pickle torch can read (damaged, foreign)."""
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        return found.group(1) if found else None
    return None
