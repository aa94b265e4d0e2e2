"""Create, load and save textual-inversion embeddings in every community format.

Reads: A1111 `.pt`/`.bin` (`string_to_param`), Kohya `emb_params` (`.safetensors` or `.pt`), OneTrainer
`emp_params`, diffusers `learned_embeds.*` (any dict holding exactly one tensor), SDXL `clip_l`/`clip_g`
pairs and A1111 image embeddings (`.png`/`.webp`). Writes: `.pt` as A1111 writes it, `.safetensors` as
Kohya writes it (plus our `ti.*` metadata keys) and `.png`/`.webp` as A1111 writes them.

As in A1111, the prompt keyword of a file is its stem (for image embeddings: the name stored inside).
Pickles are opened with `torch.load(weights_only=True)`, so a file that would run code is refused.
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from PIL import Image

from library import png_embedding
from library.errors import UserError
from library.families import FAMILIES, Family, family_of_architecture
from library.files import atomic_write, pt_bytes, read_safetensors, read_torch

# Our safetensors metadata keys; everything else in the header lands in `Embedding.metadata`.
META_NAME = "ti.name"
META_STEP = "ti.step"
META_NUM_VECTORS = "ti.num_vectors"
META_CHECKPOINT_HASH = "ti.checkpoint_hash"
META_CHECKPOINT_NAME = "ti.checkpoint_name"
# Conventional `metadata` key for the run's resolved config (JSON), so a run can be reproduced from its file.
TRAINING_SETTINGS_KEY = "ti.training_settings"
PT_METADATA_KEY = "ti.metadata"  # `.pt` key holding `metadata` (A1111, Kohya and diffusers ignore it)
STORED_NAME_KEY = "stored_name"  # `metadata` key: the name stored in a file when it differs from the stem

SDXL_KEYS = ("clip_l", "clip_g")
PICKLE_SUFFIXES = (".pt", ".bin")
SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", *png_embedding.IMAGE_FORMATS)
INIT_RULES = ("a1111", "kohya")

_A1111_STAR_TOKEN = 265  # CLIP id of "*": A1111 writes it as a constant and never reads it
_A1111_NAME_CHARS = "._- "  # besides letters and digits, what A1111 keeps in a new embedding's name


@dataclass
class Embedding:
    """A trained (or freshly initialised) textual-inversion embedding."""

    name: str  # trigger word; for files it is the stem
    vectors: torch.Tensor | dict[str, torch.Tensor]  # float32 [n, dim], or {"clip_l", "clip_g"} for SDXL
    step: int | None = None  # optimizer updates done
    checkpoint_hash: str | None = None  # A1111 short hash of the base checkpoint
    checkpoint_name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # extra keys (training settings, ...)
    family: str | None = None  # the model family it was made for (library/families.py), when known

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.vectors, dict)

    @property
    def num_vectors(self) -> int:
        """Tokens the embedding takes in a prompt."""
        if isinstance(self.vectors, dict):
            return int(self.vectors["clip_l"].shape[0])
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        """Width of one vector; for SDXL the sum 768 + 1280, which is what A1111 compares to the model."""
        if isinstance(self.vectors, dict):
            return sum(int(v.shape[-1]) for v in self.vectors.values())
        return int(self.vectors.shape[-1])


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_embedding(path: str | os.PathLike) -> Embedding:
    """Load an embedding file of any community format (see the module docstring).

    A diffusers folder holding `learned_embeds.safetensors` or `.bin` is accepted too (named after the
    folder). Vectors come back float32, on the CPU, detached. Bad input raises UserError naming the file.
    """
    path = Path(path)
    file, keyword = _find_file(path)
    suffix = file.suffix.lower()
    header: dict[str, str] = {}
    if suffix in png_embedding.IMAGE_FORMATS:
        data = png_embedding.read_image(file)
        stored = data.get("name")
        keyword = stored if isinstance(stored, str) and stored else keyword
    elif suffix == ".safetensors":
        data, header = _read_safetensors(file)
    elif suffix in PICKLE_SUFFIXES:
        data = _read_pickle(file)
    else:
        raise UserError(f"{file}: unknown embedding file type; use one of {', '.join(SUFFIXES)}")
    vectors, tensor_key = _pick_vectors(data, file)
    embedding = Embedding(name=keyword, vectors=vectors)
    _read_a1111_fields(embedding, data, file)
    _read_header(embedding, header, file)
    if tensor_key is not None and tensor_key not in ("emb_params", "emp_params"):
        embedding.metadata.setdefault(STORED_NAME_KEY, tensor_key)  # diffusers: the key is its token
    if embedding.metadata.get(STORED_NAME_KEY) == keyword:
        del embedding.metadata[STORED_NAME_KEY]
    return embedding


def _find_file(path: Path) -> tuple[Path, str]:
    """The file to read and its default keyword; checks that it exists and is not empty."""
    if path.is_dir():
        for candidate in ("learned_embeds.safetensors", "learned_embeds.bin"):
            if (path / candidate).is_file():
                return _find_file(path / candidate)[0], path.name
        raise UserError(f"{path}: folder without learned_embeds.safetensors or .bin; give the embedding file")
    if not path.is_file():
        raise UserError(f"{path}: embedding file not found; check the path")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (an interrupted download or save?); replace it")
    return path, path.stem


def _read_pickle(file: Path) -> Any:
    # ParameterDict appears in the original (LDM) textual-inversion files that A1111 also reads;
    # rebuilding one only restores attributes, it cannot call anything outside the weights-only allowlist.
    return read_torch(
        file,
        "torch file",
        "replace it (ask its author for a .safetensors file)",
        allowed=(torch.nn.ParameterDict,),
    )


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return read_safetensors(file, "file", "replace it")


def _pick_vectors(data: Any, file: Path) -> tuple[torch.Tensor | dict[str, torch.Tensor], str | None]:
    """The vectors by A1111's rules: `string_to_param` with one entry, an SDXL pair, or one lone tensor.

    Returns the vectors and, for a lone tensor, its key.
    """
    if not isinstance(data, dict):
        raise UserError(
            f"{file}: holds a {type(data).__name__}, not a dict of tensors; not an embedding file"
        )
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # ParameterDict in the original LDM files
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else "no"
            raise UserError(
                f"{file}: string_to_param has {count} entries; an embedding file holds exactly one"
            )
        return _as_matrix(next(iter(params.values())), file, "string_to_param"), None
    if all(key in data for key in SDXL_KEYS):
        pair = {key: _as_matrix(data[key], file, key) for key in SDXL_KEYS}
        if pair["clip_l"].shape[0] != pair["clip_g"].shape[0]:
            raise UserError(
                f"{file}: clip_l and clip_g have different numbers of vectors; the file is damaged"
            )
        return pair, None
    tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
    if len(tensors) == 1:
        key, tensor = next(iter(tensors.items()))
        return _as_matrix(tensor, file, str(key)), str(key)
    if not tensors:
        raise UserError(f"{file}: no tensor inside (keys: {_key_list(data)}); not an embedding file")
    raise UserError(
        f"{file}: holds {len(tensors)} tensors ({_key_list(tensors)}); an embedding file holds exactly one "
        "(or an SDXL clip_l/clip_g pair)"
    )


def _key_list(data: dict) -> str:
    keys = [str(key) for key in data][:9]
    return ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "") or "none"


def _as_matrix(value: Any, file: Path, key: str) -> torch.Tensor:
    """A float32 [n, dim] CPU copy; a single vector [dim] becomes [1, dim]."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise UserError(f"{file}: '{key}' is not a floating-point tensor; not an embedding file")
    matrix = value.detach().to("cpu", torch.float32)
    if matrix.dim() == 1:
        matrix = matrix.unsqueeze(0)
    if matrix.dim() != 2 or matrix.numel() == 0:
        raise UserError(f"{file}: '{key}' has shape {list(value.shape)}; an embedding is [vectors, width]")
    if not torch.isfinite(matrix).all():  # it would render black pictures or poison a run, silently
        raise UserError(
            f"{file}: the embedding holds NaN or infinite numbers ('{key}'); use another file "
            "(from a run that diverged: an earlier step)"
        )
    return matrix.contiguous().clone()


