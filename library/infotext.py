"""A1111 "infotext": the generation parameters stored in a PNG's `parameters` text chunk.

Layout, as A1111 writes it (the negative-prompt line is left out when the negative prompt is empty):

    <prompt, may span lines>
    Negative prompt: <negative, may span lines>
    Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 4240233169, Size: 512x512, Model hash: ..., Model: ...

A value containing a comma, a colon or a newline is written as a JSON string ("a, b" -> "\\"a, b\\"").
Deliberate difference: we also quote values that contain a double quote, so that a value such as
`"x"` reads back as itself; A1111 reads our quoted form correctly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

from library.files import atomic_write

if TYPE_CHECKING:
    from library.tables import SamplerSettings

NEGATIVE_PREFIX = "Negative prompt:"

# One "Key: value" entry of the parameter line. A key starts with a word character and goes on with
# word characters, spaces, '-' and '/'; a value is either a JSON string or everything up to the next
# comma. A1111 reads the last line as parameters only when it holds at least three such entries.
_ENTRY = re.compile(
    r"""
    \s* (?P<key> \w [\w\ \-/]+ ) : \s*
    (?P<value> " (?: \\. | [^\\"] )+ " | [^,]* )
    (?: , | $ )
    """,
    re.VERBOSE,
)
_MIN_ENTRIES = 3


def quote(value: Any) -> str:
    """One parameter value as text, JSON-quoted when it holds a character the line format uses."""
    text = str(value)
    if any(ch in text for ch in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """Undo `quote`; text that is not a valid JSON string is kept as it is (A1111 does the same)."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, str) else text
    return text


def format_infotext(prompt: str, negative: str, params: Mapping[str, Any]) -> str:
    """The infotext A1111 would write for these prompts and parameters (None values are left out)."""
    line = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    negative_line = f"\n{NEGATIVE_PREFIX} {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{line}".strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Split an infotext into (prompt, negative prompt, parameters), by A1111's reading rules.

    Parameter values come back as unquoted strings under their own keys ("Size": "512x512"); A1111's
    UI-only defaults for missing keys are not added. Lines are stripped, as A1111 strips them.
    """
    *lines, last = text.strip().split("\n")
    entries = [(m.group("key"), m.group("value")) for m in _ENTRY.finditer(last)]
    if len(entries) < _MIN_ENTRIES:
        lines.append(last)
        entries = []

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX) and not negative_lines:
            negative_lines.append(line[len(NEGATIVE_PREFIX) :].strip())
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)

    params = {key: unquote(value) for key, value in entries}
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


def _plain_number(value: float) -> int | float:
    # A1111's UI hands over whole numbers as ints: "CFG scale: 7", but "CFG scale: 7.5".
    return int(value) if float(value).is_integer() else float(value)


def _model_info(model: Any) -> tuple[str, str]:
    """(name, short hash) from an SDParts-like object or a mapping with the same keys."""
    if isinstance(model, Mapping):
        return str(model.get("checkpoint_name", "")), str(model.get("checkpoint_hash", ""))
    return str(getattr(model, "checkpoint_name", "")), str(getattr(model, "checkpoint_hash", ""))


def infotext_params(
    settings: SamplerSettings,
    seed: int,
    parts_or_model_info: Any,
    extra: Mapping[str, Any] | None = None,
    *,
    clip_skip: int = 0,
) -> dict[str, Any]:
    """The ordered parameters A1111 writes for one image, ready for `format_infotext`.

    `parts_or_model_info` is an SDParts or a mapping with `checkpoint_name` and `checkpoint_hash`;
    an empty name or hash is left out. "RNG: CPU" is included because our noise is drawn the way
    A1111's CPU RNG draws it, so pasting the infotext into A1111 reproduces the initial noise.
    `extra` entries (e.g. "TI hashes") follow, as A1111's extra generation parameters do. A `clip_skip`
    above 1 is written as A1111's "Clip skip" (1, the last layer, is A1111's default and left out).
    """
    name, short_hash = _model_info(parts_or_model_info)
    params: dict[str, Any] = {
        "Steps": settings.steps,
        "Sampler": settings.sampler,
        "CFG scale": _plain_number(settings.cfg_scale),
        "Seed": int(seed),
        "Size": f"{settings.width}x{settings.height}",
        "Model hash": short_hash or None,
        "Model": name or None,
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "RNG": "CPU",
    }
    params.update(extra or {})
    return {key: value for key, value in params.items() if value is not None}


def save_png(image: Image.Image, path: str | os.PathLike, infotext: str, *, overwrite: bool = False) -> Path:
    """Write `image` as a PNG whose tEXt chunk `parameters` holds `infotext`; atomic.

    Refuses to replace an existing file unless `overwrite=True`.
    """
    info = PngImagePlugin.PngInfo()
    # A1111 writes the chunk as iTXt when the text is not Latin-1 (PIL picks it for us).
    info.add_text("parameters", infotext)
    return atomic_write(path, lambda temp: image.save(temp, format="PNG", pnginfo=info), overwrite=overwrite)
