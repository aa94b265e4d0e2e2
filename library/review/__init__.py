"""The static review page and what comes out of it: a selection, then a Kohya folder (recipe step 2).

`write_review_page` writes one self-contained `review.html` beside the images (its CSS, script and data
inline; the pictures are read from the folder next to it, so it works from `file://` without a server).
On the page each picture shows its automatic flags; a click or a key keeps or drops it, and "Export
selection" downloads `selection.json`:

    {"format": "ti-toolkit-selection", "version": 1, "folder": "/abs/path",
     "keep": ["00012-123.png", ...], "drop": [...], "undecided": [...]}

A selection.json is a downloaded file that can be edited or shared, so `read_selection` trusts nothing
in it: it may only name pictures of its own review folder, the folder whose flags.json (written with the
page by `pick` and `generate`) lists them, each a regular file directly inside it.

`write_kohya_folder` copies the kept pictures, each with a caption file, into `<repeats>_<name> <class>`
under select.output_dir, refusing to replace any file that is already there.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from library.captions import check_caption_extension, read_caption
from library.errors import UserError
from library.files import atomic_write, copy_file
from library.tables import SelectConfig

FLAGS_FILE = "flags.json"  # written by `pick` and `generate` beside the images: what the page shows

PAGE_FILE = "review.html"
SELECTION_FORMAT = "ti-toolkit-selection"
_HERE = Path(__file__).resolve().parent
_MANIFEST = "manifest.json"  # written by library.generation


# --------------------------------------------------------------------------------------------------
# The page


def review_items(folder: Path, flags: list) -> list[dict]:
    """One entry per flagged-or-not image for the page: file, reasons, and what is known about it
    (prompt, seed and axis values from a generation manifest; the caption beside the image)."""
    manifest = _manifest_entries(folder)
    items = []
    for result in flags:
        item = {"file": result.file, "reasons": list(result.reasons), **manifest.get(result.file, {})}
        caption_file = _caption_file(folder / result.file, ".txt")
        caption = read_caption(folder / result.file, ".txt") if _is_regular_file(caption_file) else None
        if caption:
            item["caption"] = caption
        items.append(item)
    return items


# What the page and the captions take from a manifest entry, and its type (axis_values: a list of text).
_MANIFEST_DETAILS = {"prompt": str, "seed": int, "axis_values": list}


def _manifest_entries(folder: Path) -> dict[str, dict]:
    """file -> {prompt, seed, axis_values} from the folder's manifest.json, keeping only well-typed values
    (the manifest may come from someone else; a damaged one only costs the page its prompt details)."""
    path = folder / _MANIFEST
    if not _is_regular_file(path):
        return {}
    try:
        images = json.loads(path.read_text(encoding="utf-8")).get("images", [])
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return {}
    entries = {}
    for entry in images if isinstance(images, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            entries[entry["file"]] = {
                key: entry[key] for key, kind in _MANIFEST_DETAILS.items() if _is_a(entry.get(key), kind)
            }
    return entries


def _is_a(value, kind: type) -> bool:
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind) and not isinstance(value, bool)


def _is_regular_file(path: Path) -> bool:
    """A regular file itself, not a symbolic link to one (links may point anywhere on the machine)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _caption_file(image: Path, extension: str) -> Path:
    return image.with_name(image.stem + extension)


def _caption(image: Path, extension: str) -> str | None:
    """The picture's caption, read only from a regular file beside it (a link is refused: it could
    carry the first line of any file on the machine into the dataset)."""
    path = _caption_file(image, extension)
    if os.path.lexists(path) and not _is_regular_file(path):
        raise UserError(
            f"{path}: the caption is a symbolic link or not a file; put the caption text itself there"
        )
    return read_caption(image, extension)