def _read_a1111_fields(embedding: Embedding, data: dict, file: Path) -> None:
    """Fields of the A1111 dict (in `.pt` files and image embeddings)."""
    embedding.step = _optional_int(data.get("step"), file, "step")
    for attribute, key in (("checkpoint_hash", "sd_checkpoint"), ("checkpoint_name", "sd_checkpoint_name")):
        setattr(embedding, attribute, None if data.get(key) is None else str(data[key]))
    stored = data.get("name")
    if isinstance(stored, str) and stored:
        embedding.metadata[STORED_NAME_KEY] = stored
    extra = data.get(PT_METADATA_KEY)
    if isinstance(extra, dict):
        embedding.metadata.update({str(key): str(value) for key, value in extra.items()})


def _read_header(embedding: Embedding, header: dict[str, str], file: Path) -> None:
    """Our `ti.*` safetensors keys go to the fields, the ModelSpec architecture to `family` (the other
    `modelspec.*` keys are written afresh from it and the name); other keys to `metadata`."""
    fields = {META_NAME, META_STEP, META_NUM_VECTORS, META_CHECKPOINT_HASH, META_CHECKPOINT_NAME}
    embedding.metadata.update(
        {
            key: value
            for key, value in header.items()
            if key not in fields and not key.startswith("modelspec.")
        }
    )
    made_for = family_of_architecture(header.get("modelspec.architecture", ""))
    embedding.family = made_for.name if made_for else None
    if META_STEP in header:
        embedding.step = _optional_int(header[META_STEP], file, META_STEP)
    embedding.checkpoint_hash = header.get(META_CHECKPOINT_HASH, embedding.checkpoint_hash)
    embedding.checkpoint_name = header.get(META_CHECKPOINT_NAME, embedding.checkpoint_name)
    if header.get(META_NAME):
        embedding.metadata[STORED_NAME_KEY] = header[META_NAME]


