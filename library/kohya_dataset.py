"""Which images a run trains on, with which captions and settings: Kohya folders (`<repeats>_<class>`),
flat A1111 folders, and Kohya dataset TOMLs (subsets, repeats, caption options), read as Kohya reads them.

Problems that training can survive (a folder without a repeat prefix, a dataset-config key we accept but
ignore) are reported with `warnings.warn(..., DataWarning)`; scripts show them as log lines. Anything that
would make training wrong raises `UserError`.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

from library.buckets import BucketSettings, check_buckets
from library.captions import caption_from_stem, check_caption_extension, read_caption, read_text_file
from library.config import as_size
from library.errors import UserError
from library.images import list_images
from library.prompts import check_attention
from library.tables import DatasetConfig as DataSettings  # the [dataset] table of a preset

# Kohya folder names: "<repeats>_<class tokens>"; Kohya also accepts a bare "<repeats>".
_KOHYA_FOLDER = re.compile(r"(\d+)(?:_(.*))?", re.DOTALL)


class DataWarning(UserWarning):
    """A dataset problem that training survives: a skipped folder, an ignored dataset-config key."""


@dataclass
class ImageRecord:
    """One training image with the settings of the folder or subset it came from."""

    path: Path
    caption: str  # caption file, else class tokens, else A1111 words from the file stem
    repeats: int
    class_tokens: str = ""
    flip_aug: bool = False
    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    resolution: tuple[int, int] = (512, 512)  # (width, height)
    caption_prefix: str = ""  # Kohya subset options, added around the caption after tag processing
    caption_suffix: str = ""
    buckets: BucketSettings | None = None  # aspect-ratio buckets of its dataset; None = cut to resolution


def scan_images(settings: DataSettings) -> list[ImageRecord]:
    """Find the training images and their captions.

    With `settings.dataset_config`, read the Kohya dataset TOML; otherwise `settings.image_dir` is either
    a Kohya parent folder (subfolders `<repeats>_<class tokens>`) or a flat folder of images (repeats 1).
    """
    if settings.dataset_config:
        return records_from_dataset_config(Path(settings.dataset_config).expanduser(), settings)
    if not settings.image_dir:
        raise UserError("no training images: set image_dir (a folder of images) or dataset_config (a TOML)")
    for note in settings.bucket_settings()[1]:
        _warn(f"{note}, as Kohya does")
    return scan_folder(Path(settings.image_dir).expanduser(), settings)


def scan_folder(root: Path, settings: DataSettings) -> list[ImageRecord]:
    """Records of a Kohya parent folder or, when it has no `<repeats>_...` subfolders, of a flat folder."""
    if not root.is_dir():
        raise UserError(f"image_dir {root} does not exist or is not a folder")
    subfolders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=str)
    parsed = [(folder, _parse_kohya_name(folder.name)) for folder in subfolders]
    kohya = [(folder, spec) for folder, spec in parsed if spec is not None]
    direct = list_images(root)
    if not kohya:
        if not direct:
            hint = (
                " (name subfolders like '10_sks woman': 10 repeats, class tokens 'sks woman')"
                if subfolders
                else ""
            )
            raise UserError(f"image_dir {root} has no images and no <repeats>_<class> subfolders{hint}")
        if subfolders:
            _warn(
                f"{root}: using the images directly inside it; subfolders without a repeat prefix are ignored"
            )
        return [make_record(path, settings, repeats=1) for path in direct]
    for folder, spec in parsed:
        if spec is None:
            _warn(f"skipping folder {folder}: its name has no repeat count (name it like '10_sks woman')")
    if direct:
        _warn(
            f"{root}: {len(direct)} images directly inside it are ignored; only <repeats>_<class> subfolders count"
        )
    records = []
    for folder, (repeats, class_tokens) in kohya:
        if repeats < 1:
            _warn(f"skipping folder {folder}: 0 repeats")
            continue
        images = list_images(folder)
        if not images:
            _warn(f"skipping folder {folder}: it has no images")
        records += [make_record(p, settings, repeats=repeats, class_tokens=class_tokens) for p in images]
    if not records:
        raise UserError(f"image_dir {root}: none of its <repeats>_<class> subfolders holds any images")
    return records


def _parse_kohya_name(name: str) -> tuple[int, str] | None:
    match = _KOHYA_FOLDER.fullmatch(name)
    return (int(match.group(1)), match.group(2) or "") if match else None


def make_record(
    path: Path, settings: DataSettings, *, repeats: int, class_tokens: str = "", **options
) -> ImageRecord:
    """One record; `options` override the ImageRecord fields that otherwise come from `settings`."""
    values = dict(
        flip_aug=settings.flip_aug,
        shuffle_tags=settings.shuffle_tags,
        keep_tokens=settings.keep_tokens,
        tag_dropout=settings.tag_dropout,
        resolution=settings.size,
        caption_extension=settings.caption_extension,
        buckets=settings.bucket_settings()[0],
    )
    values.update(options)
    extension = values.pop("caption_extension")
    caption, source = read_caption(path, extension), path.with_name(path.stem + extension)
    if caption is None:
        _warn_other_caption_extension(path, extension)
        caption = class_tokens or caption_from_stem(
            path.stem, settings.filename_word_regex, settings.filename_join_string
        )
        source = path.parent if class_tokens else path  # the folder's name or the image's
    check_attention(caption, str(source))
    return ImageRecord(path=path, caption=caption, repeats=repeats, class_tokens=class_tokens, **values)


def _warn_other_caption_extension(path: Path, extension: str) -> None:
    # Kohya writes ".caption", A1111 ".txt": a mismatch silently trains on fallback captions otherwise.
    for other in (".txt", ".caption"):
        if other != extension and path.with_name(path.stem + other).is_file():
            _warn(
                f"{path.parent}: found {other} caption files but caption_extension is {extension!r}; "
                f"set caption_extension = {other!r} to use them"
            )


def _warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)


# Kohya dataset-config keys and their types. Subset keys may sit in [general], [[datasets]] or
# [[datasets.subsets]] and fall back in that order; dataset keys may sit in [general] or [[datasets]].
_SUBSET_KEYS = {
    "num_repeats": int,
    "class_tokens": str,
    "caption_extension": str,
    "shuffle_caption": bool,
    "keep_tokens": int,
    "flip_aug": bool,
    "caption_tag_dropout_rate": float,
    "caption_prefix": str,
    "caption_suffix": str,
}
_BUCKET_KEYS = {
    "enable_bucket": bool,
    "min_bucket_reso": int,
    "max_bucket_reso": int,
    "bucket_reso_steps": int,
    "bucket_no_upscale": bool,
}
_DATASET_KEYS = {"resolution": list, "batch_size": int, **_BUCKET_KEYS}
_SUBSET_ONLY_KEYS = {"image_dir": str, "is_reg": bool}
# Accepted so that Kohya configs load, but not implemented: key -> (Kohya's default, why). A value other
# than the default gives a DataWarning.
_IGNORED_SUBSET_KEYS = {
    "color_aug": (False, "colour augmentation is not implemented"),
    "random_crop": (False, "images are always centre-cropped"),
    "face_crop_aug_range": (None, "face-crop augmentation is not implemented"),
    "caption_separator": (",", "tags are always separated by ','"),
    "keep_tokens_separator": ("", "use keep_tokens instead"),
    "secondary_separator": ("", "secondary separators are not implemented"),
    "enable_wildcard": (False, "wildcard captions are not implemented; the first caption line is used"),
    "token_warmup_min": (1, "token warmup is not implemented"),
    "token_warmup_step": (0, "token warmup is not implemented"),
    "caption_dropout_rate": (0, "whole-caption dropout is not implemented; use caption_tag_dropout_rate"),
    "caption_dropout_every_n_epochs": (0, "whole-caption dropout is not implemented"),
    "cache_info": (False, "the image list is read at every start"),
}
_IGNORED_DATASET_KEYS = {
    "network_multiplier": (1.0, "it applies to LoRA networks only"),
}
_UNSUPPORTED_KEYS = {
    "metadata_file": "fine-tuning datasets (metadata_file) are not supported; put captions in files beside the images",
    "conditioning_data_dir": "ControlNet datasets are not supported",
}
_GENERAL_ALLOWED = {**_SUBSET_KEYS, **_DATASET_KEYS, **_IGNORED_SUBSET_KEYS, **_IGNORED_DATASET_KEYS}
_TABLE_KEYS = {
    "[general]": set(_GENERAL_ALLOWED),
    "[[datasets]]": set(_GENERAL_ALLOWED) | {"subsets"},
    "[[datasets.subsets]]": set(_SUBSET_KEYS) | set(_SUBSET_ONLY_KEYS) | set(_IGNORED_SUBSET_KEYS),
}


def read_dataset_config(path: Path) -> dict:
    """Parse and check a Kohya dataset TOML: unknown keys and wrong types are UserErrors naming the key."""
    if not path.is_file():
        raise UserError(f"dataset_config {path} not found")
    try:
        config = tomllib.loads(read_text_file(path))
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"dataset_config {path} is not valid TOML: {error}") from error
    for key in config:
        if key not in ("general", "datasets"):
            _unknown_key(path, key, "the top level", {"general", "datasets"})
    general = config.get("general", {})
    datasets = config.get("datasets", [])
    if not isinstance(general, dict) or not isinstance(datasets, list) or not datasets:
        raise UserError(f"dataset_config {path} needs a [[datasets]] table with [[datasets.subsets]] in it")
    _check_table(path, "[general]", general)
    for dataset in datasets:
        _check_table(path, "[[datasets]]", dataset)
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not subsets or not all(isinstance(t, dict) for t in subsets):
            raise UserError(
                f"dataset_config {path}: every [[datasets]] needs at least one [[datasets.subsets]]"
            )
        for subset in subsets:
            _check_table(path, "[[datasets.subsets]]", subset)
            if "image_dir" not in subset:
                raise UserError(f"dataset_config {path}: a [[datasets.subsets]] has no image_dir")
            if not subset["image_dir"].strip():  # "" would silently mean the TOML's own folder
                raise UserError(f"dataset_config {path}: a [[datasets.subsets]] has an empty image_dir")
    return config


def _check_table(path: Path, where: str, table: dict) -> None:
    if not isinstance(table, dict):
        raise UserError(f"dataset_config {path}: {where} must be a table, not {table!r}")
    for key, value in table.items():
        if key in _UNSUPPORTED_KEYS:
            raise UserError(f"dataset_config {path}: {key}: {_UNSUPPORTED_KEYS[key]}")
        if key not in _TABLE_KEYS[where]:
            _unknown_key(path, key, where, _TABLE_KEYS[where])
        expected = {**_SUBSET_KEYS, **_DATASET_KEYS, **_SUBSET_ONLY_KEYS}.get(key)
        if expected is list:
            try:
                as_size(value)  # resolution: int or [width, height]
            except UserError as error:
                raise UserError(f"dataset_config {path}: {error}") from None
        elif expected is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"dataset_config {path}: {key} in {where} must be a number, not {value!r}")
        elif expected is not None and (type(value) is not expected):
            raise UserError(
                f"dataset_config {path}: {key} in {where} must be {expected.__name__}, not {value!r}"
            )


def _unknown_key(path: Path, key: str, where: str, allowed: set[str]) -> None:
    home = [table for table, keys in _TABLE_KEYS.items() if key in keys]
    if home:
        raise UserError(f"dataset_config {path}: key {key!r} is not allowed in {where}; put it in {home[-1]}")
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(sorted(allowed))}"
    raise UserError(f"dataset_config {path}: unknown key {key!r} in {where}; {hint}")


def records_from_dataset_config(path: Path, settings: DataSettings) -> list[ImageRecord]:
    """Records of every subset of a Kohya dataset TOML; each value falls back subset -> dataset -> general
    -> `settings`. Relative image_dir paths are taken from the TOML's folder if they exist there, else
    from the working directory (Kohya's rule)."""
    config = read_dataset_config(path)
    general = config.get("general", {})
    _warn_ignored_keys(
        path, [general, *config["datasets"]], [s for d in config["datasets"] for s in d["subsets"]]
    )
    records = []
    for dataset in config["datasets"]:
        buckets = _dataset_buckets(path, settings, (dataset, general))
        for subset in dataset["subsets"]:
            records += _subset_records(path, settings, (subset, dataset, general), buckets)
    if not records:
        raise UserError(f"dataset_config {path}: its subsets hold no training images")
    sizes = sorted({record.resolution for record in records})
    if len(sizes) > 1:  # one base size for all: previews render at it, and the buckets share its area
        raise UserError(f"dataset_config {path}: datasets use different resolutions {sizes}; set one for all")
    return records


def _dataset_buckets(path: Path, settings: DataSettings, tables: tuple[dict, ...]) -> BucketSettings | None:
    """The aspect-ratio buckets of one [[datasets]] (its keys fall back to [general], then `settings`)."""

    def value(key: str):
        return next((table[key] for table in tables if key in table), getattr(settings, key))

    if not value("enable_bucket"):
        return None
    keys = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
    try:
        buckets, notes = check_buckets(
            as_size(value("resolution") or settings.size), *(value(key) for key in keys)
        )
    except UserError as error:
        raise UserError(f"dataset_config {path}: {error}") from None
    for note in notes:
        _warn(f"{path}: {note}, as Kohya does")
    return buckets


def _subset_records(
    path: Path, settings: DataSettings, tables: tuple[dict, ...], buckets: BucketSettings | None
) -> list[ImageRecord]:
    def value(key: str, default):
        return next((table[key] for table in tables if key in table), default)

    image_dir = Path(tables[0]["image_dir"]).expanduser()
    if not image_dir.is_absolute() and (path.parent / image_dir).is_dir():
        image_dir = path.parent / image_dir
    if tables[0].get("is_reg", False):
        _warn(f"{path}: skipping regularization subset {image_dir} (is_reg): TI training does not use it")
        return []
    if not image_dir.is_dir():
        raise UserError(f"dataset_config {path}: image_dir {image_dir} does not exist or is not a folder")
    images = list_images(image_dir)
    if not images:
        raise UserError(
            f"dataset_config {path}: image_dir {image_dir} has no images (.png .jpg .jpeg .webp .bmp)"
        )
    repeats = value("num_repeats", 1)
    dropout = float(value("caption_tag_dropout_rate", settings.tag_dropout))
    keep_tokens = value("keep_tokens", settings.keep_tokens)
    if repeats < 1 or keep_tokens < 0 or not 0 <= dropout < 1:
        raise UserError(
            f"dataset_config {path}: subset {image_dir} needs num_repeats >= 1, keep_tokens >= 0 "
            "and 0 <= caption_tag_dropout_rate < 1"
        )
    options = dict(
        caption_extension=check_caption_extension(
            value("caption_extension", settings.caption_extension),
            f"dataset_config {path}: caption_extension",
        ),
        flip_aug=value("flip_aug", settings.flip_aug),
        shuffle_tags=value("shuffle_caption", settings.shuffle_tags),
        keep_tokens=keep_tokens,
        tag_dropout=dropout,
        resolution=as_size(value("resolution", settings.resolution) or settings.size),
        caption_prefix=value("caption_prefix", ""),
        caption_suffix=value("caption_suffix", ""),
        buckets=buckets,
    )
    class_tokens = value("class_tokens", "")
    return [make_record(p, settings, repeats=repeats, class_tokens=class_tokens, **options) for p in images]


def _warn_ignored_keys(path: Path, upper: list[dict], subsets: list[dict]) -> None:
    ignored = {**_IGNORED_SUBSET_KEYS, **_IGNORED_DATASET_KEYS}
    seen = set()
    for table in [*upper, *subsets]:
        for key, value in table.items():
            if key in ignored and value != ignored[key][0] and (key, repr(value)) not in seen:
                seen.add((key, repr(value)))
                _warn(f"{path}: {key} = {value!r} is ignored: {ignored[key][1]}")


def dataset_config_batch_size(path: str | Path) -> int | None:
    """The batch_size a Kohya dataset TOML asks for (None if it sets none); one value for all datasets."""
    config = read_dataset_config(Path(path).expanduser())
    general = config.get("general", {})
    sizes = {dataset.get("batch_size", general.get("batch_size")) for dataset in config["datasets"]}
    if len(sizes) > 1:
        raise UserError(
            f"dataset_config {path}: datasets ask for different batch_size values {sorted(sizes, key=str)}; "
            "use one batch_size for all"
        )
    return sizes.pop()