def write_review_page(folder: str | Path, items: list[dict], title: str | None = None) -> Path:
    """Write `folder/review.html` for `items` (dicts with at least "file" and "reasons"); returns its path.

    The page is regenerated on every call (it holds no decisions: those live in the browser).
    """
    folder = Path(folder).resolve()
    data = {
        "folder": str(folder),
        "images": items,
        "select_command": (
            f"python generate_dataset.py select selection.json select.output_dir=dataset "
            f'select.name=NAME select.class_tokens=CLASS  (images: "{folder}")'
        ),
    }
    # "</" inside the JSON would end the <script> element early; \u003c is the same character to JSON.
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    title = title or f"Review: {folder.name}"
    parts = {
        "TITLE": _html_escape(title),
        "CSS": (_HERE / "review.css").read_text(encoding="utf-8"),
        "JS": (_HERE / "review.js").read_text(encoding="utf-8"),
        "DATA": payload,
    }
    # One pass: text put into the page (a folder named "{{JS}}") is never searched for placeholders again.
    template = (_HERE / "review.html").read_text(encoding="utf-8")
    page = re.sub(r"\{\{(TITLE|CSS|JS|DATA)\}\}", lambda match: parts[match[1]], template)
    return atomic_write(folder / PAGE_FILE, page)


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# --------------------------------------------------------------------------------------------------
# The selection


@dataclass(frozen=True)
class Selection:
    """The kept pictures of a review and the folder they are in."""

    folder: Path
    keep: tuple[str, ...]


def read_selection(path: str | Path, images_dir: str | Path | None = None) -> Selection:
    """Read an exported selection.json; `images_dir` overrides the folder recorded in it (moved images).

    The folder must be a review folder (it holds the flags.json written with its review page), and every
    kept name must be a plain file name that the review listed and a regular file in that folder (not a
    symbolic link). Anything else is a UserError naming selection.json; nothing is copied.
    """
    path = Path(path)
    data = _read_selection_file(path)
    keep = data.get("keep")
    if not isinstance(keep, list) or not all(isinstance(name, str) for name in keep):
        raise UserError(f"{path}: 'keep' must be a list of file names; export the selection again")
    recorded = data.get("folder")
    if images_dir is None and not isinstance(recorded, str):
        raise UserError(f"{path}: 'folder' must be the review folder's path; export the selection again")
    folder = Path(images_dir if images_dir is not None else recorded)
    if not folder.is_dir():
        raise UserError(
            f"{path}: the image folder {folder} does not exist; pass the folder the images are in now"
        )
    if not keep:
        raise UserError(f"{path}: no picture is marked keep; keep some on the review page and export again")
    reviewed = _reviewed_files(path, folder)
    for name in keep:
        _check_kept(path, folder, name, reviewed)
    if len(set(keep)) != len(keep):
        raise UserError(f"{path}: a picture is kept twice; export the selection again from review.html")
    return Selection(folder=folder, keep=tuple(keep))


def _read_selection_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; export the selection from review.html first") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; give the selection.json exported from review.html") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a valid selection file ({error}); export it again") from None
    if not isinstance(data, dict) or data.get("format") != SELECTION_FORMAT:
        raise UserError(f"{path}: not a selection exported from review.html (format {SELECTION_FORMAT!r})")
    return data


def _reviewed_files(path: Path, folder: Path) -> set[str]:
    """The file names the folder's review page listed, from the flags.json written with it."""
    flags = folder / FLAGS_FILE
    if not _is_regular_file(flags):
        raise UserError(
            f"{path}: {folder} is not a review folder (it has no {FLAGS_FILE} from generate_dataset.py "
            "pick); a selection copies only pictures of the folder whose review.html exported it"
        )
    try:
        images = json.loads(flags.read_text(encoding="utf-8"))["images"]
        return {entry["file"] for entry in images if isinstance(entry["file"], str)}
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(
            f"{path}: {flags} is damaged; run `python generate_dataset.py pick {folder}` and export again"
        ) from None


def _check_kept(path: Path, folder: Path, name: str, reviewed: set[str]) -> None:
    """One kept name: a plain name the review listed, a regular file directly inside the folder."""
    if Path(name).name != name or name in ("", ".", "..") or "\0" in name:
        raise UserError(
            f"{path}: {name!r} is not a plain file name; a selection may only name pictures of its review "
            "folder (export it again from review.html)"
        )
    if name not in reviewed:
        raise UserError(
            f"{path}: {name!r} was not on the review page of {folder}; export the selection again from "
            "that folder's review.html"
        )
    file = folder / name
    if not os.path.lexists(file):
        raise UserError(f"{path}: kept picture {name} is not in {folder}; pass the folder it is in now")
    if not _is_regular_file(file):
        raise UserError(
            f"{path}: kept picture {name} in {folder} is a symbolic link or not a file; only regular files "
            "are copied (put the picture itself in the folder)"
        )


