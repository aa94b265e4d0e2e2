"""Captions and prompt templates, following A1111 and Kohya (FACTS §3).

A caption is the first line of `<image stem><caption_extension>`; without that file it falls back to the
class tokens of a Kohya folder or, A1111 style, to the file stem. A template turns a caption into a prompt:
`[name]` becomes the embedding's keyword and `[filewords]` the caption.

How a `template` setting is read, in this order:
  1. a stock name: `subject`, `subject_filewords`, `style`, `style_filewords`, `none`; written with
     ".txt" (`style.txt`) it means a file of that name if one exists, else the stock file;
  2. an existing file, or any value ending in ".txt" (a missing one is an error): one prompt per line;
  3. a value containing `[name]` or `[filewords]` is an inline template; several prompts may be
     separated by newlines (a TOML multi-line string);
  4. anything else is an error.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from library.errors import UserError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
STOCK_TEMPLATES = ("subject", "subject_filewords", "style", "style_filewords", "none")

# A1111 strips leading numbers and dashes from file stems ("00012-sks woman" -> "sks woman").
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")


def read_text_file(path: Path) -> str:
    """Read a UTF-8 text file (a BOM, as Windows Notepad writes, is dropped); UserError on bad encoding."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not valid UTF-8 ({error.reason}); save it with UTF-8 encoding") from error
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from error


def read_caption(image_path: Path, caption_extension: str) -> str | None:
    """The first line of the image's caption file, stripped; None when there is no caption file."""
    caption_path = image_path.with_name(image_path.stem + caption_extension)
    if not caption_path.is_file():
        return None
    lines = read_text_file(caption_path).splitlines()
    return lines[0].strip() if lines else ""


def _check_attention(text: str, where: str) -> None:
    # Imported here: prompts.py loads torch, and config.py (read before any model) imports this module.
    from library.prompts import check_attention

    check_attention(text, where)


def caption_from_stem(stem: str, word_regex: str = "", join_string: str = " ") -> str:
    """A1111's fallback caption: the stem without leading `^[-\\d]+\\s*`, optionally re-joined words.

    With `word_regex`, the caption is every match of the regex joined by `join_string` (A1111's
    "Filename word regex" and "Filename join string" settings).
    """
    text = _LEADING_NUMBERS.sub("", stem)
    if not word_regex:
        return text
    try:
        pattern = re.compile(word_regex)
    except re.error as error:
        raise UserError(
            f"filename_word_regex {word_regex!r} is not a valid regular expression: {error}"
        ) from error
    return join_string.join(pattern.findall(text))


def check_caption_extension(extension: str, key: str = "caption_extension") -> str:
    """Caption extensions are suffixes such as ".txt" or ".caption"; a missing dot is an easy mistake."""
    if not extension.startswith(".") or len(extension) < 2:
        raise UserError(f"{key} {extension!r} must start with a dot, e.g. '.txt' or '.caption'")
    return extension


def load_template(spec: str) -> list[str]:
    """Resolve a template setting (stock name, file or inline text; see the module docstring) to prompts."""
    if not spec.strip():
        raise UserError(f"template is empty; use a stock name ({', '.join(STOCK_TEMPLATES)}), a file or text")
    stock_name = spec.removesuffix(".txt")
    if spec in STOCK_TEMPLATES or (stock_name in STOCK_TEMPLATES and not Path(spec).is_file()):
        return _template_lines(read_text_file(TEMPLATE_DIR / f"{stock_name}.txt"), spec)
    path = Path(spec).expanduser()
    if spec.endswith(".txt") or path.is_file():
        if not path.is_file():
            raise UserError(f"template file {path} not found; stock templates: {', '.join(STOCK_TEMPLATES)}")
        return _template_lines(read_text_file(path), str(path))
    if "[name]" in spec or "[filewords]" in spec:
        return _template_lines(spec, "dataset.template")
    raise UserError(
        f"template {spec!r} is not a stock template ({', '.join(STOCK_TEMPLATES)}), an existing file, "
        "or an inline template containing [name] or [filewords]"
    )


def _template_lines(text: str, where: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{where} has no prompt lines; write one prompt per line")
    for line in lines:
        _check_attention(line, where)
    return lines


def process_tags(caption: str, rng: random.Random, *, shuffle: bool, keep_tokens: int, dropout: float) -> str:
    """Kohya-style tag handling: split on ",", keep the first `keep_tokens` tags in place, drop each other
    tag with probability `dropout`, shuffle the rest, join with ", ". Untouched when neither is on."""
    if not shuffle and dropout <= 0:
        return caption
    tags = [tag.strip() for tag in caption.split(",")]
    tags = [tag for tag in tags if tag]
    kept, free = tags[:keep_tokens], tags[keep_tokens:]
    if dropout > 0:
        free = [tag for tag in free if rng.random() >= dropout]
    if shuffle:
        rng.shuffle(free)
    return ", ".join(kept + free)


def fill_template(line: str, name: str, caption: str) -> str:
    """Substitute `[name]` and `[filewords]` in one template line, as A1111 does."""
    return line.replace("[filewords]", caption).replace("[name]", name)