def _optional_int(value: Any, file: Path, key: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise UserError(f"{file}: '{key}' is {value!r}, not a whole number; fix or remove it")


# ---------------------------------------------------------------------------------------------------------
# Saving


def save_embedding(
    embedding: Embedding,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    image: Image.Image | None = None,
) -> Path:
    """Write `embedding` in the format its suffix names and return the path.

    `.pt`: A1111's dict (string_to_token, string_to_param, name, step, sd_checkpoint, sd_checkpoint_name;
    plus `ti.metadata` when `metadata` is not empty). `.safetensors`: Kohya's `{"emb_params": [n, dim]}` with
    modelspec and `ti.*` metadata (`metadata` entries override the modelspec defaults). `.png`/`.webp`:
    A1111's image embedding on `image`, or on a generated card. SDXL embeddings are written as the bare
    `{"clip_l", "clip_g"}` pair in every format, because A1111 refuses that pair with other keys beside it.
    The write is atomic; an existing file is replaced only with `overwrite=True`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _WRITERS:
        raise UserError(f"{path}: cannot save an embedding as '{suffix}'; use one of {', '.join(_WRITERS)}")
    if image is not None and suffix not in png_embedding.IMAGE_FORMATS:
        raise UserError(f"{path}: a picture can only be stored in a .png or .webp embedding")
    tensors = _checked_tensors(embedding, path)
    _extra_metadata(embedding)  # checks the metadata before anything is written
    return atomic_write(
        path, lambda temp: _WRITERS[suffix](embedding, tensors, temp, image, path.stem), overwrite=overwrite
    )


def _checked_tensors(embedding: Embedding, path: Path) -> dict[str, torch.Tensor]:
    """The tensors to write (float32, contiguous, CPU), keyed as the file will hold them."""
    if not embedding.name:
        raise UserError(f"{path}: the embedding has no name; give it one")
    vectors = embedding.vectors
    if isinstance(vectors, dict):
        if set(vectors) != set(SDXL_KEYS):
            raise UserError(f"{path}: SDXL vectors must be keyed clip_l and clip_g, got {sorted(vectors)}")
        tensors = {key: vectors[key] for key in SDXL_KEYS}
    else:
        tensors = {"emb_params": vectors}
    out = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.numel() == 0:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(f"{path}: vectors '{key}' have shape {shape}; expected [num_vectors, width]")
        out[key] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    if len({t.shape[0] for t in out.values()}) != 1:
        raise UserError(f"{path}: clip_l and clip_g must have the same number of vectors")
    return out


def _a1111_dict(embedding: Embedding, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The dict A1111's Embedding.save writes (or the bare SDXL pair)."""
    if embedding.is_sdxl:
        return dict(tensors)
    data: dict[str, Any] = {
        "string_to_token": {"*": _A1111_STAR_TOKEN},
        "string_to_param": {"*": tensors["emb_params"]},
        "name": embedding.name,
        "step": embedding.step,
        "sd_checkpoint": embedding.checkpoint_hash,
        "sd_checkpoint_name": embedding.checkpoint_name,
    }
    extra = _extra_metadata(embedding)
    if extra:
        data[PT_METADATA_KEY] = extra
    return data


def _extra_metadata(embedding: Embedding) -> dict[str, str]:
    extra = {key: value for key, value in embedding.metadata.items() if key != STORED_NAME_KEY}
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UserError(f"embedding metadata {key!r}: keys and values must be strings, got {value!r}")
    return extra


def _safetensors_header(embedding: Embedding) -> dict[str, str]:
    """Kohya's modelspec keys, then the caller's metadata, then our `ti.*` fields."""
    extra = _extra_metadata(embedding)
    made_for = FAMILIES[embedding.family] if embedding.family in FAMILIES else _guess_family(embedding)
    header = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{made_for.architecture}/textual-inversion",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": embedding.name,
        "modelspec.trigger_phrase": embedding.name,
        "modelspec.resolution": f"{made_for.resolution}x{made_for.resolution}",
        "modelspec.prediction_type": "v" if made_for.prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }
    header.update(extra)
    header[META_NAME] = embedding.name
    header[META_NUM_VECTORS] = str(embedding.num_vectors)
    optional = {
        META_STEP: embedding.step,
        META_CHECKPOINT_HASH: embedding.checkpoint_hash,
        META_CHECKPOINT_NAME: embedding.checkpoint_name,
    }
    header.update({key: str(value) for key, value in optional.items() if value is not None})
    return header