def _tidy(caption: str) -> str:
    """Join-friendly captions: no empty tags, no doubled spaces, no leading or trailing commas."""
    tags = [" ".join(tag.split()) for tag in caption.split(",")]
    return ", ".join(tag for tag in tags if tag)


def caption_for(image: Path, cfg: SelectConfig, axis_values: list[str] | None) -> str:
    """select.caption with [name], [class] and [filewords] (the picture's own caption, else its Prompt S/R
    values) filled in."""
    own = _caption(image, ".txt")
    if own is None and cfg.caption_extension != ".txt":
        own = _caption(image, cfg.caption_extension)
    filewords = own if own is not None else ", ".join(v for v in axis_values or [] if v)
    text = cfg.caption.replace("[name]", cfg.name).replace("[class]", cfg.class_tokens)
    return _tidy(text.replace("[filewords]", filewords))


def kohya_folder_name(cfg: SelectConfig) -> str:
    """`<repeats>_<name> <class>`, as Kohya reads it (FACTS §3)."""
    return f"{cfg.repeats}_{cfg.name} {cfg.class_tokens}".strip()


def check_select_config(cfg: SelectConfig) -> None:
    if not cfg.output_dir:
        raise UserError(
            "select.output_dir is empty; name the Kohya parent folder, e.g. select.output_dir=dataset"
        )
    if not cfg.name.strip():
        raise UserError("select.name is empty; set the trigger word, e.g. select.name=fr3nchl4dy")
    if re.search(r"[/\\]", cfg.name + cfg.class_tokens):
        raise UserError("select.name and select.class_tokens go into a folder name: leave out / and \\")
    if cfg.repeats < 1:
        raise UserError(f"select.repeats = {cfg.repeats}: must be at least 1 (Kohya's 100 is usual)")
    check_caption_extension(cfg.caption_extension, "select.caption_extension")


def write_kohya_folder(selection: Selection, cfg: SelectConfig, log: Callable[[str], None] = print) -> Path:
    """Copy the kept pictures with captions into `output_dir/<repeats>_<name> <class>/`; never overwrites.

    Every target is checked before the first file is written, so a clash writes nothing.
    """
    check_select_config(cfg)
    target = Path(cfg.output_dir) / kohya_folder_name(cfg)
    manifest = _manifest_entries(selection.folder)
    plan = []
    for name in selection.keep:
        source = selection.folder / name
        if not _is_regular_file(source):  # read_selection says why in detail; this guards other callers
            raise UserError(f"{source}: not a regular file; nothing was written (links are never copied)")
        caption = caption_for(source, cfg, manifest.get(name, {}).get("axis_values"))
        plan.append((source, target / name, target / f"{source.stem}{cfg.caption_extension}", caption))
    stems = [p[2].name for p in plan]
    if len(set(stems)) != len(stems):
        raise UserError(
            "two kept pictures share a file stem (e.g. a.png and a.jpg); their captions would clash"
        )
    for _, image, caption_file, _ in plan:
        for existing in (image, caption_file):
            if existing.exists():
                raise UserError(
                    f"{existing} already exists; nothing was written (choose another select.output_dir)"
                )
    for source, image, caption_file, caption in plan:
        copy_file(source, image)  # the bytes as they are: PNG infotext and all
        atomic_write(caption_file, caption + "\n", overwrite=False)
    log(
        f"wrote {len(plan)} pictures with captions to {target} (train with dataset.image_dir={cfg.output_dir})"
    )
    return target


def run_select(selection_file: str | Path, images_dir: str | Path | None, cfg: SelectConfig) -> Path:
    """`generate_dataset.py select`: the kept pictures of an exported selection, as a Kohya folder."""
    check_select_config(cfg)
    return write_kohya_folder(read_selection(selection_file, images_dir), cfg)
