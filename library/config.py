"""Typed TOML configuration: how a preset or a run record becomes frozen dataclasses (library/tables.py,
the only place defaults live), and how they are written back.

A preset is loaded with `load_config(TrainConfig, "presets/face.toml", ["train.lr=0.002"])`:
unknown keys, wrong types and values out of range are one-line `UserError`s naming the key (and the
closest valid one), checked before anything is loaded. `dump_config` writes the fully resolved config,
with its `format_version`, beside every output (the run's record), so a run can be reproduced and later
tools can read it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
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
# Tables


@dataclass(frozen=True)
class Table:
    """A config table. Its declared ranges and choices hold for every instance, however it was made (a
    preset, or code)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if typing.get_origin(hints[spec.name]) is Literal:
                _coerce(value, hints[spec.name], spec.name, type(self).__name__)
            _check_value(spec, value, value, spec.name, type(self).__name__)


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


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
        if dataclasses.is_dataclass(inner):  # an array of tables: [[key]]
            if not all(isinstance(v, dict) for v in value):
                raise UserError(f"{source}: '{key}' must be a list of tables, each written [[{key}]]")
            return tuple(_build(inner, v, f"{key}[{i}].", source) for i, v in enumerate(value, start=1))
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
        if dataclasses.is_dataclass(value):
            return config_to_dict(value)
        return value

    # None means "not given" (taken from another table): TOML has no null, so the key is left out.
    return {
        f.name: plain(value)
        for f in dataclasses.fields(config)
        if (value := getattr(config, f.name)) is not None
    }


def dump_config(config: Any) -> str:
    """The resolved config as TOML text with its `format_version`, loadable again by `load_config`."""
    return tomli_w.dumps({"format_version": CONFIG_FORMAT, **config_to_dict(config)})