def _guess_family(embedding: Embedding) -> Family:
    if embedding.is_sdxl:
        return FAMILIES["sdxl"]
    # 1024-wide vectors come from SD 2.x (OpenCLIP ViT-H); everything else is treated as SD 1.x.
    return FAMILIES["sd2" if embedding.width == 1024 else "sd1"]


def _write_pt(
    embedding: Embedding, tensors: dict[str, torch.Tensor], temp: Path, image: Any, stem: str
) -> None:
    # A1111's safe loader refuses torch.save's own archive; its folder is named after the file, as A1111's.
    temp.write_bytes(pt_bytes(_a1111_dict(embedding, tensors), archive=stem))


def _write_safetensors(
    embedding: Embedding, tensors: dict[str, torch.Tensor], temp: Path, image: Any, stem: str
) -> None:
    temp.write_bytes(safetensors.torch.save(tensors, metadata=_safetensors_header(embedding)))


def _write_image(
    embedding: Embedding,
    tensors: dict[str, torch.Tensor],
    temp: Path,
    image: Any,
    stem: str,
    *,
    image_format: str,
) -> None:
    if image is None:
        lines = [
            f"{embedding.num_vectors} vectors"
            + ("" if embedding.step is None else f", step {embedding.step}")
        ]
        if embedding.checkpoint_name or embedding.checkpoint_hash:
            lines.append(f"{embedding.checkpoint_name or ''} [{embedding.checkpoint_hash or '?'}]".strip())
        image = png_embedding.plain_card(f"<{embedding.name}>", lines)
    first_vector = next(iter(tensors.values()))[0].numpy()
    png_embedding.write_image(temp, image_format, image, _a1111_dict(embedding, tensors), first_vector)


