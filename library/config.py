"""Typed TOML configuration: each table is a frozen dataclass, and this is the only place defaults live.

A preset is loaded with `load_config(TrainConfig, "presets/face.toml", ["train.lr=0.002"])`:
unknown keys, wrong types and values out of range are one-line `UserError`s naming the key (and the
closest valid one), checked before anything is loaded. `dump_config` writes the fully resolved config,
with its `format_version`, beside every output (the run's record), so a run can be reproduced and later
tools can read it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from library.captions import check_caption_extension
from library.errors import UserError

# The layout of the tables. Every resolved config.toml records it; a record of an older layout is upgraded
# on reading by `_UPGRADES` (format N -> N + 1); a newer one is refused with a clear line.
CONFIG_FORMAT = 1
_UPGRADES: dict[int, Callable[[dict], dict]] = {}

# "builtin:toy" is the embedded toy model (a try-out that learns on a CPU); "builtin:tiny" a random model
# for tests. Real work names a checkpoint file or a diffusers folder.
BUILTIN_MODELS = ("builtin:toy", "builtin:tiny")


def at_least(low: float, default: Any) -> Any:
    """A field whose value must be `low` or more."""
    return field(default=default, metadata={"test": lambda v: v >= low, "problem": f"must be at least {low}"})


def image_side(default: int, *, zero: str = "") -> Any:
    """An image side in pixels: a positive multiple of 8 (SD's VAE halves the image three times); with
    `zero`, 0 is allowed too and means what `zero` says."""
    return field(
        default=default,
        metadata={
            "test": lambda v: (v == 0 and bool(zero)) or (v >= 8 and v % 8 == 0),
            "problem": "must be a multiple of 8, e.g. 512" + (f" (or 0 = {zero})" if zero else ""),
        },
    )


def between(low: float, high: float, default: Any) -> Any:
    """A field whose value must lie in [low, high]."""
    return field(
        default=default, metadata={"test": lambda v: low <= v <= high, "problem": f"must be {low} to {high}"}
    )


def above(low: float, default: Any) -> Any:
    """A field whose value must be more than `low` (a number; schedule strings are checked elsewhere)."""
    return field(
        default=default,
        metadata={"test": lambda v: isinstance(v, str) or v > low, "problem": f"must be above {low}"},
    )


def as_size(resolution: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Normalise a resolution to (width, height); an int means a square. Kohya writes [width, height]."""
    if isinstance(resolution, bool):
        raise UserError(f"resolution must be a number or [width, height], not {resolution!r}")
    if isinstance(resolution, int):
        size = (resolution, resolution)
    elif isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        size = (resolution[0], resolution[1])
    else:
        raise UserError(f"resolution must be a number or [width, height], not {resolution!r}")
    for side in size:
        # Multiples of 8: SD's VAE halves the image three times; anything else is silently cropped.
        if not isinstance(side, int) or isinstance(side, bool) or side <= 0 or side % 8:
            raise UserError(
                f"resolution {list(size)} must be positive multiples of 8 (e.g. 512 or [768, 512])"
            )
    return size


def check_name(value: str, key: str) -> str:
    """A trigger word becomes a file name (NAME.pt, embeddings/NAME-N.pt): it must be a plain name."""
    if not value.strip():
        raise UserError(f"{key} is empty: set the trigger word, e.g. {key}=fr3nchl4dy")
    bad = re.search(r"[/\\:\x00-\x1f]", value)
    if bad or value.startswith(".") or len(value) > 100:
        why = (
            f"holds {bad.group()!r}" if bad else "starts with '.'" if value.startswith(".") else "is too long"
        )
        raise UserError(
            f"{key} = {value!r} {why}: a trigger word is also a file name; use letters, digits, '_' and '-'"
        )
    return value


def check_model(model: Any, key: str = "model.checkpoint") -> None:
    """A run needs a model named: nothing falls back silently to a test model."""
    if not model.checkpoint:
        raise UserError(
            f"{key} is not set: name the model, e.g. {key}=builtin:toy (the built-in toy model, to try the "
            "toolkit), a .safetensors/.ckpt checkpoint, or a diffusers folder"
        )


# --------------------------------------------------------------------------------------------------
# Tables shared by the scripts


@dataclass(frozen=True)
class Table:
    """A config table. Its declared ranges hold for every instance, however it was made (a preset, or code)."""

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            _check_value(spec, value, value, spec.name, type(self).__name__)


@dataclass(frozen=True)
class ModelConfig(Table):
    """[model]: the checkpoint to train on (or render with)."""

    # A single-file checkpoint (.safetensors / .ckpt) as A1111 uses, or a diffusers folder; "builtin:toy" is
    # the toy model built into the project (a try-out that learns on a CPU). Required: no default.
    checkpoint: str = ""
    vae: str = ""  # optional separate VAE file, as A1111's "SD VAE" setting
    family: Literal["auto", "sd1", "sd2", "sd2-v"] = "auto"  # override only for files detection gets wrong
    config_dir: str = ""  # optional diffusers-format config folder overriding the built-in configs


@dataclass(frozen=True)
class SamplingConfig(Table):
    """[preview] and friends: how images are rendered (A1111's txt2img settings)."""

    prompt: str = ""  # "" = a prompt drawn from the training template, as A1111 does
    negative_prompt: str = ""
    seed: int = at_least(-1, 12345678)  # -1 = a new random seed each time
    steps: int = at_least(1, 20)
    cfg_scale: float = at_least(0, 7.0)
    sampler: str = "DPM++ 2M Karras"
    width: int = image_side(0, zero="the training resolution")
    height: int = image_side(0, zero="the training resolution")
    batch_size: int = at_least(1, 1)


# --------------------------------------------------------------------------------------------------
# train_textual_inversion.py


@dataclass(frozen=True)
class EmbeddingConfig(Table):
    """[embedding]: the new word being learned."""

    name: str = ""  # trigger word = file stem of the saved embedding, e.g. "fr3nchl4dy"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name:
            check_name(self.name, "embedding.name")

    init_text: str = "*"  # word(s) whose token vectors start the embedding ("" = zeros)
    num_vectors: int = field(
        default=1, metadata={"test": lambda v: 1 <= v <= 75, "problem": "must be 1 to 75 (a prompt chunk)"}
    )
    init_rule: Literal["a1111", "kohya"] = "a1111"  # how init tokens fill the vectors (FACTS §2)
    init_from: str = ""  # start from an existing embedding file instead of init_text


@dataclass(frozen=True)
class DatasetConfig(Table):
    """[dataset]: where the images and captions come from (FACTS §3)."""

    image_dir: str = ""  # a Kohya parent folder (`100_name class/`) or a flat folder of images
    dataset_config: str = ""  # a Kohya dataset TOML; when set, folder names are not parsed
    resolution: int | tuple[int, int] = 512  # square side, or [width, height]; multiples of 8
    caption_extension: str = ".txt"
    template: str = "subject_filewords"  # stock template name, a file path, or an inline "...[name]..." line
    shuffle_tags: bool = False
    keep_tokens: int = at_least(0, 0)  # tags kept in place at the front when shuffling / dropping
    tag_dropout: float = field(
        default=0.0, metadata={"test": lambda v: 0 <= v < 1, "problem": "must be at least 0 and below 1"}
    )
    flip_aug: bool = False
    alpha_loss_weight: bool = False  # PNG alpha channel weights the loss
    latent_sampling: Literal["once", "deterministic", "random"] = "once"
    filename_word_regex: str = ""
    filename_join_string: str = " "

    def __post_init__(self) -> None:
        super().__post_init__()
        as_size(self.resolution)
        check_caption_extension(self.caption_extension, "dataset.caption_extension")


@dataclass(frozen=True)
class TrainSettings(Table):
    """[train]: the optimisation itself."""

    max_steps: int = at_least(1, 1000)  # optimizer updates
    batch_size: int = at_least(1, 1)  # per process
    gradient_accumulation_steps: int = at_least(1, 1)
    # A number, or an A1111 schedule string such as "0.05:10, 0.02:20, 0.005" (FACTS §2).
    lr: float | str = above(0, 0.005)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"  # shape for a plain number
    lr_warmup_steps: int = at_least(0, 0)
    optimizer: Literal["adamw", "adamw8bit", "lion", "prodigy"] = "adamw"
    weight_decay: float = at_least(0, 0.0)
    clip_grad_mode: Literal["off", "value", "norm"] = "off"
    clip_grad_value: float | str = above(0, 0.1)  # a number or a schedule string, like lr
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # For 8 GB cards: gradient checkpointing, and the VAE leaves the GPU once the latents are cached.
    low_memory: bool = False
    # CUDA: replay the UNet's forward and backward as CUDA graphs (captured at the first step of each batch
    # shape); same results, far fewer kernel launches. Off with low_memory or gradient checkpointing.
    cuda_graphs: bool = True
    compile: bool = (
        False  # torch.compile the UNet (with cuda_graphs: mode "reduce-overhead"); slow first step
    )
    noise_offset: float = at_least(0, 0.0)
    min_snr_gamma: float = at_least(0, 0.0)  # 0 = off; 5 is the usual value
    seed: int = at_least(0, 42)

    def __post_init__(self) -> None:
        super().__post_init__()
        from library.schedules import build_schedule  # a leaf module: no import cost, no circle

        # Schedule strings are read now, so a typo fails before the model loads.
        build_schedule(self.lr, self.max_steps, self.lr_scheduler, self.lr_warmup_steps, what="train.lr")
        if self.clip_grad_mode != "off":
            build_schedule(self.clip_grad_value, self.max_steps, what="train.clip_grad_value")


@dataclass(frozen=True)
class SaveConfig(Table):
    """[save]: what is written, where, and how often."""

    output_dir: str = "output"
    save_every_steps: int = at_least(0, 500)  # 0 = only the final embedding
    # .pt (A1111's own format), .safetensors (Kohya's), .png / .webp (A1111's image embeddings)
    formats: tuple[Literal["pt", "safetensors", "png", "webp"], ...] = ("pt", "safetensors")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.formats:
            raise UserError(
                "save.formats is empty: list at least one, e.g. save.formats=['pt', 'safetensors']"
            )
        if not self.output_dir.strip():
            raise UserError("save.output_dir is empty: name the run folder, e.g. save.output_dir=output/face")

    save_optimizer_state: bool = True
    embed_in_png: bool = False  # also write A1111 PNG embeddings beside the previews


@dataclass(frozen=True)
class PreviewConfig(SamplingConfig):
    """[preview]: images rendered during training with the current vectors."""

    every_steps: int = at_least(0, 0)  # 0 = no previews
    # Kohya's --sample_prompts: a text file, one prompt per line with its own options
    # (`... --n negative --w 512 --h 512 --d seed --s steps --l cfg --ss sampler`); "" = the prompt above
    prompts_file: str = ""


@dataclass(frozen=True)
class TrainConfig(Table):
    """The whole configuration of train_textual_inversion.py."""

    model: ModelConfig = field(default_factory=ModelConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    save: SaveConfig = field(default_factory=SaveConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)


# --------------------------------------------------------------------------------------------------
# Loading, overriding, dumping


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Read a TOML preset or run record (optional) and dotted `table.key=value` overrides into a frozen `cls`."""
    raw: dict = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(
                f"{path}: config file not found; check the path (presets live in presets/)"
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            reason = " ".join(str(exc).split())
            raise UserError(f"{path}: not valid TOML ({reason}); fix the syntax at that line") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot read the config file ({exc.strerror})") from None
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(cls, raw, source)


def config_from_dict(cls: type, raw: dict, source: str) -> Any:
    """A frozen `cls` from parsed TOML tables (a record of an older format is upgraded first)."""
    raw = dict(raw)
    version = raw.pop("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{source}: format_version = {version!r} is not a format number; remove the line")
    if version > CONFIG_FORMAT:
        raise UserError(
            f"{source}: written by a newer version of the toolkit (format_version {version}); this one reads "
            f"formats up to {CONFIG_FORMAT}: update the toolkit"
        )
    for older in range(version, CONFIG_FORMAT):
        raw = _UPGRADES[older](raw)
    return _build(cls, raw, prefix="", source=source)


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {item!r}: write it as table.key=value, e.g. train.lr=0.002")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words are strings: model.checkpoint=/path/to/file.safetensors
    *tables, leaf = key.strip().split(".")
    node = raw
    for table in tables:
        node = node.setdefault(table, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {table!r} is not a table")
    node[leaf] = value


def _build(cls: type, raw: dict, prefix: str, source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise UserError(f"{source}: unknown key '{prefix}{key}'{_suggest(key, fields)}")
    values = {}
    for name, value in raw.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise UserError(f"{source}: '{prefix}{name}' must be a table [{prefix}{name}]")
            values[name] = _build(kind, value, f"{prefix}{name}.", source)
            continue
        values[name] = _coerce(value, kind, f"{prefix}{name}", source)
        _check_value(fields[name], values[name], value, f"{prefix}{name}", source)
    try:
        return cls(**values)
    except UserError as error:  # a check across keys (e.g. a schedule string against max_steps)
        raise UserError(f"{source}: {error}") from None


def _check_value(spec: dataclasses.Field, value: Any, written: Any, key: str, source: str) -> None:
    """The field's declared range (`at_least`, `above`, ...); no number may be nan or inf."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{source}: '{key}' = {written!r} must be a finite number")
    test = spec.metadata.get("test")
    if test is not None and not test(value):
        raise UserError(f"{source}: '{key}' = {written!r} {spec.metadata['problem']}")


def _suggest(key: str, fields: dict) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys here: {', '.join(fields)}"


def _coerce(value: Any, kind: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise UserError(
                f"{source}: '{key}' = {value!r} is not allowed{hint} Choose one of: {', '.join(allowed)}"
            )
        return value
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(kind):
            try:
                return _coerce(value, option, key, source)
            except UserError:
                continue
        raise UserError(f"{source}: '{key}' = {value!r} has the wrong type; expected {_type_name(kind)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value]
        (inner, _) = typing.get_args(kind)
        return tuple(_coerce(v, inner, key, source) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise UserError(f"{source}: '{key}' = {value!r} must be true or false")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{source}: '{key}' = {value!r} has the wrong type; expected {_type_name(kind)}")
    return value


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(k) for k in typing.get_args(kind))
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def config_to_dict(config: Any) -> dict:
    """The config as plain TOML-ready tables (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {
        f.name: (config_to_dict(v) if dataclasses.is_dataclass(v := getattr(config, f.name)) else plain(v))
        for f in dataclasses.fields(config)
    }


def dump_config(config: Any) -> str:
    """The resolved config as TOML text with its `format_version`, loadable again by `load_config`."""
    return tomli_w.dumps({"format_version": CONFIG_FORMAT, **config_to_dict(config)})


# --------------------------------------------------------------------------------------------------
# sweep_validate.py


@dataclass(frozen=True)
class SweepRunConfig(Table):
    """[run]: the training run whose saved steps are compared."""

    folder: str = ""  # run folder holding embeddings/NAME-N.pt|.safetensors (and config.toml, loss.csv)
    name: str = (
        ""  # trigger word; "" = embedding.name of the run's config.toml, or the one NAME in embeddings/
    )


@dataclass(frozen=True)
class SweepModelConfig(Table):
    """[model]: the checkpoints to render on; they are loaded one at a time."""

    # Checkpoint files or diffusers folders; "run:checkpoint" = the one the run was trained on (its config.toml).
    checkpoints: tuple[str, ...] = ("run:checkpoint",)
    vae: str = ""  # optional separate VAE for every checkpoint
    family: Literal["auto", "sd1", "sd2", "sd2-v"] = "auto"
    config_dir: str = ""


@dataclass(frozen=True)
class SweepAxis(Table):
    """[x], [y], [z]: one axis of A1111's X/Y/Z plot (X = columns, Y = rows, Z = grids side by side)."""

    type: Literal[
        "none", "prompt_sr", "step", "checkpoint", "cfg_scale", "seed", "sampler", "steps", "size"
    ] = "none"
    # Comma-separated as in A1111 (CSV quotes allowed), a single number, or a TOML list (one value per item).
    # Steps: "every 20" = every saved step divisible by 20, "20-140 (+20)" ranges; a checkpoint axis with no
    # values takes model.checkpoints.
    values: str | int | float | tuple[str | int | float, ...] = ""


@dataclass(frozen=True)
class SweepSettings(Table):
    """[sweep]: where the sweep writes and how it renders."""

    output_dir: str = ""  # "" = <run folder>/validation
    grid_margin: int = at_least(0, 16)  # blank pixels between grid cells
    images_per_batch: int = at_least(
        1, 16
    )  # images per UNet call; all cells of one checkpoint are batched together
    mixed_precision: Literal["no", "fp16", "bf16"] = (
        "fp16"  # on CUDA (the VAE decodes in fp32 under fp16); CPU renders fp32
    )


@dataclass(frozen=True)
class FineConfig(Table):
    """[fine]: coarse-to-fine, a second pass every few steps over one interval of the coarse sweep."""

    interval: str = ""  # "" = off; "40-80" = saved steps 40..80; "auto" = the interval the scores point to
    every: int = at_least(1, 5)  # render every 5th step inside the interval
    coarse: bool = True  # false = skip the coarse pass (you looked at it already; needs an explicit interval)


@dataclass(frozen=True)
class ScoringConfig(Table):
    """[scoring]: CLIP scores that back the choice of a step (off when `model` is empty)."""

    # A local CLIP folder (transformers layout) or its weights file, never downloaded; "builtin:toy" = the
    # toy world's scorer (for runs on the builtin:toy model).
    model: str = ""
    reference_dir: str = ""  # the training images; "" = the run's dataset from its config.toml
    class_word: str = "person"  # replaces the trigger word when prompt adherence is measured
    # An image passes when its likeness to the training images reaches this fraction of the training images'
    # likeness to each other (1.0 = as alike as the training photos are among themselves).
    likeness_bar: float = 0.8
    collapse_ratio: float = at_least(
        0, 0.5
    )  # flag "one look" when seed variety falls below this share of step 1's
    adherence_drop: float = at_least(
        0, 0.1
    )  # flag when adherence falls this fraction below the best earlier step's


@dataclass(frozen=True)
class ExportConfig(Table):
    """[export]: where --export STEP writes NAME.pt / NAME.safetensors (e.g. A1111's embeddings/ folder)."""

    folder: str = ""
    formats: tuple[Literal["pt", "safetensors", "png", "webp"], ...] = ("pt", "safetensors")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.formats:
            raise UserError(
                "export.formats is empty: list at least one, e.g. export.formats=['pt', 'safetensors']"
            )


@dataclass(frozen=True)
class SweepConfig(Table):
    """The whole configuration of sweep_validate.py."""

    run: SweepRunConfig = field(default_factory=SweepRunConfig)
    model: SweepModelConfig = field(default_factory=SweepModelConfig)
    render: SamplingConfig = field(
        default_factory=SamplingConfig
    )  # prompt, seed, batch_size = images per cell
    x: SweepAxis = field(default_factory=SweepAxis)
    y: SweepAxis = field(default_factory=SweepAxis)
    z: SweepAxis = field(default_factory=SweepAxis)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    fine: FineConfig = field(default_factory=FineConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --------------------------------------------------------------------------------------------------
# generate_dataset.py


@dataclass(frozen=True)
class GenerateSettings(Table):
    """[generate]: txt2img as A1111 does it, with any number of Prompt S/R axes (FACTS §4)."""

    # A1111 syntax: (word:1.2), [word], BREAK, prompts over 75 tokens, embeddings by file stem.
    prompt: str = ""
    negative_prompt: str = ""
    # Prompt S/R axes: each a comma-separated list (CSV quotes allowed) whose first value occurs in the prompt
    # or the negative prompt. Axis 1 = grid columns (X), 2 = rows (Y), 3 = grids side by side (Z); further
    # axes give one overview per combination of their values. Every combination gets all the images.
    axes: tuple[str, ...] = ()
    batch_count: int = at_least(1, 1)  # batches per axis combination
    batch_size: int = at_least(1, 1)  # images denoised together on the GPU; lower it if memory runs out
    seed: int = at_least(
        -1, -1
    )  # -1 = random, drawn once and recorded; image i of every combination uses seed + i
    steps: int = at_least(1, 20)
    cfg_scale: float = at_least(0, 7.0)
    sampler: str = "DPM++ 2M Karras"
    width: int = image_side(512)
    height: int = image_side(512)
    clip_skip: int = at_least(1, 1)
    embeddings: tuple[str, ...] = ()  # embedding files or folders (A1111's embeddings/); keyword = file stem
    # On CUDA: fp16 runs the UNet and text encoder in fp16 and decodes in fp32 (SD's VAE overflows in fp16);
    # bf16 runs everything in bf16. The CPU always renders in fp32.
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    output_dir: str = "output/generated"
    grids: bool = True  # a grid per axis combination, and the X/Y/Z overview of the first seed
    grid_margin: int = at_least(0, 0)  # blank pixels between grid cells


@dataclass(frozen=True)
class PhotosConfig(Table):
    """[photos]: real photos → square head-and-shoulders crops, resized; optional flips and captions."""

    input_dir: str = ""
    output_dir: str = ""
    size: int = image_side(512)  # side of the square output images
    # Side of the crop as a multiple of the detected face's side: 2.5 takes in the hair, neck and shoulders.
    face_scale: float = at_least(1, 2.5)
    face_offset: float = 0.15  # crop centre sits this many face heights below the face centre (shoulders)
    flip: bool = False  # also write mirrored copies (A1111 never flips at train time)
    # "" = keep an existing <stem>.txt caption; else a template where [filewords] is that caption (or the
    # file name without leading numbers, as A1111 reads it), e.g. "a photo of a woman, [filewords]".
    caption: str = ""
    caption_extension: str = ".txt"


@dataclass(frozen=True)
class PickConfig(Table):
    """[pick]: automatic flags shown on the review page with their reasons; nothing is ever deleted."""

    faces: bool = True  # flag images with no face or several faces (OpenCV's Haar cascades)
    # Flag an image whose 64-bit perceptual hash is at most this many bits from an earlier one's; -1 = off.
    duplicate_distance: int = between(-1, 64, 5)
    # Sharpness in % (the share of edge steepness a 1-pixel blur takes away, measured at the picture's own
    # size, at most 1024 px; crisp pictures score about 50-90, clearly blurred ones under 30) below which
    # an image is flagged blurry; 0 = off.
    blur_threshold: float = between(0, 100, 40.0)
    background: str = ""  # the plain background colour asked for ("gray", "#808080"); "" = no check
    background_tolerance: float = at_least(
        0, 60.0
    )  # RGB distance from that colour still counted as background
    background_fraction: float = between(
        0, 1, 0.6
    )  # share of the image's top and side borders that must be that colour


@dataclass(frozen=True)
class SelectConfig(Table):
    """[select]: the kept images of a review, written into a Kohya folder `<repeats>_<name> <class>`."""

    output_dir: str = ""  # the Kohya parent folder; train with dataset.image_dir = this folder
    name: str = ""  # trigger word, e.g. "fr3nchl4dy"
    class_tokens: str = ""  # e.g. "woman"
    repeats: int = at_least(1, 100)
    # [name], [class], and [filewords] = the image's own caption (a .txt beside it) or its Prompt S/R values.
    caption: str = "[name] [class], [filewords]"
    caption_extension: str = ".txt"


@dataclass(frozen=True)
class GenerateConfig(Table):
    """The whole configuration of generate_dataset.py (each subcommand reads its own tables)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    photos: PhotosConfig = field(default_factory=PhotosConfig)
    pick: PickConfig = field(default_factory=PickConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