_WRITERS: dict[str, Callable[..., None]] = {
    ".pt": _write_pt,
    ".safetensors": _write_safetensors,
    ".png": functools.partial(_write_image, image_format="PNG"),
    ".webp": functools.partial(_write_image, image_format="WEBP"),
}


# ---------------------------------------------------------------------------------------------------------
# Creating


def init_vectors(
    tokenizer, text_encoder, init_text: str, num_vectors: int, rule: str = "a1111"
) -> torch.Tensor:
    """Starting vectors [num_vectors, width] (float32, CPU) copied from rows of the token-embedding table.

    The init text is tokenized without special tokens and cut to `num_vectors` tokens. Rule "a1111":
    vector i = init row `i * n_init // num_vectors` (blocks: `woman` with 4 vectors gives four copies);
    rule "kohya": row `i % n_init` (cyclic). Empty init text gives zeros, as in A1111. Text that
    tokenizes to nothing (only spaces) also gives zeros, where A1111 would fail with an IndexError.
    """
    if rule not in INIT_RULES:
        raise UserError(f"init rule {rule!r} is unknown; use one of {', '.join(INIT_RULES)}")
    if num_vectors < 1:
        raise UserError(f"num_vectors is {num_vectors}; an embedding needs at least 1 vector")
    table = text_encoder.get_input_embeddings().weight.detach()
    vectors = torch.zeros(num_vectors, table.shape[1], dtype=torch.float32)
    ids = _token_ids(tokenizer, init_text, max_tokens=num_vectors) if init_text else []
    if not ids:
        return vectors
    rows = table[torch.tensor(ids, device=table.device)].to("cpu", torch.float32)
    for i in range(num_vectors):
        vectors[i] = rows[i * len(ids) // num_vectors if rule == "a1111" else i % len(ids)]
    return vectors


def _token_ids(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    kwargs = {"truncation": True, "max_length": max_tokens} if max_tokens else {}
    return list(tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"])


def name_warnings(tokenizer, name: str, loaded_names: Iterable[str] = ()) -> list[str]:
    """Human-readable warnings about a new embedding's name (an empty list when it is a good name).

    A1111 finds embeddings in prompts by their token ids, longest match first, so a name that is one
    existing token takes over that word, and names whose tokens start alike shadow each other.
    """
    if not name or not name.strip():
        raise UserError("the embedding name is empty; choose a short, rare word such as 'sksperson'")
    warnings = []
    ids = _token_ids(tokenizer, name)
    if len(ids) == 1:
        token = tokenizer.convert_ids_to_tokens(ids[0]).removesuffix("</w>")
        warnings.append(
            f"name {name!r} is the single CLIP token {token!r} (id {ids[0]}): the model already knows it, "
            "and every prompt that uses that word would get the embedding instead; pick a rarer word"
        )
    kept = "".join(c for c in name if c.isalnum() or c in _A1111_NAME_CHARS)
    if kept != name:
        warnings.append(
            f"name {name!r}: A1111 keeps only letters, digits, '.', '_', '-' and spaces ({kept!r})"
        )
    for other in loaded_names:
        other_ids = _token_ids(tokenizer, other)
        if other_ids == ids:
            warnings.append(
                f"name {name!r} has the same tokens as the loaded embedding {other!r}: one hides the other"
            )
        elif _starts_with(other_ids, ids) or _starts_with(ids, other_ids):
            shorter, longer = (name, other) if len(ids) < len(other_ids) else (other, name)
            warnings.append(
                f"name {name!r} collides with the loaded embedding {other!r}: the tokens of {shorter!r} begin "
                f"those of {longer!r}, so prompts that continue {shorter!r} that way get {longer!r}"
            )
    return warnings


def _starts_with(sequence: list[int], prefix: list[int]) -> bool:
    return len(prefix) < len(sequence) and sequence[: len(prefix)] == prefix
